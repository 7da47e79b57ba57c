"""Cost of imagerec's decode cache on all 60,000 CIFAR-10 JPEGs (train + test).

What is measured (wall clock, one process; imagerec's cache build uses its default worker
processes, one per CPU):

* cold: ``imagerec.data.load_images(root)`` + ``imagerec.data.decode_small_images(source)`` with
  an empty ``IMAGEREC_HOME`` (a temporary folder): lists the files and decodes them all into the
  cache file;
* warm: the same two calls again: lists the files, checks the cache key (a stat of every file)
  and maps the cache file (the pixels are not read: a memory map is lazy);
* warm + read: the pixels of the warm source copied into memory (``np.array(source.pixels)``),
  timed on its own, so that ``warm + read`` gives the cost of having every image in memory;
* peer: a plain loop that PIL-decodes every file to numpy, one process, the way
  ``torchvision.datasets.ImageFolder``'s loader does (``Image.open(f).convert("RGB")``): what
  every epoch costs without a cache.

The share of the machine's CPU time used by other processes during each step is measured and
shown as "other CPU" (timings with more than a few percent there are not reliable).

Before timing, every file is read once (bytes only, untimed) so that all measurements see the
files in the OS page cache and none of them pays for the first disk read. After timing, the peer's
pixels are checked to equal the cached pixels.

How to run
    .venv/bin/python benchmarks/decode_cache.py            # writes benchmarks/results/decode_cache.json
    .venv/bin/python benchmarks/decode_cache.py --limit 2000  # quick check on the first 2000 files
    .venv/bin/python benchmarks/decode_cache.py --wait-idle 600  # wait for a quiet machine first
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embed_throughput import CpuMeter, machine, wait_for_idle  # noqa: E402 - the same folder

DATA_ROOT = "/work/shared/datasets/cifar10-jpeg"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=DATA_ROOT, help="CIFAR-10 JPEG root with {train,test}/<class>/*.jpg")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before timing, wait up to S seconds for other processes to leave the CPUs idle")
    p.add_argument("--out", default="benchmarks/results/decode_cache.json")
    return p.parse_args(argv)


def timed(fn, *args):
    """(seconds, result, share of the CPUs other processes used meanwhile)."""
    with CpuMeter() as meter:
        result = fn(*args)
    return meter.wall_s, result, meter.foreign_share


def open_source(root: str, limit: int | None):
    """``load_images(root)`` (+ ``subset`` for a smoke run)."""
    from imagerec.data import load_images  # noqa: PLC0415

    source = load_images(root)
    return source if limit is None else source.subset(np.arange(min(limit, len(source))))


def imagerec_decode(root: str, limit: int | None):
    from imagerec.data import decode_small_images  # noqa: PLC0415

    cached = decode_small_images(open_source(root, limit), progress=False)
    assert cached is not None and cached.pixels is not None, "the images were not cached"
    return cached


def read_pixels(source) -> np.ndarray:
    return np.array(source.pixels)


def peer_decode(paths: list[str]) -> np.ndarray:
    """PIL-decode every file to a numpy array, one after another (no cache)."""
    out = None
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            pixels = np.asarray(Image.open(f).convert("RGB"))
        if out is None:
            out = np.empty((len(paths), *pixels.shape), dtype=np.uint8)
        out[i] = pixels
    return out


def warm_page_cache(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total


def row(name: str, seconds: float, n: int, foreign: float) -> dict:
    return {"step": name, "seconds": seconds, "images": n, "img_s": n / seconds, "other_cpu_share": foreign}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| step | seconds | images/s | other CPU |", "|---|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['seconds']:.2f} | {r['img_s']:,.0f} | {r['other_cpu_share']:.0%} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    home = tempfile.mkdtemp(prefix="imagerec-bench-home-")
    os.environ["IMAGEREC_HOME"] = home
    import imagerec  # noqa: PLC0415 - after IMAGEREC_HOME is set

    try:
        paths = open_source(args.root, args.limit).paths
        n = len(paths)
        size = warm_page_cache(paths)
        print(f"{n:,} files, {size / 2**20:.1f} MiB, read once into the page cache; IMAGEREC_HOME={home}", flush=True)

        if args.wait_idle:
            wait_for_idle(args.wait_idle)
        cold_s, _, cold_other = timed(imagerec_decode, args.root, args.limit)
        print(f"cold: {cold_s:.2f} s", flush=True)
        warm_s, warm, warm_other = timed(imagerec_decode, args.root, args.limit)
        print(f"warm: {warm_s:.2f} s", flush=True)
        read_s, cached_pixels, read_other = timed(read_pixels, warm)
        print(f"warm read: {read_s:.2f} s", flush=True)
        peer_s, peer_pixels, peer_other = timed(peer_decode, paths)
        print(f"peer: {peer_s:.2f} s", flush=True)

        assert len(warm) == n and warm.paths == paths, "the cache left images out or reordered them"
        identical = bool(np.array_equal(cached_pixels, peer_pixels))
        rows = [
            row("cold: load_images + decode_small_images (builds the cache)", cold_s, n, cold_other),
            row("warm: load_images + decode_small_images (maps the cache)", warm_s, n, warm_other),
            row("warm + read all pixels into memory", warm_s + read_s, n, max(warm_other, read_other)),
            row("peer: PIL decode of every file to numpy (every epoch)", peer_s, n, peer_other),
        ]
        ratios = {
            "warm_over_cold": warm_s / cold_s,
            "cold_over_peer": cold_s / peer_s,
            "peer_over_warm": peer_s / warm_s,
            "peer_over_warm_read": peer_s / (warm_s + read_s),
        }
        table = markdown_table(rows)
        info = machine()
        cache_files = sorted(Path(home, "decoded").glob("*"))
        print(f"\nMachine: {info['cpu']}, {info['cores']} cores\n")
        print(table)
        print(
            f"\nwarm/cold = {ratios['warm_over_cold']:.3f}; peer/warm = {ratios['peer_over_warm']:.1f}x; "
            f"peer/(warm+read) = {ratios['peer_over_warm_read']:.1f}x; cold/peer = {ratios['cold_over_peer']:.2f}"
        )
        print(f"cached pixels identical to the peer's: {identical}")
        for r in rows:
            if r["other_cpu_share"] > 0.05:
                print(f"WARNING: {r['step']}: other processes used {r['other_cpu_share']:.0%} of the CPUs; not reliable")

        report = {
            "benchmark": "decode_cache",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": info,
            "versions": {"imagerec": imagerec.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
            "settings": {"root": args.root, "images": n, "jpeg_bytes": size, "page_cache_prewarmed": True},
            "results": rows,
            "ratios": ratios,
            "read_pixels_s": read_s,
            "cache_files": {p.name: p.stat().st_size for p in cache_files},
            "pixels_identical_to_peer": identical,
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
