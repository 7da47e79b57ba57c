"""Temperature scaling: fitted on held-out images, it lowers NLL and ECE, never moves the argmax,
and travels from training through the checkpoint (under its checksum) and the ONNX export to the
torch-free runtime; checkpoints written before it load with T = 1."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from imagerec import Classifier, ImagerecError, TrainConfig, create_backbone, load_checkpoint, train
from imagerec import runtime
from imagerec._metadata import KEY_TEMPERATURE
from imagerec.runtime import preprocess
from imagerec.checkpoint import Checkpoint, checkpoint_temperature, save_checkpoint
from imagerec.evaluation import build_report, calibration
from imagerec.export import export_model
from imagerec.training._calibrate import T_BOUNDS, calibration_meta, describe, fit_temperature, nll

from .conftest import make_colour_dataset

FAST = dict(backbone="seed_cnn", batch_size=8, save_every=0, precision="fp32", device="cpu")
CLASSES = ["blue", "green", "red"]


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def overconfident(n: int = 4000, classes: int = 5, sharpen: float = 4.0, seed: int = 0):
    """Labels drawn from softmax(z), and logits sharpen * z: a model ``sharpen`` times too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, classes))
    labels = np.array([rng.choice(classes, p=p) for p in softmax(z)])
    return z * sharpen, labels


# -- the fit -----------------------------------------------------------------------------------


def test_fit_recovers_the_overconfidence_and_lowers_nll_and_ece():
    logits, labels = overconfident(sharpen=4.0)
    t = fit_temperature(logits, labels)
    assert 3.3 < t < 4.7  # the true temperature is 4
    assert nll(logits, labels, t) < nll(logits, labels) - 0.5
    ece_before, _ = calibration(softmax(logits), labels)
    ece_after, _ = calibration(softmax(logits / t), labels)
    assert ece_before > 0.15 and ece_after < 0.04
    assert (softmax(logits / t).argmax(1) == logits.argmax(1)).all()  # accuracy cannot change


def test_an_underconfident_model_gets_t_below_one_and_a_calibrated_one_about_one():
    logits, labels = overconfident(sharpen=0.5, seed=1)
    assert 0.4 < fit_temperature(logits, labels) < 0.6
    logits, labels = overconfident(sharpen=1.0, seed=2)
    assert 0.9 < fit_temperature(logits, labels) < 1.1


def test_fit_on_log_probabilities_equals_fit_on_logits_and_stays_in_bounds():
    logits, labels = overconfident(n=500, sharpen=3.0, seed=3)
    log_p = np.log(softmax(logits))
    assert fit_temperature(log_p, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    meta = calibration_meta(softmax(logits).astype(np.float32), labels)
    assert meta["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert meta["calibration"]["images"] == 500 and meta["calibration"]["nll_after"] < meta["calibration"]["nll_before"]
    hopeless = np.eye(3)[[1, 2, 0] * 10] * 50.0  # always wrong and sure of it: the bound holds
    assert fit_temperature(hopeless, np.array([0, 1, 2] * 10)) == pytest.approx(T_BOUNDS[1], rel=1e-2)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_no_temperature_is_fitted_when_every_held_out_image_is_right():
    """Every image right: the NLL falls as T shrinks to 0, so a fit would end at the lower bound
    and claim certainty on every later image (8 easy validation photos of an easy set). T stays 1;
    one wrong image makes the fit well posed again."""
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]] * 3)
    labels = np.array([0, 1, 2] * 3)
    assert nll(logits, labels, T_BOUNDS[0]) < nll(logits, labels)  # what a plain fit would chase
    assert fit_temperature(logits, labels) == 1.0
    meta = calibration_meta(softmax(logits), labels)
    assert meta["temperature"] == 1.0 and meta["calibration"]["all_right"]
    assert "all 9 validation images are right, so no temperature can be fitted" in describe(meta)
    labels[-1] = 0
    assert T_BOUNDS[0] < fit_temperature(logits, labels) < 1.0 and not calibration_meta(softmax(logits), labels)["calibration"]["all_right"]


