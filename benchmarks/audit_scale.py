"""Near-duplicate grouping of 1,000,000 vectors on one machine: time and peak memory.

The vectors are the 60,000 precomputed CIFAR-10 embeddings (EfficientNet-Lite2, 160 px), reduced
to 128 principal components as the audit does above ``EXACT_SEARCH_MAX`` images, repeated with
noise to 1,000,000 rows: each repeat is a noisy variant (cosine about 0.85 to its base, below the
threshold), and 1% of the rows are planted near-copies of another row (cosine about 0.995). The
grouping is what ``audit`` runs: FAISS kNN (IVF above 200,000 rows), edges at the threshold,
connected components, the group table. Reports seconds per step, peak RSS, and the share of
planted copies grouped with their original.

    flock /tmp/imagerec-bench.lock nohup .venv/bin/python benchmarks/audit_scale.py > LOG 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from imagerec.audit import NEAR_DUPLICATE_THRESHOLD, knn, near_groups
from imagerec.audit._duplicates import group_table
from imagerec.features import l2_normalize, prepare_features

EMBEDDINGS = "/work/bench-cache/cifar10_lite2_160.npz"


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB on Linux


def make_vectors(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    with np.load(EMBEDDINGS) as d:
        base = prepare_features(d["features"], pca_dim=128)
    x = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, len(base)):
        rows = min(len(base), n - start)
        noise = rng.normal(size=(rows, base.shape[1])).astype(np.float32) / np.sqrt(base.shape[1])
        x[start : start + rows] = base[:rows] + (0.0 if start == 0 else 0.6) * noise
    copies = rng.choice(np.arange(len(base), n), n // 100, replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies), replace=False)
    x[copies] = x[originals] + 0.1 * rng.normal(size=(len(copies), x.shape[1])).astype(np.float32) / np.sqrt(x.shape[1])
    return l2_normalize(x), copies, originals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--out", default="benchmarks/results/audit_scale.json")
    args = parser.parse_args()
    started = time.perf_counter()
    x, copies, originals = make_vectors(args.n)
    made = time.perf_counter() - started
    print(f"{len(x):,} x {x.shape[1]} vectors in {made:.0f} s, peak {peak_gb():.2f} GB", flush=True)
    t0 = time.perf_counter()
    sims, ids, method = knn(x, 10)
    t1 = time.perf_counter()
    groups = near_groups(sims, ids, NEAR_DUPLICATE_THRESHOLD)
    t2 = time.perf_counter()
    table = group_table(groups, x, np.ones(len(x)), np.full(len(x), "", dtype=object), "near")
    t3 = time.perf_counter()
    found = float(np.mean((groups[copies] >= 0) & (groups[copies] == groups[originals])))
    result = {
        "n": len(x), "dim": int(x.shape[1]), "search": method, "threshold": NEAR_DUPLICATE_THRESHOLD,
        "seconds": {"knn": round(t1 - t0, 1), "components": round(t2 - t1, 1), "table": round(t3 - t2, 1),
                    "grouping_total": round(t3 - t0, 1)},
        "peak_rss_gb": round(peak_gb(), 2), "groups": int(table["group"].nunique()), "grouped_images": len(table),
        "planted_copies_grouped_with_original": round(found, 4),
        "largest_group": int(table.groupby("group").size().max()) if len(table) else 0,
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    from pathlib import Path  # noqa: PLC0415

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
