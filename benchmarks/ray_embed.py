"""Embedding on Ray against plain local ``embed`` on the same images: the overhead of the Ray path.

The same photos (default: the 1,800 training photos of intel-scenes-small, 150 px JPEGs, so no
decode cache is involved), EfficientNet-Lite0 at 224 px, ONNX Runtime on the CPU, on this
machine:

* ``local``: ``imagerec.embed(DATA, out=FILE.npz)`` (2 ONNX threads, decoding processes);
* ``ray 1x2``: a local Ray cluster (``ray.init(num_cpus=2)``, started before the clock, as a
  running cluster is), ``embed_on_ray(DATA, OUT, actors=1, cpus_per_actor=2)``: one actor, two
  threads, parts of ``--part-size`` images written by the actor;
* ``ray 2x1``: the same cluster, two actors of one CPU each.

One untimed warm-up of each (the ONNX export, the page cache), then ``--repeats`` timed runs of
each, interleaved, the parts deleted before each Ray run. Ray's start and stop are timed apart.

    flock /tmp/imagerec-cpu.lock .venv/bin/python benchmarks/ray_embed.py --out benchmarks/results/ray_embed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagerec import embed  # noqa: E402
from imagerec.distributed import embed_on_ray  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "intel-scenes-small" / "train"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--part-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/ray_embed.json")
    args = parser.parse_args()
    import ray  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="ray_embed_"))
    started = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started

    def local() -> float:
        (work / "local.npz").unlink(missing_ok=True)
        t = time.perf_counter()
        embed(args.data, args.backbone, out=work / "local.npz", progress=False)
        return time.perf_counter() - t

    def on_ray(actors: int, cpus: int) -> float:
        shutil.rmtree(work / "parts", ignore_errors=True)
        t = time.perf_counter()
        done = embed_on_ray(args.data, work / "parts", args.backbone, actors=actors, cpus_per_actor=cpus, part_size=args.part_size, progress=False)
        assert done.embedded > 0 and done.reused == 0
        return time.perf_counter() - t

    runs = {"local": local, "ray 1x2": lambda: on_ray(1, 2), "ray 2x1": lambda: on_ray(2, 1)}
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run())
            print(name, round(times[name][-1], 2), flush=True)
    # the parts hold what local embedding gives
    from imagerec.embedding import Embeddings  # noqa: PLC0415
    from imagerec.index import merge_parts  # noqa: PLC0415

    merged, plain = merge_parts(sorted((work / "parts").glob("part-*.npz"))), Embeddings.load(work / "local.npz")
    same = merged.paths == plain.paths and float(np.abs(merged.features - plain.features).max())
    started = time.perf_counter()
    ray.shutdown()
    ray_stop = time.perf_counter() - started
    images = len(plain)
    best = {name: min(t) for name, t in times.items()}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout.strip(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "data": args.data, "images": images, "backbone": args.backbone,
        "part_size": args.part_size, "seconds": times, "best_seconds": best,
        "images_per_second_best": {name: round(images / s, 1) for name, s in best.items()},
        "overhead_vs_local_best": {name: round(s / best["local"] - 1, 3) for name, s in best.items() if name != "local"},
        "ray_start_seconds": round(ray_start, 2), "ray_stop_seconds": round(ray_stop, 2),
        "max_abs_feature_difference_ray_vs_local": same,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