def test_report_shows_ece_before_and_after():
    logits, labels = overconfident(n=1000, sharpen=4.0, seed=4)
    t = fit_temperature(logits, labels)
    paths = [f"{i}.png" for i in range(1000)]
    report = build_report(softmax(logits / t), labels, paths, list("abcde"), raw_proba=softmax(logits), temperature=t)
    s = report.summary
    assert s["temperature"] == t and s["ece"] < 0.04 < 0.15 < s["ece_uncalibrated"]
    assert report.reliability["uncalibrated"]["count"] != report.reliability["count"]


# -- checkpoint, export, runtime, Classifier --------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A seed_cnn checkpoint with temperature 2.5 and images to run it on."""
    root = tmp_path_factory.mktemp("calibration")
    torch.manual_seed(0)
    model = create_backbone("seed_cnn", num_classes=3)
    with torch.no_grad():
        model.fc3.weight.mul_(20)  # logits of a few units, so that T shows in the probabilities
    meta = {"backbone": "seed_cnn", "classes": CLASSES, "preprocessing": model.preprocessing.to_dict()}
    meta["temperature"] = 2.5
    path = save_checkpoint(root / "run" / "best.safetensors", Checkpoint(model.state_dict(), meta))
    data = make_colour_dataset(root / "data", per_class=3)
    return {"path": path, "data": data, "model": model}


def test_temperature_survives_checkpoint_export_and_runtime(checkpoint, tmp_path):
    assert checkpoint_temperature(load_checkpoint(checkpoint["path"])) == 2.5
    clf = Classifier.load(checkpoint["path"])
    assert clf.temperature_ == 2.5
    proba = clf.predict_proba(checkpoint["data"])
    images = sorted(str(p) for p in checkpoint["data"].rglob("*.png"))
    onnx_path = export_model(checkpoint["path"], tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props[KEY_TEMPERATURE]) == 2.5
    rt = runtime.load(onnx_path)
    assert rt.temperature == 2.5
    rt_proba = rt.predict_proba(images)
    assert np.allclose(rt_proba, proba, atol=1e-4)
    # the probabilities are softmax(logits / 2.5): the runtime's raw logits stay raw
    logits = rt.logits(np.stack([preprocess(Image.open(p), rt.preprocessing) for p in images]))
    assert np.allclose(rt_proba, softmax(logits / 2.5), atol=1e-5)
    assert not np.allclose(rt_proba, softmax(logits), atol=1e-3)
    assert (rt_proba.argmax(1) == logits.argmax(1)).all()
    onnx_clf = Classifier.load(onnx_path)
    assert onnx_clf.temperature_ == 2.5 and np.allclose(onnx_clf.predict_proba(images), proba, atol=1e-4)


def test_evaluate_reports_both_eces_for_torch_and_onnx(checkpoint, tmp_path):
    clf = Classifier.load(checkpoint["path"])
    report = clf.evaluate(checkpoint["data"], split=None, out=tmp_path / "eval")
    s = report.summary
    assert s["temperature"] == 2.5 and s["ece"] != s["ece_uncalibrated"]
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 0
    assert "uncalibrated" in json.loads((tmp_path / "eval" / "summary.json").read_text())["reliability"]
    onnx_clf = Classifier.load(export_model(checkpoint["path"], tmp_path / "m.onnx"))
    s2 = onnx_clf.evaluate(checkpoint["data"], split=None).summary
    assert s2["ece"] == pytest.approx(s["ece"], abs=1e-4)
    assert s2["ece_uncalibrated"] == pytest.approx(s["ece_uncalibrated"], abs=1e-4)
    assert s2["accuracy"] == s["accuracy"]


def test_checksum_refuses_a_tampered_temperature(checkpoint, tmp_path):
    with safe_open(str(checkpoint["path"]), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["meta"])
    meta["temperature"] = 1.0
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata=dict(header, meta=json.dumps(meta)))
    with pytest.raises(ImagerecError, match="checksum mismatch"):
        load_checkpoint(forged)


