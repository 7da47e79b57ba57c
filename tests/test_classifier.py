"""Classifier: fit, load, predict (files, folders, globs, PIL images, corrupt files) and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imagerec import Classifier, ImagerecError, SkippedImagesWarning
from imagerec.prediction import format_predictions, predict_top_k

from .conftest import make_colour_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    data = make_colour_dataset(root / "data", per_class=24, noise=20)
    # Six head-only epochs on frozen features, then one stage-2 step with every layer frozen.
    # Most tests below check plumbing against predictions made in the same process, which holds
    # whatever the weights learned. The one test of what was learned (marked ``learned``) relies on
    # a margin measured over seeds 0-9 under ATEN_CPU_CAPABILITY=avx2 and default: 0.972-1.0 of
    # the 72 images right (at 32 px, or with stage 2 tuning, single seeds fell to 0.89). The input
    # size for prediction stays the training size (test_size=False); no probe (the recipe measured).
    clf = Classifier(
        "efficientnet_lite0", epochs=0.1, head_epochs=6, freeze_groups=99, image_size=64, batch_size=8, lr_batch=8,
        val_fraction=0.25, save_every=0, device="cpu", test_size=False, probe=False,
    ).fit(data, out=root / "run", progress=False)
    return clf, data, root / "run"


def test_fit_sets_the_fitted_attributes(trained):
    clf, _, run = trained
    assert clf.classes_ == ["blue", "green", "red"]
    assert clf.preprocessing_.input_size == 64
    assert [h["stage"] for h in clf.history_] == [1] * 6 + [2] and clf.path_.parent == run


@pytest.mark.learned
def test_the_colours_are_learned(trained):
    clf, data, _ = trained
    report = clf.evaluate(data)
    assert report.summary["accuracy"] >= 0.9  # measured 0.972-1.0 over seeds 0-9 and two CPU capabilities


def test_load_and_predict_files_folders_and_globs(trained):
    fitted, data, run = trained
    clf = Classifier.load(run)
    files = sorted((data / "green").glob("*.png"))
    assert np.allclose(clf.predict_proba(files), fitted.predict_proba(files), atol=1e-5)  # the saved best = the fitted model
    assert clf.predict(str(data / "green")) == clf.predict(files)  # a folder is its files, in sorted order
    assert clf.predict(str(data / "blue" / "00*.png")) == clf.predict(sorted((data / "blue").glob("00*.png")))
    assert len(clf.predict(str(data / "blue" / "00*.png"))) == 10


def test_predict_pil_images(trained, tmp_path):
    clf, data, _ = trained
    grey = tmp_path / "grey.png"
    Image.open(data / "blue" / "001.png").convert("L").save(grey)
    images = [Image.open(data / "red" / "001.png"), Image.open(grey)]
    proba = clf.predict_proba(images)
    assert proba.shape == (2, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    # a PIL image is preprocessed like the file it came from (a grey one is made RGB on both paths)
    assert np.allclose(proba, clf.predict_proba([data / "red" / "001.png", grey]), atol=1e-5)


def test_corrupt_files_are_reported_not_fatal(trained, tmp_path):
    clf, data, _ = trained
    (tmp_path / "bad.jpg").write_bytes(b"")
    with pytest.warns(SkippedImagesWarning, match="1 image"):
        labels = clf.predict([data / "red" / "002.png", tmp_path / "bad.jpg"])
    assert labels == [clf.predict([data / "red" / "002.png"])[0], None]


def test_predict_top_k_rows_and_formats(trained, tmp_path):
    clf, data, run = trained
    (tmp_path / "bad.png").write_text("no")
    image = data / "green" / "003.png"
    rows = predict_top_k(run, [str(image), str(tmp_path / "bad.png")], top_k=2, tta=True)
    proba = clf.predict_proba([image], tta=True)[0]
    expected = [clf.classes_[i] for i in np.argsort(-proba)[:2]]
    assert [c for c, _ in rows[0]["top"]] == expected
    assert [p for _, p in rows[0]["top"]] == pytest.approx(sorted(proba, reverse=True)[:2], abs=1e-5)
    assert rows[1]["top"] == [] and "not an image" in rows[1]["error"]
    parsed = json.loads(format_predictions(rows, "json"))
    assert parsed[0]["top"][0]["class"] == expected[0]
    assert format_predictions(rows, "csv").splitlines()[0] == "path,class1,p1,class2,p2,error"
    assert expected[0] in format_predictions(rows, "table")


def test_missing_paths_and_empty_globs(trained, tmp_path):
    clf = trained[0]
    with pytest.raises(ImagerecError, match="no such file or folder"):
        clf.predict([tmp_path / "nope.jpg"])
    with pytest.raises(ImagerecError, match="matches no image files"):
        clf.predict(str(tmp_path / "*.png"))


def test_evaluate_writes_the_report(trained, tmp_path):
    clf, data, _ = trained
    report = clf.evaluate(data, out=tmp_path / "eval", tta=True)
    files = sorted(data.glob("*/*.png"))
    predicted = clf.predict(files, tta=True)
    right = [p == f.parent.name for p, f in zip(predicted, files)]
    assert report.summary["images"] == 72 and report.summary["accuracy"] == pytest.approx(np.mean(right))
    assert report.confusion.sum() == 72 and np.trace(report.confusion) == sum(right)
    for name in ("summary.json", "per_class.csv", "confusion.csv", "confusion.png", "reliability.png", "confidently_wrong.csv"):
        assert (tmp_path / "eval" / name).is_file(), name
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["top3_accuracy"] == 1.0


def test_evaluate_on_a_subset_of_the_classes(trained, tmp_path):
    clf, data, _ = trained
    sub = tmp_path / "sub"
    (sub / "red").mkdir(parents=True)
    for i in range(3):
        (sub / "red" / f"{i}.png").write_bytes((data / "red" / f"{i:03d}.png").read_bytes())
    report = clf.evaluate(sub)
    predicted = clf.predict(sorted((sub / "red").glob("*.png")))
    assert report.summary["images"] == 3 and report.confusion.shape == (3, 3)
    assert report.confusion[2].sum() == 3 and report.confusion[:2].sum() == 0  # red keeps its index 2
    assert list(report.confusion[2]) == [predicted.count(c) for c in clf.classes_]


def test_evaluate_refuses_unknown_class_names(trained, tmp_path):
    clf, data, _ = trained
    make_colour_dataset(tmp_path / "other", per_class=2, classes=("red", "green"))
    (tmp_path / "other" / "purple").mkdir()
    (tmp_path / "other" / "purple" / "x.png").write_bytes((data / "red" / "000.png").read_bytes())
    with pytest.raises(ImagerecError, match=r"class\(es\) \['purple'\] are not among the checkpoint's classes"):
        clf.evaluate(tmp_path / "other")


def test_unfitted_classifier():
    with pytest.raises(ImagerecError, match="not trained yet"):
        Classifier().predict(["x.jpg"])


def test_load_rejects_non_checkpoints(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ImagerecError, match="not a readable checkpoint"):
        Classifier.load(tmp_path / "x.safetensors")
