"""Which images to label next: the ones whose label would teach the suggestions most.

Two regimes, as the active-learning literature finds them (Hacohen et al., "Active learning on a
budget", ICML 2022):

* **Few labels** (fewer than ``typical_until`` a class so far): TypiClust. Cluster every image
  into (labelled + budget) groups and label the most *typical* image (densest neighbourhood) of
  each of the largest groups that hold no label yet. Uncertainty is worthless here: a model fit
  on a handful of labels is unsure about everything.
* **More labels**: uncertainty among diverse images. Take the images with the smallest margin
  between their two most likely classes (a pool of ``pool_factor`` x budget), cluster the pool
  into ``budget`` groups and label the least certain image of each, so one batch does not spend
  every click on the same confusing corner.
"""

from __future__ import annotations

import numpy as np

from ..clustering import KMeans
from ..clustering._neighbors import knn
from ..errors import ImagerecError

TYPICAL_NEIGHBORS = 20  # typicality: inverse mean distance to this many neighbours in the group
MAX_GROUPS = 2_000  # k-means groups at most (beyond, a batch is spread over these many)


def select_next(
    features: np.ndarray,
    labels,
    budget: int,
    *,
    proba: np.ndarray | None = None,
    typical_until: float = 3.0,
    pool_factor: int = 10,
    random_state: int = 0,
) -> np.ndarray:
    """Indices of ``budget`` unlabelled images to label next, most useful first.

    Args:
        features: float array (N, D), L2-normalised rows.
        labels: sequence of N class names, None (or "") for images without a label.
        budget: how many images to pick (capped at the unlabelled count).
        proba: float array (N, C) of current suggestions (``Suggester.proba_``); needed only once
            there are ``typical_until`` labels a class.
        typical_until: labels a class (mean over the classes seen) below which TypiClust picks.
        pool_factor: the uncertainty pool holds this many times ``budget`` images.
        random_state: seed of the k-means runs.

    Returns:
        int array of at most ``budget`` distinct indices of unlabelled images.

    Raises:
        ImagerecError: a budget below 1, or labels of another length.
    """
    features = np.ascontiguousarray(features, np.float32)
    labels = list(labels)
    if len(labels) != len(features):
        raise ImagerecError(f"{len(labels)} labels for {len(features)} images; give one label (or None) per image")
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ImagerecError(f"budget={budget!r} must be a whole number >= 1")
    known = np.array([not (v is None or str(v) == "") for v in labels])
    unlabelled = np.flatnonzero(~known)
    budget = min(int(budget), len(unlabelled))
    if budget == 0:
        return np.zeros(0, np.int64)
    n_classes = len({str(v) for v, k in zip(labels, known) if k})
    per_class = known.sum() / max(n_classes, 1)
    if proba is None or n_classes < 2 or per_class < typical_until:
        return _typiclust(features, known, budget, random_state)
    return _diverse_margin(features, unlabelled, np.asarray(proba), budget, pool_factor, random_state)


def _typiclust(x: np.ndarray, known: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """The most typical image of each of the ``budget`` largest groups without a label."""
    k = int(min(known.sum() + budget, MAX_GROUPS, len(x)))
    groups = KMeans(n_clusters=k, random_state=seed).fit_predict(x)
    covered = set(groups[known].tolist())
    sizes = np.bincount(groups, minlength=k)
    order = [g for g in np.argsort(-sizes, kind="stable") if g not in covered and sizes[g] > 0]
    picks: list[int] = []
    for g in order[:budget]:
        members = np.flatnonzero((groups == g) & ~known)
        picks.append(int(members[np.argmax(_typicality(x[members]))]))
    if len(picks) < budget:  # more picks than unlabelled groups: the next most typical, anywhere
        rest = np.setdiff1d(np.flatnonzero(~known), picks)
        picks += rest[np.argsort(-_typicality(x[rest]), kind="stable")[: budget - len(picks)]].tolist()
    return np.asarray(picks, np.int64)


def _typicality(x: np.ndarray) -> np.ndarray:
    """1 / mean distance to the nearest neighbours among ``x`` (a lone image: 1)."""
    if len(x) < 2:
        return np.ones(len(x))
    dist, _ = knn(x, min(TYPICAL_NEIGHBORS, len(x) - 1))
    return 1 / (dist.mean(1) + 1e-8)


def _diverse_margin(x: np.ndarray, unlabelled: np.ndarray, proba: np.ndarray, budget: int, factor: int, seed: int) -> np.ndarray:
    """The least certain image of each of ``budget`` k-means groups of the least certain pool."""
    top2 = np.sort(proba[unlabelled], axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    order = np.argsort(margin, kind="stable")[: budget * factor]
    pool, pool_margin = unlabelled[order], margin[order]
    if len(pool) <= budget:
        return pool
    groups = KMeans(n_clusters=budget, random_state=seed).fit_predict(x[pool])
    picks = [np.flatnonzero(groups == g)[np.argmin(pool_margin[groups == g])] for g in np.unique(groups)]
    picks.sort(key=lambda j: pool_margin[j])  # positions in the pool, least certain first
    return pool[np.asarray(picks[:budget], np.int64)]
