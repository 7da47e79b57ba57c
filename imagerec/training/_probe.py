"""Stage 0 of the transfer recipe: the new head fitted to convergence on the frozen backbone (LP-FT).

Fine-tuning from a random head spends its first steps pulling the pretrained features towards
whatever the random head needs (Kumar et al., "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022). Fitting the linear head first, a linear probe
solved to convergence, then fine-tuning from it (LP-FT) starts stage 2 from the probe's accuracy.
On a CPU with a few minutes for photos at 224 px there are only a dozen or so SGD steps, and a head
trained by those steps alone stayed far below what a probe reaches on the same images in seconds
(benchmarks/results/suite_train_run1.json; docs/MODELS.md).

The probe is the careful user's first model: scikit-learn's ``LogisticRegressionCV`` on the
backbone's pooled features of the training split (the centre crop, no augmentation), its
regularisation chosen by stratified cross-validation on log loss. The features come from the one
feature stage (:func:`~imagerec.features.compute_features`) with the model being trained as the
backbone. Its weights and bias become the head's, so the model contract is unchanged: one backbone,
one linear head.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn

PROBE_CS = np.logspace(-3, 3, 7)  # the probe's regularisation, chosen among these by cross-validation
PROBE_MAX_IMAGES = 5000  # larger training splits get enough SGD steps for the head stage (CIFAR-10: 45,000)
PROBE_FOLDS = 5
MISSING_CLASS_BIAS = -10.0  # a class with no training image: the probe never predicts it


def wants_probe(pretrained: bool, train_images: int, enabled: bool) -> bool:
    """Whether a new run starts with the probe: a pretrained backbone (a random one has no
    features to probe) and a training split small enough that the SGD head stage is too short."""
    return enabled and pretrained and train_images <= PROBE_MAX_IMAGES


def fit_probe(model: nn.Module, train_src, pp, device, *, label_smoothing: float = 0.0, seed: int = 0, max_pixels: int | None = None,
              progress: bool = False) -> dict:
    """Fit the linear head of ``model`` on its frozen features of ``train_src`` (in place).

    The probe's weights are then scaled by the one factor that minimises fine-tuning's own loss
    (cross-entropy with ``label_smoothing``) on those features: a probe fitted to near-certainty
    on a few easy images has logits so large that label smoothing's first gradients would tear
    the pretrained features apart (measured: a train loss of 6 after one epoch from a probe at
    0.0001); scaled, fine-tuning starts where its loss is flat along that direction.

    Returns:
        What was done, for the run's metadata and metrics: ``C``, ``images``, ``train_loss``,
        ``train_acc`` (of the probe on its own training features), ``images_per_s`` and ``seconds``.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    from ..data import DEFAULT_MAX_PIXELS
    from ..features import compute_features

    started = time.perf_counter()
    model.eval()
    feats = compute_features(
        train_src, backbone=model, image_size=pp.input_size, crop_pct=pp.crop_pct, normalize=False, pca_dim=None,
        device=str(device), max_pixels=max_pixels or DEFAULT_MAX_PIXELS, progress=progress,
    )  # fmt: skip
    embed_s = time.perf_counter() - started
    x, y = feats.embeddings.features.astype(np.float64), np.asarray(feats.embeddings.labels, np.int64)
    smallest = int(np.bincount(y).min()) if len(y) else 0
    # One BLAS thread: lbfgs on a few hundred rows gains nothing from two, and a busy CPU loses much.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the largest C are part of the search
        if smallest >= 2 and len(np.unique(y)) >= 2:
            folds = StratifiedKFold(n_splits=min(PROBE_FOLDS, smallest), shuffle=True, random_state=seed)
            probe = LogisticRegressionCV(Cs=PROBE_CS, cv=folds, scoring="neg_log_loss", max_iter=2000, random_state=seed).fit(x, y)
            c = float(np.atleast_1d(probe.C_)[0])
        else:  # a class with one image: no fold could hold it out; the middle of the range
            c = 1.0
            probe = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    coef, intercept = _full_rows(probe.coef_, probe.intercept_, probe.classes_, model.get_classifier().out_features)
    scale = _loss_optimal_scale(x @ coef.T + intercept, y, label_smoothing)
    _set_head(model.get_classifier(), coef * scale, intercept * scale)
    proba = probe.predict_proba(x)
    picked = np.searchsorted(probe.classes_, y)
    return {
        "C": c,
        "scale": scale,
        "images": int(len(y)),
        "train_loss": float(-np.log(np.clip(proba[np.arange(len(y)), picked], 1e-12, None)).mean()),
        "train_acc": float((probe.classes_[proba.argmax(1)] == y).mean()),
        "images_per_s": len(y) / max(embed_s, 1e-9),
        "seconds": time.perf_counter() - started,
    }


def _full_rows(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The probe's (weights, bias) with a row for each of the ``k`` classes: a class the probe
    never saw gets zero weights and a bias that never wins."""
    if len(classes) == 2 and coef.shape[0] == 1:  # scikit-learn's binary form: one row for the second class
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((k, coef.shape[1]), np.float64)
    bias = np.full(k, MISSING_CLASS_BIAS, np.float64)
    weight[classes], bias[classes] = coef, intercept
    return weight, bias


def _loss_optimal_scale(logits: np.ndarray, labels: np.ndarray, label_smoothing: float) -> float:
    """The factor s in [1e-3, 1] minimising the mean label-smoothed cross-entropy of s * logits
    (only ever shrinking: the probe's own fit is the most confident it should start)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    k = logits.shape[1]
    target = np.full(logits.shape, label_smoothing / k)
    target[np.arange(len(labels)), labels] += 1.0 - label_smoothing

    def loss(log_s: float) -> float:
        return float(-(target * log_softmax(logits * np.exp(log_s), axis=1)).sum(1).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(1e-3), 0.0), method="bounded", options={"xatol": 1e-3}).x))


@torch.no_grad()
def _set_head(head: nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    head.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
    head.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
