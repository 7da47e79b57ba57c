"""Longer fuzz of imagerec's decoder: mutated real image files, counted by outcome.

Every case is a real image (made here in PNG, JPEG, GIF, BMP, WebP, TIFF and in several modes,
plus real photos from ``--photos`` when given) with a few bytes flipped, overwritten, inserted,
deleted or truncated, written under an image extension and read with ``load_rgb`` (and
``peek_size``). The only outcomes allowed are a decoded RGB image or a ``DecodeError`` (a
reported skip); anything else is counted as a crash and printed. A case that takes longer than
``--hang-s`` kills the run with a traceback (faulthandler), so a hang cannot pass unseen.

Run (one timed run at a time machine-wide)::

    flock /tmp/imagerec-bench.lock python benchmarks/fuzz_decode.py --cases 5000 --seeds 1 2 3 \\
        --photos /work/shared/datasets/intel-scenes-small/test
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import io
import os
import random
import re
import resource
import sys
import tempfile
import time
import traceback

import numpy as np
from PIL import Image

from imagerec._decode import DEFAULT_MAX_PIXELS, DecodeError, load_rgb, peek_size

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests._mutate import mutate  # noqa: E402 - the tests' mutator, run longer

EXT = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
MODES = {"PNG": ["RGB", "RGBA", "L", "P", "I;16"], "JPEG": ["RGB", "L", "CMYK"], "GIF": ["P", "L"],
         "BMP": ["RGB", "L", "P"], "WEBP": ["RGB", "RGBA"], "TIFF": ["RGB", "CMYK", "L", "I;16"]}


def samples(photos: str | None, per_format: int = 3) -> list[tuple[str, bytes]]:
    """(label, bytes) of the real files every case starts from."""
    rng = np.random.default_rng(0)
    out = []
    for fmt, modes in MODES.items():
        for mode in modes:
            for size in [(13, 9), (64, 48)][:per_format]:
                img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
                img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
                buf = io.BytesIO()
                try:
                    img.save(buf, format=fmt)
                except OSError:
                    continue  # a mode this writer does not take
                out.append((f"{fmt}/{mode}", buf.getvalue()))
    if photos:
        names = sorted(os.path.join(d, f) for d, _, fs in os.walk(photos) for f in fs if f.lower().endswith(".jpg"))
        for name in names[:: max(1, len(names) // 12)][:12]:
            with open(name, "rb") as f:
                out.append(("photo/JPEG", f.read()))
    return out


def reason_kind(reason: str) -> str:
    """A skip reason without its variable parts, for counting."""
    return re.sub(r"\(.*", "", reason).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3000, help="cases per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--photos", default=None, help="a folder of real JPEG photos to mutate as well")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    ap.add_argument("--hang-s", type=float, default=60.0, help="a case slower than this aborts the run")
    args = ap.parse_args(argv)

    bases = samples(args.photos)
    outcomes: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    crashes = []
    slowest = (0.0, "")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rng = random.Random(seed)
            for case in range(args.cases):
                label, data = rng.choice(bases)
                own = EXT[label.split("/")[1] if label.startswith("photo") else label.split("/")[0]]
                ext = rng.choice(list(EXT.values())) if rng.random() < 0.2 else own
                path = os.path.join(tmp, f"case{ext}")
                with open(path, "wb") as f:
                    f.write(mutate(data, rng, edits=8, span=32, header_weight=2))
                faulthandler.dump_traceback_later(args.hang_s, exit=True)
                t0 = time.perf_counter()
                try:
                    img = load_rgb(path, args.max_pixels)
                    assert img.mode == "RGB" and min(img.size) >= 1
                    outcomes["decoded"] += 1
                except DecodeError as e:
                    outcomes["skipped"] += 1
                    reasons[reason_kind(str(e))] += 1
                except BaseException:  # noqa: BLE001 - the thing this benchmark looks for
                    outcomes["crashed"] += 1
                    crashes.append((seed, case, label, traceback.format_exc(limit=3)))
                peek_size(path)  # must never raise either
                faulthandler.cancel_dump_traceback_later()
                took = time.perf_counter() - t0
                if took > slowest[0]:
                    slowest = (took, f"seed {seed} case {case} ({label})")
    elapsed = time.perf_counter() - start
    total = sum(outcomes.values())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"cases: {total} ({args.cases} x seeds {args.seeds}) from {len(bases)} real files")
    print(f"outcomes: decoded {outcomes['decoded']}, skipped {outcomes['skipped']}, crashed {outcomes['crashed']}")
    for reason, count in reasons.most_common():
        print(f"  skip reason: {count:6d}  {reason}")
    per_case = elapsed / max(total, 1) * 1e3
    print(f"time: {elapsed:.1f} s ({per_case:.2f} ms/case); slowest case {slowest[0] * 1e3:.0f} ms: {slowest[1]}")
    print(f"peak RSS: {peak_mib:.0f} MiB")
    for seed, case, label, tb in crashes[:10]:
        print(f"CRASH seed {seed} case {case} ({label}):\n{tb}", file=sys.stderr)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
