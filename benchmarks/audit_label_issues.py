"""Label issues and outliers on CIFAR-10: imagerec's audit functions against a pixel peer, in one run.

What is measured
    1. Label issues. A seeded 10,000-image subset of the CIFAR-10 training split (rows of the
       precomputed embeddings file whose path contains ``/train/``); 5% of its labels flipped,
       each to a uniformly chosen other class. Precision and recall of the flagged images
       against the flipped ones, and precision of the ``n_flipped`` lowest label qualities
       (the ranking alone). Methods, run one after the other in this process:
       * ``imagerec``: ``find_label_issues(embeddings, noisy labels)`` with its defaults
         (logistic probe on the L2-normalised embeddings, 5-fold out-of-fold probabilities,
         averaged with 50-nearest-neighbour label votes; cleanlab's ``low_self_confidence``);
       * ``imagerec-probe-only``: the same with ``k_neighbors=0, filter_by="prune_by_noise_rate"``
         (the probe alone and cleanlab's default filter);
       * ``peer``: cleanlab with scikit-learn ``LogisticRegression`` on raw pixels (32x32x3
         flattened, ``StandardScaler``), same folds and cleanlab call; its solver is capped at
         ``--peer-max-iter`` iterations (default 100, scikit-learn's own default; whether it
         converges there is not checked) so that it finishes in minutes. Both run with one BLAS thread.
       Time is the wall time of the call and its CPU time (all threads; steadier than wall time
       on a shared machine); embeddings precomputed; for the peer, decoding the JPEGs is timed
       apart. Memory is the peak resident size during the call, from
       ``VmHWM`` after resetting it (``/proc/self/clear_refs``), minus the size before it.
    2. ``--sweep``: the probe's C and folds, on another seed's subset and flips (so that the
       choice is not tuned on the subset it is reported on).
    3. ``--outliers``: the 600 intel-scenes test photos embedded at the same settings
       (``embed(..., backbone, image_size)`` of the embeddings file); 101 of them (seeded, 1% of
       the result) planted among the 10,000 CIFAR images; how many ``find_outliers`` ranks in
       its top 1%, and the precision/recall of its default threshold. Peer in the same run:
       cleanlab's ``OutOfDistribution`` (kNN on the same features).

Usage
    flock /tmp/imagerec-bench.lock nohup python benchmarks/audit_label_issues.py \
        --embeddings /work/bench-cache/cifar10_lite2_160.npz --sweep --outliers > LOG 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imagerec import Embeddings, embed
from imagerec.audit._labels import find_label_issues
from imagerec.audit._outliers import find_outliers

INTEL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "intel-scenes-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings", required=True, help="imagerec embeddings .npz of CIFAR-10 (train + test)")
    parser.add_argument("--n", type=int, default=10_000, help="images in the training subset")
    parser.add_argument("--noise", type=float, default=0.05, help="share of labels flipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-max-iter", type=int, default=100, help="lbfgs iteration cap of the pixel peer")
    parser.add_argument("--sweep", action="store_true", help="also try the probe's C and folds (on seed + 1)")
    parser.add_argument("--outliers", action="store_true", help="also plant intel-scenes photos and find them")
    parser.add_argument("--json", default="benchmarks/results/audit_label_issues.json")
    args = parser.parse_args()

    emb = Embeddings.load(args.embeddings)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = {"command": " ".join(["python", *sys.argv]), "date": now}
    x, y_true, paths = subset(emb, args.n, args.seed)
    y_noisy, flipped = flip_labels(y_true, args.noise, args.seed, len(emb.classes))
    print(f"{len(x)} train images, {len(flipped)} labels flipped, features {x.shape[1]}-d ({emb.backbone})", flush=True)

    results["loadavg_start"] = os.getloadavg()
    df, cost = measured(lambda: find_label_issues(x, y_noisy, emb.classes))
    results["imagerec"] = {**score_issues(df, flipped, emb.classes, y_true), **cost, **df.attrs}
    report("imagerec", results["imagerec"])
    probe_only = {"k_neighbors": 0, "filter_by": "prune_by_noise_rate"}
    df, cost = measured(lambda: find_label_issues(x, y_noisy, emb.classes, **probe_only))
    results["imagerec-probe-only"] = {**score_issues(df, flipped, emb.classes, y_true), **cost, **df.attrs}
    report("imagerec-probe-only", results["imagerec-probe-only"])

    pixels, decode = measured(lambda: read_pixels(paths))
    df, cost = measured(lambda: pixel_peer(pixels, y_noisy, emb.classes, args.peer_max_iter, args.seed))
    results["peer"] = {**score_issues(df, flipped, emb.classes, y_true), **cost, "decode_s": decode["wall_s"]}
    results["peer"]["max_iter"] = args.peer_max_iter
    report("peer", results["peer"])
    del pixels

    if args.sweep:
        results["sweep"] = sweep(emb, args)
    if args.outliers:
        results["outliers"] = outliers(emb, x, args.seed)
    results["loadavg_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}", flush=True)


def subset(emb: Embeddings, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A seeded subset of the training rows: features, labels, paths."""
    train = np.flatnonzero(["/train/" in p for p in emb.paths])
    rows = np.sort(np.random.default_rng(seed).choice(train, n, replace=False))
    return emb.features[rows], emb.labels[rows], [emb.paths[i] for i in rows]


