"""Outliers: images far from everything else in embedding space, and far from their own class.

The score of an image is its mean cosine distance to its ``k`` nearest other images (features
L2-normalised, exact inner-product search with FAISS ``IndexFlatIP``, queried in blocks so that
memory stays O(N k), never N x N). With labels, ``class_score`` is the same distance measured
only against images of the same class.

Default threshold (``threshold=None``): the modified z-score rule of Iglewicz and Hoaglin
(1993), one-sided: an image is an outlier when ``0.6745 * (score - median) / MAD > 3.5``, that
is ``score > median + 3.5 / 0.6745 * MAD``. The median and the median absolute deviation (MAD)
are robust to the outliers themselves, so clean data gets few flags and a set without outliers
is not forced to have any (a quantile rule would always flag its quantile). Where over half the
scores are equal (MAD = 0), the mean absolute deviation stands in for it (divided by 0.7979,
its value for a normal distribution).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from imagerec.errors import ImagerecError

ROBUST_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
_MAD_TO_Z = 0.6745  # the normal distribution's MAD in standard deviations
SEARCH_BLOCK = 4096  # query rows per FAISS search: memory O(SEARCH_BLOCK * k)


def find_outliers(
    features: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    threshold: float | None = None,
    k: int = 10,
) -> pd.DataFrame:
    """Score every image by how far it lies from its nearest neighbours.

    Args:
        features: float array of shape (N, D), one embedding per image (any scale: rows are
            L2-normalised here).
        labels: optional int array of shape (N,), the class of each image; adds ``class_score``
            (distance to the nearest images of the same class) and ``is_class_outlier``.
        threshold: the score above which an image is an outlier (cosine distance, 0..2); the
            same value applies to ``class_score``. Default: the robust z-score rule of the
            module docstring, computed separately for ``score`` and ``class_score``.
        k: neighbours averaged per image (fewer where a class has fewer other images).

    Returns:
        A DataFrame, one row per image, sorted most outlying first: ``index`` (row in
        ``features``), ``score`` (mean cosine distance to the ``k`` nearest other images),
        ``is_outlier``; with labels also ``class_score`` (NaN for the only image of its class)
        and ``is_class_outlier``. ``df.attrs`` holds ``threshold``, ``class_threshold`` and ``k``.

    Raises:
        ImagerecError: fewer than 2 images, features that are not a finite 2-D array, labels of
            another length, a negative threshold or ``k < 1``.
    """
    x = check_features(features, min_rows=2, what="outlier detection")
    if k < 1:
        raise ImagerecError(f"k={k} must be at least 1 neighbour; try the default k=10")
    if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
        raise ImagerecError(
            f"threshold={threshold} must be a cosine distance >= 0; try 0.5, or None for the robust default"
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(x),):
            raise ImagerecError(
                f"labels have shape {labels.shape}, features have {len(x)} rows; give one label per row"
            )

    score = knn_distance(x, k)
    frame = {"index": np.arange(len(x)), "score": score}
    cut = _threshold(score, threshold)
    frame["is_outlier"] = score > cut
    attrs = {"threshold": cut, "k": k}
    if labels is not None:
        class_score = np.full(len(x), np.nan, dtype=np.float32)
        for value in np.unique(labels):
            rows = np.flatnonzero(labels == value)
            if len(rows) > 1:
                class_score[rows] = knn_distance(x[rows], k)
        class_cut = _threshold(class_score[~np.isnan(class_score)], threshold)
        frame["class_score"] = class_score
        frame["is_class_outlier"] = class_score > class_cut  # NaN compares False
        attrs["class_threshold"] = class_cut
    df = pd.DataFrame(frame).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs.update(attrs)
    return df


def check_features(features: np.ndarray, *, min_rows: int, what: str) -> np.ndarray:
    """Validate an (N, D) feature array and return it L2-normalised as contiguous float32.

    Raises:
        ImagerecError: not 2-D, fewer than ``min_rows`` rows, non-finite values.
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ImagerecError(f"features have shape {x.shape}; {what} needs a 2-D array (N images, D > 0 dimensions)")
    if len(x) < min_rows:
        raise ImagerecError(f"{len(x)} image(s) given; {what} needs at least {min_rows}; add images")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ImagerecError(f"{bad} feature row(s) hold NaN or infinity; re-embed those images or drop them")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row to its ``k`` nearest other rows.

    Args:
        x: float32 array (N, D), rows L2-normalised, N >= 2.
        k: neighbours wanted; capped at N - 1.

    Returns:
        float32 array (N,), values in [0, 2].
    """
    sims, _ = knn_search(x, k)
    return np.clip(1.0 - sims.mean(axis=1), 0.0, 2.0)


def knn_search(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of every row (exact inner product, FAISS, queried in blocks).

    Args:
        x: float32 array (N, D), rows L2-normalised, N >= 2.
        k: neighbours wanted; capped at N - 1.

    Returns:
        ``(sims, ids)``: float32 and int64 arrays (N, k), nearest first; a row never lists itself.
    """
    import faiss  # deferred: only the neighbour checks need it

    k = min(k, len(x) - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims = np.empty((len(x), k), dtype=np.float32)
    ids = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), SEARCH_BLOCK):
        block = x[start : start + SEARCH_BLOCK]
        s, i = index.search(block, k + 1)
        # Drop each row's own hit; where an exact duplicate took its place, drop the last one.
        own = i == np.arange(start, start + len(block))[:, None]
        own[~own.any(axis=1), -1] = True
        sims[start : start + len(block)] = s[~own].reshape(len(block), k)
        ids[start : start + len(block)] = i[~own].reshape(len(block), k)
    return sims, ids


def _threshold(score: np.ndarray, threshold: float | None) -> float:
    """The given threshold, or the robust z-score cut of the module docstring."""
    if threshold is not None:
        return float(threshold)
    if len(score) == 0:
        return float("inf")
    median = float(np.median(score))
    mad = float(np.median(np.abs(score - median)))
    if mad == 0:  # over half the scores tie: fall back to the mean absolute deviation (IBM's rule)
        return median + ROBUST_Z * float(np.mean(np.abs(score - median))) / 0.7979
    return median + ROBUST_Z / _MAD_TO_Z * mad
