"""Clustering CIFAR-10 without labels: imagerec's methods against scikit-learn peers, in one run.

What is measured
    For each set (``--sets``): ``test``, the 10,000 test images, and ``all``, all 60,000 images
    (train + test, ``load_images(root, split=None)``) of CIFAR-10 (JPEG copy, read in place):

    1. embeddings: ``imagerec.embed`` once per set (``--backbone``, ``--image-size``, ``--tta``:
       the mean of each image's and its mirror image's features, as ``cluster_images(tta=True)``),
       timed (wall seconds from opening the data set to the finished ``.npz``, peak RSS) in its own
       process with a cold imagerec cache, so decoding the JPEGs and the ONNX export count. The
       ``.npz`` and a JSON of its cost are kept in ``--work`` and reused by later runs (the cost
       shown is then the one measured when it was made);
    2. imagerec's methods, each in its own process (so its peak memory is its own):
       ``cluster_images(npz, method, k, out=None)`` with label-free defaults: ``kmeans``,
       ``minibatch_kmeans``, ``agglomerative`` (ward, average, complete) and ``deep`` (the SCAN
       head on frozen features) with k=10; ``dbscan`` and ``hdbscan`` find their own number of
       clusters. ``deep-adapt``: ``cluster_images(data, method="deep", k=10, adapt="simclr")``,
       which adapts the backbone to the images without labels and embeds them itself (its wall
       time includes that); recorded as "not available" while ``cluster_images`` has no
       ``adapt`` argument;
    3. peers, each in its own process: scikit-learn ``KMeans(n_clusters=10, n_init=10,
       random_state=0)`` on raw pixels (32x32x3 flattened, / 255, float64 as a user writes it;
       reference on test: ACC 0.203, NMI 0.085), and the same on plain EfficientNet-Lite0 features
       at 128 px, no normalisation or PCA (reference on test: ACC 0.529, NMI 0.411, ARI 0.287);
    4. ``neighbor_purity`` of the embeddings (share of each image's 20 nearest neighbours, by
       cosine, in its class): a label-using diagnostic of the features, never given to a method.

    Labels are read from the embeddings file only to score: ACC (Hungarian matching; noise counts
    as wrong), NMI and ARI (noise is one more cluster), the clusters found and the noise share.
    Times: ``wall s`` is the method's own call (reading the ``.npz`` included); ``incl. emb.`` adds
    the embedding of step 1 (for the pixel peer: reading the JPEGs). Peak MB is the peak resident
    size of the method's own process (``getrusage``), imports included (``import_rss_mb`` in the
    JSON: what importing imagerec took before the method started). "other CPU" is the share of the
    machine's CPU time that other processes used meanwhile: above a few percent the timings are
    not reliable (``--wait-idle S`` waits for a quiet machine before each row). ``--limit N``
    keeps every (n // N)-th image of a set, so all classes are in (smoke tests; results are kept
    under their own key, e.g. ``test-limit300``).

Goals
    * k-means on imagerec's best embeddings: ACC >= 0.60 on the test split;
    * deep clustering: ACC >= 0.70 within 30 minutes, embedding included;
    * every method on all 60,000 images within 15 minutes and 8 GB.

How to run
    nohup .venv/bin/python benchmarks/cluster_cifar10.py > /tmp/cluster.log 2>&1 &
    .venv/bin/python benchmarks/cluster_cifar10.py --sets test --only kmeans,deep --tta
    .venv/bin/python benchmarks/cluster_cifar10.py --sets test --limit 300 --work /tmp/cc_smoke \\
        --skip deep-adapt --results /tmp/cc_smoke/results.json                      # smoke test

It prints one table per set and writes ``benchmarks/results/cluster_cifar10.json`` (``--results``)
with the command, machine, date and versions; ``--only`` reruns some rows and keeps the others.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
RESULTS = ROOT / "benchmarks" / "results" / "cluster_cifar10.json"
SETS = {"test": "test", "all": None}  # set name -> split given to load_images
K = 10  # CIFAR-10's classes: known, so the methods that take k get it
PLAIN = {"backbone": "efficientnet_lite0", "image_size": 128, "tta": False}  # the feature peer's embeddings
PURITY_NEIGHBORS = 20

# row name -> its job; the imagerec rows run cluster_images on the set's embeddings
ROWS = {
    "kmeans": {"kind": "cluster", "method": "kmeans", "k": K},
    "minibatch_kmeans": {"kind": "cluster", "method": "minibatch_kmeans", "k": K},
    "dbscan": {"kind": "cluster", "method": "dbscan", "k": None},
    "hdbscan": {"kind": "cluster", "method": "hdbscan", "k": None},
    "agglomerative-ward": {"kind": "cluster", "method": "agglomerative", "k": K, "params": {"linkage": "ward"}},
    "agglomerative-average": {"kind": "cluster", "method": "agglomerative", "k": K, "params": {"linkage": "average"}},
    "agglomerative-complete": {"kind": "cluster", "method": "agglomerative", "k": K, "params": {"linkage": "complete"}},
    "deep": {"kind": "cluster", "method": "deep", "k": K},
    "deep-adapt": {"kind": "deep-adapt"},
    "peer-kmeans-pixels": {"kind": "peer-pixels"},
    "peer-kmeans-features": {"kind": "peer-features"},
}
GROUPS = {  # names --only and --skip also accept
    "agglomerative": [r for r in ROWS if r.startswith("agglomerative-")],
    "peers": [r for r in ROWS if r.startswith("peer-")],
}
PEERS = set(GROUPS["peers"])
REFERENCE = {  # the peers measured earlier on the test split
    "peer-kmeans-pixels": {"acc": 0.203, "nmi": 0.085},
    "peer-kmeans-features": {"acc": 0.529, "nmi": 0.411, "ari": 0.287},
}
GOALS = {"kmeans_acc": 0.60, "deep_acc": 0.70, "deep_s": 30 * 60, "method_s": 15 * 60, "method_mb": 8 * 1024}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="test,all", help="comma-separated: test (10,000 images), all (60,000)")
    p.add_argument(
        "--only",
        default=None,
        metavar="METHOD[,METHOD]",
        help=f"run only these rows, keep the others in the results file ({', '.join([*ROWS, *GROUPS])})",
    )
    p.add_argument("--skip", default=None, metavar="METHOD[,METHOD]", help="leave these rows out")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the embeddings")
    p.add_argument("--image-size", type=int, default=128, help="input side in pixels for embedding")
    p.add_argument("--tta", action="store_true", help="embed each image as the mean of it and its mirror image")
    p.add_argument(
        "--adapt-params",
        default=None,
        metavar="JSON",
        help="passed to cluster_images(adapt_params=...) in the deep-adapt row, e.g. '{\"epochs\": 5}'",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: for embedding and the deep methods")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="only N images of each set, evenly spaced so every class is in (smoke tests)",
    )
    p.add_argument("--timeout-min", type=float, default=15.0, help="kill a method that runs longer (minutes)")
    p.add_argument(
        "--adapt-timeout-min",
        type=float,
        default=30.0,
        help="the same for deep-adapt, whose time includes adapting and embedding (minutes)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each row, wait up to S seconds for other processes to leave the CPUs idle",
    )
    p.add_argument("--work", default="/tmp/cluster_cifar10", help="embeddings (reused by later runs) and logs")
    p.add_argument("--root", default=str(DATA), help="CIFAR-10 JPEG root with train/ and test/ class folders")
    p.add_argument("--results", default=str(RESULTS), help="the JSON to write (merged with what it holds)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one job and print its JSON
    args = p.parse_args(argv)
    if args.child is None:
        args.sets = _names(args.sets, SETS, "--sets")
        args.rows = [r for r in (_rows(args.only) if args.only else ROWS) if r not in _rows(args.skip)]
        args.adapt_params = json.loads(args.adapt_params) if args.adapt_params else None
        if args.limit is not None and args.limit < 2 * K:
            p.error(f"--limit {args.limit} is too small; give at least {2 * K} images")
    return args


def _names(text: str, valid, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        sys.exit(f"{flag}: {unknown[0]!r} is not one of {', '.join(valid)}")
    return names


def _rows(text: str | None) -> list[str]:
    """Row names from ``--only``/``--skip`` (a group name stands for its rows)."""
    if not text:
        return []
    names = _names(text, [*ROWS, *GROUPS], "--only/--skip")
    return [row for n in names for row in GROUPS.get(n, [n])]


# --- the machine --------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    ram_gb = None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        ram_gb = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False
        )
        gpu = found.stdout.strip() or None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions() -> dict:
    found = {}
    for package in ("imagerec", "torch", "timm", "scikit-learn", "numpy", "scipy", "onnxruntime", "faiss-cpu"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "imagerec"], capture_output=True, text=True, check=False, cwd=ROOT
        )
        found["imagerec_git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        found["imagerec_git"] = None
    return found


def host_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(max_wait_s: float, window_s: float = 5.0, threshold: float = 0.1) -> float:
    """Wait (up to ``max_wait_s``) until other processes leave the CPUs idle; the busy share last seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy, own = host_busy_s(), own_cpu_s()
        time.sleep(window_s)
        share = max(0.0, host_busy_s() - busy - (own_cpu_s() - own)) / (window_s * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() > deadline:
            return share
        print(f"machine busy ({share:.0%} of its CPUs used by other processes); waiting ...", flush=True)


# --- child processes: one job each, JSON on stdout ---------------------------------------------


def run_child(job: dict, name: str, work: Path, timeout_s: float | None = None) -> dict:
    """Run ``job`` in a new process with a cold imagerec cache; return its JSON plus what the
    parent saw: ``status`` (ok, error, timed out), ``process_s``, ``peak_tree_mb``, ``other_cpu``."""
    logs, home = work / "logs", work / f"home-{name}"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, IMAGEREC_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and its workers
        except ProcessLookupError:
            pass

    busy, own, start = host_busy_s(), own_cpu_s(), time.perf_counter()
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM: the child has its own session, so end it too
            kill()
            os.wait4(proc.pid, 0)
            raise
        finally:
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    other = max(0.0, host_busy_s() - busy - (usage.ru_utime + usage.ru_stime) - (own_cpu_s() - own))
    shutil.rmtree(home, ignore_errors=True)
    seen = {
        "process_s": wall,
        "peak_tree_mb": usage.ru_maxrss / 1024,
        "other_cpu": other / (wall * (os.cpu_count() or 1)),
        "log": str(logs / f"{name}.log"),
    }
    if killed.is_set():
        return {"status": "timed out", "reason": f"killed after {timeout_s / 60:g} min", **seen}
    lines = (logs / f"{name}.out").read_text().strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (logs / f"{name}.log").read_text().strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"status": "error", "reason": tail[0][-300:], **seen}
    return {"status": "ok", **json.loads(lines[-1]), **seen}


