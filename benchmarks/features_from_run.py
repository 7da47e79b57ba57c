"""What ``--features RUN`` changes (issue 22, part 4): the audit and the clustering with a trained
run's network against the generic ImageNet backbone, on the development suite's sets.

Per set: a run is trained on the train split (``imagerec train`` defaults, plus any
``--train-param``), then both feature kinds are scored on the **test split**, which the run never
saw (label issues on labels it learnt would be found by memory, not by the features):

- clustering: k-means with k = the number of classes (imagerec's ``cluster_images``), ACC, mean of
  3 seeds;
- label issues: 5% of the test labels moved to another class (the suite's ``flip_labels``), then
  ``audit(..., checks=["label_issues"])`` at its defaults: precision, recall, P@k;
- near-duplicates: 36 planted copies of test images (the suite's transforms and plan), then
  ``audit(..., checks=["near_duplicates"])`` at its defaults: recall and precision.

Both kinds go through the same feature stage (``backbone="auto"`` or ``"run:RUN"``), cached by
content under ``--work``. Run:
``python benchmarks/features_from_run.py --train-param probe=false --time-budget 1.5``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402 - the suite's sets, copies, flips and scores


def train_run(data: suite.SetData, args) -> tuple[Path, dict]:
    from imagerec import Classifier

    run = data.work / "runs" / data.name / f"features-{args.tag}"
    params = {"time_budget": args.time_budget, "seed": args.seed, **dict(suite._parse_param(p) for p in args.train_param)}
    record = run / "bench.json"
    if record.is_file() and json.loads(record.read_text())["params"] == params:
        return run, json.loads(record.read_text())
    started = time.perf_counter()
    clf = Classifier(**params).fit(str(data.root), out=run, progress=False)
    report = clf.evaluate(str(data.root), split="test").summary
    history = getattr(clf, "history_", None) or []
    best = max(history, key=lambda r: r.get("val_acc") or 0) if history else {}
    info = {
        "params": params, "train_s": round(time.perf_counter() - started, 1), "test_accuracy": float(report["accuracy"]),
        "best_epoch": best.get("epoch"), "best_stage": best.get("stage"), "epochs": len(history),
        "fine_tuned": any((r.get("stage") or 0) > 0 for r in history) and best.get("stage") != 0,
    }  # fmt: skip
    record.write_text(json.dumps(info))
    return run, info


def score(data: suite.SetData, spec: str, name: str, args) -> dict:
    from imagerec import audit, cluster_images
    from imagerec.clustering import clustering_scores
    from imagerec.data import ImageSource
    from imagerec.features import compute_features

    test = data.test
    cache = data.work / "features-from-run" / data.name / name
    out = {}
    # clustering, on the features of the test images alone
    feats = compute_features(test, backbone=spec, cache_dir=cache / "embed", pca_dim=None, progress=False).embeddings
    accs = [clustering_scores(test.labels, cluster_images(feats, "kmeans", data.k, random_state=s, progress=False).labels)["acc"] for s in range(3)]
    out["kmeans_acc"] = float(np.mean(accs))
    # label issues, 5% of the test labels moved
    noisy, flipped = suite.flip_labels(test.labels, data.k, args.noise, args.seed)
    source = ImageSource(list(test.paths), noisy, data.classes, f"{data.root}/test (noisy labels)")
    result = audit(source, out=cache / "audit", checks=["label_issues"], backbone=spec, random_state=args.seed, progress=False)
    where = {p: i for i, p in enumerate(source.paths)}
    df = result["label_issues"]
    idx = np.asarray([where[p] for p in df["path"]])
    ranking = idx[np.argsort(df["label_quality"].to_numpy(), kind="stable")]
    out["label_issues"] = suite.score_flags(idx[df["is_issue"].to_numpy(bool)], ranking, flipped)
    # near-duplicates, copies of test images planted among them
    plan = suite.copy_plan(len(test), args.copies, args.seed)
    folder = data.work / "planted" / f"{data.name}-test-seed{args.seed}"
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(plan):
            suite.make_copy(test.paths[p["original"]], p["params"], folder / f"copy_{i:03d}_{'+'.join(p['kinds'])}")
        (folder / "done").write_text("")
    copies = sorted(str(f) for f in folder.iterdir() if f.name.startswith("copy_"))
    n = len(test)
    labels = np.concatenate([test.labels, test.labels[[p["original"] for p in plan]]])
    source = ImageSource(list(test.paths) + copies, labels, data.classes, f"{data.root}/test + {len(copies)} copies")
    result = audit(source, out=cache / "audit", checks=["near_duplicates"], backbone=spec, random_state=args.seed, progress=False)
    where = {p: i for i, p in enumerate(source.paths)}
    table = result["near_duplicates"]
    group = np.full(len(source), -1, np.int64)
    if len(table):
        rows = np.asarray([where[p] for p in result.images["path"]])
        group[rows[table["index"].to_numpy(dtype=np.int64)]] = table["group"].to_numpy()
    truth = {(p["original"], n + i) for i, p in enumerate(plan)}
    out["near_duplicates"] = suite.score_groups(group, truth, n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(suite.PHOTO_SETS), help="comma-separated, of the suite's sets")
    parser.add_argument("--time-budget", type=float, default=1.5, help="minutes of training per set")
    parser.add_argument("--train-param", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig value other than its default")
    parser.add_argument("--tag", default="run", help="names the run folders and the results file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copies", type=int, default=36)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--work", default="/tmp/imagerec-suite")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    work = Path(args.work)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    report = {
        "command": " ".join(["python", "benchmarks/features_from_run.py", *sys.argv[1:]]), "git_commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(), "sets": {},
    }  # fmt: skip
    target = Path(args.results) / f"features_from_run_{args.tag}.json"
    for name in args.sets.split(","):
        print(f"[features-from-run] {name} ...", flush=True)
        data = suite.SetData(name, work, args.seed)
        run, info = train_run(data, args)
        row = {"run": info, "generic": score(data, "auto", "generic", args), "run_features": score(data, f"run:{run}", args.tag, args)}
        report["sets"][name] = row
        g, r = row["generic"], row["run_features"]
        print(f"  run acc {info['test_accuracy']:.3f} (fine-tuned: {info['fine_tuned']}); k-means ACC {g['kmeans_acc']:.3f} -> {r['kmeans_acc']:.3f}; "
              f"label issues P/R {g['label_issues']['precision']:.2f}/{g['label_issues']['recall']:.2f} -> "
              f"{r['label_issues']['precision']:.2f}/{r['label_issues']['recall']:.2f}; near-dup recall "
              f"{g['near_duplicates']['recall']:.2f} -> {r['near_duplicates']['recall']:.2f} "
              f"(P {g['near_duplicates']['precision']:.2f} -> {r['near_duplicates']['precision']:.2f})", flush=True)  # fmt: skip
        report["loadavg_end"] = os.getloadavg()
        target.write_text(json.dumps(report, indent=1))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
