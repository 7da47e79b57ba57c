"""Classification metrics on hand-computed toy cases."""

from __future__ import annotations

import numpy as np
import pytest

from imagerec.evaluation import accuracy, build_report, calibration, confusion_matrix, per_class_metrics, top_k_accuracy

Y = np.array([0, 0, 1, 1, 2, 2])
PRED = np.array([0, 1, 1, 1, 2, 0])


def test_accuracy():
    assert accuracy(Y, PRED) == pytest.approx(4 / 6)


def test_confusion_matrix():
    expected = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert confusion_matrix(Y, PRED, 3).tolist() == expected


def test_per_class_metrics():
    m = per_class_metrics(Y, PRED, 3)
    # class 0: predicted 0 twice (1 right) -> precision 1/2; 2 true, 1 found -> recall 1/2
    # class 1: predicted 3 times (2 right) -> 2/3; recall 2/2
    # class 2: predicted once (right) -> 1; recall 1/2
    np.testing.assert_allclose(m["precision"], [1 / 2, 2 / 3, 1])
    np.testing.assert_allclose(m["recall"], [1 / 2, 1, 1 / 2])
    np.testing.assert_allclose(m["f1"], [1 / 2, 0.8, 2 / 3])
    assert m["support"].tolist() == [2, 2, 2]


def test_top_k_accuracy():
    proba = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    y = np.array([1, 0, 1])
    assert top_k_accuracy(y, proba, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(y, proba, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(y, proba, 5) == 1.0


def test_expected_calibration_error():
    # two bins used: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, 2 right)
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    ece, bins = calibration(proba, y, bins=10)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert int(bins["count"].sum()) == 4


def test_perfectly_calibrated_is_zero():
    proba = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration(proba, np.array([0, 1]))[0] == pytest.approx(0.0)


def test_report_lists_confidently_wrong_first():
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.99, 0.01]])
    y = np.array([1, 1, 1, 0])
    report = build_report(proba, y, ["a", "b", "c", "d"], ["cat", "dog"])
    assert [w["path"] for w in report.wrong] == ["a", "b"]
    assert report.summary["accuracy"] == pytest.approx(0.5)
    assert report.confusion.tolist() == [[1, 0], [2, 1]]
