"""CIFAR-10 time to accuracy: the origin document's script against imagerec, in one run.

Runs, one after another on the same machine, each as its own process with a cold imagerec cache
(so decoding the JPEGs counts as data loading):

1. ``seed``: the origin document's own script (``../shared/baselines/seed_tutorial.py``);
2. ``imagerec-seed``: ``imagerec train --recipe seed`` then ``imagerec evaluate`` on the test split;
3. ``imagerec-default``: ``imagerec quickstart --time-budget 20`` (the default transfer recipe,
   training and test evaluation inside 20 minutes);
4. with ``--hq``: ``imagerec-hq``, a higher-quality setting inside 90 minutes (``imagerec train``
   at 160 px with an 85-minute budget, then ``imagerec evaluate``).

For each: wall time of the whole job (data loading, training and test evaluation), test accuracy,
and the peak resident memory of its process tree. Writes
``benchmarks/results/cifar10_time_to_accuracy.json`` and a plot of test accuracy against wall time
(``docs/cifar10_time_to_accuracy.png``, with imagerec's validation accuracy per epoch).

Usage::

    nohup .venv/bin/python benchmarks/cifar10_time_to_accuracy.py > /tmp/tta.log 2>&1 &
    .venv/bin/python benchmarks/cifar10_time_to_accuracy.py --only imagerec-default --budget 20
    .venv/bin/python benchmarks/cifar10_time_to_accuracy.py --only imagerec-default --slowdown 1.4 \
        --set ema=0.999 --out benchmarks/results/cifar10_variants.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
SEED_SCRIPT = ROOT.parent / "shared" / "baselines" / "seed_tutorial.py"
IMAGEREC = [sys.executable, "-m", "imagerec"]


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS of the process and its children in MB, output)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}:\n{text[-2000:]}")
    return wall, usage.ru_maxrss // 1024, text  # ru_maxrss: the largest child, in KB on Linux


def seed_script(work: Path, env: dict) -> dict:
    wall, rss, text = run([sys.executable, str(SEED_SCRIPT), str(DATA)], env, work / "seed.log")
    found = re.search(r"train_seconds=([\d.]+) test_accuracy=([\d.]+)%", text)
    return {"wall_s": wall, "peak_rss_mb": rss, "test_accuracy": float(found.group(2)) / 100, "train_s": float(found.group(1))}


def imagerec_job(name: str, train_args: list[str], work: Path, env: dict) -> dict:
    run_dir = work / name
    wall_train, rss_train, _ = run(IMAGEREC + ["train", str(DATA), "--out", str(run_dir), "--no-progress", *train_args], env, work / f"{name}-train.log")
    wall_eval, rss_eval, text = run(
        IMAGEREC + ["evaluate", str(run_dir), str(DATA), "--split", "test", "--tta", "--out", str(run_dir / "evaluation")], env, work / f"{name}-eval.log"
    )
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    return {
        "wall_s": wall_train + wall_eval,
        "train_wall_s": wall_train,
        "eval_wall_s": wall_eval,
        "peak_rss_mb": max(rss_train, rss_eval),
        "test_accuracy": summary["accuracy"],
        "epochs": _epochs(run_dir),
        "plan": json.loads((run_dir / "config.json").read_text())["plan"],
    }


def quickstart_job(budget: float, work: Path, env: dict, slowdown: float = 1.0, settings: list[str] = ()) -> dict:
    run_dir = work / "imagerec-default"
    # a variant (benchmarks/variant.py): training steps made slower, or other training defaults
    variant = [f"--slowdown={slowdown}", *(f"--set={s}" for s in settings), "--"]
    cli = IMAGEREC + ["quickstart"] if slowdown == 1 and not settings else [sys.executable, str(ROOT / "benchmarks" / "variant.py"), *variant]
    env = dict(env, PYTHONPATH=str(ROOT))  # benchmarks/variant.py imports this checkout's imagerec
    wall, rss, text = run(cli + ["--data", str(DATA), "--out", str(run_dir), "--time-budget", str(budget), "--no-progress"], env, work / "quickstart.log")
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    return {
        "wall_s": wall,
        "peak_rss_mb": rss,
        "test_accuracy": summary["accuracy"],
        "epochs": _epochs(run_dir),
        "plan": json.loads((run_dir / "config.json").read_text())["plan"],
    }


def _epochs(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]


def plot(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        line = ax.plot([r["wall_s"] / 60], [100 * r["test_accuracy"]], "o", ms=8, label=f"{name}: {100 * r['test_accuracy']:.2f}% test")[0]
        if r.get("epochs"):
            xs = [e["elapsed_s"] / 60 for e in r["epochs"] if e.get("val_acc") is not None]
            ys = [100 * e["val_acc"] for e in r["epochs"] if e.get("val_acc") is not None]
            if xs:
                ax.plot(xs, ys, "--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("wall time, minutes (data loading, training and test evaluation)")
    ax.set_ylabel("CIFAR-10 (JPEG copy) accuracy, %")
    ax.set_title("time to accuracy on a 2-core CPU (dashed: validation accuracy per epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only these jobs (seed, imagerec-seed, imagerec-default, imagerec-hq; naming imagerec-hq implies --hq)")
    parser.add_argument("--budget", type=float, default=20.0, help="minutes for imagerec-default (default: 20)")
    parser.add_argument("--slowdown", type=float, default=1.0, help="imagerec-default with every training step this many times slower (1.4: a slower machine)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="imagerec-default with this training setting (e.g. ema=0.999)")
    parser.add_argument("--hq", action="store_true", help="also run the 90-minute higher-quality setting")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cifar10_time_to_accuracy.json"))
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"CIFAR-10 JPEG copy not found at {DATA}")

    every = ["seed", "imagerec-seed", "imagerec-default", "imagerec-hq"]
    unknown = sorted(set(args.only or []) - set(every))
    if unknown:
        sys.exit(f"--only {' '.join(unknown)}: no such job; the jobs are {', '.join(every)}")
    jobs = [j for j in every if (j in args.only if args.only else j != "imagerec-hq" or args.hq)]
    results, work = {}, Path(tempfile.mkdtemp(prefix="imagerec-tta-"))
    for name in jobs:
        env = dict(os.environ, IMAGEREC_HOME=str(work / f"home-{name}"), PYTHONUNBUFFERED="1")  # cold cache each
        print(f"== {name} ({datetime.datetime.now():%H:%M:%S})", flush=True)
        if name == "seed":
            results[name] = seed_script(work, env)
        elif name == "imagerec-seed":
            results[name] = imagerec_job(name, ["--recipe", "seed"], work, env)
        elif name == "imagerec-default":
            results[name] = quickstart_job(args.budget, work, env, args.slowdown, args.set)
            results[name].update(slowdown=args.slowdown, settings=args.set)
        else:
            # EfficientNet-Lite0 at 160 px on all 50,000 training images; 5 of the 90 minutes are
            # left for set-up and the test evaluation with flip TTA (about 2 minutes at 160 px).
            results[name] = imagerec_job(name, ["--time-budget", "85", "--image-size", "160", "--val-fraction", "0"], work, env)
        r = results[name]
        print(f"   {name}: test accuracy {100 * r['test_accuracy']:.2f}%  wall {r['wall_s']:.0f} s  peak RSS {r['peak_rss_mb']} MB", flush=True)

    record = {
        "benchmark": "cifar10_time_to_accuracy",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "work_dir": str(work),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if previous.get("results"):  # a run updates its own rows and keeps the others
        record["results"] = {**previous["results"], **results}
    out.write_text(json.dumps(record, indent=2))
    plot(record["results"], ROOT / "docs" / "cifar10_time_to_accuracy.png")
    print(json.dumps({k: {"test_accuracy": v["test_accuracy"], "wall_s": round(v["wall_s"])} for k, v in record["results"].items()}, indent=1))


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
