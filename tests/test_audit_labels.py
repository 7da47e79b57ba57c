"""Label issues and outliers on hand-made embeddings: Gaussian blobs with planted faults."""

from __future__ import annotations

import numpy as np
import pytest

from imagerec.audit import _outliers
from imagerec.audit._labels import find_label_issues, neighbour_votes
from imagerec.audit._outliers import find_outliers
from imagerec.errors import ImagerecError, ImagerecWarning

CLASSES = ["cat", "dog", "ship"]


def blobs(per_class: int = 60, dim: int = 16, spread: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs, centred on the first three axes (scaled by 6)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), per_class)
    x = rng.normal(0, spread, (len(y), dim))
    x[np.arange(len(y)), y] += 6.0
    return x.astype(np.float32), y.astype(np.int64)


def flip(y: np.ndarray, count: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Give ``count`` random images another class; return the noisy labels and the flipped rows."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(y), count, replace=False)
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, 3, count)) % 3
    return noisy, rows


# --- label issues -----------------------------------------------------------------------------


def test_planted_flips_are_found_with_their_true_label():
    x, y = blobs()
    noisy, rows = flip(y, 9)
    df = find_label_issues(x, noisy, CLASSES)
    issues = df[df.is_issue]
    assert set(rows) <= set(issues["index"])  # recall 1
    assert len(issues) <= len(rows) + 2  # and hardly anything else
    found = df.set_index("index").loc[rows]
    assert list(found.suggested_label) == [CLASSES[c] for c in y[rows]]
    assert list(found.given_label) == [CLASSES[c] for c in noisy[rows]]
    assert (found.confidence > 0.5).all()
    assert (found.label_quality < 0.5).all()


@pytest.mark.parametrize(
    "kwargs", [{"k_neighbors": 0}, {"filter_by": "prune_by_noise_rate"}, {"k_neighbors": 0, "filter_by": "both"}]
)
def test_planted_flips_are_found_by_every_variant(kwargs):
    x, y = blobs()
    noisy, rows = flip(y, 9)
    df = find_label_issues(x, noisy, CLASSES, **kwargs)
    assert set(rows) <= set(df.loc[df.is_issue, "index"])
    assert df.is_issue.sum() <= len(rows) + 3
    assert df.attrs["k_neighbors"] == kwargs.get("k_neighbors", 50)


def test_neighbour_votes_count_the_labels_of_the_nearest_others():
    # four points on a line of angles: 0 and 1 are close, 2 and 3 are close
    angles = np.array([0.0, 0.1, 1.4, 1.5])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    y = np.array([0, 1, 1, 1])
    votes = neighbour_votes(x, y, k=1, n_classes=2)
    # each row gets its one neighbour's vote: (1 + 0.1) / (1 + 0.2) for that class
    expected = np.array([[0.1, 1.1], [1.1, 0.1], [0.1, 1.1], [0.1, 1.1]]) / 1.2
    assert np.allclose(votes, expected)


def test_rows_are_sorted_issues_first_by_rising_quality():
    x, y = blobs()
    noisy, rows = flip(y, 9)
    df = find_label_issues(x, noisy, CLASSES)
    assert sorted(df["index"]) == list(range(len(y)))  # one row per image
    n = int(df.is_issue.sum())
    assert df.is_issue.iloc[:n].all() and not df.is_issue.iloc[n:].any()
    assert df.label_quality.iloc[:n].is_monotonic_increasing
    assert df.label_quality.iloc[n:].is_monotonic_increasing
    assert df.attrs["cv_folds"] == 5 and df.attrs["threshold"] is None


def test_clean_data_gets_few_flags():
    x, y = blobs(spread=1.5)
    df = find_label_issues(x, y, CLASSES)
    assert df.is_issue.sum() <= 2  # of 180
    assert (df.given_label == df.suggested_label).mean() > 0.98


