"""``k="auto"``: choosing the number of clusters without labels.

Every candidate k in a range is clustered and scored by three label-free criteria:

* silhouette (higher is better), on a random sample of at most ``sample_size`` images, since it
  costs O(n^2);
* Calinski-Harabasz (higher is better), on all images;
* Davies-Bouldin (lower is better), on all images.

The chosen k has the best mean rank over the three; ties go to the higher silhouette, then to
the smaller k. One criterion alone is easily fooled (silhouette favours k=2 on embeddings whose
classes touch); a rank vote is not swayed by their different scales.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

from ..errors import ImagerecError
from ._checks import ClusteringWarning, check_features, check_n_samples
from ._hierarchy import AgglomerativeClustering
from ._methods import K_METHODS, check_method, make_estimator
from ._metrics import sampled_silhouette

DEFAULT_K_RANGE = (2, 15)


@dataclass
class KSelection:
    """The scores of every candidate number of clusters, and the one chosen.

    Attributes:
        best_k: the chosen number of clusters.
        scores: one dict per candidate: ``k``, ``found`` (non-empty clusters), ``silhouette``,
            ``calinski_harabasz``, ``davies_bouldin`` (None where undefined), ``mean_rank`` and
            ``seconds``.
        scored_with: the method whose clusterings were scored.
        rule: how ``best_k`` was chosen, in words.
    """

    best_k: int
    scores: list[dict]
    scored_with: str
    rule: str

    def table(self) -> str:
        """The scores as a text table, the chosen row marked with ``*``."""
        lines = [f"{'k':>4} {'silhouette':>10} {'calinski_harabasz':>17} {'davies_bouldin':>14} {'mean_rank':>9}"]
        for s in self.scores:
            cells = [
                _fmt(s["silhouette"], ".4f"),
                _fmt(s["calinski_harabasz"], ".1f"),
                _fmt(s["davies_bouldin"], ".4f"),
            ]
            mark = " *" if s["k"] == self.best_k else ""
            lines.append(f"{s['k']:>4} {cells[0]:>10} {cells[1]:>17} {cells[2]:>14} {s['mean_rank']:>9.2f}{mark}")
        return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def check_k_range(k_range, n_samples: int) -> tuple[int, int]:
    """Inclusive bounds ``(low, high)``, with ``high`` capped at ``n_samples - 1``.

    Raises:
        ImagerecError: not two whole numbers with 2 <= low <= high, or too few images.
    """
    try:
        low, high = (int(v) for v in k_range)
    except (TypeError, ValueError):
        raise ImagerecError(f"k_range={k_range!r} must be two whole numbers (low, high), e.g. (2, 15)") from None
    if not 2 <= low <= high:
        raise ImagerecError(f"k_range=({low}, {high}) needs 2 <= low <= high; e.g. (2, 15)")
    if n_samples - 1 < low:
        raise ImagerecError(
            f"n_samples={n_samples} is too few to compare numbers of clusters from {low} on (the silhouette needs "
            f"k <= n_samples - 1); give a fixed k, or more images"
        )
    return low, min(high, n_samples - 1)


def select_n_clusters(
    features,
    *,
    method: str = "kmeans",
    k_range: tuple[int, int] = DEFAULT_K_RANGE,
    params: dict | None = None,
    sample_size: int = 5000,
    random_state: int | None = 0,
) -> KSelection:
    """Choose the number of clusters by label-free criteria (see the module docstring).

    Args:
        features: float array (N, D), prepared.
        method: a method that takes k. ``"deep"`` is scored with k-means (training a head for
            every candidate would cost as much as many runs); ``"agglomerative"`` builds its
            tree once and cuts it at every k.
        k_range: inclusive (low, high); high is capped at N - 1.
        params: the method's other constructor arguments.
        sample_size: images the silhouette is computed on.
        random_state: seed of the clusterings and of the sample.

    Returns:
        A :class:`KSelection`.

    Raises:
        ImagerecError: bad features, range or method.
    """
    X = check_features(features)
    check_n_samples(len(X), 3)
    method = check_method(method)
    if method not in K_METHODS:
        raise ImagerecError(
            f"method={method!r} finds the number of clusters itself; k='auto' applies to {', '.join(K_METHODS)}"
        )
    low, high = check_k_range(k_range, len(X))
    scored_with = "kmeans" if method == "deep" else method
    params = {} if method == "deep" else dict(params or {})
    labelings = _labelings(X, scored_with, range(low, high + 1), params, random_state)
    scores = []
    for k, (labels, seconds) in labelings.items():
        found = int(len(np.unique(labels)))
        ok = 2 <= found <= len(X) - 1
        scores.append(
            {
                "k": k,
                "found": found,
                "silhouette": sampled_silhouette(X, labels, sample_size, random_state) if ok else None,
                "calinski_harabasz": float(calinski_harabasz_score(X, labels)) if ok else None,
                "davies_bouldin": float(davies_bouldin_score(X, labels)) if ok else None,
                "seconds": round(seconds, 3),
            }
        )
    _rank(scores)
    best = min(
        scores, key=lambda s: (s["mean_rank"], -(s["silhouette"] if s["silhouette"] is not None else -2), s["k"])
    )
    rule = "best mean rank of silhouette (higher), Calinski-Harabasz (higher) and Davies-Bouldin (lower)"
    return KSelection(best["k"], scores, scored_with, rule)


def _labelings(X, method, ks, params, random_state) -> dict[int, tuple[np.ndarray, float]]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClusteringWarning)  # "found fewer clusters" shows in the scores
        if method == "agglomerative":
            start = time.perf_counter()
            tree = make_estimator(method, max(ks), params, random_state)
            tree.fit(X)
            assert isinstance(tree, AgglomerativeClustering)
            for k in ks:
                has_tree = hasattr(tree, "linkage_matrix_")  # not when every image is the same
                out[k] = (
                    tree.cut(min(k, len(tree.linkage_matrix_) + 1)) if has_tree else tree.labels_,
                    time.perf_counter() - start,
                )
                start = time.perf_counter()
            return out
        for k in ks:
            start = time.perf_counter()
            out[k] = (make_estimator(method, k, params, random_state).fit(X).labels_, time.perf_counter() - start)
    return out


def _rank(scores: list[dict]) -> None:
    """Add ``mean_rank``: 1 is best; an undefined score ranks last."""
    columns = [("silhouette", -1), ("calinski_harabasz", -1), ("davies_bouldin", 1)]
    ranks = []
    for key, sign in columns:
        values = np.array([np.inf if s[key] is None else sign * s[key] for s in scores])
        ranks.append(rankdata(values, method="average"))
    for s, r in zip(scores, np.mean(ranks, axis=0)):
        s["mean_rank"] = float(r)
