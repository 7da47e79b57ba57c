"""Which epoch to keep when the validation split is tiny: the rules compared on unseen photos.

With 30 validation photos one photo is 3.3 points, so "the first epoch with the highest
validation accuracy" (imagerec's rule before this benchmark) often keeps an early epoch that a
later, better-trained one ties. For each seed this trains ``--data`` with ``--time-budget``
(defaults otherwise; the input-size search off, so every epoch is judged at the training size),
keeps a copy of each epoch's weights, and evaluates on the test split the epoch each rule picks:

* ``first_best``: the first epoch with the highest validation accuracy;
* ``one_se``: the latest epoch within one standard error of the highest (binomial, at least one
  image: ``max(sqrt(p (1 - p) / n), 1 / n)``), Breiman's one-standard-error rule;
* ``min_loss``: the epoch with the lowest validation loss;
* ``last``: the last epoch.

    flock /tmp/imagerec-bench.lock nohup /work/main/.venv/bin/python benchmarks/checkpoint_rule.py \
        --data /tmp/intel300 --seeds 2 3 4 --out /tmp/rule.json > /tmp/rule.log 2>&1 &
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import imagerec.training._callbacks as callbacks
from imagerec import Classifier, TrainConfig, train
from imagerec.data import load_images


def keep_each_epoch() -> None:
    """After each epoch's end (which writes ``last``), copy ``last`` to ``epoch-N.safetensors``."""
    original = callbacks.EpochEnd.on_epoch_end

    def on_epoch_end(self, loop):
        original(self, loop)
        shutil.copy(self.run_dir / callbacks.LAST, self.run_dir / f"epoch-{loop.epoch + 1}.safetensors")

    callbacks.EpochEnd.on_epoch_end = on_epoch_end


def picks(rows: list[dict], n_val: int) -> dict[str, int]:
    """The epoch (1-based) each rule keeps, from the rows of ``metrics.csv``."""
    acc = np.array([float(r["val_acc"]) for r in rows])
    loss = np.array([float(r["val_loss"]) for r in rows])
    best = acc.max()
    se = max(math.sqrt(best * (1 - best) / n_val), 1 / n_val)
    return {
        "first_best": int(np.argmax(acc)) + 1,
        "one_se": int(np.nonzero(acc >= best - se - 1e-9)[0][-1]) + 1,
        "min_loss": int(np.argmin(loss)) + 1,
        "last": len(rows),
    }


def test_accuracy(checkpoint: Path, data: str) -> float:
    clf = Classifier.load(checkpoint)
    source = load_images(data, "test")
    out = clf._predictions(source, tta=False, batch_size=128)
    return float(np.mean(out.proba.argmax(1) == clf._map_labels(source)[out.indices]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data set with train/ and test/ folders")
    parser.add_argument("--time-budget", type=float, default=4.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()
    keep_each_epoch()
    work = Path(tempfile.mkdtemp(prefix="imagerec-rule-"))
    runs = {}
    for seed in args.seeds:
        run_dir = work / f"seed{seed}"
        started = time.perf_counter()
        train(args.data, run_dir, TrainConfig(time_budget=args.time_budget, seed=seed, test_size=False), progress=False)
        train_min = (time.perf_counter() - started) / 60
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        n_val = len(load_images(args.data, "val", val_fraction=TrainConfig().val_fraction, seed=seed))
        chosen = picks(rows, n_val)
        tested = {epoch: test_accuracy(run_dir / f"epoch-{epoch}.safetensors", args.data) for epoch in sorted(set(chosen.values()))}
        runs[f"seed {seed}"] = {
            "train_min": round(train_min, 2),
            "val_images": n_val,
            "val_acc": [float(r["val_acc"]) for r in rows],
            "val_loss": [round(float(r["val_loss"]), 4) for r in rows],
            "picks": chosen,
            "test_acc": {rule: tested[epoch] for rule, epoch in chosen.items()},
        }
        print(json.dumps({f"seed {seed}": runs[f"seed {seed}"]}), flush=True)
    rules = list(next(iter(runs.values()))["picks"])
    record = {
        "benchmark": "checkpoint_rule",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip(),
        "data": args.data,
        "time_budget_min": args.time_budget,
        "runs": runs,
        "mean_test_acc": {rule: float(np.mean([r["test_acc"][rule] for r in runs.values()])) for rule in rules},
    }
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record["mean_test_acc"], indent=1))


if __name__ == "__main__":
    main()
