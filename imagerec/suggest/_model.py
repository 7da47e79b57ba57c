"""Suggested classes for every image from the few a person labelled.

Two learners on the same prepared features, averaged:

1. a **linear probe**: multinomial logistic regression on the labelled images;
2. **label propagation** over the images' k-nearest-neighbour graph (Zhou et al. 2004, with the
   sparse cosine graph and conjugate-gradient solve of Iscen et al., CVPR 2019): a label spreads
   to the images it is connected to, so one labelled image of a tight group names the group.

The graph is built once per collection; a new decision only re-solves the linear systems and
refits the probe, which is what keeps a refresh under a second on 10,000 images.
Labelled images get **out-of-fold** suggestions (the model that judges an image never saw its
label), so ``disagrees`` means "a model trained on the other labels thinks otherwise".
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from ..clustering._neighbors import knn
from ..errors import ImagerecError
from ..training._calibrate import fit_temperature

METHODS = ("auto", "probe", "propagation")
MIN_CALIBRATION_LABELS = 30  # below this many out-of-fold labels no temperature is fitted (T = 1)
OOF_FOLDS = 5


class Suggester:
    """Fit on every image's features and the labels known so far; suggest a class for each.

    Args:
        method: ``"auto"`` (the mean of the probe's and the propagation's probabilities),
            ``"probe"`` or ``"propagation"``.
        n_neighbors: neighbours per image in the graph.
        alpha: how far labels spread (0: not at all, towards 1: along the whole graph).
        gamma: the graph's edge weight is ``cosine ** gamma`` (sharper for larger gamma).
        C: inverse L2 regularisation of the probe.
        random_state: seed of the out-of-fold split.

    Attributes:
        classes_: class names, sorted.
        proba_: float array (N, C): calibrated probabilities of every image (out-of-fold for the
            labelled ones where their class has at least two labels).
        temperature_: the temperature applied to the averaged log-probabilities (1.0 when too few
            labels to fit one).
        graph_: the normalised sparse kNN graph (N, N), reused by :meth:`refit`.
    """

    def __init__(self, method: str = "auto", *, n_neighbors: int = 20, alpha: float = 0.99, gamma: float = 3.0,
                 C: float = 1.0, random_state: int = 0):  # fmt: skip
        self.method = method
        self.n_neighbors = n_neighbors
        self.alpha = alpha
        self.gamma = gamma
        self.C = C
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, features: np.ndarray, labels) -> Suggester:
        """Build the graph of ``features`` and fit on ``labels``.

        Args:
            features: float array (N, D), one row per image; L2-normalised rows are expected
                (cosine similarity is their dot product).
            labels: sequence of N class names, None (or "") for images without a label.

        Returns:
            self.

        Raises:
            ImagerecError: a bad method, lengths that differ, or no labelled image.
        """
        if self.method not in METHODS:
            raise ImagerecError(f"method={self.method!r} is not one of {METHODS}; use 'auto'")
        features = np.ascontiguousarray(features, np.float32)
        if features.ndim != 2 or len(features) < 2:
            raise ImagerecError(f"features of shape {features.shape} must be (N, D) with N >= 2; embed the images first")
        self.features_ = features
        self.graph_ = None if self.method == "probe" else _graph(features, min(self.n_neighbors, len(features) - 1), self.gamma)
        return self.refit(labels)

    def refit(self, labels) -> Suggester:
        """Fit again on new labels of the same images, reusing the graph (the incremental step)."""
        y, self.classes_ = _encode(labels, len(self.features_))
        log_p = self._log_proba(y)
        judged = _judged(y)
        self.temperature_ = fit_temperature(log_p[judged], y[judged]) if len(judged) >= MIN_CALIBRATION_LABELS else 1.0
        self.proba_ = _softmax(log_p / self.temperature_)
        self.labels_ = y
        return self

    def _log_proba(self, y: np.ndarray) -> np.ndarray:
        """Log-probabilities of every image: transductive for the unlabelled, out-of-fold for the labelled."""
        k = len(self.classes_)
        log_p = self._learners(y, k)
        known = _judged(y)
        if len(known) and k > 1:  # each fold's labels hidden in turn
            folds = min(OOF_FOLDS, int(np.bincount(y[known], minlength=k)[np.unique(y[known])].min()))
            split = StratifiedKFold(folds, shuffle=True, random_state=self.random_state)
            for keep, hide in split.split(known, y[known]):
                y_fold = y.copy()
                y_fold[known[hide]] = -1
                log_p[known[hide]] = self._learners(y_fold, k, rows=known[hide])
        return log_p

    def _learners(self, y: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
        """The method's log-probabilities for ``rows`` (all images when None), fitted on ``y``.

        The full fit (``rows`` None) keeps its probe and its propagated scores as the starting
        point of the folds and of the next refit."""
        full = rows is None
        rows = np.arange(len(y)) if full else rows
        parts = []
        if self.method in ("auto", "probe"):
            proba, probe = _probe(self.features_, y, k, rows, self.C, init=getattr(self, "probe_", None))
            if full:
                self.probe_ = probe
            parts.append(proba)
        if self.method in ("auto", "propagation"):
            proba, spread = _propagate(self.graph_, y, k, rows, self.alpha, start=getattr(self, "spread_", None))
            if full:
                self.spread_ = spread
            parts.append(proba)
        return np.log(np.clip(np.mean(parts, axis=0), 1e-12, None))

    # -- results ------------------------------------------------------------------------------

    @property
    def suggested_(self) -> np.ndarray:
        """Index of the suggested class of every image, int array (N,)."""
        return self.proba_.argmax(1)

    @property
    def confidence_(self) -> np.ndarray:
        """The suggested class's probability, float array (N,)."""
        return self.proba_.max(1)

    @property
    def disagrees_(self) -> np.ndarray:
        """Bool array (N,): labelled images whose out-of-fold suggestion is another class."""
        return (self.labels_ >= 0) & (self.suggested_ != self.labels_)


