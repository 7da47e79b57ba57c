"""The whole audit of all 60,000 CIFAR-10 images, embedding included: wall time and peak memory.

Runs ``imagerec.audit`` on the CIFAR-10 JPEG split root with its defaults (EfficientNet-Lite2 at
160 px, flip-averaged unless ``--no-tta``, every check) into a fresh run folder and a fresh
imagerec cache (so the decode cache and the embeddings are computed, not reused), and reports the
seconds per step from ``summary.json`` and the peak RSS of the process and its decode workers.

    flock /tmp/imagerec-bench.lock nohup .venv/bin/python benchmarks/audit_speed.py > LOG 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default="/tmp/audit-speed")
    parser.add_argument("--no-tta", action="store_true")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="imagerec-home-")
    os.environ["IMAGEREC_HOME"] = home  # nothing cached from earlier runs
    shutil.rmtree(args.out, ignore_errors=True)
    from imagerec import audit  # noqa: PLC0415 - after IMAGEREC_HOME is set

    started = time.perf_counter()
    result = audit(args.data, out=args.out, tta=not args.no_tta, progress=False)
    wall = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    report = {"images": result.summary["n_images"], "wall_seconds": round(wall, 1), "peak_rss_gb": round(own, 2),
              "largest_worker_rss_gb": round(children, 2), "steps": result.summary["seconds"],
              "counts": result.summary["counts"], "features": result.summary["features"]}  # fmt: skip
    print(json.dumps(report), flush=True)
    Path(args.out, "speed.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
