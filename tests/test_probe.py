"""Stage 0 of the transfer recipe (LP-FT): the head fitted as a linear probe before fine-tuning.

What the code guarantees, not what a network learns: the probe's decisions become the head's,
the run records it as epoch 0 and keeps it as ``best`` until fine-tuning validates as well, a
budget with no room for a step after the probe still yields a model, and frozen batch-norm
statistics stay the pretrained ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagerec import ImagerecError, TrainConfig, load_checkpoint, train
from imagerec.backbones import create_backbone
from imagerec.data import load_images
from imagerec.features import compute_features
from imagerec.training._callbacks import not_worse, within_one_se
from imagerec.training._probe import MISSING_CLASS_BIAS, PROBE_MAX_IMAGES, _full_rows, _loss_optimal_scale, fit_probe, wants_probe

from .conftest import make_colour_dataset

PROBED = dict(image_size=64, batch_size=16, save_every=0, device="cpu", precision="fp32")


def test_the_probe_runs_for_small_pretrained_splits_only():
    assert wants_probe(True, 300, True)
    assert wants_probe(True, PROBE_MAX_IMAGES, True) and not wants_probe(True, PROBE_MAX_IMAGES + 1, True)
    assert not wants_probe(False, 300, True)  # a random backbone has no features to probe
    assert not wants_probe(True, 300, False)  # probe=False


def test_full_rows_give_every_class_a_row():
    coef, intercept = np.array([[1.0, 2.0]]), np.array([0.5])  # scikit-learn's binary form
    weight, bias = _full_rows(coef, intercept, np.array([0, 2]), k=3)
    assert weight.shape == (3, 2) and bias.shape == (3,)
    x = np.array([[1.0, 1.0], [-1.0, -1.0]])
    decision = x @ coef[0] + intercept[0]  # > 0: the second class
    logits = x @ weight.T + bias
    assert list(logits.argmax(1)) == [2 if d > 0 else 0 for d in decision]
    assert np.all(weight[1] == 0) and bias[1] == MISSING_CLASS_BIAS  # a class with no image never wins


def test_the_scale_minimises_the_smoothed_loss_and_only_shrinks():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(0, 1, (200, 4))
    logits[np.arange(200), labels] += 30.0  # a probe fitted to near-certainty
    s = _loss_optimal_scale(logits, labels, 0.1)
    assert 0 < s < 1

    def loss(scale):
        target = np.full(logits.shape, 0.1 / 4)
        target[np.arange(200), labels] += 0.9
        z = logits * scale
        log_p = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
        return -(target * log_p).sum(1).mean()

    assert loss(s) <= min(loss(s * 0.9), loss(s * 1.1), loss(1.0)) + 1e-6
    assert _loss_optimal_scale(logits, labels, 0.0) == pytest.approx(1.0, abs=1e-2)  # no smoothing: the probe's own fit


def test_the_head_decides_as_the_probe_did(tmp_path):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    from imagerec.training._probe import PROBE_CS

    source = load_images(make_colour_dataset(tmp_path / "d", per_class=12, size=(48, 48)))
    model = create_backbone("efficientnet_lite0", num_classes=3).eval()
    pp = model.preprocessing.resolve(64, 1.0)
    info = fit_probe(model, source, pp, "cpu", label_smoothing=0.1)
    feats = compute_features(source, backbone=model, image_size=64, crop_pct=1.0, normalize=False, pca_dim=None, progress=False).embeddings
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    probe = LogisticRegressionCV(Cs=PROBE_CS, cv=folds, scoring="neg_log_loss", max_iter=2000, random_state=0).fit(feats.features.astype(np.float64), feats.labels)
    with torch.no_grad():
        logits = model.get_classifier()(torch.from_numpy(feats.features)).numpy()
    assert info["images"] == len(source) and info["C"] == pytest.approx(float(probe.C_[0]))
    assert np.array_equal(logits.argmax(1), probe.predict(feats.features.astype(np.float64)))


def test_the_probe_is_epoch_zero_and_kept_until_fine_tuning_validates_as_well(tmp_path):
    data = make_colour_dataset(tmp_path / "d", per_class=20, size=(48, 48))
    result = train(data, tmp_path / "run", TrainConfig(epochs=1, val_fraction=0.25, **PROBED), progress=False)
    first = result.history[0]
    assert (first["epoch"], first["stage"], first["step"]) == (0, 0, 0)
    assert [row["stage"] for row in result.history] == [0, 2]  # no head-only SGD stage after the probe
    assert result.plan.head_steps == 0 and result.plan.frozen_norm  # auto: frozen statistics after the probe
    best = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert best.meta["probe"]["images"] == 45
    kept = result.best_epoch
    assert kept in (0, 1)
    acc = {row["epoch"]: row["val_acc"] for row in result.history}
    loss = {row["epoch"]: row["val_loss"] for row in result.history}
    replaces = acc[1] > acc[0] or (within_one_se(acc[1], acc[0], 15) and not_worse(loss[1], loss[0]))
    assert kept == (1 if replaces else 0)  # fine-tuning replaced the probe only where it validated as well
    assert best.meta["step"] == (0 if kept == 0 else result.plan.total_steps)


def test_fine_tuning_after_the_probe_takes_small_steps(tmp_path):
    """Stage 2's peak learning rates after the probe are the configured ones times
    probe_lr_scale (head lr, backbone lr x backbone_lr_scale); without the probe they are not scaled."""
    data = make_colour_dataset(tmp_path / "d", per_class=12, size=(48, 48))
    for probe, scale in ((True, 0.1), (False, 1.0)):
        config = TrainConfig(epochs=1, head_epochs=0, val_fraction=0.25, probe=probe, lr=0.04, probe_lr_scale=0.1, **PROBED)
        result = train(data, tmp_path / f"run-{probe}", config, progress=False)
        assert result.plan.lr_scale == scale
        groups = load_checkpoint(tmp_path / f"run-{probe}" / "last.safetensors").optimizer["param_groups"]
        linear = 16 / 64  # batch_size / lr_batch
        assert sorted({g["peak_lr"] for g in groups}) == pytest.approx([0.04 * 0.5 * linear * scale, 0.04 * linear * scale])
    with pytest.raises(ImagerecError, match="probe_lr_scale=0"):
        TrainConfig(probe_lr_scale=0)


def test_a_budget_with_no_room_for_a_step_after_the_probe_gives_the_probe(tmp_path, monkeypatch, capsys):
    import imagerec.training._plan as planning

    monkeypatch.setattr(planning, "_time_steps", lambda *args, **kwargs: 1e4)  # a step would take hours
    data = make_colour_dataset(tmp_path / "d", per_class=12, size=(48, 48))
    result = train(data, tmp_path / "run", TrainConfig(time_budget=1, val_fraction=0.25, **PROBED), progress=False)
    assert result.plan.total_steps == 0 and [row["epoch"] for row in result.history] == [0]
    assert "the probe is the model" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "best.safetensors").meta["step"] == 0


def test_frozen_norm_keeps_the_pretrained_statistics_while_weights_train(tmp_path):
    data = make_colour_dataset(tmp_path / "d", per_class=16)
    config = TrainConfig(epochs=1, head_epochs=0, val_fraction=0, freeze_groups=2, probe=False, norm_stats="frozen", **PROBED)
    result = train(data, tmp_path / "run", config, progress=False)
    assert result.plan.frozen_norm
    before = create_backbone("efficientnet_lite0", num_classes=3).state_dict()
    after = load_checkpoint(tmp_path / "run" / "last.safetensors").model
    for name in ("bn1.running_mean", "blocks.3.0.bn1.running_mean", "bn2.running_var"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["blocks.3.0.conv_pw.weight"], before["blocks.3.0.conv_pw.weight"])  # the weights still train
