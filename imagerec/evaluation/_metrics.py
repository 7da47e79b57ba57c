"""Classification metrics on arrays: plain functions, tested on hand-computed cases."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix as _sk_confusion
from sklearn.metrics import precision_recall_fscore_support


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of correct predictions (the origin document's metric)."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else float("nan")


def top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the ``k`` most probable.

    Args:
        y_true: int array (N,).
        proba: float array (N, C) of class probabilities (or scores).
        k: how many top classes count; clipped to C.
    """
    k = min(k, proba.shape[1])
    top = np.argpartition(-proba, k - 1, axis=1)[:, :k]
    return float(np.mean((top == np.asarray(y_true)[:, None]).any(axis=1)))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 array (C, C): row = true class, column = predicted class."""
    return _sk_confusion(y_true, y_pred, labels=np.arange(num_classes)).astype(np.int64)


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1, support and accuracy of each class (arrays of length C).

    A class's accuracy is its recall: the share of its images predicted as it. Undefined values
    (a class never predicted, or absent) are 0.
    """
    labels = np.arange(num_classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "accuracy": recall}


def calibration(proba: np.ndarray, y_true: np.ndarray, bins: int = 15) -> tuple[float, dict[str, np.ndarray]]:
    """Expected calibration error (ECE) over ``bins`` equal-width confidence bins.

    ECE = sum over bins of (images in bin / N) * |accuracy in bin - mean confidence in bin|.

    Returns:
        (ece, table) where table holds per-bin ``lower``, ``upper``, ``count``, ``accuracy`` and
        ``confidence`` arrays, for a reliability plot.
    """
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct, minlength=bins) / np.maximum(count, 1)
    conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    ece = float(np.sum(count / max(len(confidence), 1) * np.abs(acc - conf)))
    return ece, {"lower": edges[:-1], "upper": edges[1:], "count": count, "accuracy": acc, "confidence": conf}
