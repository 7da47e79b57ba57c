""""Label these next" against random picks (issue 22, part 2), on the development suite's sets.

For each set (all its images, train and test, embedded by imagerec's feature stage with
``backbone="auto"``, cached under ``--work`` like the suite's), each budget of B labels a class
(B in 1, 2, 5, 10: B x classes labels in all) and each seed:

- **label next**: the person labels what ``select_next`` asks for, one class count of images a
  round (the first round from nothing: TypiClust; later rounds: margin among a diverse pool, fed
  the current suggestions), until B x classes images are labelled;
- **random**: the same number of images drawn at random from the whole set.

Both are scored the same way: ``suggest`` fitted on the labelled images, then the accuracy of its
suggestions on every other image. Figures: mean over the seeds, both in the same run. Writes
``results/label_next.json`` and the curves to ``docs/label_next.png``. Run:
``python benchmarks/label_next.py`` (minutes: the embeddings are the suite's cache).
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
import suite  # noqa: E402 - the suite's sets and their cached features

BUDGETS = (1, 2, 5, 10)
ROOT = Path(__file__).resolve().parents[1]


def accuracy_of_suggestions(features: np.ndarray, truth: list[str], picked: np.ndarray) -> float:
    from imagerec.suggest import suggest

    labels = [None] * len(truth)
    for i in picked:
        labels[i] = truth[i]
    s = suggest(features, labels)
    suggested = np.asarray([s.classes[i] for i in s.suggester.suggested_])
    rest = np.setdiff1d(np.arange(len(truth)), picked)
    return float(np.mean(suggested[rest] == np.asarray(truth)[rest]))


def label_next_picks(features: np.ndarray, truth: list[str], total: int, per_round: int, seed: int) -> np.ndarray:
    """The images the person labels, ``per_round`` a round as ``select_next`` asks, ``total`` in all."""
    from imagerec.features import FeaturePipeline
    from imagerec.suggest import PCA_DIM, select_next, suggest

    prepared = FeaturePipeline(normalize=True, pca_dim=PCA_DIM, random_state=0).fit_transform(features)  # as suggest prepares them
    labels: list[str | None] = [None] * len(truth)
    picked: list[int] = []
    while len(picked) < total:
        proba = suggest(features, labels).proba if picked else None
        for i in select_next(prepared, labels, min(per_round, total - len(picked)), proba=proba, random_state=seed):
            labels[int(i)] = truth[int(i)]
            picked.append(int(i))
    return np.asarray(picked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(suite.PHOTO_SETS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--work", default="/tmp/imagerec-suite")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "label_next.png"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report = {
        "command": " ".join(["python", "benchmarks/label_next.py", *sys.argv[1:]]), "git_commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budgets": BUDGETS, "seeds": args.seeds, "sets": {},
    }  # fmt: skip
    for name in args.sets.split(","):
        started = time.perf_counter()
        data = suite.SetData(name, Path(args.work), 0)
        emb = data.auto()
        features = np.asarray(emb.features, np.float32)
        truth = [data.classes[i] for i in emb.labels]
        k = data.k
        row = {"images": len(truth), "classes": k, "label_next": {}, "random": {}}
        for b in BUDGETS:
            ours, rand = [], []
            for seed in range(args.seeds):
                picks = label_next_picks(features, truth, b * k, k, seed)
                ours.append(accuracy_of_suggestions(features, truth, picks))
                rng = np.random.default_rng(seed)
                rand.append(accuracy_of_suggestions(features, truth, rng.choice(len(truth), b * k, replace=False)))
            row["label_next"][b], row["random"][b] = ours, rand
            print(f"[label-next] {name} {b}/class: label next {np.mean(ours):.3f}, random {np.mean(rand):.3f}", flush=True)
        row["seconds"] = round(time.perf_counter() - started, 1)
        report["sets"][name] = row
        Path(args.results, "label_next.json").write_text(json.dumps(report, indent=1))
    plot(report, Path(args.plot))
    print(table(report))


def table(report: dict) -> str:
    lines = ["| set | " + " | ".join(f"{b}/class: next / random" for b in BUDGETS) + " |", "|---|" + "---:|" * len(BUDGETS)]
    wins = 0
    for name, row in report["sets"].items():
        cells = []
        for b in BUDGETS:
            ours, rand = np.mean(row["label_next"][b]), np.mean(row["random"][b])
            wins += ours > rand
            cells.append(f"{'**' if ours > rand else ''}{ours:.3f}{'**' if ours > rand else ''} / {rand:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nlabel next above random in {wins} of {len(report['sets']) * len(BUDGETS)} (set, budget) cells")
    return "\n".join(lines)


def plot(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["sets"])
    cols = min(4, len(sets))
    rows = -(-len(sets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, sets):
        row = report["sets"][name]
        for kind, style in (("label_next", "o-"), ("random", "s--")):
            ax.plot(BUDGETS, [np.mean(row[kind][b]) for b in BUDGETS], style, label=kind.replace("_", " "))
        ax.set_title(name, fontsize=9)
        ax.set_xscale("log")
        ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
        ax.set_xlabel("labels a class", fontsize=8)
        ax.set_ylabel("accuracy of the suggestions", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(sets):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
