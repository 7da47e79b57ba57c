"""Throughput of ``imagerec.embed`` against a plain timm loop doing the same work.

What is measured
    For each backbone (efficientnet_lite0/1/2) and input size (96, 128, 224 px), on a fixed,
    stratified subset of the CIFAR-10 test split (``--images 2000``: every 5th file in sorted
    order), the wall-clock time of

    * imagerec: ``imagerec.embed(source, name, image_size=size, batch_size=64, progress=False)``
      with a warm decode cache (``IMAGEREC_HOME`` is a temporary folder, warmed once, untimed).
      ``--engines auto`` (default) is that call as a user writes it; ``torch`` / ``onnx`` pass
      ``engine=`` explicitly (auto means onnx where onnxruntime is installed). Before each
      configuration every engine runs once, untimed, on 64 images, so the ONNX export (cached
      in ``IMAGEREC_HOME``, once per backbone and size) is not in the timings (``warmup_s``).
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
    time of each side is also measured apart (``build_times`` in the JSON). The sides are
    interleaved per configuration, ``--repeats`` times each (default 3; the median is reported,
    min-max in the table), the first one rotating, so machine noise hits all. The features of
    every engine are compared with the peer's image by image (same order, checked by path).

    The machine's CPU time used by *other* processes during each configuration is measured
    (``/proc/stat`` minus this process and its workers) and shown as "other CPU": timings with
    more than a few percent there are not reliable (``--wait-idle S`` waits for a quiet machine
    before starting).

How to run
    .venv/bin/python benchmarks/embed_throughput.py                       # full run (2000 images)
    .venv/bin/python benchmarks/embed_throughput.py --engines auto torch  # also the PyTorch engine
    .venv/bin/python benchmarks/embed_throughput.py --images 128 --sizes 96 --backbones efficientnet_lite0 --repeats 1

It prints a markdown table and writes JSON (default ``benchmarks/results/embed_throughput.json``)
with the machine, date, versions and command.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
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
    p.add_argument("--engines", nargs="+", default=["auto"], choices=["auto", "torch", "onnx"],
                   help="imagerec engines to time; auto (the default call) is onnx where onnxruntime is installed")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side per configuration (median reported)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each configuration, wait up to S seconds for other processes to leave the CPUs idle")
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


def resolve_engine(engine: str) -> str:
    """What ``embed(engine=...)`` runs on a CPU: ``auto`` is onnx where onnxruntime is installed."""
    if engine == "auto":
        return "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
    return engine


def imagerec_embed(source, name: str, size: int, engine: str):
    import imagerec  # noqa: PLC0415

    if engine == "auto":  # the call exactly as a user writes it: the library's default engine
        return imagerec.embed(source, name, image_size=size, batch_size=BATCH_SIZE, progress=False)
    return imagerec.embed(source, name, image_size=size, batch_size=BATCH_SIZE, progress=False, engine=engine)


# --- CPU accounting: was anything else running? ------------------------------------------------


def host_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class CpuMeter:
    """CPU time used by other processes, and stolen by the hypervisor, while a block runs."""

    def __enter__(self):
        self.wall, (self.busy, self.steal), self.own = time.perf_counter(), host_cpu_s(), own_cpu_s()
        return self

    def __exit__(self, *exc):
        busy, steal = host_cpu_s()
        self.wall_s = time.perf_counter() - self.wall
        self.steal_s = steal - self.steal
        self.foreign_s = max(0.0, busy - self.busy - (own_cpu_s() - self.own))
        self.foreign_share = self.foreign_s / (self.wall_s * (os.cpu_count() or 1))
        return False


def wait_for_idle(max_wait_s: float, window_s: float = 5.0, threshold: float = 0.1) -> float:
    """Wait (up to ``max_wait_s``) until the machine is idle; return the busy share last seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        with CpuMeter() as meter:
            time.sleep(window_s)
        if meter.foreign_share < threshold or time.monotonic() > deadline:
            return meter.foreign_share
        print(f"machine busy ({meter.foreign_share:.0%} of its CPUs used by other processes); waiting ...", flush=True)


