"""The on-disk IVF-PQ index at 1M and 10M vectors: build (time, peak RSS), recall@10, latency, grouping.

Vectors: 3,000 real CIFAR-10 embeddings (EfficientNet-Lite2 at 160 px, from the benchmark suite's
cache of the CIFAR-10 JPEG copy), reduced by PCA to ``--dim`` (256), replicated with Gaussian
noise of a strength drawn per row (sigma 0.3 to 1.0 of each dimension's spread, so the neighbours
of a row are at a continuum of distances), L2-normalised. In every part the last 1% of the rows
are planted near-copies of earlier rows of that part (noise 0.1 / sqrt(dim): cosine about 0.995).
Paths are ``/bench/train/...`` for 80% of the rows and ``/bench/test/...`` for the rest, so the
leakage check sees planted copies across splits. The parts are written as the embeddings files
``imagerec embed`` writes (``--part-rows`` rows each).

Phases, each in its own process (so each peak RSS is its own; ``/usr/bin/time -v`` gives it):

* ``generate``: the parts.
* ``build``: ``imagerec index --parts ... --exact-max 100000`` (``--exact-max``; the on-disk IVF-PQ kind).
* ``search``: 1,000 queries (new noisy variants, not in the index); exact top 10 computed by
  streaming the parts in blocks; recall@10 of the index at several nprobe/rerank; ms per query
  in a batch of 1,000 and one at a time (``search_features``, the public call, 200 queries).
* ``audit``: ``audit_index`` (blocks of 4,096 queries), the share of planted copies grouped with
  their original, peak RSS.

    flock /tmp/imagerec-cpu.lock nice -n 10 .venv/bin/python benchmarks/index_scale.py all --n 1000000 \\
        --work /tmp/index_scale --out benchmarks/results/index_scale_1M.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagerec import Embeddings, Preprocessing  # noqa: E402
from imagerec.features import prepare_features  # noqa: E402

BASE = os.environ.get("INDEX_SCALE_BASE", "/tmp/wt23/cifar3000_lite2_160.npz")
COPY_SHARE = 0.01
TEST_SHARE = 0.2


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def base_vectors(dim: int) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(BASE) as d:
        meta = json.loads(str(d["meta"]))
        base = prepare_features(d["features"], pca_dim=dim)  # L2, PCA, L2
    return base.astype(np.float32), base.std(axis=0).astype(np.float32), meta


def make_part(i: int, rows: int, first: int, base: np.ndarray, spread: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Part ``i``: (vectors (rows, dim), planted copy rows, their originals), both as global row numbers."""
    rng = np.random.default_rng([seed, i])
    strength = rng.uniform(0.3, 1.0, (rows, 1)).astype(np.float32)
    x = base[rng.integers(0, len(base), rows)] + strength * spread * rng.standard_normal((rows, base.shape[1]), dtype=np.float32)
    copies = np.arange(rows - max(1, int(rows * COPY_SHARE)), rows)
    originals = rng.integers(0, copies[0], len(copies))
    x[copies] = x[originals] / np.linalg.norm(x[originals], axis=1, keepdims=True)
    x[copies] += 0.1 / np.sqrt(x.shape[1]) * rng.standard_normal((len(copies), x.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, copies + first, originals + first


def generate(args) -> dict:
    started = time.perf_counter()
    base, spread, meta = base_vectors(args.dim)
    pp = Preprocessing.from_dict(meta["preprocessing"])
    parts = Path(args.work) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    count = -(-args.n // args.part_rows)
    planted = []
    for i in range(count):
        first = i * args.part_rows
        rows = min(args.part_rows, args.n - first)
        x, copies, originals = make_part(i, rows, first, base, spread, args.seed)
        split = np.where(np.random.default_rng([args.seed, i, 1]).random(rows) < TEST_SHARE, "test", "train")
        paths = [f"/bench/{split[r]}/{first + r:09d}.jpg" for r in range(rows)]
        shard = {"shard": {"index": i, "count": count, "images": args.n}}
        Embeddings(x, paths, None, None, meta["backbone"], pp).save(parts / f"part-{i:05d}.npz", meta=shard)
        planted.append(np.stack([copies, originals], axis=1))
    np.save(Path(args.work) / "planted.npy", np.concatenate(planted))
    return {"seconds": round(time.perf_counter() - started, 1), "parts": count, "peak_rss_mb": round(peak_mb())}


def _time_v(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, output) of a command under /usr/bin/time -v."""
    started = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode:
        raise SystemExit(f"{command[:4]} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1]) / 1024
    return wall, rss, run.stdout + run.stderr


def build(args) -> dict:
    parts = sorted(str(p) for p in (Path(args.work) / "parts").glob("part-*.npz"))
    index = Path(args.work) / "index"
    command = [sys.executable, "-m", "imagerec", "index", "--parts", *parts, "--out", str(index), "--exact-max", str(args.exact_max)]
    wall, rss, output = _time_v(command)
    meta = json.loads((index / "meta.json").read_text())
    files = {f.name if f.is_file() else f.name + "/": _size(f) for f in index.iterdir()}
    steps = [line for line in output.splitlines() if line.startswith("imagerec index:") and "read " not in line and "added " not in line]
    return {
        "seconds": round(wall, 1), "peak_rss_mb": round(rss), "faiss_index": meta["faiss_index"], "nlist": meta["nlist"],
        "train_rows": meta["train_rows"], "disk_bytes": files, "disk_bytes_per_vector": round(sum(files.values()) / meta["count"], 1),
        "steps": steps, "log_tail": output.splitlines()[-3:],
    }  # fmt: skip


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def queries(args) -> np.ndarray:
    base, spread, _ = base_vectors(args.dim)
    x, _, _ = make_part(10**6, args.queries + 1, 0, base, spread, args.seed + 1)  # another seed: not in the index
    return x[: args.queries]


def exact_truth(args, q: np.ndarray, k: int = 10) -> tuple[np.ndarray, float]:
    """Exact top ``k`` rows of each query, streaming the parts (one in memory at a time)."""
    started = time.perf_counter()
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    first = 0
    for part in sorted((Path(args.work) / "parts").glob("part-*.npz")):
        with np.load(part) as d:
            x = d["features"]
        s = q @ x.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, top + first], axis=1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
        first += len(x)
    return best_i, time.perf_counter() - started


def search(args) -> dict:
    from imagerec import load_index  # noqa: PLC0415

    q = queries(args)
    truth, truth_seconds = exact_truth(args, q)
    index = load_index(Path(args.work) / "index")
    names = [f"q{i}" for i in range(len(q))]
    result = {"queries": len(q), "exact_truth_seconds": round(truth_seconds, 1), "sweep": []}
    for nprobe, rerank in [(16, 100), (32, 100), (32, 200), (64, 200), (64, 400)]:
        started = time.perf_counter()
        _, ids = index.search_vectors(q, 10, nprobe=nprobe, rerank=rerank)
        batch_ms = (time.perf_counter() - started) * 1000 / len(q)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
        single = []
        for i in range(args.single):
            started = time.perf_counter()
            index.search_features(q[i : i + 1], names[i : i + 1], top_k=10, nprobe=nprobe, rerank=rerank)
            single.append(time.perf_counter() - started)
        single_ms = np.asarray(single) * 1000
        result["sweep"].append({
            "nprobe": nprobe, "rerank": rerank, "recall_at_10": round(recall, 4), "batch_ms_per_query": round(batch_ms, 3),
            "single_p50_ms": round(float(np.percentile(single_ms, 50)), 2), "single_p95_ms": round(float(np.percentile(single_ms, 95)), 2),
        })  # fmt: skip
        print(json.dumps(result["sweep"][-1]), flush=True)
    result["peak_rss_mb"] = round(peak_mb())
    return result


def audit(args) -> dict:
    from imagerec.audit import NEAR_DUPLICATE_THRESHOLD, audit_index  # noqa: PLC0415

    started = time.perf_counter()
    done = audit_index(Path(args.work) / "index", threshold=NEAR_DUPLICATE_THRESHOLD, nprobe=args.audit_nprobe,
                       rerank=args.audit_rerank, progress=False)  # fmt: skip
    planted = np.load(Path(args.work) / "planted.npy")
    group = dict(zip(done.near_duplicates["index"].tolist(), done.near_duplicates["group"].tolist()))
    grouped = np.mean([c in group and group.get(o) == group[c] for c, o in planted])
    sizes = done.near_duplicates.groupby("group").size() if len(done.near_duplicates) else []
    return {
        "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_mb()), "threshold": NEAR_DUPLICATE_THRESHOLD,
        "nprobe": args.audit_nprobe, "rerank": args.audit_rerank, "planted": len(planted),
        "planted_copies_grouped_with_original": round(float(grouped), 4), "counts": done.summary["counts"],
        "largest_group": int(max(sizes)) if len(sizes) else 0, "edges": done.summary["edges"],
    }  # fmt: skip


def plot(results: list[str], out: str) -> None:
    """The cost curve: build seconds, peak RSS, disk per vector, p50, recall and audit seconds against N."""
    from imagerec._plot import pyplot, save_figure  # noqa: PLC0415

    runs = sorted((json.loads(Path(r).read_text()) for r in results), key=lambda r: r["n"])
    n = [r["n"] for r in runs]
    default = [next(x for x in r["search"]["sweep"] if (x["nprobe"], x["rerank"]) == (32, 200)) for r in runs]
    panels = [
        ("build seconds", [r["build"]["seconds"] for r in runs]),
        ("build peak RSS (MB)", [r["build"]["peak_rss_mb"] for r in runs]),
        ("disk bytes per vector", [r["build"]["disk_bytes_per_vector"] for r in runs]),
        ("p50 ms, one query (nprobe 32, rerank 200)", [d["single_p50_ms"] for d in default]),
        ("recall@10 (nprobe 32, rerank 200)", [d["recall_at_10"] for d in default]),
        ("audit seconds (blocked grouping)", [r.get("audit", {}).get("seconds", float("nan")) for r in runs]),
    ]
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, values) in zip(axes.ravel(), panels):
        ax.plot(n, values, "o-")
        ax.set_xticks(n, [f"{v / 1e6:g}M" for v in n])  # plain labels: the figure writer draws text literally (no mathtext)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("vectors")
        for x, y in zip(n, values):
            ax.annotate(f"{y:,.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fig.suptitle("imagerec on-disk IVF-PQ index: cost by size (benchmarks/index_scale.py, 2-core shared VM)")
    fig.tight_layout()
    save_figure(fig, Path(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["generate", "build", "search", "audit", "all", "plot"])
    parser.add_argument("--results", nargs="*", default=[], help="phase plot: the JSON files of 'all' runs")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--exact-max", type=int, default=100_000)
    parser.add_argument("--part-rows", type=int, default=250_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--audit-nprobe", type=int, default=8)
    parser.add_argument("--audit-rerank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/index_scale")
    parser.add_argument("--out", help="the JSON of all phases (phase all)")
    parser.add_argument("--skip", default="", help="phases 'all' leaves out, comma-separated (e.g. generate when the parts exist)")
    args = parser.parse_args()
    if args.phase == "plot":
        return plot(args.results, args.out or "docs/index_scale.png")
    if args.phase != "all":
        result = {"generate": generate, "build": build, "search": search, "audit": audit}[args.phase](args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    own = [a for a in sys.argv[1:] if a not in ("all",)]
    report = {"n": args.n, "dim": args.dim, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": _machine(), "command": " ".join(sys.argv), "base": BASE}  # fmt: skip
    for phase in ("generate", "build", "search", "audit"):
        if phase in args.skip.split(","):
            continue
        report[f"load_before_{phase}"] = os.getloadavg()
        started = time.perf_counter()
        wall, rss, output = _time_v([sys.executable, __file__, phase, *own])
        line = next(line for line in reversed(output.splitlines()) if line.startswith("RESULT "))
        report[phase] = {**json.loads(line[7:]), "wall_seconds": round(wall, 1), "process_peak_rss_mb": round(rss)}
        print(phase, json.dumps(report[phase]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        del started


def _machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s*(.+)", text)[1].strip() + f", {os.cpu_count()} CPUs"
    except Exception:  # noqa: BLE001
        return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
