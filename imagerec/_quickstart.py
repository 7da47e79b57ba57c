"""``imagerec quickstart``: the main job, end to end, inside a time budget.

Downloads CIFAR-10 (or reads a local copy), fine-tunes EfficientNet-Lite0 with the default
transfer recipe on 96% of the training images (4% held out to calibrate the probabilities
and choose the input size for prediction), evaluates on the test split and prints where
everything is.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .classifier import Classifier
from .data import load_images
from .errors import ImagerecError
from .training import TrainConfig, train

VAL_FRACTION = 0.04  # held out to fit the temperature and choose the input size for prediction


def quickstart(data: str | os.PathLike = "cifar10", out: str | os.PathLike = "runs/quickstart", *, time_budget: float = 20.0, progress: bool = True) -> dict:
    """Train and evaluate the default recipe on ``data`` within ``time_budget`` minutes.

    Returns:
        The evaluation summary (accuracy, top-k, ECE...) plus ``run_dir`` and ``minutes``.

    Raises:
        ImagerecError: ``time_budget`` is not a positive number of minutes (checked first).
    """
    if isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)) or not (math.isfinite(time_budget) and time_budget > 0):
        raise ImagerecError(f"time_budget={time_budget!r} must be a positive number of minutes, e.g. --time-budget 20")
    started = time.perf_counter()
    out = Path(out)
    # A small validation carve-out (VAL_FRACTION: 2,000 of CIFAR-10's 50,000) is what the
    # temperature and the input size for prediction are fitted on; everything else trains.
    # The budget covers the test evaluation too: training keeps the time it measures for it.
    config = TrainConfig(time_budget=time_budget, val_fraction=VAL_FRACTION)
    test_images = len(load_images(data, "test"))  # listed only: a missing test split fails before training
    resumed = out if (out / "last.safetensors").exists() else None
    result = train(data, out, config, resume=resumed, progress=progress, predict_after=test_images)
    clf = Classifier.load(result.run_dir, device=config.device)
    report = clf.evaluate(data, split="test", out=out / "evaluation", tta=True, progress=progress)
    summary = dict(report.summary, run_dir=str(out), minutes=(time.perf_counter() - started) / 60)
    print(
        f"\nimagerec quickstart: test accuracy {summary['accuracy']:.2%} "
        f"(top-5 {summary.get('top5_accuracy', float('nan')):.2%}, ECE {summary['ece']:.3f}) "
        f"on {summary['images']:,} images in {summary['minutes']:.1f} min\n"
        f"  checkpoint: {out / 'best.safetensors'}\n"
        f"  metrics per epoch: {out / 'metrics.csv'}\n"
        f"  evaluation: {out / 'evaluation'} (summary.json, confusion.png, reliability.png)\n"
        f"  next: imagerec predict {out} your_photo.jpg"
    )
    return summary