# --- the benchmark ------------------------------------------------------------------------------


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_config(job: dict, name: str, size: int, engines: list[str], repeats: int, rotation: int) -> dict:
    """Time the peer and each imagerec engine ``repeats`` times, interleaved, the first one
    rotating; compare every engine's features with the peer's."""
    source, test_dir, indices, state = job["source"], job["test_dir"], job["indices"], job["states"][name]
    warm = {}
    for engine in engines:  # untimed: builds the ONNX export of this backbone and size, once
        warm[engine], _ = timed(imagerec_embed, job["cached"].subset(np.arange(BATCH_SIZE)), name, size, engine)
    sides = ["peer", *engines]
    times = {side: [] for side in sides}
    outputs = {}
    with CpuMeter() as meter:
        for r in range(repeats):
            shift = (rotation + r) % len(sides)
            for side in sides[shift:] + sides[:shift]:
                if side == "peer":
                    seconds, outputs[side] = timed(peer_embed, test_dir, indices, TIMM_ARCH[name], state, size)
                else:
                    seconds, outputs[side] = timed(imagerec_embed, source, name, size, side)
                times[side].append(seconds)
                print(f"  {name} {size}px {side}: {seconds:.2f} s", flush=True)
    n = len(indices)
    peer_feats = outputs["peer"]
    peer_s = float(np.median(times["peer"]))
    row = {
        "backbone": name,
        "size": size,
        "images": n,
        "peer": {"times": times["peer"], "median_s": peer_s, "img_s": n / peer_s},
        "imagerec": {},
        "feature_dim": int(peer_feats.shape[1]),
        "max_abs_feature": float(np.abs(peer_feats).max()),
        "foreign_cpu_s": meter.foreign_s,
        "foreign_cpu_share": meter.foreign_share,
        "cpu_steal_s": meter.steal_s,
    }
    for engine in engines:
        emb = outputs[engine]
        assert [os.path.normpath(p) for p in emb.paths] == [os.path.normpath(p) for p in source.paths]
        same_shape = emb.features.shape == peer_feats.shape
        median = float(np.median(times[engine]))
        row["imagerec"][engine] = {
            "engine": resolve_engine(engine),
            "times": times[engine],
            "median_s": median,
            "img_s": n / median,
            "ratio": peer_s / median,
            "max_abs_diff": float(np.abs(emb.features - peer_feats).max()) if same_shape else float("nan"),
            "warmup_s": warm[engine],
            "preprocessing": emb.preprocessing.to_dict(),
        }
    return row


def build_times(name: str, state: dict) -> dict:
    """Model build time of each side, measured apart from the runs."""
    import imagerec  # noqa: PLC0415

    rec_s, _ = timed(imagerec.create_backbone, name, 0)
    peer_s, _ = timed(peer_build, TIMM_ARCH[name], state)
    return {"imagerec_build_s": rec_s, "peer_build_s": peer_s}


def engine_label(engine: str) -> str:
    resolved = resolve_engine(engine)
    return engine if resolved == engine else f"{engine}={resolved}"


