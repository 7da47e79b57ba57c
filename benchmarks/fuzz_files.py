"""Longer fuzz of the files ``imagerec index``, ``search`` and ``audit`` read: the properties of ``tests/test_file_fuzz.py`` at length, counted.

The same strategies and properties (``tests/_file_strategies.py``): embeddings ``.npz`` files with
wrong keys, dtypes, shapes, values and names, damaged or forged bytes, given to ``index``,
``search`` and ``audit``; index folders with tampered meta, damaged, truncated or swapped FAISS
files and edited item lists, searched, added to and rebuilt; ``--parts`` sets of mixed models,
dimensions and shard records; ``--out`` of every kind; CSV manifests that climb out of their
folder. No model: the embeddings are numpy arrays. A property that does not hold is counted and
printed with its example, not raised, so the run goes on. The properties take turns in rounds of
``--chunk`` examples each (a fresh Hypothesis seed per round) until ``--seconds`` have passed.

Prints the commands run and their exit statuses, the examples and failures by property, and each
distinct failure once with its first example. Exit status 1 if anything failed.

Run (heavy CPU: one at a time machine-wide)::

    flock /tmp/imagerec-cpu.lock python benchmarks/fuzz_files.py --seconds 300
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests import _file_strategies as fz  # noqa: E402 - the tests' strategies and properties, run longer


def properties(good_index: Path) -> dict:
    """{name: (strategy of the property's arguments, property(tmp, *args))}: those of tests/test_file_fuzz.py."""
    return {
        "index_npz": (st.tuples(fz.embeddings_files()), lambda tmp, file: fz.prop_index_from_npz(tmp, file[0])),
        "search_npz": (st.tuples(fz.embeddings_files()), lambda tmp, file: fz.prop_search_with_npz(tmp, good_index, file[0])),
        "audit_npz": (st.tuples(fz.embeddings_files()), lambda tmp, file: fz.prop_audit_npz(tmp, file[0])),
        "damaged_index": (fz.index_damage(), fz.prop_damaged_index),
        "parts": (st.tuples(fz.part_sets()), fz.prop_parts),
        "out_kind": (st.tuples(st.sampled_from(fz.OUT_KINDS)), fz.prop_out_kind),
        "manifest": (fz.manifests(), fz.prop_manifest),
    }


def run_round(root, name, strategy, prop, examples: int, round_seed: int, deadline: float, stats) -> None:
    @seed(round_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(args=strategy)
    def one(args):
        if time.monotonic() > deadline:
            return
        stats["examples"][name] += 1
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        try:
            found = prop(tmp, *args)
        except Exception:  # noqa: BLE001 - a broken harness is reported, not hidden
            found = [f"the property itself raised: {traceback.format_exc(limit=4)}"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if found:
            stats["failures"][name] += 1
            for problem in found:
                key = (name, problem[:160])
                if key not in stats["first"]:
                    stats["first"][key] = repr(args)[:1500]

    try:
        one()
    except Exception:  # noqa: BLE001 - a strategy that cannot draw is counted, and the run goes on
        stats["failures"][name] += 1
        stats["first"].setdefault((name, "the strategy itself raised"), traceback.format_exc(limit=6)[-1500:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300, help="stop after this long (the round in progress ends early)")
    ap.add_argument("--chunk", type=int, default=25, help="examples per property per round")
    ap.add_argument("--seed", type=int, default=None, help="the first round's Hypothesis seed (then +1 a round); default: from the clock")
    ap.add_argument("--out", default=None, help="also write the counts here as JSON")
    args = ap.parse_args(argv)
    first_seed = args.seed if args.seed is not None else int(time.time())

    root = Path(tempfile.mkdtemp(prefix="fuzz_files-"))
    os.environ["IMAGEREC_HOME"] = str(root / "home")  # imagerec's caches stay in the run's folder
    warnings.simplefilter("ignore")  # an ImagerecWarning per example would bury the counts
    stats = {"examples": collections.Counter(), "failures": collections.Counter(), "first": {}}
    exits = collections.Counter()
    run_cli = fz.run_cli

    def counted(*argv):
        outcome = run_cli(*argv)
        exits[(os.fspath(argv[0]), outcome.code)] += 1
        return outcome

    fz.run_cli = counted  # the properties call it through the module
    start = time.monotonic()
    deadline = start + args.seconds
    rounds = 0
    try:
        fz.build_good_index(root / "good")
        props = properties(root / "good")
        setup_s = time.monotonic() - start
        while time.monotonic() < deadline:
            for name, (strategy, prop) in props.items():
                run_round(root, name, strategy, prop, args.chunk, first_seed + rounds, deadline, stats)
            rounds += 1
    finally:
        fz.run_cli = run_cli
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runs = sum(exits.values())
    print(f"time: {elapsed:.1f} s ({setup_s:.1f} s setup), {rounds} rounds of up to {args.chunk} examples per property, "
          f"seeds {first_seed}..{first_seed + rounds - 1}; load average at the end {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"commands run: {runs} ({runs / max(elapsed - setup_s, 1e-9):.1f}/s); peak RSS {peak_mib:.0f} MiB")
    for command in sorted({c for c, _ in exits}):
        codes = {code: n for (c, code), n in exits.items() if c == command}
        print(f"  imagerec {command:7s} " + ", ".join(f"exit {code}: {n}" for code, n in sorted(codes.items(), key=lambda kv: str(kv[0]))))
    total_failures = sum(stats["failures"].values())
    print(f"examples: {sum(stats['examples'].values())}, failures: {total_failures}")
    for name in stats["examples"]:
        print(f"  {name:14s} examples {stats['examples'][name]:6d}  failures {stats['failures'][name]:4d}")
    for (name, problem), example in stats["first"].items():
        print(f"FAILURE {name}: {problem}\n  first example: {example}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "argv": sys.argv, "seconds": round(elapsed, 1), "setup_s": round(setup_s, 1), "rounds": rounds, "first_seed": first_seed,
            "exits": {f"{c} {code}": n for (c, code), n in exits.items()},
            "examples": dict(stats["examples"]), "failures": dict(stats["failures"]),
            "distinct_failures": [{"property": n, "problem": p, "example": e} for (n, p), e in stats["first"].items()],
        }, indent=1))  # fmt: skip
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
