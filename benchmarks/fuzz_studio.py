"""Longer fuzz of ``imagerec studio``'s HTTP surface: the properties of tests/test_studio_fuzz.py
(strategies, ASGI driver and checks in tests/_studio_strategies.py), run with fresh random seeds
until ``--examples`` per property or ``--seconds`` in all, then the requests counted by route and
status, and every failure (Hypothesis's shrunk example) printed.

Properties: any request (no 5xx, no Python error text, /api/ errors in JSON, a refused or GET
request changes nothing, an accepted action is one action, no file outside the project);
refused POSTs (wrong Host, Origin, cookie or token: 403 and nothing changed); escaped names
on every page; only the project's images served; action sequences (one action each, integrity,
undo back to the start); and, once first, every planted file and traversal under each route
that serves files.

Run (one timed run at a time machine-wide)::

    flock /tmp/imagerec-bench.lock python benchmarks/fuzz_studio.py --examples 100000 --seconds 300
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import platform
import sys
import tempfile
import time
import traceback

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests._studio_strategies import (SERVER, Req, Studio, attack_targets, names, paths, prop_actions,  # noqa: E402
                                      prop_any_request, prop_escaped, prop_refused, requests)

# examples per round, in the proportions the test runs them (a round of each is a few seconds)
MAX_FAILURES = 5  # a property that failed this often is set aside for the rest of the run
BATCH = {"any request": 100, "refused POST": 40, "escaped names": 10, "project images only": 50, "action sequences": 12}


def properties(studio: Studio) -> dict:
    """name -> a function of one data draw, the same bodies as the test's."""
    def any_request(data):
        prop_any_request(studio, data.draw(requests(studio.context()), label="request"))

    def refused(data):
        prop_refused(studio, data.draw(requests(studio.context(), want=False), label="request"))

    def escaped(data):
        prop_escaped(studio, data.draw(names, label="name"), data.draw(st.integers(0, 20), label="group"), data.draw(st.booleans(), label="new class"))

    def served(data):
        target, label = data.draw(paths(studio.context(), templates=("/img/{i}", "/thumb/{i}", "/static/{x}", "/img/{i}/{x}")), label="path")
        prop_any_request(studio, Req("GET", target, [("host", SERVER)], b"", True, label))

    def actions(data):
        prop_actions(studio, data)

    return dict(zip(BATCH, (any_request, refused, escaped, served, actions)))


def counting(body, counted):
    def run(data):
        counted[0] += 1
        body(data)

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="examples per property at most (default 2000)")
    ap.add_argument("--seconds", type=float, default=300, help="time for all properties together (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="first seed; round k uses seed + k")
    args = ap.parse_args()
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # its warnings on each broken upload are expected here
    started = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {' '.join(sys.argv)}", flush=True)
    print(f"# python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="fuzz_studio_") as root:
        studio = Studio(root)
        done = collections.Counter()
        failures: list[tuple[str, int, str]] = []
        props = properties(studio)
        with studio.activate():
            sweep = attack_targets(studio.context())  # the fixed list first, once (as the test does)
            for target, label in sweep:
                try:
                    prop_any_request(studio, Req("GET", target, [("host", SERVER)], b"", True, label))
                except AssertionError as e:
                    failures.append(("file names", 0, str(e)))
                    print(f"FAILED file names: {str(e)[:1000]}", flush=True)
            done["file names"] = len(sweep)
            k = 0
            while time.time() - started < args.seconds and any(
                    done[n] < args.examples and sum(f[0] == n for f in failures) < MAX_FAILURES for n in props):
                for name, body in props.items():
                    if done[name] >= args.examples or time.time() - started >= args.seconds:
                        continue
                    if sum(f[0] == name for f in failures) >= MAX_FAILURES:
                        continue
                    counted = [0]
                    test = seed(args.seed + k)(settings(max_examples=min(BATCH[name], args.examples - done[name]), database=None,
                                                        deadline=None, print_blob=False, suppress_health_check=list(HealthCheck))(
                        given(data=st.data())(counting(body, counted))))
                    try:
                        test()
                    except Exception as e:  # noqa: BLE001 - a failed property: print it, go on with the next seed
                        failures.append((name, args.seed + k, "".join(traceback.format_exception_only(type(e), e)).strip()))
                        print(f"FAILED {name} (seed {args.seed + k}):\n{failures[-1][2][:3000]}", flush=True)
                    done[name] += counted[0]
                k += 1
        studio.close()
    elapsed = time.time() - started
    print(f"\n{elapsed:.0f} s, {k} rounds; examples (Hypothesis calls, shrinking included) per property:")
    for name in ["file names", *props]:
        print(f"  {name:22s} {done[name]:7,d}   failures {sum(f[0] == name for f in failures)}")
    by_route: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (label, status), count in studio.counts.items():
        by_route[label][status] += count
    statuses = sorted({s for c in by_route.values() for s in c})
    print(f"\nrequests by route and status ({sum(studio.counts.values()):,} in all):")
    print(f"  {'route':26s}" + "".join(f"{s:>8d}" for s in statuses))
    for label in sorted(by_route):
        print(f"  {label[:26]:26s}" + "".join(f"{by_route[label][s]:8d}" for s in statuses))
    total = collections.Counter()
    for c in by_route.values():
        total.update(c)
    print(f"  {'all':26s}" + "".join(f"{total[s]:8d}" for s in statuses))
    print(f"\n5xx answers: {sum(v for s, v in total.items() if s >= 500)}; failures: {len(failures)}")
    for name, s, text in failures:
        print(f"  {name} (seed {s}): {text.splitlines()[0][:300]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