def test_threshold_flags_by_label_quality():
    x, y = blobs(spread=2.5)  # overlapping blobs: qualities spread out
    noisy, _ = flip(y, 9)
    df = find_label_issues(x, noisy, CLASSES, threshold=0.4)
    assert (df.is_issue == (df.label_quality < 0.4)).all()
    assert df.is_issue.sum() >= 9
    assert df.attrs["threshold"] == 0.4


@pytest.mark.parametrize("q", [0.4, 0.7])
def test_min_confidence_keeps_only_flags_confidently_of_another_class(q):
    x, y = blobs(spread=2.5)  # overlapping blobs: some flags are the probe's doubt
    noisy, _ = flip(y, 9)
    plain = find_label_issues(x, noisy, CLASSES, min_confidence=None)
    gated = find_label_issues(x, noisy, CLASSES, min_confidence=q)
    issues = gated[gated.is_issue]
    assert (issues.suggested_label != issues.given_label).all() and (issues.confidence >= q).all()
    before = set(plain.loc[plain.is_issue, "index"])
    assert set(issues["index"]) <= before  # the gate only removes flags
    kept = plain[plain.is_issue & (plain.suggested_label != plain.given_label) & (plain.confidence >= q)]
    assert set(issues["index"]) == set(kept["index"])
    assert gated.attrs["min_confidence"] == q


def test_min_confidence_leaves_a_given_threshold_alone():
    x, y = blobs(spread=2.5)
    noisy, _ = flip(y, 9)
    df = find_label_issues(x, noisy, CLASSES, threshold=0.4, min_confidence=0.9)
    assert (df.is_issue == (df.label_quality < 0.4)).all()


def test_quality_is_the_out_of_fold_probability_of_the_given_label():
    x, y = blobs()
    noisy, rows = flip(y, 9)
    df = find_label_issues(x, noisy, CLASSES).set_index("index")
    agree = df.given_label == df.suggested_label
    assert np.allclose(df.label_quality[agree], df.confidence[agree])
    assert (df.label_quality[~agree] < df.confidence[~agree]).all()


def test_a_class_without_images_is_never_suggested():
    x, y = blobs()
    df = find_label_issues(x, y, [*CLASSES, "empty"])
    assert "empty" not in set(df.suggested_label)


def test_small_class_reduces_the_folds_with_a_warning():
    x, y = blobs()
    keep = np.r_[0:60, 60:120, 120:123]  # 'ship' keeps 3 images
    with pytest.warns(ImagerecWarning, match="'ship' has 3 images.*using 3 folds"):
        df = find_label_issues(x[keep], y[keep], CLASSES)
    assert df.attrs["cv_folds"] == 3
    assert len(df) == len(keep)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y: (x, np.zeros_like(y)), "all 180 images are labelled 'cat'; label issues need at least 2 classes"),
        (lambda x, y: (x[:121], y[:121]), "class 'ship' has 1 image; label issues need at least 2 per class"),
        (lambda x, y: (x, y[:-1]), r"labels have shape \(179,\), features have 180 rows"),
        (lambda x, y: (x, np.where(y == 2, 7, y)), r"label 7 is outside 0..2 \(3 classes\)"),
        (lambda x, y: (x, y.astype(float)), "labels have dtype float64; give integer indices"),
        (lambda x, y: (np.where(np.arange(180)[:, None] == 5, np.nan, x), y), "1 feature row"),
        (lambda x, y: (x[0], y[:1]), r"features have shape \(16,\)"),
    ],
)
def test_bad_input_is_one_line(change, message):
    x, y = change(*blobs())
    with pytest.raises(ImagerecError, match=message) as err:
        find_label_issues(x, y, CLASSES)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cv_folds": 1}, "cv_folds=1 must be at least 2"),
        ({"threshold": 1.5}, "threshold=1.5"),
        ({"C": 0}, "C=0 must be > 0"),
        ({"k_neighbors": -1}, "k_neighbors=-1 must be >= 0"),
        ({"filter_by": "magic"}, "filter_by='magic' is not one of cleanlab's low_self_confidence"),
        ({"min_confidence": 1.5}, "min_confidence=1.5 must be a probability between 0 and 1"),
    ],
)
def test_bad_arguments_are_one_line(kwargs, message):
    x, y = blobs()
    with pytest.raises(ImagerecError, match=message):
        find_label_issues(x, y, CLASSES, **kwargs)


