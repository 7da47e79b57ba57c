"""Temperature scaling: one number T that makes a trained classifier's probabilities honest.

A network trained with cross-entropy is usually over-confident: among the images it calls 95%
sure, fewer than 95% are right. Dividing every logit by one temperature T > 1 softens the
probabilities (T < 1 sharpens them) without changing which class is most probable, so accuracy
is untouched (Guo et al., "On Calibration of Modern Neural Networks", 2017). T is the value that
minimises the negative log-likelihood of held-out images, a one-dimensional convex problem in
log T, solved by a bounded search.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

T_BOUNDS = (0.05, 20.0)  # a temperature outside these means a broken model, not a calibration
MIN_PROBABILITY = 1e-30  # float32 softmax underflows to 0; its log is clipped here


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(``logits`` / ``temperature``).

    Args:
        logits: float array (N, C); log-probabilities work as well (a per-row constant cancels).
        labels: int array (N,) of true classes.
        temperature: T > 0.
    """
    log_p = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the NLL of softmax(logits / T) on labelled images.

    Args:
        logits: float array (N, C) of held-out images (or their log-probabilities).
        labels: int array (N,) of their true classes.

    Returns:
        T in ``T_BOUNDS``; 1.0 when there are no images.
    """
    labels = np.asarray(labels, np.int64)
    if not len(labels):
        return 1.0
    logits = np.asarray(logits, np.float64)
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=tuple(np.log(T_BOUNDS)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def calibration_meta(raw_proba: np.ndarray, labels: np.ndarray) -> dict:
    """The checkpoint metadata of a calibration fitted on held-out predictions.

    Args:
        raw_proba: float array (N, C), the plain softmax of the held-out images' logits.
        labels: int array (N,) of their true classes.

    Returns:
        ``{"temperature": T, "calibration": {"images", "nll_before", "nll_after"}}``.
    """
    log_p = np.log(np.clip(np.asarray(raw_proba, np.float64), MIN_PROBABILITY, None))
    temperature = fit_temperature(log_p, labels)
    facts = {
        "images": int(len(labels)),
        "nll_before": nll(log_p, labels) if len(labels) else None,
        "nll_after": nll(log_p, labels, temperature) if len(labels) else None,
    }
    return {"temperature": temperature, "calibration": facts}