def flip_labels(y: np.ndarray, noise: float, seed: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip round(noise * N) labels, each to a uniformly chosen other class; return labels and rows."""
    rng = np.random.default_rng(seed + 1000)
    rows = rng.choice(len(y), round(noise * len(y)), replace=False)
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, n_classes, len(rows))) % n_classes
    return noisy, np.sort(rows)


def measured(call):
    """Run ``call()``; return its result and its wall time and peak memory above the start."""
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current size
    start, cpu = time.perf_counter(), time.process_time()
    out = call()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _status("VmHWM")
    mb = {"peak_mb": round(peak / 1024), "extra_mb": round((peak - rss) / 1024)}
    return out, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **mb}


def _status(key: str) -> int:
    """A kB figure from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def score_issues(df, flipped: np.ndarray, classes: list[str], y_true: np.ndarray) -> dict:
    """Precision and recall of the flags, precision of the ranking, right suggestions."""
    flagged = set(df.loc[df.is_issue, "index"])
    truth = set(flipped.tolist())
    hits = len(flagged & truth)
    ranked = set(df.sort_values("label_quality", kind="stable")["index"].iloc[: len(truth)])
    found = df[df.is_issue & df["index"].isin(truth)]
    true_names = np.asarray(classes)[y_true[found["index"]]]
    right = (found.suggested_label.to_numpy() == true_names).mean() if len(found) else 0.0
    return {
        "flagged": len(flagged),
        "precision": round(hits / max(len(flagged), 1), 4),
        "recall": round(hits / len(truth), 4),
        "precision_at_n_flipped": round(len(ranked & truth) / len(truth), 4),
        "suggestion_right": round(float(right), 4),
    }


def report(name: str, r: dict) -> None:
    print(
        f"{name}: flagged {r['flagged']}, precision {r['precision']:.3f}, recall {r['recall']:.3f}, "
        f"P(lowest flips)  {r['precision_at_n_flipped']:.3f}, suggestion right {r['suggestion_right']:.3f}, "
        f"{r['wall_s']} s (CPU {r['cpu_s']} s), peak {r['peak_mb']} MB (+{r['extra_mb']} MB)",
        flush=True,
    )


def read_pixels(paths: list[str]) -> np.ndarray:
    """The JPEGs as float32 rows of 32x32x3 values."""
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).reshape(-1) for p in paths])


def pixel_peer(pixels: np.ndarray, y: np.ndarray, classes: list[str], max_iter: int, seed: int):
    """cleanlab on out-of-fold probabilities of a logistic regression on standardised pixels."""
    import pandas as pd
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    with threadpool_limits(limits=1, user_api="blas"):  # as imagerec's probe: fair timing
        probs = cross_val_predict(model, pixels, y, cv=folds, method="predict_proba")
    quality = get_label_quality_scores(y, probs)
    issues = cleanlab_issues(y, probs, filter_by="prune_by_noise_rate")
    best = probs.argmax(axis=1)
    names = np.asarray(classes)
    columns = {"index": np.arange(len(y)), "suggested_label": names[best], "label_quality": quality, "is_issue": issues}
    return pd.DataFrame(columns)


def sweep(emb: Embeddings, args) -> list[dict]:
    """The probe's C (5 folds), then 10 folds at the best C, on seed + 1."""
    x, y_true, _ = subset(emb, args.n, args.seed + 1)
    y_noisy, flipped = flip_labels(y_true, args.noise, args.seed + 1, len(emb.classes))
    rows = []
    for C in (0.3, 1.0, 3.0, 10.0):
        rows.append(_sweep_row(x, y_noisy, flipped, emb.classes, y_true, C, 5))
    best = max(rows, key=lambda r: r["f1"])["C"]
    rows.append(_sweep_row(x, y_noisy, flipped, emb.classes, y_true, best, 10))
    return rows


def _sweep_row(x, y_noisy, flipped, classes, y_true, C, folds) -> dict:
    df, cost = measured(lambda: find_label_issues(x, y_noisy, classes, C=C, cv_folds=folds))
    row = {"C": C, "folds": folds, **score_issues(df, flipped, classes, y_true), **cost}
    row["f1"] = round(2 * row["precision"] * row["recall"] / max(row["precision"] + row["recall"], 1e-9), 4)
    print(f"sweep C={C} folds={folds}: " + json.dumps(row), flush=True)
    return row


def outliers(emb: Embeddings, x: np.ndarray, seed: int) -> dict:
    """Plant 1% intel-scenes photos among the CIFAR images; how many come out on top."""
    from cleanlab.outlier import OutOfDistribution

    pp = emb.preprocessing
    intel, cost = measured(lambda: embed(INTEL / "test", emb.backbone, image_size=pp.input_size, progress=False))
    if intel.preprocessing != pp:
        print(f"warning: intel preprocessing {intel.preprocessing} differs from {pp}", flush=True)
    n_plant = round(len(x) / 99)  # 1% of the combined set
    plant = np.random.default_rng(seed).choice(len(intel), n_plant, replace=False)
    both = np.vstack([x, intel.features[plant]])
    truth = set(range(len(x), len(both)))
    top = len(truth)
    out = {"planted": n_plant, "of": len(both), "intel_embed_s": cost["wall_s"], "intel_images": len(intel)}

    df, c = measured(lambda: find_outliers(both))
    flagged = set(df.loc[df.is_outlier, "index"])
    out["imagerec"] = {
        "in_top_1pct": len(set(df["index"].iloc[:top]) & truth),
        "flagged": len(flagged),
        "precision": round(len(flagged & truth) / max(len(flagged), 1), 4),
        "recall": round(len(flagged & truth) / len(truth), 4),
        **c,
    }
    scores, c = measured(lambda: OutOfDistribution().fit_score(features=both))
    order = np.argsort(scores, kind="stable")  # cleanlab: low score = outlier
    out["cleanlab_ood"] = {"in_top_1pct": len(set(order[:top].tolist()) & truth), **c}
    print("outliers: " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
