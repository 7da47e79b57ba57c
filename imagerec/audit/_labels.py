"""Label issues: images whose given label is probably wrong, found from their embeddings.

1. Out-of-sample class probabilities for every image, from a model that never saw its label:
   the mean of (a) a linear probe, scikit-learn ``LogisticRegression`` on the L2-normalised
   embeddings, out of fold (``cross_val_predict``, stratified folds), and (b) the label votes
   of the image's ``k_neighbors`` nearest other images (cosine, FAISS; leave-one-out).
2. cleanlab ranks them: ``cleanlab.rank.get_label_quality_scores`` (self-confidence: the
   probability of the given label) scores every image, and ``cleanlab.filter.find_label_issues``
   decides which are issues. Its default here, ``filter_by="low_self_confidence"``, flags the
   lowest-quality images, as many as confident learning estimates are mislabelled.

3. A flag stands only where another class is the most probable out of fold, at
   ``min_confidence`` (0.4) or more.

The probe's C (10) and ``min_confidence`` were chosen on the development suite (ten sets, 5% of
labels moved; docs/MODELS.md, "Audit defaults"): worst set first, then the mean. Earlier
evidence, from CIFAR-10 alone (docs/BENCHMARKS.md, "Audit: label issues", chosen on another
seed than the one reported): on 10,000 CIFAR-10 images with 5% flipped labels and EfficientNet-Lite2
features, the probe alone (C=10) with cleanlab's ``prune_by_noise_rate`` flagged 1,304 images
(precision 0.31, recall 0.81); the probe (C=1) + kNN mean with ``low_self_confidence`` flagged
682 (precision 0.62, recall 0.84). C in 0.3..3 ranked alike (precision of the 500 lowest
qualities 0.76-0.77), C=10 worse (0.74). Refitting the probe without the flagged images did not
help (precision 0.59).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from imagerec.audit._outliers import check_features, knn_search
from imagerec.errors import ImagerecError, ImagerecWarning

DEFAULT_C = 10.0  # inverse L2 strength of the probe, for unit-norm features (chosen on the suite: docs/MODELS.md)
DEFAULT_MIN_CONFIDENCE = 0.4  # out-of-fold probability another class needs for a flag to stand (docs/MODELS.md)
FILTERS = ("low_self_confidence", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
           "predicted_neq_given", "low_normalized_margin")  # cleanlab's filter_by values
_VOTE_PRIOR = 0.1  # pseudo-votes per class: no class gets probability 0 from the neighbours


def find_label_issues(
    features: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    threshold: float | None = None,
    cv_folds: int = 5,
    random_state: int = 0,
    C: float = DEFAULT_C,
    max_iter: int = 1000,
    k_neighbors: int = 50,
    filter_by: str = "low_self_confidence",
    min_confidence: float | None = DEFAULT_MIN_CONFIDENCE,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Find images whose given label is probably wrong.

    Args:
        features: float array of shape (N, D), one embedding per image (rows are L2-normalised
            here).
        labels: int array of shape (N,), indices into ``classes``.
        classes: class names.
        threshold: flag images whose ``label_quality`` is below this value (0..1). Default
            (None): cleanlab decides (see ``filter_by``), which needs no threshold and adapts to
            the noise it estimates.
        cv_folds: cross-validation folds for the out-of-fold probabilities; reduced to the size
            of the smallest class when that is smaller (at least 2 images per class needed).
        random_state: seed of the fold split and of the probe.
        C: inverse regularisation strength of the logistic-regression probe.
        max_iter: iteration cap of the probe's solver.
        k_neighbors: neighbours whose labels vote (capped at N - 1); 0 uses the probe alone.
        filter_by: cleanlab's rule when ``threshold`` is None, one of :data:`FILTERS`.
        min_confidence: with cleanlab's rule, an image it flags stays an issue only where another
            class is the most probable out of fold, at this probability or more (0..1): where the
            probe hesitates between several classes, a low probability of the given label is
            the probe's doubt, not evidence of a wrong label. None: cleanlab's flags as they are.
        n_jobs: folds fitted in parallel (None: one at a time).

    Returns:
        A DataFrame, one row per image, sorted most certain issues first (issues by rising
        ``label_quality``, then the other images the same way): ``index`` (row in
        ``features``), ``given_label`` and ``suggested_label`` (class names; suggested = the
        most probable class out of fold), ``confidence`` (out-of-fold probability of the
        suggested label), ``label_quality`` (cleanlab's score, lower = more likely wrong),
        ``is_issue``. ``df.attrs`` holds ``threshold``, ``filter_by``, ``min_confidence``,
        ``cv_folds`` (the folds used), ``C`` and ``k_neighbors``.

    Raises:
        ImagerecError: bad shapes, labels outside ``classes``, fewer than 2 classes present,
            a class with a single image, or a bad ``threshold``, ``cv_folds``, ``C``,
            ``k_neighbors``, ``filter_by`` or ``min_confidence``.
    """
    x = check_features(features, min_rows=2, what="label-issue detection")
    y, folds = _check_labels(labels, classes, len(x), cv_folds)
    if threshold is not None and not (0 <= threshold <= 1):
        raise ImagerecError(
            f"threshold={threshold} must be a label quality between 0 and 1; try 0.1, or None for cleanlab's rule"
        )
    if not (C > 0):
        raise ImagerecError(f"C={C} must be > 0; try the default C={DEFAULT_C}")
    if k_neighbors < 0:
        raise ImagerecError(f"k_neighbors={k_neighbors} must be >= 0 (0: the probe alone); try 50")
    if filter_by not in FILTERS:
        raise ImagerecError(f"filter_by={filter_by!r} is not one of cleanlab's {', '.join(FILTERS)}; pick one")
    if min_confidence is not None and not (0 <= min_confidence <= 1):
        raise ImagerecError(
            f"min_confidence={min_confidence} must be a probability between 0 and 1 (or None: cleanlab's flags as they are); "
            f"try the default {DEFAULT_MIN_CONFIDENCE}"
        )

    present, y_dense = np.unique(y, return_inverse=True)  # probe over the classes that have images
    probs = out_of_fold_probabilities(
        x, y_dense, folds=folds, random_state=random_state, C=C, max_iter=max_iter, n_jobs=n_jobs
    )
    if k_neighbors:
        probs = (probs + neighbour_votes(x, y_dense, k_neighbors, len(present))) / 2
    quality, is_issue = _rank(y_dense, probs, threshold, filter_by)
    best = probs.argmax(axis=1)
    if threshold is None and min_confidence is not None:
        is_issue &= (best != y_dense) & (probs[np.arange(len(x)), best] >= min_confidence)

    names = np.asarray(classes, dtype=object)
    df = pd.DataFrame(
        {
            "index": np.arange(len(x)),
            "given_label": names[y],
            "suggested_label": names[present[best]],
            "confidence": probs[np.arange(len(x)), best],
            "label_quality": quality,
            "is_issue": is_issue,
        }
    )
    df = df.sort_values(["is_issue", "label_quality"], ascending=[False, True], kind="stable").reset_index(drop=True)
    df.attrs.update(
        {"threshold": threshold, "filter_by": filter_by, "min_confidence": min_confidence, "cv_folds": folds, "C": C,
         "k_neighbors": k_neighbors}  # fmt: skip
    )
    return df


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, *, folds: int, random_state: int, C: float, max_iter: int, n_jobs: int | None = None
) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic-regression probe.

    Args:
        x: float32 array (N, D), L2-normalised rows.
        y: int array (N,) with values 0..K-1, every value present at least ``folds`` times.
        folds: stratified cross-validation folds.
        random_state: seed of the split and the solver.
        C: inverse regularisation strength.
        max_iter: iteration cap of the lbfgs solver.
        n_jobs: folds fitted in parallel.

    Returns:
        float array (N, K), rows summing to 1.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=random_state)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
    # One BLAS thread: on a busy 2-core machine the multi-threaded BLAS made each lbfgs step
    # 50x slower (a 2,000-image fit: 8.9 s against 0.16 s); its matrices are too small to share.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # a probe stopped at max_iter still ranks well; the cap is the caller's speed choice
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(probe, x, y, cv=split, method="predict_proba", n_jobs=n_jobs)


