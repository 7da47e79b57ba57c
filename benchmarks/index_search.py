"""Index and search: one-query latency against all of CIFAR-10, and exact vs IVF at a million vectors.

What is measured
    ``--part cifar``: ``imagerec.build_index`` on the 60,000 precomputed CIFAR-10 embeddings
    (EfficientNet-Lite2 at 160 px, ``--embeddings``; the image files' identities are read too,
    as a user's build does), its wall time and this process's peak RSS. Then the latency of
    ``SearchIndex.search(one JPEG, top_k=10)`` for ``--queries`` CIFAR-10 test images, each
    call timed whole: decoding the file, embedding it with the index's own backbone (built once,
    as a server keeps it), and the FAISS search; p50/p95 after 3 untimed warm-up queries, for
    the default engine (one ONNX Runtime session kept by the index) and ``torch``
    (``imagerec.embed`` with PyTorch; 20 queries). Peer for the search step alone: numpy brute
    force (features @ query, argpartition) over the same 60,000 normalised vectors, beside the
    FAISS step alone on the same query vectors, on one and on two OpenMP threads.

    ``--part million``: 1,000,000 vectors made from the CIFAR embeddings: PCA to ``--dim`` (256)
    dimensions, then each of the 60,000 repeated with Gaussian noise (sigma 0.35 of the per-dim
    spread) until there are 1,000,000, L2-normalised. ``build_index`` makes an exact index
    (``IndexFlatIP``, at the default threshold) and an IVF one (threshold lowered below N:
    ``IndexIVFFlat``, 4 sqrt(N) = 4,000 lists trained on 50 per list). Queries: 200 other noisy
    copies (not in the index). recall@10 of IVF against the exact top 10 for several nprobe, and
    ms per query (a batch of 200, and one at a time). Build times include writing the folder.

How to run (one timed run at a time, machine-wide)
    flock /tmp/imagerec-bench.lock nohup .venv/bin/python benchmarks/index_search.py --part cifar > /tmp/ix-cifar.log 2>&1 &
    flock /tmp/imagerec-bench.lock nohup .venv/bin/python benchmarks/index_search.py --part million > /tmp/ix-million.log 2>&1 &

Each part prints its figures and a JSON line (``RESULT {...}``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagerec import Embeddings, build_index, load_index  # noqa: E402

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "test"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(times: list[float]) -> dict:
    ms = np.asarray(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2), "n": len(ms)}


def cifar(args, work: Path) -> dict:
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    data = Embeddings.load(args.embeddings)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(data, work / "cifar_index")
    build_s = time.perf_counter() - t
    result = {"vectors": len(index), "dim": index.meta["dim"], "describe": index.describe(), "load_npz_s": round(load_s, 2),
              "build_index_s": round(build_s, 2), "peak_rss_mb_after_build": round(peak_rss_mb()), "peak_rss_mb_before": round(rss0)}
    del data
    t = time.perf_counter()
    index = load_index(work / "cifar_index")
    result["load_index_s"] = round(time.perf_counter() - t, 2)
    files = sorted(str(p) for p in CIFAR_TEST.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    queries = [files[i] for i in rng.choice(len(files), args.queries + 3, replace=False)]
    for engine in ("onnx", "torch"):
        times, hits = [], 0
        for n, q in enumerate(queries if engine == "onnx" else queries[:23]):  # torch: 20 timed (slow)
            t = time.perf_counter()
            table = index.search(q, top_k=10, engine=engine)
            if n >= 3:
                times.append(time.perf_counter() - t)
                hits += table["path"][0] == q  # the query is itself in the index: it must come first
        result[f"search_{engine}"] = {**percentiles(times), "query_itself_first": f"{hits}/{len(times)}"}
    names, features = index.embed_queries(queries[3:], engine="torch")
    vectors = index.faiss_index.reconstruct_n(0, len(index))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    import faiss  # noqa: PLC0415

    faiss_times, numpy_times = {1: [], 2: []}, []
    for row in unit:
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            t = time.perf_counter()
            index.faiss_index.search(row[None], 10)
            faiss_times[threads].append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = vectors @ row
        np.argpartition(-scores, 10)[:10]
        numpy_times.append(time.perf_counter() - t)
    result["faiss_search_step_only_1_thread"] = percentiles(faiss_times[1])
    result["faiss_search_step_only_2_threads"] = percentiles(faiss_times[2])
    result["numpy_brute_force_step_only"] = percentiles(numpy_times)
    result["peak_rss_mb"] = round(peak_rss_mb())
    return result


def million(args, work: Path) -> dict:
    from sklearn.decomposition import PCA  # noqa: PLC0415

    base = Embeddings.load(args.embeddings)
    rng = np.random.default_rng(0)
    reduced = PCA(args.dim, random_state=0).fit_transform(base.features).astype(np.float32)
    spread = reduced.std(axis=0)
    n = args.vectors
    source = rng.integers(0, len(reduced), n)
    source[: min(n, len(reduced))] = np.arange(min(n, len(reduced)))  # every base vector at least once
    vectors = reduced[source]
    for start in range(0, n, 100_000):  # noise in slices: no second full-size temporary
        block = vectors[start : start + 100_000]
        block += rng.normal(size=block.shape).astype(np.float32) * (args.noise * spread)
    queries = reduced[rng.integers(0, len(reduced), 200)] + rng.normal(size=(200, args.dim)).astype(np.float32) * (args.noise * spread)
    data = Embeddings(vectors, [f"/synthetic/{i:07d}.jpg" for i in range(n)], None, None, base.backbone, base.preprocessing)
    del base
    result = {"vectors": n, "dim": args.dim, "noise": args.noise}
    t = time.perf_counter()
    flat = build_index(data, work / "flat")
    result["flat"] = {"describe": flat.describe(), "build_s": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak_rss_mb())}
    t = time.perf_counter()
    exact_scores, exact_ids = flat.faiss_index.search(_unit(queries), 10)
    result["flat"]["ms_per_query_batch200"] = round((time.perf_counter() - t) / 200 * 1000, 2)
    result["flat"]["ms_per_query_single"] = _single(flat.faiss_index, _unit(queries[:20]))
    del flat
    t = time.perf_counter()
    ivf = build_index(data, work / "ivf", exact_max=n - 1)
    result["ivf"] = {"describe": ivf.describe(), "build_s": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak_rss_mb())}
    for nprobe in (8, 16, 32, 64, 128):
        ivf.faiss_index.nprobe = nprobe
        t = time.perf_counter()
        _, ids = ivf.faiss_index.search(_unit(queries), 10)
        batch_ms = (time.perf_counter() - t) / 200 * 1000
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
        result["ivf"][f"nprobe_{nprobe}"] = {"recall_at_10": round(float(recall), 4), "ms_per_query_batch200": round(batch_ms, 3),
                                             "ms_per_query_single": _single(ivf.faiss_index, _unit(queries[:20]))}
    result["disk_mb"] = {name: round(sum(f.stat().st_size for f in (work / name).iterdir()) / 1e6) for name in ("flat", "ivf")}
    return result


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _single(index, queries: np.ndarray) -> float:
    t = time.perf_counter()
    for row in queries:
        index.search(row[None], 10)
    return round((time.perf_counter() - t) / len(queries) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cifar", "million"], required=True)
    parser.add_argument("--embeddings", default="/work/bench-cache/cifar10_lite2_160.npz")
    parser.add_argument("--queries", type=int, default=50, help="timed query images (cifar part)")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors (million part)")
    parser.add_argument("--dim", type=int, default=256, help="PCA dimensions (million part)")
    parser.add_argument("--noise", type=float, default=0.35, help="noise sigma as a share of each dimension's spread")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="imagerec-index-bench-"))
    os.environ.setdefault("IMAGEREC_HOME", str(work / "home"))
    started = time.perf_counter()
    try:
        result = cifar(args, work) if args.part == "cifar" else million(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result.update(part=args.part, total_s=round(time.perf_counter() - started, 1), command=" ".join(sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), machine=platform.platform(),
                  cpus=os.cpu_count(), load_avg=os.getloadavg())
    print(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
