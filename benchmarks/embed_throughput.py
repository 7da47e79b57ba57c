"""Throughput of ``imagerec.embed`` against a plain timm loop doing the same work.

What is measured
    For each backbone (efficientnet_lite0/1/2) and input size (96, 128, 224 px), on a fixed,
    stratified subset of the CIFAR-10 test split (``--images 2000``: every 5th file in sorted
    order), the wall-clock time of

    * imagerec: ``imagerec.embed(source, name, image_size=size, batch_size=64, progress=False)``
      with a warm decode cache (``IMAGEREC_HOME`` is a temporary folder, warmed once, untimed);
    * the peer, what a typical user writes: ``torchvision.datasets.ImageFolder`` (PIL decoding of
      every JPEG, every time) + the same eval transform per image with ``transforms.v2``
      (ToImage, ToDtype(float32, scale=True), Resize(floor(size / crop_pct), bicubic, antialias),
      CenterCrop(size), Normalize(0.5, 0.5); crop_pct = 1.0 because imagerec upsamples images
      smaller than the input whole), a ``DataLoader`` (batch 64, num_workers=2), and
      ``timm.create_model(arch, num_classes=0)`` loaded with imagerec's weights, in eval mode under
      ``torch.no_grad()``, default (contiguous) memory format.

    Both timings cover the whole call *including* model creation: imagerec builds the backbone
    inside ``embed`` (timm model + weights read from the weight package), the peer builds its timm
    model and loads the state dict (held in memory) inside the timed region too. The model build
    time of each side is also measured separately (``build_s`` in the JSON). Peer and imagerec are
    interleaved per configuration, and the one that goes first alternates, so machine noise hits
    both. Before the first configuration both sides run once untimed (this warms the decode cache
    and the process: imports, thread pools, oneDNN).

    The features of both sides are compared image by image (same order, checked by path): the
    maximum absolute difference is reported.

How to run
    .venv/bin/python benchmarks/embed_throughput.py                       # full run (2000 images)
    .venv/bin/python benchmarks/embed_throughput.py --images 128 --sizes 96 --backbones efficientnet_lite0

It prints a markdown table and writes JSON (default ``benchmarks/results/embed_throughput.json``)
with the machine, date, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode, v2

DATA_ROOT = "/work/shared/datasets/cifar10-jpeg"
TIMM_ARCH = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}
BATCH_SIZE = 64
PEER_WORKERS = 2
FEATURE_TOLERANCE = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=DATA_ROOT, help="CIFAR-10 JPEG root with test/<class>/*.jpg")
    p.add_argument("--images", type=int, default=2000, help="size of the stratified test subset")
    p.add_argument("--backbones", nargs="+", default=list(TIMM_ARCH), choices=list(TIMM_ARCH))
    p.add_argument("--sizes", nargs="+", type=int, default=[96, 128, 224])
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side per configuration")
    p.add_argument("--out", default="benchmarks/results/embed_throughput.json")
    return p.parse_args(argv)


def subset_indices(n: int, images: int) -> np.ndarray:
    """Every ``n // images``-th file in sorted order: stratified, since files are sorted by class."""
    step = max(1, n // images)
    return np.arange(0, n, step)[:images]


def machine() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- the peer: a plain timm loop ---------------------------------------------------------------


def peer_transform(size: int, crop_pct: float = 1.0) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(math.floor(size / crop_pct), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ]
    )


def peer_build(arch: str, state: dict) -> torch.nn.Module:
    model = timm.create_model(arch, num_classes=0)
    model.load_state_dict(state)
    return model.eval()


def peer_embed(test_dir: str, indices: np.ndarray, arch: str, state: dict, size: int) -> np.ndarray:
    """The whole peer run: build the model, decode, transform and embed every image."""
    model = peer_build(arch, state)
    dataset = Subset(ImageFolder(test_dir, transform=peer_transform(size)), indices.tolist())
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=False, num_workers=PEER_WORKERS)
    features = []
    with torch.no_grad():
        for images, _ in loader:
            features.append(model(images).numpy())
    return np.concatenate(features)


def peer_paths(test_dir: str, indices: np.ndarray) -> list[str]:
    samples = ImageFolder(test_dir).samples
    return [os.path.normpath(samples[i][0]) for i in indices]


# --- imagerec -----------------------------------------------------------------------------------


def imagerec_embed(source, name: str, size: int) -> np.ndarray:
    import imagerec  # noqa: PLC0415

    return imagerec.embed(source, name, image_size=size, batch_size=BATCH_SIZE, progress=False)