# --- outliers ---------------------------------------------------------------------------------


def with_far_points(count: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blobs plus ``count`` points each alone on an axis of its own; returns x, y, their rows."""
    x, y = blobs()
    rng = np.random.default_rng(3)
    far = rng.normal(0, 1.0, (count, x.shape[1])).astype(np.float32)
    far[np.arange(count), 5 + np.arange(count)] += 6.0
    return np.vstack([x, far]), np.r_[y, np.arange(count) % 3], np.arange(len(x), len(x) + count)


def test_planted_far_points_are_the_top_outliers():
    x, _, far = with_far_points()
    df = find_outliers(x)
    assert set(df["index"].iloc[: len(far)]) == set(far)
    flagged = set(df.loc[df.is_outlier, "index"])
    assert set(far) <= flagged and len(flagged) <= len(far) + 2
    assert df.score.is_monotonic_decreasing
    assert df.score.iloc[len(far) - 1] > df.attrs["threshold"] > df.score.median()


def test_clean_blobs_get_few_outliers():
    x, _ = blobs()
    df = find_outliers(x)
    assert df.is_outlier.sum() <= 3  # of 180


def test_class_score_finds_an_image_inside_another_class():
    x, y = blobs()
    y = y.copy()
    y[5] = 1  # a 'cat' blob image labelled 'dog': near everything, far from the other dogs
    df = find_outliers(x, y).set_index("index")
    assert df.class_score.idxmax() == 5
    assert df.is_class_outlier[5] and not df.is_outlier[5]
    assert df.is_class_outlier.sum() <= 3


def test_scores_match_brute_force_whatever_the_block_size(monkeypatch):
    x, _, _ = with_far_points()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    expected = 1 - np.sort(sims, axis=1)[:, ::-1][:, :4].mean(axis=1)
    monkeypatch.setattr(_outliers, "SEARCH_BLOCK", 7)
    df = find_outliers(x, k=4).sort_values("index")
    assert np.allclose(df.score, expected, atol=1e-5)


def test_exact_duplicates_are_each_others_neighbours():
    x, _ = blobs(per_class=5)
    x = np.vstack([x, x[:1], x[:1]])  # row 0 three times
    df = find_outliers(x, k=2).set_index("index")
    assert df.score[[0, 15, 16]].max() < 1e-6


def test_a_class_of_one_has_no_class_score():
    x, y = blobs(per_class=5)
    y = np.r_[y[:-1], 3]
    df = find_outliers(x, y).set_index("index")
    assert np.isnan(df.class_score[14]) and not df.is_class_outlier[14]
    assert df.class_score.drop(14).notna().all()


def test_given_threshold_is_used_for_both_scores():
    x, y, _ = with_far_points()
    df = find_outliers(x, y, threshold=0.3)
    assert (df.is_outlier == (df.score > 0.3)).all()
    assert (df.is_class_outlier == (df.class_score > 0.3)).all()
    assert df.attrs["threshold"] == df.attrs["class_threshold"] == 0.3


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((np.ones((1, 4)),), {}, "1 image"),
        ((np.ones((3, 4)), np.zeros(2)), {}, r"labels have shape \(2,\), features have 3 rows"),
        ((np.ones((3, 4)),), {"k": 0}, "k=0 must be at least 1"),
        ((np.ones((3, 4)),), {"threshold": -1.0}, "threshold=-1.0"),
        ((np.full((3, 4), np.inf),), {}, "3 feature row"),
    ],
)
def test_bad_outlier_input_is_one_line(args, kwargs, message):
    with pytest.raises(ImagerecError, match=message) as err:
        find_outliers(*args, **kwargs)
    assert "\n" not in str(err.value)
