"""Where the first rise of a serving process's memory comes from: measured in one process.

    flock /tmp/imagerec-cpu.lock python benchmarks/serve_memory_rise.py MODEL.onnx [--photos DIR]

The server's two sources of memory that grow with its first requests, taken apart:

1. ONNX Runtime: the model run at every batch size 1..``--max-batch`` once (the batcher forms
   any of them under load), RSS after each new size; then every size again: does it grow again?
2. decoding: ``--photos`` JPEGs decoded and prepared (``imagerec.runtime``) by a pool of
   ``--threads`` threads, as the server's decoding pool does, twice over.

Run once as is, and once with ``MALLOC_ARENA_MAX=1`` (``--child`` runs the measurement; the
parent runs both and prints them side by side): glibc gives each thread that allocates its own
malloc arena, and memory freed in one arena is not reused by another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "datasets" / "intel-scenes-small"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(model_path: str, photos: Path, max_batch: int, threads: int, n_photos: int) -> dict:
    import imagerec.runtime as rt  # noqa: PLC0415
    from imagerec.serve._images import decode_bytes  # noqa: PLC0415

    steps = [("start", rss_mb())]
    model = rt.load(model_path, threads=1)
    steps.append(("model loaded", rss_mb()))
    size = model.preprocessing.input_size
    by_batch = []
    for rnd in (1, 2):
        for n in range(1, max_batch + 1):
            model.logits(np.zeros((n, 3, size, size), np.float32))
            by_batch.append({"round": rnd, "batch": n, "rss_mb": rss_mb()})
    steps.append(("every batch size 1..%d, twice" % max_batch, rss_mb()))
    files = sorted(photos.rglob("*.jpg"))[:n_photos]
    blobs = [f.read_bytes() for f in files]
    steps.append((f"{len(blobs)} JPEG files read into memory", rss_mb()))

    def prepare(data: bytes) -> np.ndarray:
        return rt.preprocess(decode_bytes(data), model.preprocessing)

    with ThreadPoolExecutor(threads) as pool:
        for rnd in (1, 2):
            for start in range(0, len(blobs), 32):  # as the server: a batch's worth at a time
                batch = np.stack(list(pool.map(prepare, blobs[start : start + 32])))
                model.logits(batch)
            steps.append((f"decoded, prepared and run all photos in {threads} threads (round {rnd})", rss_mb()))
    return {"steps": steps, "by_batch": by_batch, "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an imagerec .onnx")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--n-photos", type=int, default=2000)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="decoding threads (the server's default on 2 CPUs)")
    parser.add_argument("--child", action="store_true", help="run the measurement in this process")
    parser.add_argument("--out", default="benchmarks/results/serve_memory_rise.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.photos, args.max_batch, args.threads, args.n_photos)))
        return
    runs = {}
    for label, extra in (("default", {}), ("MALLOC_ARENA_MAX=1", {"MALLOC_ARENA_MAX": "1"})):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
        argv = [sys.executable, __file__, args.model, "--photos", str(args.photos), "--n-photos", str(args.n_photos),
                "--max-batch", str(args.max_batch), "--threads", str(args.threads), "--child"]
        began = time.monotonic()
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
        runs[label]["seconds"] = time.monotonic() - began
        print(label)
        previous = None
        for step, mb in runs[label]["steps"]:
            print(f"  {step:<70} {mb:8.1f} MB" + (f"  ({mb - previous:+.1f})" if previous is not None else ""))
            previous = mb
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
              "argv": sys.argv[1:], "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