# --- the benchmark ------------------------------------------------------------------------------


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_config(source, test_dir, indices, name, state, size, repeats, first_peer) -> dict:
    """Time both sides ``repeats`` times, alternating which goes first; compare their features."""
    arch = TIMM_ARCH[name]
    peer_times, rec_times = [], []
    peer_feats = rec_emb = None
    for r in range(repeats):
        order = ["peer", "imagerec"] if (first_peer ^ (r % 2 == 1)) else ["imagerec", "peer"]
        for side in order:
            if side == "peer":
                seconds, peer_feats = timed(peer_embed, test_dir, indices, arch, state, size)
                peer_times.append(seconds)
            else:
                seconds, rec_emb = timed(imagerec_embed, source, name, size)
                rec_times.append(seconds)
            print(f"  {name} {size}px {side}: {seconds:.2f} s", flush=True)
    n = len(indices)
    rec_feats = rec_emb.features
    assert [os.path.normpath(p) for p in rec_emb.paths] == [os.path.normpath(p) for p in source.paths]
    diff = float(np.abs(rec_feats - peer_feats).max()) if rec_feats.shape == peer_feats.shape else float("nan")
    peer_s, rec_s = float(np.mean(peer_times)), float(np.mean(rec_times))
    return {
        "backbone": name,
        "size": size,
        "images": n,
        "peer_s": peer_s,
        "imagerec_s": rec_s,
        "peer_img_s": n / peer_s,
        "imagerec_img_s": n / rec_s,
        "ratio": peer_s / rec_s,
        "peer_times": peer_times,
        "imagerec_times": rec_times,
        "max_abs_diff": diff,
        "max_abs_feature": float(np.abs(peer_feats).max()),
        "feature_dim": int(peer_feats.shape[1]),
        "preprocessing": rec_emb.preprocessing.to_dict(),
    }


def build_times(name: str, state: dict) -> dict:
    """Model build time of each side, measured apart from the runs."""
    import imagerec  # noqa: PLC0415

    rec_s, _ = timed(imagerec.create_backbone, name, 0)
    peer_s, _ = timed(peer_build, TIMM_ARCH[name], state)
    return {"imagerec_build_s": rec_s, "peer_build_s": peer_s}


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| backbone | size | images | peer s | peer img/s | imagerec s | imagerec img/s | imagerec/peer | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['size']} | {r['images']} | {r['peer_s']:.2f} | {r['peer_img_s']:.1f} | "
            f"{r['imagerec_s']:.2f} | {r['imagerec_img_s']:.1f} | {r['ratio']:.2f}x | {r['max_abs_diff']:.2e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    home = tempfile.mkdtemp(prefix="imagerec-bench-home-")
    os.environ["IMAGEREC_HOME"] = home
    import imagerec  # noqa: PLC0415 - after IMAGEREC_HOME is set
    from imagerec.data import decode_small_images  # noqa: PLC0415

    try:
        test_dir = os.path.join(args.root, "test")
        full = imagerec.load_images(args.root, split="test")
        indices = subset_indices(len(full), args.images)
        source = full.subset(indices)
        assert [os.path.normpath(p) for p in source.paths] == peer_paths(test_dir, indices), "image order differs"
        print(f"{len(source)} images of {len(full)} ({source.root}); IMAGEREC_HOME={home}", flush=True)

        states = {name: imagerec.create_backbone(name, num_classes=0).state_dict() for name in args.backbones}
        seconds, cached = timed(lambda s: decode_small_images(s, progress=False), source)
        assert cached is not None and cached.pixels is not None, "the decode cache was not used"
        print(f"decode cache built in {seconds:.2f} s; warm-up runs (untimed) ...", flush=True)
        warm = args.backbones[0], args.sizes[0]
        imagerec_embed(source, *warm)
        peer_embed(test_dir, indices, TIMM_ARCH[warm[0]], states[warm[0]], warm[1])

        rows, builds = [], {}
        for name in args.backbones:
            builds[name] = build_times(name, states[name])
            for size in args.sizes:
                first_peer = len(rows) % 2 == 0
                rows.append(run_config(source, test_dir, indices, name, states[name], size, args.repeats, first_peer))
                r = rows[-1]
                print(f"  -> {r['imagerec_img_s']:.1f} vs {r['peer_img_s']:.1f} img/s, {r['ratio']:.2f}x, "
                      f"max abs diff {r['max_abs_diff']:.2e}", flush=True)

        table = markdown_table(rows)
        info = machine()
        print(f"\nMachine: {info['cpu']}, {info['cores']} cores, torch {torch.__version__} "
              f"({info['torch_threads']} threads)")
        print("Times: wall clock of the whole call, model creation included on both sides.\n")
        print(table)
        flagged = [r for r in rows if not r["max_abs_diff"] <= FEATURE_TOLERANCE]
        for r in flagged:
            print(f"WARNING: {r['backbone']} {r['size']}px: features differ by {r['max_abs_diff']:.2e} > {FEATURE_TOLERANCE}")

        report = {
            "benchmark": "embed_throughput",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": info,
            "versions": {
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
                "numpy": np.__version__,
                "imagerec": imagerec.__version__,
            },
            "settings": {
                "root": args.root,
                "images": len(source),
                "subset": f"every {max(1, len(full) // args.images)}th file of the sorted test split",
                "batch_size": BATCH_SIZE,
                "peer_workers": PEER_WORKERS,
                "repeats": args.repeats,
                "timing": "wall clock of the whole call, model creation included on both sides; mean of repeats",
            },
            "build_times": builds,
            "results": rows,
            "table": table,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
