"""Checks at the clustering boundary: every public entry point validates here, once.

The helpers behind the boundary trust what passed these checks. Messages name the value, the
rule and the fix, as scikit-learn's do (``n_samples=5 should be >= n_clusters=8``).
"""

from __future__ import annotations

import numbers
import warnings


from ..errors import ImagerecError, ImagerecWarning
from ..features._prepare import all_identical, check_features, check_positive  # noqa: F401 - re-exported: the one definition lives with the feature stage


class ClusteringWarning(ImagerecWarning):
    """A legal but degenerate clustering: identical images, k=1, fewer clusters than asked for,
    everything marked noise. The run goes on and says what it did instead."""


def warn(message: str, stacklevel: int = 4) -> None:
    """Raise a :class:`ClusteringWarning` pointing at the user's call (``stacklevel`` frames up
    from here), not at imagerec."""
    warnings.warn(message, ClusteringWarning, stacklevel=stacklevel)


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
