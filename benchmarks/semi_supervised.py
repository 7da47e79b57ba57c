"""Semi-supervised training against the labels alone (issue 22, part 5), on the suite's photo sets.

Per set and seed: 10 labelled images a class drawn from the train split (a CSV manifest); the rest
of the train split is the unlabelled pool (its labels are not read). Two runs with the same time
budget and defaults: ``train`` on the 10 a class, and ``train_semi_supervised`` on them plus the
pool (``imagerec train LABELLED --unlabeled POOL``). Both are scored on the test split. Writes
``results/semi_supervised.json``. Run: ``python benchmarks/semi_supervised.py --time-budget 1.5``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402 - the suite's sets

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from imagerec import Classifier
    from imagerec.data import write_manifest
    from imagerec.suggest import PSEUDO_SHARE, train_semi_supervised
    from imagerec.training import TrainConfig, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(suite.PHOTO_SETS))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--time-budget", type=float, default=1.5, help="minutes per run, pseudo-labelling included")
    parser.add_argument("--share", type=float, default=PSEUDO_SHARE)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--work", default="/tmp/imagerec-suite")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report = {
        "command": " ".join(["python", "benchmarks/semi_supervised.py", *sys.argv[1:]]), "git_commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_start": os.getloadavg(), "sets": {},
    }  # fmt: skip
    target = Path(args.results) / "semi_supervised.json"
    for name in args.sets.split(","):
        data = suite.SetData(name, Path(args.work), 0)
        rows = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            picked = np.concatenate([rng.choice(np.flatnonzero(data.train.labels == c), min(args.per_class, int((data.train.labels == c).sum())), replace=False)
                                     for c in range(data.k)])  # fmt: skip
            rest = np.setdiff1d(np.arange(len(data.train)), picked)
            folder = Path(args.work) / "semi" / f"{name}-seed{seed}"
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_manifest(folder / "labelled.csv", [(data.train.paths[i], data.classes[data.train.labels[i]]) for i in picked])
            write_manifest(folder / "pool.csv", [(data.train.paths[i], None) for i in rest], labelled=False)
            config = TrainConfig(time_budget=args.time_budget, seed=seed)
            row = {"seed": seed, "labelled": len(picked), "pool": len(rest)}
            started = time.perf_counter()
            train(str(folder / "labelled.csv"), folder / "alone", config, progress=False)
            row["alone_s"] = round(time.perf_counter() - started, 1)
            row["alone"] = float(Classifier.load(folder / "alone").evaluate(str(data.root), split="test").summary["accuracy"])
            started = time.perf_counter()
            _, info = train_semi_supervised(str(folder / "labelled.csv"), str(folder / "pool.csv"), folder / "semi", config, share=args.share, progress=False)
            row["semi_s"] = round(time.perf_counter() - started, 1)
            row["semi"] = float(Classifier.load(folder / "semi").evaluate(str(data.root), split="test").summary["accuracy"])
            truth = {data.train.paths[i]: data.classes[data.train.labels[i]] for i in rest}
            import csv

            with open(folder / "semi" / "pseudo" / "pseudo_labels.csv", newline="") as f:
                taken = [(r["path"], r["label"]) for r in csv.DictReader(f)]
            real = {os.path.realpath(p): v for p, v in truth.items()}
            row["pseudo"] = {**info, "accuracy": float(np.mean([real.get(os.path.realpath(p)) == v for p, v in taken])) if taken else None}
            rows.append(row)
            print(f"[semi] {name} seed {seed}: alone {row['alone']:.3f}, semi {row['semi']:.3f} "
                  f"({info['pseudo_labelled']}/{info['unlabelled_images']} pseudo-labelled, right {row['pseudo']['accuracy']})", flush=True)  # fmt: skip
        report["sets"][name] = {"runs": rows, "alone": float(np.mean([r["alone"] for r in rows])), "semi": float(np.mean([r["semi"] for r in rows]))}
        report["loadavg_end"] = os.getloadavg()
        target.write_text(json.dumps(report, indent=1))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
