"""Suggestions from a few labels, and which images to label next (imagerec.suggest)."""

from __future__ import annotations

import numpy as np
import pytest

from imagerec import ImagerecError
from imagerec.suggest import MIN_CALIBRATION_LABELS, Suggester, select_next, suggest

from .conftest import assert_user_error, make_colour_dataset, run_cli


def blobs(sizes=(60, 40, 20), dim=16, spread=0.05, seed=0):
    """Tight, well-separated groups on the unit sphere: (features, true class per row)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 1.0
    y = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    return x.astype(np.float32), y


def one_label_each(y) -> list[str | None]:
    labels: list[str | None] = [None] * len(y)
    for c in np.unique(y):
        labels[int(np.flatnonzero(y == c)[0])] = f"c{c}"
    return labels


@pytest.mark.parametrize("method", ["auto", "probe", "propagation"])
def test_one_label_a_group_names_the_whole_group(method):
    x, y = blobs()
    s = suggest(x, one_label_each(y), method=method)
    assert s.classes == ["c0", "c1", "c2"]
    assert [s.classes[i] for i in s.suggester.suggested_] == [f"c{c}" for c in y]
    assert s.proba.shape == (120, 3) and np.allclose(s.proba.sum(1), 1)
    frame = s.frame
    assert list(frame.columns) == ["path", "label", "suggested", "confidence", "disagrees"]
    assert not frame["disagrees"].any()


def test_a_wrong_label_is_judged_out_of_fold_and_disagrees():
    x, y = blobs()
    labels = [f"c{c}" if i % 4 == 0 else None for i, c in enumerate(y)]
    wrong = 8  # a c0 image labelled c1
    labels[wrong] = "c1"
    s = suggest(x, labels)
    assert s.frame.loc[wrong, "suggested"] == "c0" and s.frame.loc[wrong, "disagrees"]
    assert s.frame["disagrees"].sum() == 1  # the other labelled images agree with their labels


def test_an_update_equals_a_fresh_fit_and_reuses_the_graph():
    x, y = blobs()
    labels = one_label_each(y)
    s = suggest(x, labels)
    graph = s.suggester.graph_
    row = int(np.flatnonzero(y == 2)[5])
    updated = s.update({row: "c2"})
    assert updated.suggester.graph_ is graph and updated.labels[row] == "c2" and s.labels[row] is None
    labels[row] = "c2"
    fresh = suggest(x, labels)
    assert np.allclose(updated.proba, fresh.proba, atol=1e-3)


def test_embeddings_bring_their_paths_and_labels():
    from imagerec import Embeddings, Preprocessing

    x, y = blobs()
    emb = Embeddings(x, [f"img{i}.png" for i in range(len(y))], y.astype(np.int64), ["a", "b", "c"], "test", Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    s = suggest(emb)
    assert s.frame["path"].tolist()[:2] == ["img0.png", "img1.png"]
    assert (s.frame["suggested"] == s.frame["label"]).all()


def test_no_temperature_from_a_handful_of_labels():
    x, y = blobs()
    s = suggest(x, one_label_each(y))
    assert s.suggester.temperature_ == 1.0
    assert MIN_CALIBRATION_LABELS > 3


def test_bad_input_is_refused_with_the_fix():
    x, y = blobs()
    with pytest.raises(ImagerecError, match="no image has a label"):
        suggest(x, [None] * len(y))
    with pytest.raises(ImagerecError, match="3 labels for 120 images"):
        suggest(x, ["a", "b", "c"])
    with pytest.raises(ImagerecError, match="hold no labels"):
        suggest(x)
    with pytest.raises(ImagerecError, match="method='magic'"):
        Suggester("magic").fit(x, one_label_each(y))
    with pytest.raises(ImagerecError, match="row 999"):
        suggest(x, one_label_each(y)).update({999: "c0"})


def test_label_next_cold_start_covers_every_group_with_its_most_typical_image():
    x, y = blobs(sizes=(60, 40, 20))
    picks = select_next(x, [None] * len(y), budget=3)
    assert sorted(y[picks].tolist()) == [0, 1, 2]  # one per group, not three from the largest
    centre_distance = np.linalg.norm(x - np.eye(16)[y], axis=1)
    for p in picks:  # the pick is typical: nearer its group's centre than most of the group
        assert (centre_distance[y == y[p]] < centre_distance[p]).mean() < 0.5


def test_label_next_skips_labelled_groups_then_asks_where_the_model_is_unsure():
    x, y = blobs(sizes=(60, 40, 20))
    labels = one_label_each(y)
    picks = select_next(x, labels, budget=5)
    assert len(set(picks.tolist())) == 5 and all(labels[p] is None for p in picks)
    labels = [f"c{c}" if i % 3 == 0 else None for i, c in enumerate(y)]
    proba = np.tile([0.98, 0.01, 0.01], (len(y), 1))
    unsure = [i for i in range(len(y)) if labels[i] is None][:4]
    proba[unsure] = [0.4, 0.35, 0.25]
    picks = select_next(x, labels, budget=4, proba=proba, pool_factor=1)
    assert sorted(picks.tolist()) == sorted(unsure)


def test_label_next_refuses_a_bad_budget():
    x, y = blobs()
    with pytest.raises(ImagerecError, match="budget=0"):
        select_next(x, [None] * len(y), budget=0)
    assert len(select_next(x, [f"c{c}" for c in y], budget=3)) == 0  # nothing left to label


# -- imagerec label ---------------------------------------------------------------------------


def test_cli_label_writes_suggestions_and_the_next_images(capsys, tmp_path):
    import csv

    data = make_colour_dataset(tmp_path / "data", per_class=8)
    flat = tmp_path / "flat"  # the same images without their class folders
    flat.mkdir()
    for f in sorted(data.glob("*/*.png")):
        (flat / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    (flat / "few.csv").write_text("red_000.png,red\ngreen_000.png,green\nblue_000.png,blue\n")
    out = tmp_path / "suggested.csv"
    code, stdout, err = run_cli(capsys, "label", flat, "--labels", flat / "few.csv", "--out", out, "--next", "5",
                                "--backbone", "efficientnet_lite0", "--no-progress")
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "suggested", "confidence", "disagrees", "next"]
    assert len(rows) == 24 and sum(bool(r["label"]) for r in rows) == 3
    assert sorted(int(r["next"]) for r in rows if r["next"]) == [1, 2, 3, 4, 5]
    assert all(not r["label"] for r in rows if r["next"])  # only unlabelled images are asked for
    assert all(r["suggested"] in ("red", "green", "blue") for r in rows)
    assert "24 images, 3 labelled, 3 classes" in stdout and (tmp_path / "suggested.csv.features" / "embeddings.npz").is_file()


def test_cli_label_refuses_labels_of_images_outside_the_collection(capsys, tmp_path):
    data = make_colour_dataset(tmp_path / "data", per_class=2, classes=("red",))
    other = make_colour_dataset(tmp_path / "other", per_class=1, classes=("blue",))
    (tmp_path / "few.csv").write_text(f"{other / 'blue' / '000.png'},blue\n")
    code, _, err = run_cli(capsys, "label", data, "--labels", tmp_path / "few.csv", "--out", tmp_path / "s.csv", "--allow-outside")
    assert_user_error(code, err, "are not in", "label images of the collection")
    code, _, err = run_cli(capsys, "label", data, "--labels", tmp_path / "nope.csv", "--out", tmp_path / "s.csv")
    assert_user_error(code, err, "no such file")
