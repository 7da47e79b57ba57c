"""Feature preparation: L2 normalisation, then optionally PCA (whitened or not), then L2 again,
so Euclidean distances between prepared features follow cosine similarity."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.utils.validation import check_is_fitted

from ..errors import ImagerecError

SMALL_SET_IMAGES = 5_000  # below this many images pca_dim="auto" keeps SMALL_SET_PCA_DIM components
SMALL_SET_PCA_DIM = 32
LARGE_SET_PCA_DIM = 128


def auto_pca_dim(n_images: int) -> int:
    """The principal components ``pca_dim="auto"`` keeps for a collection of ``n_images``.

    32 below :data:`SMALL_SET_IMAGES` (5,000) images, 128 from there on. Measured with k-means
    (``benchmarks/cluster_small_sets.py``, docs/BENCHMARKS.md, "Clustering small photo sets"):
    on 480 to 2,400 images (intel-scenes-small, CIFAR-10 test subsets) 32 components scored a
    higher mean ACC than 128 on every set (+0.011 to +0.036, 5 seeds, 5 draws of the small
    sets); on 5,000 CIFAR-10 images the two tie (0.572 vs 0.576), on 10,000 and 60,000 128 is
    better (0.583 vs 0.552, 0.593 vs 0.590). Whitening lowered ACC on every set.

    Args:
        n_images: rows the preparation is fitted on.

    Returns:
        The number of components.
    """
    return SMALL_SET_PCA_DIM if n_images < SMALL_SET_IMAGES else LARGE_SET_PCA_DIM


def check_pca_dim(pca_dim) -> int | str | None:
    """A positive whole number of components, ``"auto"`` or None.

    Raises:
        ImagerecError: anything else.
    """
    if pca_dim is None or pca_dim == "auto":
        return pca_dim
    hint = "; try 'auto', 128, or None for no PCA"
    return check_positive(pca_dim, "pca_dim", integer=True, minimum=1, inclusive=True, hint=hint)


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero).

    Args:
        features: float array (N, D).

    Returns:
        float array (N, D), a new array.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]
    return features / np.maximum(norms, np.finfo(features.dtype).tiny)


class FeaturePipeline(TransformerMixin, BaseEstimator):
    """L2 normalisation, then PCA to ``pca_dim`` (optionally whitened), then L2 again.

    Fit it once on a collection; ``transform`` prepares new images' features the same way (for
    ``predict`` of k-means or the deep head).

    Args:
        normalize: L2-normalise before PCA and after it.
        pca_dim: keep this many principal components (capped at min(N, D)); ``"auto"``: by the
            number of images fitted on (:func:`auto_pca_dim`: 32 below 5,000, else 128); None:
            no PCA (nor when every row is the same: there are no components).
        whiten: scale each component to unit variance (PCA whitening).
        random_state: seed of the randomised SVD.

    Attributes:
        pca_dim_: the components asked for once ``"auto"`` is resolved (an int, or None).
        pca_: the fitted ``sklearn.decomposition.PCA``, or None.
        n_features_in_: D.
        n_features_out_: the prepared dimension.
    """

    def __init__(
        self,
        normalize: bool = True,
        pca_dim: int | str | None = None,
        whiten: bool = False,
        random_state: int | None = 0,
    ):
        self.normalize = normalize
        self.pca_dim = pca_dim
        self.whiten = whiten
        self.random_state = random_state

    def fit(self, X, y=None):
        """Learn the PCA of ``X`` (float array (N, D)); returns self.

        Raises:
            ImagerecError: NaN or infinite features, or a bad ``pca_dim``.
        """
        X = check_features(X)
        pca_dim = check_pca_dim(self.pca_dim)
        self.pca_dim_ = auto_pca_dim(len(X)) if pca_dim == "auto" else pca_dim
        self.n_features_in_ = X.shape[1]
        self.pca_ = None
        if self.pca_dim_ is not None and (self.pca_dim_ < X.shape[1] or self.whiten) and not all_identical(X):
            x = l2_normalize(X) if self.normalize else X
            n_components = min(self.pca_dim_, len(X), X.shape[1])
            self.pca_ = PCA(n_components, random_state=self.random_state).fit(x)
        self.n_features_out_ = self.pca_.n_components_ if self.pca_ is not None else X.shape[1]
        return self

    def transform(self, X) -> np.ndarray:
        """Prepare features.

        Args:
            X: float array (M, D).

        Returns:
            float32 array (M, n_features_out_).

        Raises:
            ImagerecError: NaN or infinite features, or a dimension other than the fitted one.
        """
        check_is_fitted(self, "n_features_out_")
        X = check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ImagerecError(
                f"X has {X.shape[1]} features but the pipeline was fitted on {self.n_features_in_}; use the same backbone"
            )
        x = l2_normalize(X) if self.normalize else X
        if self.pca_ is not None:
            x = (x - self.pca_.mean_) @ self.pca_.components_.T
            if self.whiten:
                variance = self.pca_.explained_variance_
                x = x / np.sqrt(np.maximum(variance, 1e-6 * variance.max() + 1e-12))  # near-0 components not blown up
            if self.normalize:
                x = l2_normalize(x)
        return np.ascontiguousarray(x, dtype=np.float32)


def prepare_features(
    features,
    *,
    normalize: bool = True,
    pca_dim: int | str | None = None,
    whiten: bool = False,
    random_state: int | None = 0,
) -> np.ndarray:
    """``FeaturePipeline(...).fit_transform(features)``: see :class:`FeaturePipeline`.

    Args:
        features: float array (N, D).
        normalize: L2-normalise (before and after PCA).
        pca_dim: principal components to keep, ``"auto"`` (:func:`auto_pca_dim`), or None.
        whiten: PCA whitening.
        random_state: seed.

    Returns:
        float32 array (N, min(pca_dim, N, D)) or (N, D) without PCA.

    Raises:
        ImagerecError: NaN or infinite features, a bad ``pca_dim``.
    """
    return FeaturePipeline(normalize, pca_dim, whiten, random_state).fit_transform(features)


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
            "embed those images again, or drop the rows before using them"
        )
    return array


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