def markdown_table(rows: list[dict], engines: list[str]) -> str:
    head = "| backbone | size | peer s (min-max) | peer img/s |"
    rule = "|---|---:|---:|---:|"
    for engine in engines:
        label = engine_label(engine)
        head += f" imagerec[{label}] s (min-max) | img/s | x peer | max abs diff |"
        rule += "---:|---:|---:|---:|"
    head += " other CPU |"
    rule += "---:|"
    lines = [head, rule]
    for r in rows:
        p = r["peer"]
        line = f"| {r['backbone']} | {r['size']} | {p['median_s']:.2f} ({min(p['times']):.2f}-{max(p['times']):.2f}) | {p['img_s']:.1f} |"
        for engine in engines:
            e = r["imagerec"][engine]
            line += (
                f" {e['median_s']:.2f} ({min(e['times']):.2f}-{max(e['times']):.2f}) | {e['img_s']:.1f} | "
                f"{e['ratio']:.2f}x | {e['max_abs_diff']:.1e} |"
            )
        line += f" {r['foreign_cpu_share']:.0%} |"
        lines.append(line)
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
        job = {"source": source, "cached": cached, "test_dir": test_dir, "indices": indices, "states": states}
        print(f"decode cache built in {seconds:.2f} s; warm-up runs (untimed) ...", flush=True)
        first = args.backbones[0], args.sizes[0]
        for engine in args.engines:
            imagerec_embed(source, *first, engine)
        peer_embed(test_dir, indices, TIMM_ARCH[first[0]], states[first[0]], first[1])

        rows, builds = [], {}
        for name in args.backbones:
            builds[name] = build_times(name, states[name])
            for size in args.sizes:
                if args.wait_idle:
                    wait_for_idle(args.wait_idle)
                rows.append(run_config(job, name, size, args.engines, args.repeats, rotation=len(rows)))
                r = rows[-1]
                summary = ", ".join(
                    f"{engine_label(e)} {v['img_s']:.1f} img/s ({v['ratio']:.2f}x, diff {v['max_abs_diff']:.1e})"
                    for e, v in r["imagerec"].items()
                )
                print(f"  -> peer {r['peer']['img_s']:.1f} img/s; {summary}; "
                      f"other processes used {r['foreign_cpu_share']:.0%} of the CPUs", flush=True)
                write_report(args, len(full), len(source), builds, rows, complete=False)  # a killed run keeps these

        info = machine()
        table = markdown_table(rows, args.engines)
        print(f"\nMachine: {info['cpu']}, {info['cores']} cores, torch {torch.__version__} "
              f"({info['torch_threads']} threads)")
        print(f"Times: wall clock of the whole call, model creation included on both sides; median of {args.repeats}. "
              "other CPU: share of the machine's CPU time used by other processes during the configuration.\n")
        print(table)
        for r in rows:
            for engine, v in r["imagerec"].items():
                if not v["max_abs_diff"] <= FEATURE_TOLERANCE:
                    print(f"WARNING: {r['backbone']} {r['size']}px {engine}: features differ by {v['max_abs_diff']:.2e}")
            if r["foreign_cpu_share"] > 0.05:
                print(f"WARNING: {r['backbone']} {r['size']}px: other processes used {r['foreign_cpu_share']:.0%} "
                      "of the CPUs; its timings are not reliable")
        write_report(args, len(full), len(source), builds, rows, complete=True)
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


def write_report(args, n_split: int, n_images: int, builds: dict, rows: list[dict], complete: bool) -> None:
    """Write the JSON report (also after every configuration, with ``complete: false``)."""
    import imagerec  # noqa: PLC0415

    report = {
        "benchmark": "embed_throughput",
        "complete": complete,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "onnxruntime": _version_of("onnxruntime"),
            "imagerec": imagerec.__version__,
            "imagerec_git": _git_revision(),
        },
        "settings": {
            "root": args.root,
            "images": n_images,
            "subset": f"every {max(1, n_split // args.images)}th file of the sorted test split",
            "batch_size": BATCH_SIZE,
            "peer_workers": PEER_WORKERS,
            "repeats": args.repeats,
            "engines": {e: resolve_engine(e) for e in args.engines},
            "timing": "wall clock of the whole call, model creation included on both sides; median of repeats",
        },
        "build_times": builds,
        "results": rows,
        "table": markdown_table(rows, args.engines),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def _version_of(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def _git_revision() -> str | None:
    """The commit of the checkout, with ``+dirty`` when imagerec/ has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "imagerec"], capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
