"""Temperature scaling measured: train with a time budget, then ECE before and after on the test split.

    flock /tmp/imagerec-bench.lock nohup /work/main/.venv/bin/python benchmarks/calibration.py \
        --data ../shared/datasets/intel-scenes-small --time-budget 4 --out /tmp/cal-intel > LOG 2>&1 &

Trains ``imagerec train DATA --time-budget MINUTES`` (temperature fitted on the carved-out
validation split, as the default does), then runs the best checkpoint once over the test split
and reports, from that one pass, accuracy and ECE of the plain softmax and of the calibrated
probabilities, with and without the flip TTA, and checks that no prediction changed class.
Pass ``--run`` to evaluate an existing run folder instead of training.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from imagerec import Classifier
from imagerec.data import load_images
from imagerec.evaluation import build_report


def measure(clf: Classifier, data: str, tta: bool) -> dict:
    """One pass over the test split: accuracy and ECE before/after temperature scaling."""
    source = load_images(data, "test")
    labels = clf._map_labels(source)
    started = time.perf_counter()
    out = clf._predictions(source, tta=tta, batch_size=128)
    seconds = time.perf_counter() - started
    y = labels[out.indices]
    paths = [source.paths[i] for i in out.indices]
    report = build_report(out.proba, y, paths, clf.classes_, raw_proba=out.raw_proba, temperature=clf.temperature_)
    same = bool((out.proba.argmax(1) == out.raw_proba.argmax(1)).all())
    s = report.summary
    return {
        "tta": tta,
        "images": s["images"],
        "accuracy": s["accuracy"],
        "accuracy_uncalibrated": float(np.mean(out.raw_proba.argmax(1) == y)),
        "argmax_unchanged": same,
        "ece_uncalibrated": s["ece_uncalibrated"],
        "ece_calibrated": s["ece"],
        "temperature": s["temperature"],
        "eval_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data set with train/ and test/ folders")
    parser.add_argument("--time-budget", type=float, default=4.0, help="minutes for the training run")
    parser.add_argument("--out", required=True, help="the run folder to write")
    parser.add_argument("--run", help="evaluate this existing run folder instead of training")
    parser.add_argument("--param", action="append", default=[], help="extra TrainConfig field, KEY=VALUE (JSON value)")
    args = parser.parse_args()
    params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    started = time.perf_counter()
    if args.run:
        clf, run = Classifier.load(args.run), args.run
    else:
        clf = Classifier(time_budget=args.time_budget, **params).fit(args.data, args.out, progress=False)
        clf, run = Classifier.load(args.out), args.out
    train_min = (time.perf_counter() - started) / 60
    result = {
        "data": args.data,
        "time_budget_min": args.time_budget,
        "params": params,
        "train_wall_min": round(train_min, 2),
        "run": run,
        "calibration_fit": clf.meta_.get("calibration"),
        "epochs_done": len(clf.meta_.get("history", [])),
        "results": [measure(clf, args.data, tta) for tta in (False, True)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
