"""The evaluation report: metrics in JSON and CSV, and the pictures a person looks at."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._plot import pyplot as _pyplot
from .._plot import save_figure as _save
from .._io import write_text_atomic
from ..data import ImageSource
from ._metrics import accuracy, calibration, confusion_matrix, per_class_metrics, top_k_accuracy


@dataclass
class EvaluationReport:
    """Metrics of a classifier on a labelled data set.

    Attributes:
        summary: accuracy, top-k accuracy, ECE (of the calibrated probabilities, and
            ``ece_uncalibrated`` of the plain softmax), ``temperature``, mean loss, image counts
            (JSON-able).
        per_class: rows of class, precision, recall, f1, accuracy, support.
        confusion: int64 array (C, C), rows = true class.
        reliability: per-bin confidence, accuracy and count; under ``uncalibrated`` the same
            bins of the plain softmax.
        wrong: the most confidently wrong images: path, true, predicted, confidence.
    """

    summary: dict
    per_class: list[dict]
    confusion: np.ndarray
    reliability: dict
    wrong: list[dict]


def build_report(
    proba: np.ndarray,
    labels: np.ndarray,
    paths: list[str],
    classes: list[str],
    *,
    loss_sum: float = 0.0,
    top_k: int = 5,
    shown_wrong: int = 25,
    skipped: int = 0,
    raw_proba: np.ndarray | None = None,
    temperature: float = 1.0,
) -> EvaluationReport:
    """Compute every metric from class probabilities.

    Args:
        proba: float array (N, C), calibrated (softmax of logits / ``temperature``).
        labels: int array (N,) of true classes.
        paths: the image of each row.
        classes: class names (C).
        loss_sum: summed cross-entropy, for the mean loss.
        top_k: the k of top-k accuracy.
        shown_wrong: how many confidently wrong images to keep.
        skipped: images that could not be read (reported, not scored).
        raw_proba: float array (N, C), the plain softmax before temperature scaling, for the
            ECE before calibration; None: the same as ``proba``.
        temperature: the calibration temperature that made ``proba``.
    """
    pred = proba.argmax(1)
    num_classes = len(classes)
    ece, bins = calibration(proba, labels)
    ece_raw, bins_raw = calibration(proba if raw_proba is None else raw_proba, labels)
    stats = per_class_metrics(labels, pred, num_classes)
    per_class = [
        {"class": name, **{key: float(stats[key][i]) for key in ("precision", "recall", "f1", "accuracy")}, "support": int(stats["support"][i])}
        for i, name in enumerate(classes)
    ]
    wrong_rows = np.flatnonzero(pred != labels)
    confidence = proba[np.arange(len(pred)), pred]
    wrong_rows = wrong_rows[np.argsort(-confidence[wrong_rows], kind="stable")][:shown_wrong]
    wrong = [{"path": paths[i], "true": classes[labels[i]], "predicted": classes[pred[i]], "confidence": float(confidence[i])} for i in wrong_rows]
    summary = {
        "images": int(len(labels)),
        "skipped": int(skipped),
        "accuracy": accuracy(labels, pred),
        f"top{min(top_k, num_classes)}_accuracy": top_k_accuracy(labels, proba, top_k),
        "ece": ece,
        "ece_uncalibrated": ece_raw,
        "temperature": float(temperature),
        "loss": loss_sum / max(len(labels), 1),
        "macro_f1": float(np.mean(stats["f1"])),
        "classes": classes,
    }
    reliability = {k: v.tolist() for k, v in bins.items()}
    reliability["uncalibrated"] = {k: v.tolist() for k, v in bins_raw.items()}
    return EvaluationReport(summary, per_class, confusion_matrix(labels, pred, num_classes), reliability, wrong)


def write_report(report: EvaluationReport, out: str | Path, source: ImageSource | None = None) -> Path:
    """Write ``summary.json``, ``per_class.csv``, ``confusion.csv``, ``confusion.png``,
    ``reliability.png``, ``confidently_wrong.csv`` and ``confidently_wrong.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = report.summary["classes"]
    write_text_atomic(out / "summary.json", json.dumps({**report.summary, "reliability": report.reliability}, indent=2))
    write_text_atomic(out / "per_class.csv", _csv(report.per_class))
    confusion_rows = [{"true \\ predicted": name, **dict(zip(classes, map(int, row)))} for name, row in zip(classes, report.confusion)]
    write_text_atomic(out / "confusion.csv", _csv(confusion_rows))
    write_text_atomic(out / "confidently_wrong.csv", _csv(report.wrong) if report.wrong else "path,true,predicted,confidence\n")
    _plot_confusion(report.confusion, classes, out / "confusion.png")
    _plot_reliability(report.reliability, report.summary, out / "reliability.png")
    if report.wrong and source is not None:
        _plot_wrong(report.wrong, source, out / "confidently_wrong.png")
    return out


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _pyplot()
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ax.set_title("confusion matrix (colour: share of the true class)")
    _save(fig, path)


def _plot_reliability(bins: dict, summary: dict, path: Path) -> None:
    """Accuracy against mean confidence per bin: before (plain softmax) and after temperature scaling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    before = summary.get("ece_uncalibrated", summary["ece"])
    curves = [
        (bins.get("uncalibrated", bins), f"before calibration (ECE {before:.3f})", "o--"),
        (bins, f"after, T={summary.get('temperature', 1.0):.2f} (ECE {summary['ece']:.3f})", "s-"),
    ]
    for curve, label, style in curves:
        filled = np.asarray(curve["count"]) > 0
        confidence, accuracy = np.asarray(curve["confidence"])[filled], np.asarray(curve["accuracy"])[filled]
        ax.plot(confidence, accuracy, style, ms=4, label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("reliability")
    ax.legend(loc="upper left", fontsize=7)
    _save(fig, path)


def _plot_wrong(wrong: list[dict], source: ImageSource, path: Path, columns: int = 5) -> None:
    plt = _pyplot()
    index = {p: i for i, p in enumerate(source.paths)}
    rows = -(-len(wrong) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.0, rows * 2.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), wrong):
        try:
            image, _ = source[index[item["path"]]]
        except Exception:  # noqa: BLE001 - a picture that cannot be shown is left blank
            continue
        ax.imshow(image)
        ax.set_title(f"{item['predicted']} {item['confidence']:.2f}\n(true: {item['true']})", fontsize=7)
    _save(fig, path)