@pytest.mark.parametrize("bad", [0, -1.0, "2", True, float("nan")])
def test_a_broken_temperature_is_a_one_line_error(checkpoint, tmp_path, bad):
    ckpt = load_checkpoint(checkpoint["path"])
    path = save_checkpoint(tmp_path / "bad.safetensors", Checkpoint(ckpt.model, dict(ckpt.meta, temperature=bad)))
    with pytest.raises(ImagerecError, match="'temperature' is"):
        load_checkpoint(path)


def test_old_checkpoints_and_onnx_files_without_temperature_mean_one(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint["path"])
    old_meta = {k: v for k, v in ckpt.meta.items() if k != "temperature"}
    old = save_checkpoint(tmp_path / "old.safetensors", Checkpoint(ckpt.model, old_meta))
    clf = Classifier.load(old)
    assert clf.temperature_ == 1.0
    onnx_path = export_model(old, tmp_path / "old.onnx")
    model = onnx.load(str(onnx_path))
    kept = [p for p in model.metadata_props if p.key != KEY_TEMPERATURE]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(onnx_path))  # as an older imagerec wrote it
    rt = runtime.load(onnx_path)
    assert rt.temperature == 1.0
    images = sorted(str(p) for p in checkpoint["data"].rglob("*.png"))
    assert np.allclose(rt.predict_proba(images), clf.predict_proba(images), atol=1e-4)


# -- training ---------------------------------------------------------------------------------


def test_training_fits_t_on_the_validation_split_unless_told_not_to(tmp_path, capsys):
    data = make_colour_dataset(tmp_path / "data", per_class=16)
    train(data, tmp_path / "run", TrainConfig(epochs=2, val_fraction=0.25, **FAST), progress=False)
    best = load_checkpoint(tmp_path / "run")
    assert T_BOUNDS[0] < best.meta["temperature"] < T_BOUNDS[1]
    assert best.meta["calibration"]["images"] == 12
    assert best.meta["calibration"]["nll_after"] <= best.meta["calibration"]["nll_before"] + 1e-9
    assert best.meta["temperature"] in (1.0, best.meta["calibration"]["fitted"])  # kept, or refused by the held-out check
    assert "calibration: T" in capsys.readouterr().err.replace("temperature", "T")
    train(data, tmp_path / "off", TrainConfig(epochs=1, val_fraction=0.25, calibrate=False, **FAST), progress=False)
    assert "temperature" not in load_checkpoint(tmp_path / "off").meta
    train(data, tmp_path / "noval", TrainConfig(epochs=1, val_fraction=0.0, **FAST), progress=False)
    assert "temperature" not in load_checkpoint(tmp_path / "noval").meta
    assert "no held-out images" in capsys.readouterr().err


def test_a_temperature_is_kept_only_when_it_lowers_the_nll_of_images_it_was_not_fitted_on():
    """Each half's fit is checked on the other half: a real miscalibration (500 images, 3x too
    sharp) passes; a fit that would not carry to new images (one half sure and wrong, the other
    sure and right) is refused and T stays 1."""
    from imagerec.training._calibrate import held_out_gain

    logits, labels = overconfident(n=500, sharpen=3.0, seed=5)
    meta = calibration_meta(softmax(logits), labels)
    assert meta["calibration"]["held_out_gain"] > 0 and meta["temperature"] == meta["calibration"]["fitted"] > 1.0

    n = 20
    order = np.random.default_rng(0).permutation(n)  # the split held_out_gain draws
    first, second = order[: n // 2], order[n // 2 :]
    labels = np.zeros(n, np.int64)
    logits = np.zeros((n, 3))
    logits[first, 1] = 8.0  # sure and wrong: this half alone would fit a large T
    logits[first[:2], 0] = 9.0  # (two right, so the fit is well posed)
    logits[second, 0] = 8.0  # every one sure and right: its own fit is T=1, and a large T only costs it
    assert held_out_gain(logits, labels) < 0
    meta = calibration_meta(softmax(logits), labels)
    assert meta["calibration"]["fitted"] != 1.0 and meta["temperature"] == 1.0
    assert "did not lower the NLL of the halves it was not fitted on" in describe(meta)
