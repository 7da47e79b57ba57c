"""Training on the current labels, in a background thread, with its evaluation on held-out images.

The run folder ``runs/run-<id>/`` holds the manifests it was given (``train.csv``, ``test.csv``),
the model (``model/``, an ``imagerec train`` run folder) and ``evaluation.json``. The database
row says running / done / failed / interrupted; a server killed mid-run leaves it ``running``,
and the next start marks it ``interrupted``.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from .._io import write_text_atomic
from ..data import stratified_split, write_manifest
from ..errors import ImagerecError
from ._db import Project

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "seed_cnn", "cifar_resnet18")
TEST_FRACTION = 0.2


def check_trainable(rows) -> None:
    """Raise ImagerecError unless there are two classes of at least 3 images each."""
    counts: dict[str, int] = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    small = sorted(name for name, n in counts.items() if n < 3)
    if len(counts) < 2:
        raise ImagerecError(f"training needs at least 2 groups with images, there are {len(counts)}; name or split the groups first")
    if small:
        raise ImagerecError(f"group(s) {', '.join(map(repr, small))} hold fewer than 3 images; merge them into another group or mark them junk, then train")


class Trainer:
    """Runs one training job at a time for a project; ``status()`` is what the page polls."""

    def __init__(self, project: Project):
        self.project = project
        self._lock = threading.Lock()
        self._state: dict = {}

    def status(self) -> dict:
        with self._lock:
            state = dict(self._state)
        if state.get("phase") == "training":
            state["progress"] = min(0.95, (time.time() - state["started"]) / (state["budget_min"] * 60))
        return state

    def start(self, budget_min: float, backbone: str) -> int:
        """Check the request, write the manifests, start the thread; returns the run id.

        Raises:
            ImagerecError: a bad budget or backbone, too few labelled images, or a run already running.
        """
        if not 0.05 <= budget_min <= 600:
            raise ImagerecError(f"time budget {budget_min} min must be between 0.05 and 600 minutes; e.g. 5")
        if backbone not in BACKBONES:
            raise ImagerecError(f"backbone {backbone!r} is not one of {', '.join(BACKBONES)}; pick one of those")
        rows = self.project.labels()
        check_trainable(rows)
        names = sorted({label for _, label in rows})
        labels = np.asarray([names.index(label) for _, label in rows])
        train_idx, test_idx = stratified_split(labels, len(rows), TEST_FRACTION, seed=0)
        runs = self.project.folder / "runs"
        runs.mkdir(exist_ok=True)
        run_dir = runs / f"run-{int(time.time() * 1000)}"
        run_id = self.project.start_run(budget_min, backbone, str(run_dir), len(rows))
        write_manifest(run_dir / "train.csv", [rows[i] for i in train_idx])  # trusted: it names the collection's folders
        write_manifest(run_dir / "test.csv", [rows[i] for i in test_idx])
        with self._lock:
            self._state = {"run_id": run_id, "phase": "training", "started": time.time(), "budget_min": budget_min, "progress": 0.0}
        threading.Thread(target=self._run, args=(run_id, run_dir, budget_min, backbone), daemon=True, name=f"studio-train-{run_id}").start()
        return run_id

    def _run(self, run_id: int, run_dir: Path, budget_min: float, backbone: str) -> None:
        try:
            accuracy, predictions = _train_and_evaluate(self.project, run_dir, budget_min, backbone, self._set_phase)
            self.project.finish_run(run_id, "done", accuracy, predictions=predictions)
            self._set_phase("done", 1.0)
        except ImagerecError as e:
            self.project.finish_run(run_id, "failed", message=str(e))
            self._set_phase("failed", 1.0, str(e))
        except Exception as e:  # a bug: keep the traceback in the run folder, show one line
            (run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            self.project.finish_run(run_id, "failed", message=f"{type(e).__name__}: {e} (traceback in {run_dir / 'error.txt'})")
            self._set_phase("failed", 1.0, str(e))

    def _set_phase(self, phase: str, progress: float | None = None, message: str | None = None) -> None:
        with self._lock:
            self._state["phase"] = phase
            if progress is not None:
                self._state["progress"] = progress
            if message:
                self._state["message"] = message


def _train_and_evaluate(project: Project, run_dir: Path, budget_min: float, backbone: str, set_phase):
    """Train on train.csv within the budget, then predict test.csv; returns (accuracy, predictions)."""
    from ..classifier import Classifier  # noqa: PLC0415 - torch only when training
    from ..data import load_images  # noqa: PLC0415
    from ..evaluation import build_report  # noqa: PLC0415
    from ..training import TrainConfig, train  # noqa: PLC0415

    small = backbone in ("seed_cnn", "cifar_resnet18")
    n_train = len(load_images(str(run_dir / "train.csv")))
    batch = max(1, min(64, int(n_train * 0.9) // 2))  # a tiny project still gets two steps an epoch
    config = TrainConfig(backbone=backbone, pretrained=not small, time_budget=budget_min, image_size=32 if small else None,
                         batch_size=batch, device="cpu", workers=0, save_every=0)
    train(str(run_dir / "train.csv"), run_dir / "model", config, progress=False)
    set_phase("evaluating", 0.96)
    test = load_images(str(run_dir / "test.csv"))
    clf = Classifier.load(run_dir / "model")
    proba = clf.predict_proba(test.paths)
    ok = ~np.isnan(proba).any(axis=1)
    index = {name: i for i, name in enumerate(clf.classes_)}
    true = np.asarray([index.get(test.classes[label], -1) for label in test.labels])
    keep = ok & (true >= 0)
    paths = [p for p, k in zip(test.paths, keep) if k]
    report = build_report(proba[keep], true[keep], paths, list(clf.classes_), skipped=int((~keep).sum()))
    evaluation = {"summary": report.summary, "per_class": report.per_class, "confusion": report.confusion.tolist(),
                  "classes": list(clf.classes_)}
    write_text_atomic(run_dir / "evaluation.json", json.dumps(evaluation, indent=1))
    ids = project.ids_of_paths(paths)
    pred = proba[keep].argmax(1)
    conf = proba[keep].max(1)
    predictions = [(ids[p], clf.classes_[t], clf.classes_[q], float(c)) for p, t, q, c in zip(paths, true[keep], pred, conf) if p in ids]
    return float(report.summary["accuracy"]), predictions
