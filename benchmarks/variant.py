"""Run ``imagerec quickstart`` as a variant: other training defaults, or slower training steps.

- ``--set KEY=VALUE``: a :class:`~imagerec.TrainConfig` value the quickstart's configuration
  starts from (``--set ema=0.999``), to measure a candidate before it becomes a default;
- ``--slowdown FACTOR``: every training step (``imagerec.training._stage.Stage.step``, which the
  time budget also times when it plans) takes FACTOR times as long: the step runs, then the
  process sleeps ``FACTOR - 1`` times the step's own duration. Decoding, validation and the test
  evaluation keep this machine's speed, so this measures what the issue asks, how the result
  moves when training steps are slower, and not a whole slower machine.

Usage::

    python benchmarks/variant.py --slowdown 1.4 --set ema=0.999 -- --data DATA --out RUN --time-budget 20
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slowdown", type=float, default=1.0, help="training steps this many times slower (1.4: 40%% slower)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig value (JSON, or a string)")
    parser.add_argument("quickstart", nargs=argparse.REMAINDER, help="-- then imagerec quickstart's arguments")
    args = parser.parse_args()
    if not args.slowdown >= 1:
        sys.exit(f"--slowdown {args.slowdown} must be >= 1 (1.4: steps 40% slower)")
    import imagerec._quickstart as quickstart  # noqa: PLC0415
    from imagerec.cli import main as cli_main  # noqa: PLC0415
    from imagerec.training._stage import Stage  # noqa: PLC0415

    values = {}
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    quickstart.TrainConfig = functools.partial(quickstart.TrainConfig, **values)

    if args.slowdown > 1:
        step = Stage.step

        def slow_step(self, *a, **k):
            start = time.perf_counter()
            out = step(self, *a, **k)
            time.sleep((args.slowdown - 1) * (time.perf_counter() - start))
            return out

        Stage.step = slow_step
    rest = args.quickstart[1:] if args.quickstart[:1] == ["--"] else args.quickstart
    sys.exit(cli_main(["quickstart", *rest]))


if __name__ == "__main__":
    main()
