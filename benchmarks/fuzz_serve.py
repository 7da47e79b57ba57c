"""Longer HTTP fuzz of ``imagerec serve``: the properties of ``tests/test_serve_fuzz.py`` at length, counted.

The same strategies, app and properties (``tests/_http_strategies.py``): random methods, paths,
queries, headers and bodies to :func:`imagerec.serve.create_app` in-process (with and without a
token) and as bytes to a real uvicorn on 127.0.0.1. A property that does not hold is counted and
printed with its request, not raised, so the run goes on. The properties take turns in rounds of
``--chunk`` examples each (a fresh Hypothesis seed per round) until each has had ``--examples``
or ``--seconds`` have passed.

Prints the requests sent, the statuses answered by code, the examples and failures by property,
and each distinct failure once with its first request. Exit status 1 if anything failed.

Run (one timed run at a time machine-wide)::

    flock /tmp/imagerec-bench.lock python benchmarks/fuzz_serve.py --seconds 300
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests import _http_strategies as fz  # noqa: E402 - the tests' strategies and properties, run longer


def properties(h: fz.Harness) -> dict:
    """{name: (strategy of the property's arguments, property)}: those of tests/test_serve_fuzz.py."""
    return {
        "any_request": (st.tuples(fz.requests(h.routes, big=fz.BIG)), fz.prop_any_request),
        "token": (st.tuples(fz.requests(h.routes, token=fz.TOKEN)), fz.prop_token),
        "image_verdict": (st.tuples(fz.images(), st.booleans(), st.sampled_from(["/predict", "/embed"])), fz.prop_image_verdict),
        "form": (st.tuples(fz.multiparts(), st.sampled_from(["/predict", "/embed"])), fz.prop_form),
        "query": (st.tuples(fz.queries()), fz.prop_query),
        "content_type": (st.tuples(fz.content_types()), fz.prop_content_type),
        "admin_reload": (st.tuples(fz.admin_requests()), fz.prop_admin_reload),
        "socket": (st.tuples(fz.requests(h.routes, big=fz.BIG), st.one_of(st.none(), st.none(), st.binary(max_size=200))), fz.prop_socket),
    }


def run_round(h, name, strategy, prop, examples: int, round_seed: int, deadline: float, stats) -> None:
    @seed(round_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(args=strategy)
    def one(args):
        if time.monotonic() > deadline:
            return
        stats["examples"][name] += 1
        try:
            found = prop(h, *args)
        except Exception:  # noqa: BLE001 - a broken harness is reported, not hidden
            found = [f"the property itself raised: {traceback.format_exc(limit=4)}"]
        if found:
            stats["failures"][name] += 1
            for problem in found:
                key = (name, problem[:160])
                if key not in stats["first"]:
                    stats["first"][key] = repr(args)[:1500]

    one()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000, help="examples per property at most")
    ap.add_argument("--seconds", type=float, default=300, help="stop after this long (the round in progress ends early)")
    ap.add_argument("--chunk", type=int, default=50, help="examples per property per round")
    ap.add_argument("--seed", type=int, default=0, help="the first round's Hypothesis seed (then +1 a round)")
    ap.add_argument("--out", default=None, help="also write the counts here as JSON")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="fuzz_serve-"))
    stats = {"examples": collections.Counter(), "failures": collections.Counter(), "first": {}}
    start = time.monotonic()
    deadline = start + args.seconds
    rounds = 0
    try:
        with fz.Harness(root) as h:
            setup_s = time.monotonic() - start
            # their notes on each malformed request (counted in the statuses) would bury the counts
            logging.getLogger("python_multipart").setLevel(logging.ERROR)
            logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
            props = properties(h)
            while time.monotonic() < deadline:
                todo = [n for n in props if stats["examples"][n] < args.examples]
                if not todo:
                    break
                for name in todo:
                    strategy, prop = props[name]
                    n = min(args.chunk, args.examples - stats["examples"][name])
                    run_round(h, name, strategy, prop, n, args.seed + rounds, deadline, stats)
                rounds += 1
            sent, statuses = h.sent, h.statuses
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    by_code = dict(sorted(statuses.items(), key=lambda kv: str(kv[0])))
    seeds = f"{args.seed}..{args.seed + rounds - 1}"
    print(f"time: {elapsed:.1f} s ({setup_s:.1f} s setup), {rounds} rounds of up to {args.chunk} examples per property, seeds {seeds}")
    print(f"requests sent: {sent} ({sent / max(elapsed - setup_s, 1e-9):.1f}/s); peak RSS {peak_mib:.0f} MiB")
    print("statuses: " + ", ".join(f"{code}: {count}" for code, count in by_code.items()))
    total_failures = sum(stats["failures"].values())
    print(f"examples: {sum(stats['examples'].values())}, failures: {total_failures}")
    for name in stats["examples"]:
        print(f"  {name:14s} examples {stats['examples'][name]:6d}  failures {stats['failures'][name]:4d}")
    for (name, problem), example in stats["first"].items():
        print(f"FAILURE {name}: {problem}\n  first example: {example}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "argv": sys.argv, "seconds": round(elapsed, 1), "setup_s": round(setup_s, 1), "rounds": rounds,
            "requests_sent": sent, "statuses": {str(k): v for k, v in by_code.items()},
            "examples": dict(stats["examples"]), "failures": dict(stats["failures"]),
            "distinct_failures": [{"property": n, "problem": p, "example": e} for (n, p), e in stats["first"].items()],
        }, indent=1))
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