def child_main(job: dict) -> None:
    """Run one job; its JSON is the last line on stdout (anything else printed goes to stderr).

    A job that clusters returns the clusters (``y_pred``) and the classes (``y_true``, read after
    the method ran); they are scored here, after the peak memory is read, so that importing the
    metrics (imagerec, hence PyTorch) counts in no peer's memory and in no one's wall time.
    """
    stdout, sys.stdout = sys.stdout, sys.stderr
    result = JOBS[job["kind"]](job)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the largest process this one started (decoding workers); Linux counts a forked child's
    # memory before exec too, so a short helper run by a library (lscpu) reads as large as its parent
    result["peak_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if "y_pred" in result:
        result.update(_scores(result.pop("y_true"), result.pop("y_pred")))
    print(json.dumps(result), file=stdout, flush=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subset_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` of ``n`` images, every ``n // limit``-th: all classes are in, since files are sorted by class."""
    if limit is None or limit >= n:
        return list(range(n))
    return list(range(0, n, n // limit))[:limit]


def _select(source, limit: int | None):
    return source.subset(_subset_indices(len(source), limit)) if limit is not None else source


def _scores(y_true, y_pred) -> dict:
    import numpy as np

    from imagerec.clustering import ari, cluster_accuracy, nmi

    y_pred = np.asarray(y_pred)
    return {
        "acc": cluster_accuracy(y_true, y_pred),
        "nmi": nmi(y_true, y_pred),
        "ari": ari(y_true, y_pred),
        "n_clusters": len(np.unique(y_pred[y_pred >= 0])),
        "noise_fraction": float(np.mean(y_pred < 0)),
    }


def job_embed(job: dict) -> dict:
    import imagerec
    from imagerec.clustering._features import FlipAveraged  # what cluster_images(tta=True) embeds with

    start = time.perf_counter()
    source = _select(imagerec.load_images(job["root"], job["split"]), job["limit"])
    model = job["backbone"]
    if job["tta"]:
        model = FlipAveraged(imagerec.create_backbone(model, num_classes=0))
    emb = imagerec.embed(source, model, out=job["npz"], image_size=job["image_size"], device=job["device"])
    return {
        "seconds": time.perf_counter() - start,
        "n_images": len(emb),
        "skipped": len(emb.skipped),
        "dim": int(emb.features.shape[1]),
        "backbone": emb.backbone,
        "preprocessing": emb.preprocessing.to_dict(),
    }


def job_purity(job: dict) -> dict:
    import numpy as np
    from sklearn.neighbors import NearestNeighbors

    from imagerec.clustering import l2_normalize, neighbor_purity

    with np.load(job["npz"], allow_pickle=False) as d:
        features, labels = d["features"], d["labels"]
    k = min(PURITY_NEIGHBORS, len(features) - 1)
    start = time.perf_counter()
    neighbors = NearestNeighbors(n_neighbors=k).fit(l2_normalize(features)).kneighbors(return_distance=False)
    return {"neighbor_purity": neighbor_purity(neighbors, labels), "k": k, "seconds": time.perf_counter() - start}


def job_cluster(job: dict) -> dict:
    import numpy as np

    from imagerec import cluster_images

    import_mb = _rss_mb()
    start = time.perf_counter()
    result = cluster_images(
        job["npz"], job["method"], job["k"], params=job.get("params"), out=None, device=job["device"], progress=False
    )
    wall = time.perf_counter() - start
    with np.load(job["npz"], allow_pickle=False) as d:
        y_true = d["labels"]  # read only now: the method never saw them
    s = result.summary
    extra = {key: s[key] for key in ("eps", "neighbor_purity", "silhouette") if key in s}
    return {
        "wall_s": wall,
        "import_rss_mb": import_mb,
        "seconds": s["seconds"],
        "params": s["params"],
        **extra,
        "y_true": y_true,
        "y_pred": result.labels,
    }


def run_deep_adapt(data, *, split, backbone, tta, device, adapt_params=None):
    """``cluster_images(data, method="deep", k=10, adapt="simclr", ...)``: the backbone adapted to
    the images without labels, then embedding and the SCAN head.

    No ``image_size``: the adapted backbone embeds at the size it was adapted at (set it with
    ``adapt_params={"image_size": ...}``); ``--image-size`` is that of the frozen embeddings.

    Returns:
        (ClusteringResult, None), or (None, why) where this imagerec's ``cluster_images`` does not
        take ``adapt`` (or ``adapt_params``) yet.
    """
    from imagerec import cluster_images

    accepted = inspect.signature(cluster_images).parameters
    if "adapt" not in accepted:
        return None, "cluster_images() has no 'adapt' argument in this imagerec"
    extra = {"adapt": "simclr"}
    if adapt_params:
        if "adapt_params" not in accepted:
            return None, "cluster_images() has no 'adapt_params' argument in this imagerec"
        extra["adapt_params"] = adapt_params
    result = cluster_images(
        data,
        method="deep",
        k=K,
        split=split,
        backbone=backbone,
        tta=tta,
        device=device,
        out=None,
        progress=True,
        **extra,
    )
    return result, None


def job_deep_adapt(job: dict) -> dict:
    import imagerec

    data, split = job["root"], job["split"]
    source = _select(imagerec.load_images(data, split), job["limit"])  # for the labels, and the subset of --limit
    if job["limit"] is not None:
        data, split = source, None
    start = time.perf_counter()
    result, why = run_deep_adapt(
        data,
        split=split,
        backbone=job["backbone"],
        tta=job["tta"],
        device=job["device"],
        adapt_params=job["adapt_params"],
    )
    if result is None:
        return {"status": "not available", "reason": why}
    wall = time.perf_counter() - start
    label_of = dict(zip(source.paths, source.labels.tolist()))
    s = result.summary
    return {
        "wall_s": wall,
        "seconds": s.get("seconds"),
        "params": s.get("params"),
        "config": s.get("config"),
        "y_true": [label_of[p] for p in result.paths],
        "y_pred": result.labels,
    }


def _list_images(root: str, split: str | None) -> tuple[list[str], list[int]]:
    """Files and class indices of ``root/<split>/<class>/*`` in sorted order (train then test for
    None): the order of ``imagerec.load_images``, listed without imagerec."""
    paths, labels = [], []
    for part in [split] if split else ["train", "test"]:
        folder = Path(root) / part
        for label, cls in enumerate(
            sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        ):
            files = sorted(f.name for f in (folder / cls).iterdir() if not f.name.startswith("."))
            paths += [str(folder / cls / f) for f in files]
            labels += [label] * len(files)
    return paths, labels


def _kmeans_peer(X) -> tuple[float, object]:
    from sklearn.cluster import KMeans

    start = time.perf_counter()
    labels = KMeans(n_clusters=K, n_init=10, random_state=0).fit(X).labels_
    return time.perf_counter() - start, labels


def job_peer_pixels(job: dict) -> dict:
    """What a user writes, with numpy, Pillow and scikit-learn alone."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    paths, labels = _list_images(job["root"], job["split"])
    keep = _subset_indices(len(paths), job["limit"])
    pixels = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in keep])
    X = pixels.reshape(len(pixels), -1) / 255  # float64, as a user writes it
    load_s = time.perf_counter() - start
    fit_s, y_pred = _kmeans_peer(X)
    return {"load_s": load_s, "wall_s": fit_s, "y_true": [labels[i] for i in keep], "y_pred": y_pred}


def job_peer_features(job: dict) -> dict:
    import numpy as np

    start = time.perf_counter()
    with np.load(job["npz"], allow_pickle=False) as d:
        features, y_true = d["features"], d["labels"]
    fit_s, y_pred = _kmeans_peer(features)
    return {"wall_s": time.perf_counter() - start, "fit_s": fit_s, "y_true": y_true, "y_pred": y_pred}


JOBS = {
    "embed": job_embed,
    "purity": job_purity,
    "cluster": job_cluster,
    "deep-adapt": job_deep_adapt,
    "peer-pixels": job_peer_pixels,
    "peer-features": job_peer_features,
}


# --- the parent: embeddings, rows, tables ------------------------------------------------------


def set_key(name: str, limit: int | None) -> str:
    return name if limit is None else f"{name}-limit{limit}"


def ensure_embeddings(args, set_name: str, backbone: str, image_size: int, tta: bool) -> dict:
    """The set's embeddings (made now, or reused from ``--work``) and what they cost when made."""
    work = Path(args.work)
    stem = f"{set_key(set_name, args.limit)}_{backbone}_{image_size}px{'_tta' if tta else ''}"
    npz, meta_file = work / f"{stem}.npz", work / f"{stem}.json"
    if npz.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        print(
            f"  embeddings: reusing {npz} (made {meta['date']} in {meta['seconds']:.1f} s, "
            f"peak {meta['peak_mb']:.0f} MB)",
            flush=True,
        )
        return {**meta, "reused": True}
    work.mkdir(parents=True, exist_ok=True)
    resumed = Path(f"{npz}.partial").is_dir()
    print(f"  embeddings: {backbone} {image_size}px{' tta' if tta else ''} -> {npz} ...", flush=True)
    job = {
        "kind": "embed",
        "root": args.root,
        "split": SETS[set_name],
        "limit": args.limit,
        "backbone": backbone,
        "image_size": image_size,
        "tta": tta,
        "device": args.device,
        "npz": str(npz),
    }
    found = run_child(job, f"{stem}-embed", work)
    if found["status"] != "ok":
        sys.exit(f"embedding failed: {found['reason']} (see {found['log']})")
    meta = {
        "npz": str(npz),
        "date": _now(),
        "set": set_name,
        "limit": args.limit,
        "backbone_name": backbone,
        "image_size": image_size,
        "tta": tta,
        "device": args.device,
        "resumed": resumed,
        "cold_cache": True,
        "seconds": found["seconds"],
        "process_s": found["process_s"],
        "peak_mb": found["peak_rss_mb"],
        "peak_rss_mb": found["peak_rss_mb"],
        "other_cpu": found["other_cpu"],
        "machine_cpu": machine()["cpu"],
        **{key: found[key] for key in ("n_images", "skipped", "dim", "backbone", "preprocessing")},
    }
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"  embeddings: {meta['n_images']:,} images in {meta['seconds']:.1f} s, peak {meta['peak_mb']:.0f} MB",
        flush=True,
    )
    return {**meta, "reused": False}


def ensure_purity(args, emb: dict) -> float:
    """``neighbor_purity`` of the embeddings, computed once and kept in their JSON."""
    meta_file = Path(emb["npz"]).with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    if "neighbor_purity" not in meta:
        found = run_child({"kind": "purity", "npz": emb["npz"]}, f"{Path(emb['npz']).stem}-purity", Path(args.work))
        if found["status"] != "ok":
            print(f"  neighbor purity failed: {found['reason']} (see {found['log']})", flush=True)
            return float("nan")
        meta.update(neighbor_purity=found["neighbor_purity"], neighbor_purity_k=found["k"])
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return meta["neighbor_purity"]


def run_row(args, name: str, set_name: str, emb: dict, plain: dict | None) -> dict:
    """One row: its job in its own process, scored, with both wall times."""
    spec = ROWS[name]
    job = {**spec, "root": args.root, "split": SETS[set_name], "limit": args.limit, "device": args.device}
    timeout = args.timeout_min * 60
    features = emb
    if spec["kind"] == "cluster":
        job["npz"] = emb["npz"]
    elif spec["kind"] == "peer-features":
        features = plain
        job["npz"] = plain["npz"]
    elif spec["kind"] == "deep-adapt":
        job.update(backbone=args.backbone, tta=args.tta, adapt_params=args.adapt_params)
        timeout = args.adapt_timeout_min * 60
        features = None
    if args.wait_idle:
        wait_for_idle(args.wait_idle)
    found = run_child(job, f"{set_key(set_name, args.limit)}-{name}", Path(args.work), timeout)
    row = {"date": _now(), **found}
    if spec["kind"] == "peer-pixels":
        row["features"] = "raw pixels (32x32x3 / 255)"
        row["embed_s"] = found.get("load_s")
    elif features is not None:
        row["features"] = _describe(features)
        row["embed_s"] = features["seconds"]
    else:  # deep-adapt: adapts and embeds inside its own call
        row["features"] = f"{args.backbone} adapted (simclr){' tta' if args.tta else ''}, at the adapted size"
        row["embed_s"] = (found.get("seconds") or {}).get("embed")  # its own embedding, inside its call
    if row["status"] == "ok":
        if spec["kind"] == "deep-adapt":  # the call embeds: its own time is the rest (adapting, clustering)
            row["wall_incl_s"] = row["wall_s"]
            row["wall_s"] = row["wall_s"] - row["embed_s"] if row["embed_s"] is not None else None
        else:
            row["wall_incl_s"] = row["wall_s"] + (row["embed_s"] or 0.0)
        row["peak_mb"] = row["peak_rss_mb"]
    if name in REFERENCE and set_name == "test" and args.limit is None:
        row["reference"] = REFERENCE[name]
    return row


def _describe(emb: dict) -> str:
    return f"{emb['backbone']} {emb['image_size']}px ({emb['n_images']:,} images)"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def table(rows: dict) -> str:
    lines = [
        "| method | ACC | NMI | ARI | clusters | noise % | wall s | wall s incl. emb. | peak MB | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [r for r in ROWS if r in rows]:
        r = rows[name]
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']}: {r.get('reason', '')} | | | | | {r['process_s']:.0f} | | | |")
            continue
        noise = 100 * r["noise_fraction"]
        lines.append(
            f"| {name} | {r['acc']:.3f} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['n_clusters']} | {noise:.1f} | "
            f"{_fmt(r['wall_s'], '.1f')} | {r['wall_incl_s']:.1f} | {r['peak_mb']:.0f} | {r['other_cpu']:.0%} |"
        )
    return "\n".join(lines)


def goals(sets: dict) -> list[str]:
    """The goals of the module docstring, as met or not by what the results file holds."""
    lines = []
    test = sets.get("test", {}).get("rows", {})
    km = test.get("kmeans")
    if km and km["status"] == "ok":
        verdict = "met" if km["acc"] >= GOALS["kmeans_acc"] else "not met"
        lines.append(
            f"kmeans on test: ACC {km['acc']:.3f} (goal >= {GOALS['kmeans_acc']}): {verdict} [{km['features']}]"
        )
    for key, s in sets.items():
        if key not in SETS:
            continue  # --limit runs are smoke tests
        for name in ("deep", "deep-adapt"):
            r = s.get("rows", {}).get(name)
            if r and r["status"] == "ok":
                ok = r["acc"] >= GOALS["deep_acc"] and r["wall_incl_s"] <= GOALS["deep_s"]
                lines.append(
                    f"{name} on {key}: ACC {r['acc']:.3f} in {r['wall_incl_s'] / 60:.1f} min incl. embedding "
                    f"(goal >= {GOALS['deep_acc']} within 30 min): {'met' if ok else 'not met'}"
                )
    rows = sets.get("all", {}).get("rows", {})
    if rows:
        late = []
        for name, r in rows.items():
            if name in PEERS:
                continue
            seconds = r.get("wall_s") if r.get("wall_s") is not None else r.get("wall_incl_s")
            if r["status"] == "not available":
                continue
            if r["status"] != "ok":
                late.append(f"{name} ({r['status']})")
            elif seconds > GOALS["method_s"] or r["peak_mb"] > GOALS["method_mb"]:
                late.append(f"{name} ({seconds / 60:.1f} min, {r['peak_mb']:.0f} MB)")
        lines.append(
            "every method on all 60,000 images within 15 min and 8 GB: "
            + ("met" if not late else "not met by " + ", ".join(late))
        )
    return lines


def load_previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_report(args, sets: dict, complete: bool) -> None:
    report = {
        "benchmark": "cluster_cifar10",
        "complete": complete,
        "date": _now(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "root": args.root,
            "backbone": args.backbone,
            "image_size": args.image_size,
            "tta": args.tta,
            "device": args.device,
            "limit": args.limit,
            "timeout_min": args.timeout_min,
            "adapt_timeout_min": args.adapt_timeout_min,
            "adapt_params": args.adapt_params,
            "k": K,
            "labels": "never given to a method; read from the embeddings file only to score",
        },
        "goals": goals(sets),
        "sets": sets,
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    if not Path(args.root).is_dir():
        sys.exit(f"CIFAR-10 JPEG copy not found at {args.root}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that the running child is ended too
    info = machine()
    print(
        f"{_now()}  {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM; rows: {', '.join(args.rows)}",
        flush=True,
    )
    sets = load_previous(Path(args.results)).get("sets", {})
    plain_wanted = "peer-kmeans-features" in args.rows
    same_as_plain = (args.backbone, args.image_size, args.tta) == tuple(PLAIN.values())
    for set_name in args.sets:
        key = set_key(set_name, args.limit)
        print(f"== {key} ({_now()})", flush=True)
        emb = ensure_embeddings(args, set_name, args.backbone, args.image_size, args.tta)
        emb["neighbor_purity"] = ensure_purity(args, emb)
        print(f"  neighbor purity@{PURITY_NEIGHBORS} (cosine, labels used): {emb['neighbor_purity']:.3f}", flush=True)
        plain = None
        if plain_wanted:
            plain = emb if same_as_plain else ensure_embeddings(args, set_name, **PLAIN)
        previous = sets.get(key, {}).get("rows", {}) if args.only else {}
        entry = {
            "embeddings": emb,
            "plain_embeddings": plain if plain is not emb else "same",
            "command": shlex.join([sys.executable, *sys.argv]),
            "rows": dict(previous),
        }
        sets[key] = entry
        for name in args.rows:
            print(f"  {name} ...", end=" ", flush=True)
            row = entry["rows"][name] = run_row(args, name, set_name, emb, plain)
            if row["status"] == "ok":
                print(
                    f"ACC {row['acc']:.3f} NMI {row['nmi']:.3f} ARI {row['ari']:.3f}, {row['n_clusters']} clusters, "
                    f"{row['process_s']:.1f} s, peak {row['peak_mb']:.0f} MB",
                    flush=True,
                )
            else:
                print(f"{row['status']}: {row.get('reason', '')}", flush=True)
            write_report(args, sets, complete=False)  # a killed run keeps the rows so far
        print(
            f"\n{key}: {_describe(emb)}, embedding {emb['seconds']:.1f} s{' (reused)' if emb['reused'] else ''}, "
            f"peak {emb['peak_mb']:.0f} MB; neighbor purity {emb['neighbor_purity']:.3f}\n"
        )
        print(table(entry["rows"]) + "\n", flush=True)
    write_report(args, sets, complete=True)
    for line in goals(sets):
        print(line)
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
