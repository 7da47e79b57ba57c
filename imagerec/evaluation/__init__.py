"""Evaluation layer: classification metrics and the report written to a run's folder."""

from ._metrics import accuracy, calibration, confusion_matrix, per_class_metrics, top_k_accuracy
from ._report import EvaluationReport, build_report, write_report

__all__ = [
    "EvaluationReport",
    "accuracy",
    "build_report",
    "calibration",
    "confusion_matrix",
    "per_class_metrics",
    "top_k_accuracy",
    "write_report",
]