def neighbour_votes(x: np.ndarray, y: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Leave-one-out class probabilities from the labels of each row's ``k`` nearest other rows.

    Args:
        x: float32 array (N, D), L2-normalised rows.
        y: int array (N,) with values 0..n_classes-1.
        k: neighbours that vote (capped at N - 1).
        n_classes: columns of the result.

    Returns:
        float array (N, n_classes): (votes + 0.1) / (k + 0.1 * n_classes), rows summing to 1.
    """
    _, ids = knn_search(x, k)
    votes = np.zeros((len(x), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(x)), ids.shape[1]), y[ids].ravel()), 1.0)
    return (votes + _VOTE_PRIOR) / (ids.shape[1] + _VOTE_PRIOR * n_classes)


def _rank(y: np.ndarray, probs: np.ndarray, threshold: float | None, filter_by: str) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's label quality per image, and which images are issues."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(y, probs, method="self_confidence")
    if threshold is not None:
        return quality, quality < threshold
    # n_jobs=1: cleanlab's process pool never joins when called from a thread of a server (the studio)
    return quality, cleanlab_issues(y, probs, filter_by=filter_by, n_jobs=1)


def _check_labels(labels: np.ndarray, classes: list[str], n: int, cv_folds: int) -> tuple[np.ndarray, int]:
    """Validate labels against ``classes``; return them as int64 and the folds to use."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ImagerecError(f"labels have shape {y.shape}, features have {n} rows; give one label per row")
    if not np.issubdtype(y.dtype, np.integer):
        raise ImagerecError(f"labels have dtype {y.dtype}; give integer indices into classes")
    y = y.astype(np.int64)
    outside = y[(y < 0) | (y >= len(classes))]
    if len(outside):
        raise ImagerecError(
            f"label {int(outside[0])} is outside 0..{len(classes) - 1} ({len(classes)} classes); "
            "give indices into classes"
        )
    if cv_folds < 2:
        raise ImagerecError(f"cv_folds={cv_folds} must be at least 2 for out-of-fold probabilities; try 5")
    present, counts = np.unique(y, return_counts=True)
    if len(present) < 2:
        only = classes[int(present[0])]
        raise ImagerecError(f"all {n} images are labelled '{only}'; label issues need at least 2 classes")
    if counts.min() < 2:
        lonely = classes[int(present[counts.argmin()])]
        raise ImagerecError(
            f"class '{lonely}' has 1 image; label issues need at least 2 per class for cross-validation; "
            "add images or drop the class"
        )
    if counts.min() < cv_folds:
        small = classes[int(present[counts.argmin()])]
        few = int(counts.min())
        message = f"class '{small}' has {few} images, fewer than cv_folds={cv_folds}; using {few} folds"
        warnings.warn(message, ImagerecWarning, stacklevel=3)
    return y, int(min(cv_folds, counts.min()))