def _encode(labels, n: int) -> tuple[np.ndarray, list[str]]:
    labels = list(labels)
    if len(labels) != n:
        raise ImagerecError(f"{len(labels)} labels for {n} images; give one label (or None) per image")
    named = [None if (v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == "") else str(v) for v in labels]
    classes = sorted({v for v in named if v is not None})
    if not classes:
        raise ImagerecError("no image has a label; label at least one image of each class you want suggested")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([-1 if v is None else index[v] for v in named], np.int64), classes


def _judged(y: np.ndarray) -> np.ndarray:
    """Indices of the labelled images whose class has at least two labels: one can be hidden
    from the fit, so these get out-of-fold suggestions and calibrate the temperature."""
    known = np.flatnonzero(y >= 0)
    return known[np.bincount(y[known], minlength=1)[y[known]] >= 2]


def _probe(x: np.ndarray, y: np.ndarray, k: int, rows: np.ndarray, C: float, init: LogisticRegression | None = None):
    """(probabilities of ``rows``, the fitted model): logistic regression on the labelled rows,
    started from ``init``'s weights when it was fitted on the same classes (a fold, or the last
    decision's fit: a few iterations instead of a few hundred)."""
    known = y >= 0
    present = np.unique(y[known])
    proba = np.full((len(rows), k), 1e-12)
    if len(present) == 1:
        proba[:, present[0]] = 1.0
        return proba, None
    clf = LogisticRegression(C=C, max_iter=500, warm_start=True)
    if init is not None and np.array_equal(init.classes_, present) and init.coef_.shape[1] == x.shape[1]:
        clf.coef_, clf.intercept_ = init.coef_.copy(), init.intercept_.copy()
    clf.fit(x[known], y[known])
    proba[:, clf.classes_] = clf.predict_proba(x[rows])
    return proba, clf


def _graph(x: np.ndarray, n_neighbors: int, gamma: float) -> sp.csr_matrix:
    """Symmetric kNN graph with weights max(cos, 0) ** gamma, normalised as D^-1/2 W D^-1/2."""
    dist, idx = knn(x, n_neighbors)
    cos = np.clip(1 - dist.astype(np.float64) ** 2 / 2, 0, None) ** gamma  # unit rows: |a-b|^2 = 2 - 2 cos
    n = len(x)
    w = sp.csr_matrix((cos.ravel(), (np.repeat(np.arange(n), n_neighbors), idx.ravel())), shape=(n, n))
    w = w.maximum(w.T)
    d = np.asarray(w.sum(1)).ravel()
    d_inv = 1 / np.sqrt(np.maximum(d, 1e-12))
    return sp.diags(d_inv) @ w @ sp.diags(d_inv)


def _propagate(graph: sp.csr_matrix, y: np.ndarray, k: int, rows: np.ndarray, alpha: float, start: np.ndarray | None = None):
    """(probabilities of ``rows``, the raw solution F): solve (I - alpha S) F = Y per class by
    conjugate gradients, from ``start`` (the last solution: a refit after one more decision
    moves F little), and normalise F's rows to probabilities."""
    n = graph.shape[0]
    system = sp.identity(n, format="csr") - alpha * graph
    f = np.zeros((n, k))
    for c in range(k):
        target = (y == c).astype(np.float64)
        if target.any():
            target /= target.sum()  # each class spreads the same mass: a class with more labels does not win by count
            x0 = start[:, c] if start is not None and start.shape == f.shape else None
            f[:, c], _ = cg(system, target, x0=x0, rtol=1e-5, maxiter=100)
    part = np.clip(f[rows], 0, None)
    total = part.sum(1, keepdims=True)
    proba = np.where(total > 0, part / np.where(total > 0, total, 1), 1 / k)
    return proba, f


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
