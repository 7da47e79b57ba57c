"""Index and search by example: build, search, --add, IVF, model checks, shards, CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import imagerec.index._build as build_module
from imagerec import Embeddings, ImagerecError, Preprocessing, build_index, load_index
from imagerec.index import add_to_index, merge_parts, parse_shard, shard_indices, shard_path

from .conftest import assert_user_error, make_colour_dataset, run_cli

BACKBONE = dict(backbone="efficientnet_lite0", image_size=128)  # pretrained; 128 px: fast, and near-copies stay near
CLI_BACKBONE = ("--backbone", "efficientnet_lite0", "--image-size", "128")


def _pattern(seed: int, size: int = 64) -> Image.Image:
    """A picture with structure (shapes on a gradient), unlike every other seed's."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, size)[None, :, None] * rng.integers(0, 256, 3) + rng.integers(0, 120, 3)
    image = Image.fromarray(np.clip(np.broadcast_to(base, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, 24, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _near_copy(image: Image.Image) -> Image.Image:
    """Down to 80% and back, brightened 10%, JPEG quality 75: the same shot, other pixels."""
    small = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.Resampling.BILINEAR).resize(image.size)
    brighter = Image.fromarray(np.clip(np.asarray(small, dtype=np.float32) * 1.1, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    brighter.save(buffer, format="JPEG", quality=75)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture
def collection(tmp_path) -> tuple[Path, Path]:
    """(folder of 12 distinct pictures + a near-copy of the query, the query outside it)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(12):
        _pattern(seed).save(folder / f"pic{seed:02d}.png")
    query = _pattern(100)
    query.save(tmp_path / "query.png")
    _near_copy(query).save(folder / "planted.jpg")
    return folder, tmp_path / "query.png"


def _fake_embeddings(n: int, dim: int = 16, seed: int = 0, backbone: str = "efficientnet_lite0", size: int = 64) -> Embeddings:
    rng = np.random.default_rng(seed)
    pp = Preprocessing(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 1.0)
    return Embeddings(rng.normal(size=(n, dim)).astype(np.float32), [f"/virtual/{seed}/{i:05d}.png" for i in range(n)], None, None, backbone, pp)


def test_search_finds_the_planted_near_copy_first(collection, tmp_path):
    folder, query = collection
    index = build_index(folder, tmp_path / "idx", progress=False, **BACKBONE)
    assert len(index) == 13 and index.kind == "flat" and "exact inner-product" in index.describe()
    results = load_index(tmp_path / "idx").search(query, top_k=5)
    from_memory = load_index(tmp_path / "idx").search(Image.open(query), top_k=5)  # an upload, never saved
    assert from_memory["path"].tolist() == results["path"].tolist() and from_memory["query"][0] == "<image 0>"
    assert np.allclose(from_memory["score"], results["score"], atol=1e-5)
    assert list(results.columns) == ["query", "rank", "path", "score"]
    assert results["rank"].tolist() == [1, 2, 3, 4, 5]
    assert Path(results["path"][0]).name == "planted.jpg"
    assert results["score"][0] > results["score"][1] + 0.05  # first by a clear margin, not a tie
    assert results["score"].is_monotonic_decreasing


@pytest.mark.slow
def test_an_indexed_image_finds_itself_with_score_one(collection, tmp_path):
    folder, _ = collection
    index = build_index(folder, tmp_path / "idx", progress=False, **BACKBONE)
    for engine in ("auto", "torch"):  # the warm ONNX session, and imagerec.embed with PyTorch
        results = index.search([folder / "pic03.png", folder / "pic07.png", folder / "planted.jpg"], top_k=2, engine=engine)
        top = results[results["rank"] == 1]
        assert [Path(p).name for p in top["path"]] == ["pic03.png", "pic07.png", "planted.jpg"]
        assert np.allclose(top["score"], 1.0, atol=1e-4)  # queries are embedded exactly as the index was


def test_files_of_the_index_folder(collection, tmp_path):
    folder, _ = collection
    build_index(folder, tmp_path / "idx", progress=False, **BACKBONE)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["preprocessing"]["input_size"] == 128
    assert (meta["metric"], meta["kind"], meta["count"], meta["generation"]) == ("inner_product", "flat", 13, 1)
    assert {p.name for p in (tmp_path / "idx").iterdir()} >= {"meta.json", "index-1.faiss", "items-1.csv"}


def test_add_embeds_only_the_new_images(collection, tmp_path, monkeypatch):
    folder, query = collection
    build_index(folder, tmp_path / "idx", progress=False, **BACKBONE)
    embedded = []
    real_embed = build_module.embed
    monkeypatch.setattr(build_module, "embed", lambda source, *a, **k: embedded.append(len(source)) or real_embed(source, *a, **k))
    for seed in (200, 201):
        _pattern(seed).save(folder / f"new{seed}.png")
    done = add_to_index(tmp_path / "idx", folder, progress=False)
    assert embedded == [2]  # the 13 images already in were not embedded again
    assert (done.added, done.already, len(done.index)) == (2, 13, 15)
    again = add_to_index(tmp_path / "idx", folder, progress=False)
    assert embedded == [2] and (again.added, again.already) == (0, 15)
    reloaded = load_index(tmp_path / "idx")
    assert len(reloaded) == 15 and reloaded.meta["generation"] == 2
    assert not (tmp_path / "idx" / "index-1.faiss").exists()  # the old generation is removed
    top = reloaded.search(folder / "new201.png", top_k=1)
    assert Path(top["path"][0]).name == "new201.png" and top["score"][0] > 0.9999


def test_add_refuses_a_changed_file(collection, tmp_path):
    folder, _ = collection
    build_index(folder, tmp_path / "idx", progress=False, **BACKBONE)
    _pattern(999).save(folder / "pic05.png")  # same path, other content
    with pytest.raises(ImagerecError, match=r"changed content .*pic05\.png.*rebuild"):
        add_to_index(tmp_path / "idx", folder, progress=False)
    assert len(load_index(tmp_path / "idx")) == 13  # untouched


def test_exact_up_to_the_threshold_ivf_pq_on_disk_above(tmp_path):
    data = _fake_embeddings(400)
    exact = build_index(data, tmp_path / "flat", exact_max=400)
    approx = build_index(data, tmp_path / "ivfpq", exact_max=399)
    assert exact.kind == "flat" and exact.meta["faiss_index"] == "IndexFlatIP"
    assert approx.kind == "ivfpq" and approx.meta["faiss_index"] == "IVF12_HNSW32,PQ8x8np"  # 400 / 32 lists at most
    assert "IVF-PQ search on disk" in approx.describe()
    reloaded = load_index(tmp_path / "ivfpq")
    hits = reloaded.search_features(data.features[:20], data.paths[:20], top_k=1, nprobe=reloaded.meta["nlist"])
    assert hits["path"].tolist() == data.paths[:20]  # every list probed, candidates re-ranked: exact


def test_a_flat_index_grown_past_the_threshold_goes_on_disk(tmp_path):
    build_index(_fake_embeddings(300), tmp_path / "idx", exact_max=350)
    done = add_to_index(tmp_path / "idx", _fake_embeddings(100, seed=1))
    assert done.added == 100 and done.index.kind == "ivfpq" and len(load_index(tmp_path / "idx")) == 400


def test_queries_from_another_model_are_refused(tmp_path):
    build_index(_fake_embeddings(50), tmp_path / "idx")
    other = _fake_embeddings(3, backbone="efficientnet_lite2")
    other.save(tmp_path / "other.npz")
    index = load_index(tmp_path / "idx")
    with pytest.raises(ImagerecError, match="made with efficientnet_lite2 .* not comparable"):
        index.search(tmp_path / "other.npz")
    with pytest.raises(ImagerecError, match="at 96 px"):
        index.search(_fake_embeddings(3, size=96))
    with pytest.raises(ImagerecError, match="made with efficientnet_lite2"):
        add_to_index(tmp_path / "idx", tmp_path / "other.npz")
    same = _fake_embeddings(3, seed=5)
    assert index.search(same, top_k=1)["query"].tolist() == same.paths  # the same model is fine


def test_a_backbone_without_weights_cannot_index(class_folder, tmp_path):
    with pytest.raises(ImagerecError, match="'seed_cnn' cannot index.*pretrained weights"):
        build_index(class_folder, tmp_path / "idx", backbone="seed_cnn", progress=False)


def test_bad_input(tmp_path, collection):
    folder, _ = collection
    build_index(_fake_embeddings(20), tmp_path / "idx")
    index = load_index(tmp_path / "idx")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImagerecError, match="not an image file"):
        index.search(tmp_path / "notes.txt")
    with pytest.raises(ImagerecError, match="no such file or folder"):
        index.search(tmp_path / "missing.png")
    with pytest.raises(ImagerecError, match="top_k=0"):
        index.search_features(np.zeros((1, 16)), ["q"], top_k=0)
    with pytest.raises(ImagerecError, match="do not fit an index of 16-dim"):
        index.search_features(np.zeros((1, 8)), ["q"])
    with pytest.raises(ImagerecError, match="not an imagerec index"):
        load_index(folder)
    with pytest.raises(ImagerecError, match="listed twice"):
        build_index(Embeddings(np.ones((2, 4), np.float32), ["/a.png", "/a.png"], None, None, "efficientnet_lite0", _fake_embeddings(1).preprocessing), tmp_path / "dup")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImagerecError, match="none of the 1 query image"):
        index.search(tmp_path / "broken.png")


def test_shard_selection_is_a_strided_partition():
    paths = [f"/d/{c}" for c in "kbjaxcq"]
    parts = [shard_indices(paths, i, 3) for i in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(7))
    assert [paths[i] for i in parts[0]] == ["/d/j", "/d/a", "/d/x"]  # sorted a b c j k q x: a, j, x, in source order
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "-1/4", "1", "a/b", "1/0"):
        with pytest.raises(ImagerecError, match="must be I/N with 0 <= I < N"):
            parse_shard(bad)


def test_shard_auto_reads_the_launcher(monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ImagerecError, match="no launcher found"):
        parse_shard("auto")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_shard("auto") == (3, 8)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")  # --array=1-4: ids 1..4
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard("auto") == (3, 4)
    assert shard_path("parts/part-{shard}.npz", (3, 12)).name == "part-03.npz"


@pytest.mark.slow
def test_two_shard_processes_merge_into_the_single_process_index(tmp_path, capsys):
    data = make_colour_dataset(tmp_path / "colours", per_class=5)
    procs = [
        subprocess.Popen(
            # one command line for every process, as torchrun starts them: the shard comes from RANK/WORLD_SIZE
            [sys.executable, "-m", "imagerec", "embed", str(data), *CLI_BACKBONE, "--shard", "auto", "--out", str(tmp_path / "part-{shard}.npz"), "--no-progress"],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RANK": str(i), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    sizes = [len(Embeddings.load(tmp_path / f"part-{i}.npz")) for i in range(2)]  # {shard} -> 0, 1
    assert sizes == [8, 7]  # 15 images, strided
    code, out, err = run_cli(capsys, "index", "--parts", tmp_path / "part-0.npz", tmp_path / "part-1.npz", "--out", tmp_path / "merged")
    assert code == 0 and "exact inner-product" in out, err
    single = build_index(data, tmp_path / "single", progress=False, **BACKBONE)
    merged = load_index(tmp_path / "merged")
    assert sorted(merged.items.paths) == sorted(single.items.paths) and merged.items.labels is not None
    vectors = dict(zip(single.items.paths, single.faiss_index.reconstruct_n(0, len(single))))
    for path, vector in zip(merged.items.paths, merged.faiss_index.reconstruct_n(0, len(merged))):
        assert np.allclose(vector, vectors[path], atol=1e-5)
    assert dict(zip(merged.items.paths, merged.items.labels)) == dict(zip(single.items.paths, single.items.labels))
    with pytest.raises(ImagerecError, match="shard\\(s\\) 1/2 missing"):
        merge_parts([tmp_path / "part-0.npz"])
    with pytest.raises(ImagerecError, match="shard 0/2 is given more than once"):
        merge_parts([tmp_path / "part-0.npz", tmp_path / "part-0.npz", tmp_path / "part-1.npz"])


def test_parts_of_other_models_or_overlapping_are_refused(tmp_path):
    a, b = _fake_embeddings(5), _fake_embeddings(5, backbone="efficientnet_lite2")
    a.save(tmp_path / "a.npz")
    b.save(tmp_path / "b.npz")
    with pytest.raises(ImagerecError, match="b.npz: made with efficientnet_lite2 .* same --backbone"):
        merge_parts([tmp_path / "a.npz", tmp_path / "b.npz"])
    a.save(tmp_path / "a2.npz")
    with pytest.raises(ImagerecError, match="is in both .*a.npz and .*a2.npz"):
        merge_parts([tmp_path / "a.npz", tmp_path / "a2.npz"])


def test_cli_index_add_and_search(capsys, collection, tmp_path):
    folder, query = collection
    code, out, err = run_cli(capsys, "index", folder, "--out", tmp_path / "idx", *CLI_BACKBONE, "--no-progress")
    assert code == 0 and "exact inner-product search (FAISS IndexFlatIP) over 13 vectors" in out, err
    _pattern(300).save(folder / "late.png")
    code, out, err = run_cli(capsys, "index", folder, "--out", tmp_path / "idx", "--add", "--no-progress")
    assert code == 0 and "added 1 image(s); 13 already indexed" in out, err
    code, out, err = run_cli(capsys, "search", tmp_path / "idx", query, "--top-k", "3", "--format", "json", "--sheet", tmp_path / "sheets")
    assert code == 0, err
    rows = json.loads(out)
    assert "\\/" not in out  # plain paths, not pandas' escaped slashes
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["path"].endswith("planted.jpg")
    assert "searched with exact" in err and "wrote 1 contact sheet" in err
    sheet = Image.open(next((tmp_path / "sheets").glob("*.png")))
    assert sheet.width > 4 * 100  # the query and three neighbours side by side
    code, out, err = run_cli(capsys, "search", tmp_path / "idx", query, "--format", "csv", "--out", tmp_path / "hits.csv")
    assert code == 0 and (tmp_path / "hits.csv").read_text().startswith("query,rank,path,score")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["search", "{tmp}/nothing", "{tmp}/q.png"], ["no such folder", "imagerec index DATA --out"]),
        (["index", "--out", "{tmp}/idx"], ["nothing to index"]),
        (["index", "{tmp}/data", "--out", "{tmp}/idx", "--parts", "{tmp}/p.npz"], ["either DATA or --parts"]),
        (["index", "{tmp}/data", "--out", "{tmp}/idx", "--add", "--backbone", "efficientnet_lite2"], ["index's own backbone"]),
        (["index", "{tmp}/data", "--out", "{tmp}/idx", "--backbone", "seed_cnn"], ["cannot index"]),
        (["embed", "{tmp}/data", "--out", "{tmp}/p.npz", "--shard", "2/2"], ["--shard '2/2' must be I/N"]),
        (["index", "--parts", "{tmp}/p.npz", "--out", "{tmp}/idx"], ["no such embeddings file"]),
    ],
)
def test_cli_user_errors(capsys, tmp_path, argv, fragments):
    make_colour_dataset(tmp_path / "data", per_class=2)
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert_user_error(code, err, *fragments)


def test_cli_bad_top_k_is_an_argument_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "search", tmp_path, "q.png", "--top-k", "0")
    assert code == 2 and "must be at least 1" in err
