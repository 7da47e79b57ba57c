"""Leakage on real data: CIFAR-10 test images with a near-duplicate in the training split.

Barz & Denzler ("Do we train on test data? Purging CIFAR of near-duplicates", J. Imaging 2020)
annotated by hand that about 3.3% of the CIFAR-10 test images have a near-duplicate in the
training set. This audits the precomputed embeddings of all 60,000 CIFAR-10 JPEGs
(EfficientNet-Lite2 at 160 px, whole image, no flip averaging) for leakage and exact duplicates,
counts leaks at the default thresholds (embeddings confirmed by thumbnails) and, from the
embeddings alone, at a few cosine thresholds, and writes the contact sheet of pairs
(``RUN/sheets/leakage.png``; test image, then its training copy) plus a sheet of the pairs just
above the threshold (``RUN/leakage_borderline.png``), to be looked at.

    nohup .venv/bin/python benchmarks/audit_leakage.py --out /tmp/audit-leakage > LOG 2>&1 &
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from imagerec.audit import audit, knn
from imagerec.clustering._report import ImageReader, contact_sheet

EMBEDDINGS = "/work/bench-cache/cifar10_lite2_160.npz"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embeddings", default=EMBEDDINGS)
    parser.add_argument("--out", default="/tmp/audit-leakage")
    args = parser.parse_args()
    result = audit(args.embeddings, out=args.out, checks=["leakage", "exact_duplicates"], progress=False)
    leaks = result["leakage"]
    n_test = int((result.images["split"] == "test").sum())
    used = result.summary["thresholds"]
    print(f"default thresholds (cosine {used['near_duplicates']}, thumbnails {used['pixel_correlation']}): {len(leaks)} of {n_test} test images leak "
          f"({len(leaks) / n_test:.2%}); exact copies {int(leaks['exact'].sum())}")  # fmt: skip
    # the count at other thresholds, from one kNN search
    split = result.images["split"].to_numpy()
    sims, ids, _ = knn(result.features, 10)
    test = np.flatnonzero(split == "test")
    is_train = split[np.clip(ids[test], 0, None)] == "train"
    best = np.where(is_train, sims[test], -1).max(axis=1)
    counts = {f"{t:.2f}": int((best >= t).sum()) for t in (0.85, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)}
    print("test images with a training neighbour at or above each cosine (embeddings alone):", counts)
    # the borderline pairs: the 24 least similar leaks at the default threshold
    reader = ImageReader(result.images["path"].tolist(), None)
    border = leaks.sort_values("similarity").head(24)
    pairs = [i for a, b in zip(border["index"], border["train_index"]) for i in (int(a), int(b))]
    contact_sheet(reader, pairs, "least similar leaks at the defaults (test, train)", Path(args.out) / "leakage_borderline.png", 8)
    summary = {"n_test": n_test, "leaks": len(leaks), "share": len(leaks) / n_test, "by_threshold": counts,
               "exact_duplicate_groups": result.summary["counts"].get("exact_duplicates"), "seconds": result.summary["seconds"]}  # fmt: skip
    Path(args.out, "leakage_benchmark.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
