"""Near-duplicate precision and recall: imagerec's audit against imagededup (PHash, DHash) and
plain cosine on timm features with one global threshold.

Two collections: 2,000 CIFAR-10 test images (seeded sample) and the 2,400 photos of
intel-scenes-small. 5% of the images get one transformed copy each, the transforms taken in turn:
resize to 50-80%, JPEG quality 20-40, crop 85-95%, horizontal flip, brightness +-20%, rotation
+-5 degrees. A method's predicted pairs are all pairs inside its groups (connected components of
its edges at the threshold); precision and recall are over the planted (original, copy) pairs.
For every method the threshold is swept (imagerec: the cosine threshold, and the thumbnail
correlation that confirms candidates) and the table reports the best recall at precision >= 0.95,
and imagerec's at its default thresholds.

    nohup .venv/bin/python benchmarks/audit_near_duplicates.py > LOG 2>&1 &

It measures precision and recall, not time (no timing is recorded), so it does not take the
machine-wide benchmark lock.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from imagerec import embed
from imagerec.audit import knn
from imagerec.audit._duplicates import NEAR_DUPLICATE_DEFAULTS, edges
from imagerec.audit._scan import scan_images
from imagerec.data import load_images
from imagerec.features import compute_features, l2_normalize

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TRANSFORMS = ("resize", "jpeg", "crop", "flip", "brightness", "rotate")


def transform(image: Image.Image, kind: str, rng: random.Random) -> tuple[Image.Image, dict]:
    w, h = image.size
    if kind == "resize":
        f = rng.uniform(0.5, 0.8)
        return image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BICUBIC), {}
    if kind == "jpeg":
        return image, {"format": "JPEG", "quality": rng.randint(20, 40)}
    if kind == "crop":
        f = rng.uniform(0.85, 0.95)
        cw, ch = round(w * f), round(h * f)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return image.crop((x, y, x + cw, y + ch)), {}
    if kind == "flip":
        return ImageOps.mirror(image), {}
    if kind == "brightness":
        return ImageEnhance.Brightness(image).enhance(1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.2)), {}
    return image.rotate(rng.uniform(-5, 5), resample=Image.Resampling.BICUBIC), {}


def build(name: str, paths: list[str], folder: Path, seed: int) -> tuple[list[str], set, dict]:
    """Copy the originals, add transformed copies of 5%; returns (files, true pairs, kind per pair)."""
    rng = random.Random(seed)
    files = []
    for i, p in enumerate(paths):
        target = folder / f"{i:05d}{Path(p).suffix}"
        shutil.copyfile(p, target)
        files.append(str(target))
    chosen = rng.sample(range(len(paths)), len(paths) // 20)
    truth, kinds = set(), {}
    for n, i in enumerate(chosen):
        kind = TRANSFORMS[n % len(TRANSFORMS)]
        image, save = transform(Image.open(paths[i]).convert("RGB"), kind, rng)
        target = folder / f"copy_{i:05d}.{'jpg' if save.get('format') == 'JPEG' else 'png'}"
        image.save(target, **save)
        files.append(str(target))
        pair = (i, len(files) - 1)
        truth.add(pair)
        kinds[pair] = kind
    print(f"{name}: {len(paths)} originals + {len(chosen)} copies in {folder}", flush=True)
    return files, truth, kinds


def pairs_of_components(n: int, a: np.ndarray, b: np.ndarray, max_group: int = 50) -> set:
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    pairs = set()
    for g in np.flatnonzero(np.bincount(label) > 1):
        members = np.flatnonzero(label == g)
        if len(members) > max_group:  # a chained blob: all its pairs count (as false positives mostly)
            pass
        pairs |= {tuple(sorted(p)) for p in combinations(members.tolist(), 2)}
    return pairs


def score(pairs: set, truth: set) -> tuple[float, float]:
    tp = len(pairs & truth)
    return (tp / len(pairs) if pairs else 1.0), tp / len(truth)


def sweep_cosine(x: np.ndarray, truth: set, thresholds, thumbs=None, pixel=None, floor=None) -> list[dict]:
    sims, ids, _ = knn(x, 10)
    rows = []
    for t in thresholds:
        r, c = np.nonzero(edges(sims, ids, t, thumbs, pixel, floor) if thumbs is not None else sims >= t)
        p, rec = score(pairs_of_components(len(x), r, ids[r, c]), truth)
        rows.append({"threshold": round(float(t), 3), "pixel_threshold": pixel, "precision": p, "recall": rec})
    return rows


def sweep_hash(method, folder: Path, files: list[str], truth: set, distances) -> list[dict]:
    index = {Path(f).name: i for i, f in enumerate(files)}
    encodings = method.encode_images(image_dir=str(folder))
    rows = []
    for d in distances:
        found = method.find_duplicates(encoding_map=encodings, max_distance_threshold=d)
        a, b = [], []
        for key, dups in found.items():
            for other in dups:
                a.append(index[key])
                b.append(index[other])
        p, rec = score(pairs_of_components(len(files), np.asarray(a, int), np.asarray(b, int)), truth)
        rows.append({"threshold": d, "precision": p, "recall": rec})
    return rows


def in_order(emb, files: list[str]) -> np.ndarray:
    """The L2-normalised features in the order of ``files`` (the truth pairs' numbering)."""
    row = {p: i for i, p in enumerate(emb.paths)}
    return l2_normalize(emb.features[[row[f] for f in files]])


def best_at(rows: list[dict], precision: float = 0.95) -> dict:
    ok = [r for r in rows if r["precision"] >= precision]
    return max(ok, key=lambda r: (r["recall"], r["precision"])) if ok else {"threshold": None, "precision": None, "recall": 0.0}


def per_kind(x, truth, kinds, threshold, thumbs=None, pixel=None, floor=None):
    sims, ids, _ = knn(x, 10)
    r, c = np.nonzero(edges(sims, ids, threshold, thumbs, pixel, floor) if thumbs is not None else sims >= threshold)
    found = pairs_of_components(len(x), r, ids[r, c])
    out = {}
    for kind in TRANSFORMS:
        pairs = {p for p in truth if kinds[p] == kind}
        out[kind] = f"{len(pairs & found)}/{len(pairs)}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cifar", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/audit_near_duplicates.json")
    args = parser.parse_args()
    rng = random.Random(0)
    sets = {
        "cifar10-test-2000": rng.sample(load_images(DATA / "cifar10-jpeg" / "test").paths, args.cifar),
        "intel-scenes-small": load_images(DATA / "intel-scenes-small").paths,
    }
    from imagededup.methods import DHash, PHash  # noqa: PLC0415

    results = {}
    grid = np.round(np.arange(0.80, 0.995, 0.01), 3)
    for name, paths in sets.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            files, truth, kinds = build(name, paths, folder, seed=1)
            res = {"images": len(files), "true_pairs": len(truth)}
            cosine, pixel_default, floor = NEAR_DUPLICATE_DEFAULTS["small" if name.startswith("cifar") else "photos"]
            source = load_images(str(folder))
            figures, _, thumbs_all = scan_images(source, progress=False)
            row = {p: i for i, p in enumerate(source.paths)}
            thumbs = thumbs_all[[row[f] for f in files]]
            for label, tta, use_thumbs in (("imagerec audit (flip-averaged embeddings + thumbnail check)", True, True),
                                           ("imagerec, embeddings only (flip-averaged)", True, False),
                                           ("imagerec, embeddings only, no flip TTA", False, False)):  # fmt: skip
                feats = compute_features(str(folder), tta=tta, crop_pct=1.0, progress=False) if label != "imagerec, embeddings only (flip-averaged)" else feats
                x = in_order(feats.embeddings, files)
                rows = []
                for pixel in ((0.85, 0.88, 0.90, 0.92, 0.95, 0.97) if use_thumbs else (None,)):
                    rows += sweep_cosine(x, truth, grid, thumbs if use_thumbs else None, pixel, floor)
                default = next(r for r in rows if abs(r["threshold"] - cosine) < 1e-6
                               and r["pixel_threshold"] in ((pixel_default,) if use_thumbs else (None,)))  # fmt: skip
                res[label] = {"backbone": feats.embeddings.backbone, "sweep": rows, "best": best_at(rows), "at_default": default,
                              "per_transform_at_default": per_kind(x, truth, kinds, cosine, thumbs if use_thumbs else None, pixel_default, floor)}  # fmt: skip
                print(label, res[label]["backbone"], "best", res[label]["best"], "default", res[label]["at_default"], res[label]["per_transform_at_default"], flush=True)
            started = time.perf_counter()
            backbone = "efficientnet_lite0"
            plain = embed(str(folder), backbone, progress=False)  # timm network, its own preprocessing, no TTA
            x = in_order(plain, files)
            rows = sweep_cosine(x, truth, grid)
            res["plain cosine, timm features"] = {"backbone": backbone,  "sweep": rows, "best": best_at(rows)}
            print("plain", res["plain cosine, timm features"]["best"], flush=True)
            for label, method in (("imagededup PHash", PHash(verbose=False)), ("imagededup DHash", DHash(verbose=False))):
                started = time.perf_counter()
                rows = sweep_hash(method, folder, files, truth, range(0, 21))
                res[label] = { "sweep": rows, "best": best_at(rows)}
                print(label, res[label]["best"], flush=True)
            results[name] = res
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
