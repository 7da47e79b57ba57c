"""imagerec.audit on a generated collection with planted problems: exact and near-duplicates,
a train/test leak, a black frame, a blurred image, a grey one, an unreadable file; the run
folder, the clean manifest, the CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from imagerec import ImagerecError, audit, embed, load_images
from imagerec.audit import exact_groups, knn, near_groups, quality_issues
from imagerec.audit._duplicates import edges, group_table, leak_table
from imagerec.audit._scan import image_figures

from .conftest import run_cli

FAST = {"backbone": "efficientnet_lite0", "image_size": 96, "progress": False}


def scene(seed: int, size: int = 64) -> Image.Image:
    """A picture with structure (a gradient and a few shapes), unlike uniform noise."""
    r = np.random.default_rng(seed)
    base = np.linspace(r.integers(0, 255, 3), r.integers(0, 255, 3), size).astype(np.uint8)
    image = Image.fromarray(np.repeat(base[:, None, :], size, 1))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = r.integers(0, size, 2)
        w, h = r.integers(8, size // 2, 2)
        colour = tuple(int(c) for c in r.integers(0, 255, 3))
        (draw.ellipse if r.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
    return image


def make_collection(root):
    """A split root with planted problems; returns {name: path}."""
    seed = 0
    for split, n in (("train", 8), ("test", 3)):
        for cls in ("a", "b"):
            for i in range(n):
                path = root / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                scene(seed).save(path)
                seed += 1
    a, b = root / "train" / "a", root / "train" / "b"
    planted = {
        "exact": a / "exact_copy.png",
        "flipped": a / "flipped.png",
        "resized": a / "resized.png",
        "leak": root / "test" / "b" / "leak.png",
        "black": a / "black.png",
        "blurred": a / "blurred.png",
        "grey": a / "grey.png",
        "broken": a / "broken.jpg",
    }
    Image.open(a / "0.png").save(planted["exact"])
    ImageOps.mirror(Image.open(a / "1.png")).save(planted["flipped"])
    Image.open(a / "2.png").resize((44, 44), Image.Resampling.BICUBIC).save(planted["resized"])
    Image.open(b / "4.png").save(planted["leak"])
    Image.new("RGB", (64, 64), (0, 0, 0)).save(planted["black"])
    scene(777).filter(ImageFilter.GaussianBlur(4)).save(planted["blurred"])
    scene(778).convert("L").convert("RGB").save(planted["grey"])
    planted["broken"].write_bytes(b"not a jpeg")
    return {key: str(value) for key, value in planted.items()}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One audit of the planted collection, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("collection")
    planted = make_collection(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEREC_HOME", str(root / "home"))
        result = audit(root / "data", out=root / "run", export_manifest=root / "run" / "clean.csv", **FAST)
    return result, planted, root


def _paths(table: pd.DataFrame, column: str = "path") -> set[str]:
    return set(table[column])


def test_exact_duplicates_are_grouped_with_the_member_to_keep(audited):
    result, planted, root = audited
    table = result["exact_duplicates"]
    group = table[table["path"] == planted["exact"]]["group"].iloc[0]
    members = table[table["group"] == group]
    assert set(members["path"]) == {str(root / "data/train/a/0.png"), planted["exact"]}
    assert members[members["keep"]]["path"].tolist() == [str(root / "data/train/a/0.png")]  # the first


def test_a_flipped_copy_is_a_near_duplicate_and_different_images_are_not(audited):
    result, planted, root = audited
    table = result["near_duplicates"]
    group = table[table["path"] == planted["flipped"]]["group"].iloc[0]
    assert set(table[table["group"] == group]["path"]) == {str(root / "data/train/a/1.png"), planted["flipped"]}
    planted_or_original = {planted["exact"], planted["flipped"], planted["resized"], planted["leak"]} | {
        str(root / p) for p in ("data/train/a/0.png", "data/train/a/1.png", "data/train/a/2.png", "data/train/b/4.png")
    }
    assert _paths(table) <= planted_or_original  # no distinct picture joined a group


def test_a_resized_copy_is_confirmed_by_its_thumbnail(audited):
    """Its embedding alone is under the cosine threshold (tiny images); the thumbnails agree."""
    result, planted, root = audited
    table = result["near_duplicates"]
    group = table[table["path"] == planted["resized"]]["group"].iloc[0]
    members = table[table["group"] == group]
    assert set(members["path"]) == {str(root / "data/train/a/2.png"), planted["resized"]}
    assert members["similarity"].min() < result.summary["thresholds"]["near_duplicates"]
    assert members[members["keep"]]["path"].tolist() == [str(root / "data/train/a/2.png")]  # the larger


def test_the_test_copy_of_a_training_image_is_a_leak(audited):
    result, planted, root = audited
    leaks = result["leakage"]
    assert leaks["path"].tolist() == [planted["leak"]]
    assert leaks["train_path"].tolist() == [str(root / "data/train/b/4.png")] and leaks["exact"].all()
    # in the duplicate group, the training image is the one kept
    table = result["exact_duplicates"]
    assert table[table["path"] == planted["leak"]]["keep"].tolist() == [False]


def test_bad_images_are_found_and_clean_ones_are_not(audited):
    result, planted, root = audited
    quality = result["quality"]
    found = {(p, issue) for p, issue in zip(quality["path"], quality["issue"])}
    assert {(planted["black"], "dark"), (planted["black"], "low_information"), (planted["blurred"], "blurry"),
            (planted["grey"], "grayscale")} <= found  # fmt: skip
    assert _paths(quality) <= {planted["black"], planted["blurred"], planted["grey"]}
    assert (planted["black"], "blurry") not in found  # a blank frame is low information, not blur
    assert result["unreadable"]["path"].tolist() == [planted["broken"]]


def test_the_run_folder(audited):
    result, planted, root = audited
    run = root / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_images"] == 29 and summary["n_unreadable"] == 1
    assert summary["counts"]["exact_duplicates"] == {"groups": 2, "images": 4, "to_remove": 2}
    assert summary["counts"]["leakage"] == {"rows": 1} and summary["thresholds"]["blurry"] == 0.10
    for name in ("exact_duplicates", "near_duplicates", "leakage", "outliers", "label_issues", "quality", "unreadable"):
        assert (run / f"{name}.csv").is_file()
        pd.testing.assert_frame_equal(pd.read_parquet(run / f"{name}.parquet"), result[name], check_dtype=False)
    page = (run / "report.html").read_text()
    assert page.count("<section") == 7 and "data:image/jpeg;base64," in page and "http" not in page
    assert page.index(planted["exact"]) < page.index("Near-duplicates")  # groups shown in their section
    with Image.open(run / "sheets" / "quality.png") as sheet:
        assert sheet.size[0] >= 96


def test_the_clean_manifest_leaves_out_the_flagged_and_train_reads_it(audited):
    result, planted, root = audited
    # the module fixture wrote it under another test's imagerec home, where imagerec recorded the
    # folders it trusts; tests/test_manifest.py checks that trust, this test what the rows hold
    clean = load_images(root / "run" / "clean.csv", allow_outside=True)
    kept = set(clean.paths)
    for key in ("exact", "flipped", "resized", "leak", "black", "blurred", "grey", "broken"):
        assert planted[key] not in kept
    assert str(root / "data/train/a/0.png") in kept and clean.classes == ["a", "b"]
    flagged = set(result.images["path"][result.flagged()])
    assert kept == set(result.images["path"]) - flagged
    assert result.summary["manifest"]["rows"] == len(kept)


def test_relabel_keeps_label_issues_with_the_suggested_label(audited, tmp_path):
    from imagerec.audit import write_clean_manifest  # noqa: PLC0415

    result, planted, root = audited
    issues = result["label_issues"]
    issues_flagged = issues[issues["is_issue"]]
    if issues_flagged.empty:
        pytest.skip("no label issue in this collection")
    written, _ = write_clean_manifest(result, tmp_path / "relabelled.csv", relabel=True)
    rows = pd.read_csv(tmp_path / "relabelled.csv")
    relabelled = dict(zip(rows["path"], rows["label"]))
    first = issues_flagged.iloc[0]
    if first["path"] in relabelled:
        assert relabelled[first["path"]] == first["suggested_label"]
    assert written >= result.summary["manifest"]["rows"]


# ---------------------------------------------------------------- the parts, on hand-made cases


def test_exact_duplicate_hash_is_of_decoded_pixels():
    pixels = np.asarray(scene(1))
    assert image_figures(pixels)[0] == image_figures(pixels.copy())[0]
    other = pixels.copy()
    other[0, 0, 0] ^= 1
    assert image_figures(other)[0] != image_figures(pixels)[0]
    groups = exact_groups(pd.Series(["x", "y", "x", "", ""]))
    assert groups[0] == groups[2] >= 0 and groups[1] == -1 and (groups[3:] == -1).all()


def test_near_groups_are_connected_components_of_knn_edges():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x[10] = x[3] + 0.01 * rng.normal(size=16)
    x[20] = x[10] + 0.01 * rng.normal(size=16)  # 3 ~ 10 ~ 20: one group of three
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, ids, method = knn(x, 5)
    assert "exact" in method
    groups = near_groups(sims, ids, 0.95)
    assert groups[3] == groups[10] == groups[20] >= 0 and (np.delete(groups, [3, 10, 20]) == -1).all()
    split = np.array(["train"] * 50)
    split[10] = "test"
    table = group_table(groups, x, np.ones(50), split, "near")
    assert table["index"].tolist()[0] == 3 and table["keep"].tolist() == [True, False, False]
    leaks = leak_table(sims, ids, 0.95, split, np.full(50, -1))
    assert leaks["index"].tolist() == [10] and leaks["train_index"].iloc[0] in (3, 20)


def test_mutual_nearest_neighbours_that_stand_out_are_near_duplicates():
    """The rank test of ``edges``, on hand-made neighbour lists (most similar first): 0 and 1 are
    each other's nearest, at 0.90, and both images' second-nearest is at most 0.85; 2 and 3 are
    each other's nearest at 0.90 too, but 2's second-nearest is at 0.89 (a look-alike);
    4's nearest is 5, whose nearest is 0 (not mutual)."""
    ids = np.array([[1, 4], [0, 3], [3, 1], [2, 0], [5, 0], [0, 4]])
    sims = np.array([[0.90, 0.80], [0.90, 0.85], [0.90, 0.89], [0.90, 0.70], [0.93, 0.60], [0.95, 0.93]], np.float32)
    strict = {"threshold": 0.99, "thumbs": None}
    accept = edges(sims, ids, **strict, mutual=0.85, margin=0.04)
    assert accept[0, 0] and accept[1, 0]  # 0.90 - max(0.80, 0.85) = 0.05 >= 0.04
    assert not accept[2:].any()  # 2-3: margin 0.01 on 2's side; 4-5: not each other's nearest
    assert not edges(sims, ids, **strict, mutual=0.85, margin=0.06).any()  # 0.05 < 0.06
    assert not edges(sims, ids, **strict, mutual=0.95, margin=0.04).any()  # under the mutual floor
    assert not edges(sims, ids, **strict, mutual=None).any()  # no rank test: the cosine alone
    assert (edges(sims, ids, 0.90, None, mutual=None) == (sims >= 0.90)).all()


