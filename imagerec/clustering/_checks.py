"""Checks at the clustering boundary: every public entry point validates here, once.

The helpers behind the boundary trust what passed these checks. Messages name the value, the
rule and the fix, as scikit-learn's do (``n_samples=5 should be >= n_clusters=8``).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

from ..errors import ImagerecError, ImagerecWarning


class ClusteringWarning(ImagerecWarning):
    """A legal but degenerate clustering: identical images, k=1, fewer clusters than asked for,
    everything marked noise. The run goes on and says what it did instead."""


def warn(message: str, stacklevel: int = 4) -> None:
    """Raise a :class:`ClusteringWarning` pointing at the user's call (``stacklevel`` frames up
    from here), not at imagerec."""
    warnings.warn(message, ClusteringWarning, stacklevel=stacklevel)


def check_features(features, name: str = "features") -> np.ndarray:
    """A 2-D float array of finite values, as float32 (float64 input stays float64).

    Args:
        features: array-like of shape (N, D).
        name: what to call it in messages.

    Returns:
        A C-contiguous float array of shape (N, D).

    Raises:
        ImagerecError: not 2-D, empty, not numeric, or holding NaN or infinite values.
    """
    try:
        array = np.asarray(features)
    except (TypeError, ValueError) as e:
        raise ImagerecError(f"{name} could not be read as an array ({e}); pass a float array of shape (N, D)") from None
    if array.ndim != 2:
        raise ImagerecError(
            f"{name} has shape {array.shape}; it must be 2-D (N images, D features), e.g. Embeddings.features"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImagerecError(f"{name} has shape {array.shape}: no images or no features; embed some images first")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ImagerecError(f"{name} has dtype {array.dtype}; it must be numeric (float32 feature vectors)")
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    array = np.ascontiguousarray(array, dtype=dtype)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ImagerecError(
            f"{name} has {len(bad)} row(s) with NaN or infinite values (first: row {bad[0]}); "
            "embed those images again, or drop the rows before clustering"
        )
    return array


def check_n_samples(n_samples: int, minimum: int = 2) -> None:
    """Clustering needs at least ``minimum`` images.

    Raises:
        ImagerecError: fewer images than that.
    """
    if n_samples < minimum:
        raise ImagerecError(
            f"n_samples={n_samples} should be >= {minimum}: there is nothing to group with "
            f"{n_samples} image(s); cluster at least {minimum} images"
        )


def check_n_clusters(n_clusters, n_samples: int | None = None) -> int:
    """A whole number of clusters, at least 1 and at most the number of images.

    Args:
        n_clusters: the asked-for number of clusters.
        n_samples: number of images, where known.

    Returns:
        ``n_clusters`` as an int.

    Raises:
        ImagerecError: not a whole number, below 1, or above ``n_samples``.
    """
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral):
        raise ImagerecError(f"n_clusters={n_clusters!r} must be a whole number of clusters, e.g. 10 (or k='auto')")
    n_clusters = int(n_clusters)
    if n_clusters < 1:
        raise ImagerecError(f"n_clusters={n_clusters} must be at least 1; ask for 2 or more clusters, or k='auto'")
    if n_samples is not None and n_samples < n_clusters:
        raise ImagerecError(
            f"n_samples={n_samples} should be >= n_clusters={n_clusters}: there are fewer images than "
            f"clusters; ask for at most {n_samples} clusters, or add images"
        )
    return n_clusters


def check_positive(
    value, name: str, *, integer: bool = False, minimum: float = 0.0, inclusive: bool = False, hint: str = ""
):
    """A number above (or, with ``inclusive``, at least) ``minimum``.

    Raises:
        ImagerecError: of the wrong type or out of range.
    """
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ImagerecError(f"{name}={value!r} must be {'a whole number' if integer else 'a number'}{hint}")
    ok = value >= minimum if inclusive else value > minimum
    if not ok or (not integer and not np.isfinite(value)):
        raise ImagerecError(f"{name}={value!r} must be {'>=' if inclusive else '>'} {minimum}{hint}")
    return int(value) if integer else float(value)


def all_identical(features: np.ndarray) -> bool:
    """Whether every row equals the first (duplicates, or blank images)."""
    return bool(np.all(features.max(axis=0) == features.min(axis=0)))