def test_ivf_search_finds_the_same_close_pairs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x[1500:1600] = x[:100] + 0.01 * rng.normal(size=(100, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, ids, method = knn(x, 3, exact=False)
    assert "IVF" in method
    assert (ids[1500:1600, 0] == np.arange(100)).mean() >= 0.95


def test_quality_thresholds_can_be_changed():
    figures = pd.DataFrame({"width": [64, 64], "height": [64, 64], "sharpness": [0.5, 0.5],
                            "brightness": [0.15, 0.5], "entropy": [6.0, 6.0], "colourfulness": [20.0, 20.0]})  # fmt: skip
    assert quality_issues(figures).empty
    dark = quality_issues(figures, {"dark": 0.2})
    assert dark["index"].tolist() == [0] and dark["issue"].tolist() == ["dark"]


# ---------------------------------------------------------------- inputs, CLI and bad input


def test_embeddings_file_as_input_reads_the_pixels_from_its_paths(tmp_path):
    for i in range(4):
        scene(i).save(tmp_path / f"{i}.png")
    scene(0).save(tmp_path / "copy.png")
    emb = embed(tmp_path, "seed_cnn", progress=False)
    emb.save(tmp_path / "e.npz")
    result = audit(tmp_path / "e.npz", checks=["exact_duplicates", "quality", "outliers"], progress=False)
    assert set(result["exact_duplicates"]["path"]) == {str(tmp_path / "0.png"), str(tmp_path / "copy.png")}
    assert "outliers" in result.tables and result.summary["not_run"] == {}


def test_pixel_checks_alone_embed_nothing(tmp_path, monkeypatch):
    import imagerec.features._cache as cache_module  # noqa: PLC0415

    monkeypatch.setattr(cache_module, "embed", lambda *a, **k: pytest.fail("embedded for pixel checks"))
    for i in range(3):
        scene(i).save(tmp_path / f"{i}.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "white.png")
    result = audit(tmp_path, checks="quality,exact_duplicates", progress=False)
    assert set(result["quality"]["path"]) == {str(tmp_path / "white.png")}


def test_cli_audit_writes_the_run_and_a_manifest(tmp_path, capsys):
    for i in range(4):
        scene(i).save(tmp_path / f"{i}.png")
    scene(0).save(tmp_path / "copy.png")
    code, out, err = run_cli(capsys, "audit", tmp_path, "--out", tmp_path / "run", "--checks", "exact_duplicates,quality",
                             "--export-manifest", tmp_path / "clean.csv", "--dark-threshold", "0.05", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "exact_duplicates: 1 groups" in out and "report.html" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["thresholds"]["dark"] == 0.05
    assert len(load_images(tmp_path / "clean.csv", labelled=False)) == 4


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "audit", tmp_path / "empty", "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "holds no images" in err
    assert not (tmp_path / "run").exists()  # checked before the run folder is made
    scene(0).save(tmp_path / "one.png")
    code, out, err = run_cli(capsys, "audit", tmp_path / "one.png", "--out", tmp_path / "run")
    assert code == 2 and "not a .csv manifest" in err
    code, out, err = run_cli(capsys, "audit", tmp_path, "--out", tmp_path / "run", "--checks", "dupes")
    assert code == 2 and "not among" in err
    code, out, err = run_cli(capsys, "audit", tmp_path, "--out", tmp_path / "run", "--near-duplicates-threshold", "1.5")
    assert code == 2 and "must be in (0, 1]" in err


def test_a_single_image_gives_a_report_that_says_what_needs_more(tmp_path):
    (tmp_path / "only").mkdir()
    scene(0).save(tmp_path / "only" / "one.png")
    result = audit(tmp_path / "only", out=tmp_path / "run", backbone="seed_cnn", progress=False)
    assert "needs at least 2 images" in result.summary["not_run"]["near_duplicates"]
    assert "needs at least 3 images" in result.summary["not_run"]["outliers"]
    assert "leakage" in result.summary["not_run"] and (tmp_path / "run" / "report.html").is_file()


def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch):
    import imagerec.features._cache as cache_module  # noqa: PLC0415

    monkeypatch.setattr(cache_module, "embed", lambda *a, **k: pytest.fail("worked before validating"))
    with pytest.raises(ImagerecError, match="unknown; the checks with thresholds are"):
        audit(tmp_path, thresholds={"blury": 0.1})
    with pytest.raises(ImagerecError, match="must be a number >= 0"):
        audit(tmp_path, thresholds={"dark": -1})
    with pytest.raises(ImagerecError, match="must name a .csv file"):
        audit(tmp_path, export_manifest=tmp_path / "clean.txt")
