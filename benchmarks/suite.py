"""The development suite: every capability on every set, beside a plain peer on the same images.

Issue 21, part 2. One harness runs one capability (or all) on each set of the development suite
and writes, per capability, each set's figure, the plain peer's figure on the same images in the
same run, the mean over the sets and the worst set.

Sets (read in place; nothing is copied into the repository):

* the seven folders of ``shared/datasets/photo-suite/`` (``NAME/train/<class>``, ``NAME/test/<class>``);
* ``intel-scenes-small`` (1,800 train / 600 test photos, 6 classes);
* ``cifar10-500`` and ``cifar10-2000``: 50 and 200 training images a class drawn seeded and
  stratified from ``cifar10-jpeg/train`` (the 500 are drawn from the 2,000), with 100 test images a
  class from ``cifar10-jpeg/test`` (the same 1,000 for both). They are split roots of symbolic
  links under ``--work`` (links to the files in place, not copies).

Capabilities:

``train``
    ``imagerec.Classifier(time_budget=4)`` (every other setting at its default) fitted on the set's
    train split, then ``evaluate(split="test")``: test accuracy and 15-bin ECE (of the calibrated
    probabilities, as imagerec gives them). Peer: EfficientNet-Lite0 features at 224 px (imagerec's
    feature stage, ``backbone="efficientnet_lite0", image_size=224``, the backbone's own centre
    crop, no TTA) + scikit-learn ``LogisticRegressionCV`` (C from ``PEER_CS`` by 5-fold
    stratified cross-validation on the train split, scored by log loss, ``max_iter`` 5,000), its
    test accuracy and ECE (same ECE function).
``cluster``
    k = the number of classes, on the train split: ``cluster_images(..., method="kmeans")`` and
    ``method="deep"`` on imagerec's own features (``backbone="auto"``: Lite0 at 224 px for
    photos, Lite2 at 160 px for CIFAR's 32 px images), ACC (Hungarian) and NMI, mean over
    ``--seeds`` seeds. Peer: scikit-learn ``KMeans(k, n_init=10)`` on the raw Lite0@224 features
    above (the same as imagerec's for photos; for CIFAR the JSON also holds the peer on imagerec's
    Lite2@160 features).
``near_duplicates``
    ``--copies`` (36) transformed copies (seeded) of distinct train images are written under
    ``--work``: the six transforms (resize to 50-80%, JPEG quality 20-40, crop 85-95%, mirror,
    brightness +-5..20%, rotation +-1..5 degrees) alone and in pairs, alternately (36: each
    transform three times alone, each of the 15 pairs at least once).
    ``imagerec.audit(train + copies, checks=["near_duplicates"])`` at its defaults gives
    precision and recall of the planted (original, copy) pairs, where the predicted pairs are all
    pairs inside each reported group (so a chain that merges unrelated images costs precision).
    A copy paired with an exact duplicate of its original (same decoded pixels) is right too.
    Two precisions: ``P`` over the predicted pairs that hold a planted copy (pairs of two
    original images are left out: whether they are real duplicates is not known), and ``P_all``
    over every predicted pair (duplicates the set already holds count as false positives).
    Then the audit's rule is swept (the cosine that suffices alone, the thumbnail correlation
    and its cosine floor, the mutual-nearest-neighbour floor and margin, with imagerec's own
    kNN/edge/group functions on the audit's features; the sweep reproduces the audit's groups at
    the defaults, checked) for the best recall at P >= 0.95 (and at P_all >= 0.95). Peer:
    imagededup PHash at its best distance, scored both as imagededup's ``find_duplicates``
    pairs (checked against it) and as their connected components, the better kept; imagehash's
    ``phash`` where imagededup is missing; unavailable where neither is installed. A second,
    plain peer is always run: cosine of the Lite0@224 features above with one global
    threshold, swept likewise.
``label_issues``
    5% of the train labels moved to another class (seeded, uniform), then
    ``imagerec.audit(train with noisy labels, checks=["label_issues"])``: precision and recall of
    its flags at the defaults and P@k (k = the number of flips) of its ``label_quality`` ranking.
    Peer: ``cleanlab.filter.find_label_issues`` (its defaults) on the out-of-fold probabilities of
    ``cross_val_predict(LogisticRegression(C, max_iter=5000), Lite0@224 features, 5 stratified
    folds)``, C chosen as the train peer's (``LogisticRegressionCV`` over ``PEER_CS``, log loss;
    C=1 kept as ``peer_C1``); P@k of ``cleanlab.rank.get_label_quality_scores``. The JSON also holds the same peer
    on the audit's own (flip-averaged, whole-image, L2-normalised) features.

Embeddings are cached by file content with imagerec's own cache (a run folder per set and
feature kind under ``--work``): the Lite0@224 features serve train's peer, cluster and the
plain peers; the audit's features serve near_duplicates and label_issues. scikit-learn runs
with one BLAS thread (on this busy 2-core machine two threads made lbfgs many times slower).

How to run::

    PYTHONPATH=. .venv/bin/python benchmarks/suite.py --capability cluster
    PYTHONPATH=. .venv/bin/python benchmarks/suite.py --capability near_duplicates --sets weather_6class,cifar10-500
    PYTHONPATH=. nohup .venv/bin/python benchmarks/suite.py --capability train > benchmarks/results/suite_train.log 2>&1 &

Each capability writes ``benchmarks/results/suite_<capability>.json`` (per set raw figures, the
command, date, machine, git commit, wall times) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
PHOTO_SUITE = DATASETS / "photo-suite"
INTEL = DATASETS / "intel-scenes-small"
CIFAR = DATASETS / "cifar10-jpeg"
RESULTS = ROOT / "benchmarks" / "results"
PHOTO_SETS = (
    "animals_cats_dogs_panda", "brain_tumor_mri", "clothing_small", "corn_leaf_disease",
    "sign_language_digits", "skin_lesion_isic9", "weather_6class",
)  # fmt: skip
SETS = (*PHOTO_SETS, "intel-scenes-small", "cifar10-500", "cifar10-2000")
CIFAR_SIZES = {"cifar10-500": 50, "cifar10-2000": 200}  # train images a class
CIFAR_TEST_PER_CLASS = 100
CAPABILITIES = ("cluster", "near_duplicates", "label_issues", "train")
PEER_CS = np.logspace(-3, 3, 7)
TRANSFORMS = ("resize", "jpeg", "crop", "mirror", "brightness", "rotate")
PLAIN = ("efficientnet_lite0", 224)  # the plain peer's backbone and input size


# -- sets -----------------------------------------------------------------------------------


def set_root(name: str, work: Path, seed: int) -> Path:
    """The split root of a set (``train/<class>``, ``test/<class>``), built for the CIFAR subsets."""
    if name in PHOTO_SETS:
        return PHOTO_SUITE / name
    if name == "intel-scenes-small":
        return INTEL
    return cifar_subset(name, work, seed)


def cifar_subset(name: str, work: Path, seed: int) -> Path:
    """A split root of symbolic links: CIFAR_SIZES[name] train images a class and 100 test images
    a class, seeded and stratified (the 500 drawn from the 2,000). Built once; links are stable."""
    from imagerec.data import load_images

    root = work / "data" / f"{name}-seed{seed}"
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    train = load_images(CIFAR, "train")
    big = {c: np.sort(rng.choice(np.flatnonzero(train.labels == c), max(CIFAR_SIZES.values()), replace=False)) for c in range(len(train.classes))}
    rng_small = np.random.default_rng(seed + 1)
    picked = {c: (idx if CIFAR_SIZES[name] == len(idx) else np.sort(rng_small.choice(idx, CIFAR_SIZES[name], replace=False))) for c, idx in big.items()}
    test = load_images(CIFAR, "test")
    rng_test = np.random.default_rng(seed + 2)
    test_idx = {c: np.sort(rng_test.choice(np.flatnonzero(test.labels == c), CIFAR_TEST_PER_CLASS, replace=False)) for c in range(len(test.classes))}
    if root.exists():
        shutil.rmtree(root)
    for split, source, chosen in (("train", train, picked), ("test", test, test_idx)):
        for c, idx in chosen.items():
            folder = root / split / source.classes[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                os.symlink(os.path.abspath(source.paths[i]), folder / os.path.basename(source.paths[i]))
    (root / "done").write_text("")
    return root


class SetData:
    """A set's images and the features the capabilities share, computed (or reused) on demand."""

    def __init__(self, name: str, work: Path, seed: int):
        from imagerec.data import load_images

        self.name, self.work, self.seed = name, work, seed
        self.root = set_root(name, work, seed)
        self.train = load_images(self.root, "train")
        self.test = load_images(self.root, "test")
        self.classes = list(self.train.classes)
        self.k = len(self.classes)
        self._plain = None

    def all_images(self):
        """train then test, as one ImageSource (labels in the train classes' order)."""
        from imagerec.data import ImageSource

        assert self.test.classes == self.classes
        return ImageSource(self.train.paths + self.test.paths, np.concatenate([self.train.labels, self.test.labels]), self.classes, str(self.root))

    def features(self, backbone: str, image_size: int | None, source=None):
        """Raw embeddings of train + test (or ``source``) by imagerec's feature stage, cached by
        content in a run folder of their own (one folder per backbone and size: a folder's cache
        keeps one kind)."""
        from imagerec.features import compute_features

        source = source if source is not None else self.all_images()
        cache = self.work / "cache" / self.name / f"{backbone}@{image_size or 'default'}"
        cache.mkdir(parents=True, exist_ok=True)
        feats = compute_features(source, backbone=backbone, image_size=image_size, cache_dir=cache, pca_dim=None, progress=False)
        emb = feats.embeddings
        assert list(emb.paths) == list(source.paths), f"{self.name}: unreadable images were skipped; rows no longer match"
        return emb

    def plain(self):
        """Lite0@224 embeddings of train + test: the plain peer's features."""
        if self._plain is None:
            self._plain = self.features(*PLAIN)
        return self._plain

    def auto(self):
        """imagerec's own features for clustering (``backbone="auto"``), of train + test."""
        from imagerec.features import auto_backbone

        backbone, size, source = auto_backbone(self.all_images(), None)
        if (backbone, size or 224) == PLAIN:
            return self.plain()
        return self.features(backbone, size, source)

    def train_rows(self, emb):
        return rows_of(emb, range(len(self.train)))

    def test_rows(self, emb):
        return rows_of(emb, range(len(self.train), len(self.train) + len(self.test)))


def rows_of(emb, indices):
    idx = np.asarray(list(indices), dtype=np.int64)
    return dataclasses.replace(
        emb, features=emb.features[idx], paths=[emb.paths[i] for i in idx],
        labels=None if emb.labels is None else emb.labels[idx], skipped=[],
    )  # fmt: skip


def one_blas_thread():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


# -- train ------------------------------------------------------------------------------------


def run_train(data: SetData, args) -> dict:
    from imagerec import Classifier

    run_dir = data.work / "runs" / data.name / "train"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    params = {"time_budget": args.time_budget, "seed": args.seed, **dict(_parse_param(p) for p in args.train_param)}
    clf = Classifier(**params).fit(str(data.root), out=run_dir, progress=False)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    report = clf.evaluate(str(data.root), split="test")
    eval_s = time.perf_counter() - started
    s = report.summary
    history = getattr(clf, "history_", None) or []
    try:
        plan = json.loads((run_dir / "config.json").read_text()).get("plan", {})
    except (OSError, ValueError):
        plan = {}
    ours = {
        "accuracy": float(s["accuracy"]), "ece": float(s["ece"]), "ece_uncalibrated": float(s.get("ece_uncalibrated", s["ece"])),
        "temperature": float(s.get("temperature", 1.0)), "test_images": int(s.get("images", len(data.test))),
        "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "epochs_run": len(history),
        "input_size": int(clf.preprocessing_.input_size), "train_images": len(data.train), "plan": _small(plan),
        "params": dict(_parse_param(p) for p in args.train_param),
        "val_curve": [[row.get("epoch"), row.get("stage"), row.get("val_acc"), row.get("train_loss")] for row in history],
    }  # fmt: skip
    peer = train_peer(data, args.seed)
    return {"imagerec": ours, "peer": peer}


def _parse_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of --train-param, the value read as JSON where it parses (numbers, true/false), else a string."""
    key, _, value = text.partition("=")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _small(plan) -> dict:
    """The scalar entries of a training plan, for the JSON."""
    return {k: v for k, v in dict(plan).items() if isinstance(v, (int, float, str, bool)) or v is None} if isinstance(plan, dict) else {}


def train_peer(data: SetData, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    from imagerec.evaluation import calibration

    started = time.perf_counter()
    emb = data.plain()
    embed_s = time.perf_counter() - started
    tr, te = data.train_rows(emb), data.test_rows(emb)
    started = time.perf_counter()
    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(tr.labels).min())), shuffle=True, random_state=seed)
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the largest C are part of the search
        model = LogisticRegressionCV(Cs=PEER_CS, cv=folds, scoring="neg_log_loss", max_iter=5000, random_state=seed).fit(tr.features, tr.labels)
        proba = model.predict_proba(te.features)
    fit_s = time.perf_counter() - started
    pred = model.classes_[proba.argmax(1)]
    full = np.zeros((len(proba), data.k), np.float64)
    full[:, model.classes_] = proba
    ece, _ = calibration(full, te.labels)
    return {
        "accuracy": float(np.mean(pred == te.labels)), "ece": float(ece), "C": float(np.atleast_1d(model.C_)[0]),
        "features": f"{emb.backbone} @ {emb.preprocessing.input_size} px (crop {emb.preprocessing.crop_pct})",
        "embed_s": round(embed_s, 1), "fit_s": round(fit_s, 1),
    }  # fmt: skip


# -- cluster ----------------------------------------------------------------------------------


def run_cluster(data: SetData, args) -> dict:
    from sklearn.cluster import KMeans

    from imagerec import cluster_images
    from imagerec.clustering import clustering_scores

    started = time.perf_counter()
    own = data.train_rows(data.auto())
    plain = data.train_rows(data.plain())
    embed_s = time.perf_counter() - started
    y = own.labels
    runs = {"kmeans": [], "deep": [], "peer": [], "peer_on_imagerec_features": []}
    seconds = {m: 0.0 for m in runs}
    for seed in range(args.seeds):
        for method in ("kmeans", "deep"):
            t = time.perf_counter()
            result = cluster_images(own, method=method, k=data.k, random_state=seed, progress=False)
            seconds[method] += time.perf_counter() - t
            runs[method].append({"seed": seed, **clustering_scores(y, result.labels), "pca_dim": result.summary["config"]["pca_dim"]})
        with one_blas_thread():
            t = time.perf_counter()
            peer = KMeans(data.k, n_init=10, random_state=seed).fit(plain.features)
            seconds["peer"] += time.perf_counter() - t
            runs["peer"].append({"seed": seed, **clustering_scores(y, peer.labels_)})
            if own.backbone != plain.backbone:
                t = time.perf_counter()
                other = KMeans(data.k, n_init=10, random_state=seed).fit(own.features)
                seconds["peer_on_imagerec_features"] += time.perf_counter() - t
                runs["peer_on_imagerec_features"].append({"seed": seed, **clustering_scores(y, other.labels_)})
    out = {"n_images": len(y), "k": data.k, "features": own.backbone, "peer_features": plain.backbone, "embed_s": round(embed_s, 1)}
    for method, rs in runs.items():
        if rs:
            out[method] = {
                "acc": float(np.mean([r["acc"] for r in rs])), "nmi": float(np.mean([r["nmi"] for r in rs])),
                "acc_min": float(np.min([r["acc"] for r in rs])), "seconds": round(seconds[method], 1), "runs": rs,
            }  # fmt: skip
    return out


# -- near duplicates --------------------------------------------------------------------------


def copy_plan(n_train: int, n_copies: int, seed: int) -> list[dict]:
    """Which train images get a copy and how: singles and pairs of transforms, alternately."""
    rng = random.Random(seed)
    originals = rng.sample(range(n_train), min(n_copies, n_train))
    pairs = list(itertools.combinations(TRANSFORMS, 2))
    rng.shuffle(pairs)
    plan = []
    for i, original in enumerate(originals):
        kinds = (TRANSFORMS[(i // 2) % len(TRANSFORMS)],) if i % 2 == 0 else pairs[(i // 2) % len(pairs)]
        params = {}
        for kind in kinds:
            if kind == "resize":
                params["resize"] = round(rng.uniform(0.5, 0.8), 3)
            elif kind == "jpeg":
                params["jpeg"] = rng.randint(20, 40)
            elif kind == "crop":
                params["crop"] = [round(rng.uniform(0.85, 0.95), 3), round(rng.random(), 3), round(rng.random(), 3)]
            elif kind == "brightness":
                params["brightness"] = round(1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.2), 3)
            elif kind == "rotate":
                params["rotate"] = round(rng.choice([-1, 1]) * rng.uniform(1, 5), 2)
            else:
                params["mirror"] = True
        plan.append({"original": original, "kinds": list(kinds), "params": params})
    return plan


def make_copy(path: str, params: dict, target: Path) -> Path:
    from PIL import Image, ImageEnhance, ImageOps

    image = Image.open(path).convert("RGB")
    w, h = image.size
    if "crop" in params:
        f, fx, fy = params["crop"]
        cw, ch = max(1, round(w * f)), max(1, round(h * f))
        x, y = round((w - cw) * fx), round((h - ch) * fy)
        image = image.crop((x, y, x + cw, y + ch))
    if "resize" in params:
        w, h = image.size
        image = image.resize((max(1, round(w * params["resize"])), max(1, round(h * params["resize"]))), Image.Resampling.BICUBIC)
    if "rotate" in params:
        image = image.rotate(params["rotate"], resample=Image.Resampling.BICUBIC)
    if params.get("mirror"):
        image = ImageOps.mirror(image)
    if "brightness" in params:
        image = ImageEnhance.Brightness(image).enhance(params["brightness"])
    if "jpeg" in params:
        target = target.with_suffix(".jpg")
        image.save(target, format="JPEG", quality=params["jpeg"])
    else:
        target = target.with_suffix(".png")
        image.save(target, format="PNG")
    return target


def planted_copies(data: SetData, n_copies: int, seed: int) -> tuple[list[str], list[dict]]:
    """Write the copies (once for a plan; unchanged files keep their cached embeddings)."""
    plan = copy_plan(len(data.train), n_copies, seed)
    folder = data.work / "planted" / f"{data.name}-seed{seed}"
    record = folder / "plan.json"
    wanted = json.dumps({"plan": plan, "paths": [data.train.paths[p["original"]] for p in plan]})
    if not (record.is_file() and record.read_text() == wanted):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for i, p in enumerate(plan):
            make_copy(data.train.paths[p["original"]], p["params"], folder / f"copy_{i:03d}_{'+'.join(p['kinds'])}")
        record.write_text(wanted)
    files = sorted(str(f) for f in folder.iterdir() if f.name.startswith("copy_"))  # copy_NNN: the plan's order
    assert len(files) == len(plan), f"{folder}: {len(files)} copies for a plan of {len(plan)}"
    return files, plan


def component_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Group id per image (-1: alone) of the connected components of the edges (a, b)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    sizes = np.bincount(label)
    return np.where(sizes[label] > 1, label, -1)


def score_pairs(pairs: set, truth: set, n_originals: int, also_true: frozenset = frozenset()) -> dict:
    """Recall of the planted pairs ``truth``; precision over all predicted pairs (``precision_all``:
    pairs the set held before planting, its own duplicates, count as false) and over the pairs with
    a planted copy in them (``precision``: pairs of two original images are left out, since which
    of them are real duplicates is not known). A pair of a copy and an exact duplicate (same
    decoded pixels) of its original is right too (``also_true``); it adds to neither recall's
    numerator nor its denominator."""
    tp = len(pairs & truth)
    right = tp + len(pairs & also_true)
    with_copy = sum(1 for p in pairs if max(p) >= n_originals)
    return {
        "precision": right / with_copy if with_copy else 1.0, "precision_all": right / len(pairs) if pairs else 1.0,
        "recall": tp / len(truth) if truth else 1.0, "pairs": len(pairs), "pairs_with_copy": with_copy, "true_positives": tp,
    }  # fmt: skip


def score_groups(group: np.ndarray, truth: set, n_originals: int, also_true: frozenset = frozenset()) -> dict:
    """:func:`score_pairs` of all pairs inside the groups (``group``: id per image, -1 alone),
    counted from the group sizes rather than listed (a chain of hundreds of look-alikes is
    100,000 pairs)."""
    grouped = group[group >= 0]
    size = np.bincount(grouped).astype(np.int64) if len(grouped) else np.zeros(0, np.int64)
    copies = np.bincount(group[n_originals:][group[n_originals:] >= 0], minlength=len(size)).astype(np.int64)
    pairs = int((size * (size - 1) // 2).sum())
    with_copy = pairs - int(((size - copies) * (size - copies - 1) // 2).sum())
    same = lambda p: group[p[0]] >= 0 and group[p[0]] == group[p[1]]  # noqa: E731
    tp = sum(map(same, truth))
    right = tp + sum(map(same, also_true))
    return {
        "precision": right / with_copy if with_copy else 1.0, "precision_all": right / pairs if pairs else 1.0,
        "recall": tp / len(truth) if truth else 1.0, "pairs": pairs, "pairs_with_copy": with_copy, "true_positives": tp,
    }  # fmt: skip


def exact_partners(pixel_hash, plan: list[dict], n: int) -> frozenset:
    """(original's exact duplicate, copy) pairs: a copy is a near-duplicate of those too."""
    h = np.asarray(pixel_hash)
    out = set()
    for i, p in enumerate(plan):
        o = p["original"]
        if h[o]:
            out |= {(int(j), n + i) for j in np.flatnonzero(h[:n] == h[o]) if j != o}
    return frozenset(out)


def best_at(rows: list[dict], precision: float = 0.95, key: str = "precision") -> dict:
    ok = [r for r in rows if r[key] >= precision]
    if not ok:
        return {"recall": 0.0, key: None, "threshold": None}
    return max(ok, key=lambda r: (r["recall"], r[key]))


def run_near_duplicates(data: SetData, args) -> dict:
    from imagerec import audit
    from imagerec.audit import knn
    from imagerec.audit._duplicates import NEAR_DUPLICATE_DEFAULTS, edges, exact_groups, near_groups
    from imagerec.audit._scan import scan_images
    from imagerec.data import SMALL_IMAGE_MAX_SIDE, ImageSource

    copies, plan = planted_copies(data, args.copies, args.seed)
    n = len(data.train)
    labels = np.concatenate([data.train.labels, data.train.labels[[p["original"] for p in plan]]])
    source = ImageSource(data.train.paths + copies, labels, data.classes, f"{data.root}/train + {len(copies)} copies")
    truth = {(p["original"], n + i) for i, p in enumerate(plan)}
    kinds = {(p["original"], n + i): "+".join(p["kinds"]) for i, p in enumerate(plan)}

    started = time.perf_counter()
    result = audit(source, out=data.work / "audit" / data.name, checks=["near_duplicates"], random_state=args.seed, progress=False)
    audit_s = time.perf_counter() - started
    where = {p: i for i, p in enumerate(source.paths)}
    row_to_source = np.asarray([where[p] for p in result.images["path"]])
    table = result["near_duplicates"]
    group = np.full(len(source), -1, np.int64)
    if len(table):
        group[row_to_source[table["index"].to_numpy(dtype=np.int64)]] = table["group"].to_numpy()

    # the audit's own inputs again, rows in source order, for the sweep and the exact partners
    started = time.perf_counter()
    order = np.argsort(row_to_source)
    x = np.ascontiguousarray(result.features[order])
    figures, _, thumbs = scan_images(source.subset(row_to_source[order]), progress=False)
    exact = exact_groups(figures["pixel_hash"])
    also = exact_partners(figures["pixel_hash"], plan, n)
    kind = "small" if np.nanmedian(np.maximum(figures["width"], figures["height"])) <= SMALL_IMAGE_MAX_SIDE else "photos"
    default_rule = NEAR_DUPLICATE_DEFAULTS[kind]
    used = {k: result.summary["thresholds"][k] for k in ("near_duplicates", "pixel_correlation")}
    at_default = {**score_groups(group, truth, n, also), "thresholds": used, "rule": dict(zip(("threshold", "pixel_correlation", "floor", "mutual", "margin"), default_rule))}
    per_transform: dict[str, list[int]] = {}
    for p in sorted(truth):
        per_transform.setdefault(kinds[p], [0, 0])
        per_transform[kinds[p]][1] += 1
        per_transform[kinds[p]][0] += bool(group[p[0]] >= 0 and group[p[0]] == group[p[1]])

    # the sweep, with the audit's own functions on the audit's features: the cosine that suffices
    # alone, the thumbnail rule (correlation, candidate floor) and the mutual-nearest-neighbour
    # rule (floor, margin), each also switched off
    sims, ids, _ = knn(x, result.summary["features"]["neighbours"])
    rows = []
    pixel_rules = ((2.0, 1.0), (0.90, 0.70), (0.95, 0.85), (0.97, 0.50), (0.98, 0.50), (0.99, 0.50), default_rule[1:3])  # 2.0: no thumbnails
    mutual_rules = ((None, 0.0), (0.80, 0.02), (0.80, 0.04), (0.85, 0.02), (0.85, 0.04), default_rule[3:5])
    for (pixel, floor), (mutual, margin) in itertools.product(dict.fromkeys(pixel_rules), dict.fromkeys(mutual_rules)):
        for t in sorted({*np.round(np.arange(0.88, 0.996, 0.01), 3).tolist(), default_rule[0]}):
            accept = edges(sims, ids, float(t), thumbs, pixel, floor, mutual, margin)
            rule = {"threshold": float(t), "pixel_correlation": pixel, "floor": floor, "mutual": mutual, "margin": margin}
            rows.append({**rule, **score_groups(near_groups(sims, ids, accept, exact), truth, n, also)})
    again = near_groups(sims, ids, edges(sims, ids, default_rule[0], thumbs, *default_rule[1:]), exact)
    replicated = score_groups(again, truth, n, also) == {k: v for k, v in at_default.items() if k not in ("thresholds", "rule")}
    sweep_s = time.perf_counter() - started
    ours = {
        "at_default": at_default, "best": best_at(rows), "best_all_pairs": best_at(rows, key="precision_all"),
        "exact_duplicate_pairs_in_set": score_groups(exact[:n], set(), n)["pairs"] if (exact[:n] >= 0).any() else 0,
        "copies_with_an_exact_partner": len({c for _, c in also}), "per_transform_at_default": {k: f"{a}/{b}" for k, (a, b) in per_transform.items()},
        "sweep_reproduces_default": bool(replicated), "kind": kind, "features": result.summary["features"]["backbone"],
        "audit_s": round(audit_s, 1), "sweep_s": round(sweep_s, 1), "sweep": rows,
    }  # fmt: skip
    return {
        "train_images": n, "copies": len(copies), "plan": plan, "imagerec": ours,
        "peer_phash": phash_peer(source, truth, n, also), "peer_plain_cosine": plain_cosine_peer(data, copies, truth, n, also),
    }  # fmt: skip


def phash_peer(source, truth: set, n: int, also: frozenset = frozenset()) -> dict:
    """imagededup PHash at its best Hamming distance (or imagehash's phash where imagededup is
    missing; unavailable when neither is installed), scored two ways: the pairs imagededup's
    ``find_duplicates`` returns (every pair within the distance, no chaining: the tool's own
    output) and all pairs inside their connected components (how imagerec's groups are scored).
    ``best`` is the better of the two, so the peer gets its best reading."""
    try:
        from imagededup.methods import PHash  # noqa: F401
    except ImportError:
        PHash = None
    if PHash is None:
        try:
            import imagehash
        except ImportError:
            return {"available": False, "reason": "neither imagededup nor imagehash is installed in the venv"}
    from PIL import Image

    started = time.perf_counter()
    if PHash is not None:
        method = PHash(verbose=False)
        codes = [method.encode_image(image_file=p) for p in source.paths]
        bits = np.asarray([[int(b) for b in bin(int(c or "0", 16))[2:].zfill(64)] for c in codes], np.uint8)
        name = "imagededup PHash"
    else:
        codes = None
        bits = np.asarray([imagehash.phash(Image.open(p).convert("RGB")).hash.reshape(-1) for p in source.paths], np.uint8)
        name = "imagehash phash"
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    np.fill_diagonal(dist, 99)
    if codes is not None:
        dist[[i for i, c in enumerate(codes) if c is None]] = 99  # unreadable by imagededup: no pair
        dist[:, [i for i, c in enumerate(codes) if c is None]] = 99
    direct, chained = [], []
    for d in range(0, 33):
        a, b = np.nonzero(np.triu(dist <= d, 1))
        direct.append({"threshold": d, **score_pairs(set(zip(a.tolist(), b.tolist())), truth, n, also)})
        chained.append({"threshold": d, **score_groups(component_labels(len(bits), a, b), truth, n, also)})
    best = {mode: best_at(rows) for mode, rows in (("direct", direct), ("components", chained))}
    best_all = {mode: best_at(rows, key="precision_all") for mode, rows in (("direct", direct), ("components", chained))}
    out = {
        "available": True, "method": name, "unencodable": sum(c is None for c in codes) if codes is not None else 0,
        "best": {**max(best.values(), key=lambda r: r["recall"]), "mode": max(best, key=lambda m: best[m]["recall"])},
        "best_all_pairs": {**max(best_all.values(), key=lambda r: r["recall"]), "mode": max(best_all, key=lambda m: best_all[m]["recall"])},
        "best_direct": best["direct"], "best_components": best["components"],
    }  # fmt: skip
    if codes is not None and out["best_direct"]["threshold"] is not None:  # our distances are imagededup's own
        d = out["best_direct"]["threshold"]
        found = method.find_duplicates(encoding_map={str(i): c for i, c in enumerate(codes) if c}, max_distance_threshold=d, num_dist_workers=0)
        theirs = {tuple(sorted((int(q), int(r)))) for q, rs in found.items() for r in rs}
        out["direct_pairs_match_find_duplicates"] = theirs == set(zip(*[v.tolist() for v in np.nonzero(np.triu(dist <= d, 1))]))
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["sweep_direct"], out["sweep_components"] = direct, chained
    return out


def plain_cosine_peer(data: SetData, copies: list[str], truth: set, n: int, also: frozenset = frozenset()) -> dict:
    """Cosine of the Lite0@224 features (no TTA, centre crop), one global threshold, all pairs."""
    from imagerec.data import ImageSource
    from imagerec.embedding import embed

    started = time.perf_counter()
    originals = data.train_rows(data.plain()).features
    extra = embed(ImageSource(list(copies), None, None, "copies"), PLAIN[0], image_size=PLAIN[1], progress=False).features
    x = np.vstack([originals, extra]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -1)
    rows = []
    for t in np.round(np.arange(0.80, 0.996, 0.005), 3):
        a, b = np.nonzero(np.triu(sim >= t, 1))
        rows.append({"threshold": float(t), **score_groups(component_labels(len(x), a, b), truth, n, also)})
    return {"features": f"{PLAIN[0]} @ {PLAIN[1]} px", "best": best_at(rows), "best_all_pairs": best_at(rows, key="precision_all"), "seconds": round(time.perf_counter() - started, 1), "sweep": rows}


# -- label issues -----------------------------------------------------------------------------


def flip_labels(y: np.ndarray, k: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    rows = np.sort(rng.choice(len(y), round(share * len(y)), replace=False))
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, k, len(rows))) % k
    return noisy, rows


def score_flags(flagged: np.ndarray, ranking: np.ndarray, flipped: np.ndarray) -> dict:
    truth = set(flipped.tolist())
    hits = len(set(flagged.tolist()) & truth)
    top = set(ranking[: len(truth)].tolist())
    return {
        "flagged": int(len(flagged)), "precision": hits / len(flagged) if len(flagged) else 0.0,
        "recall": hits / len(truth), "p_at_k": len(top & truth) / len(truth),
    }  # fmt: skip


def run_label_issues(data: SetData, args) -> dict:
    from imagerec import audit
    from imagerec.data import ImageSource

    noisy, flipped = flip_labels(data.train.labels, data.k, args.noise, args.seed)
    source = ImageSource(list(data.train.paths), noisy, data.classes, f"{data.root}/train (noisy labels)")
    started = time.perf_counter()
    result = audit(source, out=data.work / "audit" / data.name, checks=["label_issues"], random_state=args.seed, progress=False)
    audit_s = time.perf_counter() - started
    where = {p: i for i, p in enumerate(source.paths)}
    df = result["label_issues"]
    idx = np.asarray([where[p] for p in df["path"]])
    flagged = idx[df["is_issue"].to_numpy(bool)]
    ranking = idx[np.argsort(df["label_quality"].to_numpy(), kind="stable")]
    ours = {**score_flags(flagged, ranking, flipped), "audit_s": round(audit_s, 1), "attrs": {k: v for k, v in df.attrs.items() if isinstance(v, (int, float, str, type(None)))}}

    plain = data.train_rows(data.plain())
    assert list(plain.paths) == list(source.paths)
    peer = cleanlab_peer(plain.features, noisy, flipped, args.seed)
    peer_c1 = cleanlab_peer(plain.features, noisy, flipped, args.seed, C=1.0)
    feats = np.empty_like(result.features)
    feats[[where[p] for p in result.images["path"]]] = result.features
    control = cleanlab_peer(feats, noisy, flipped, args.seed)
    return {
        "train_images": len(noisy), "flipped": int(len(flipped)), "imagerec": ours, "peer": peer,
        "peer_C1": peer_c1, "peer_on_audit_features": control,
    }  # fmt: skip


def cleanlab_peer(x: np.ndarray, noisy: np.ndarray, flipped: np.ndarray, seed: int, C: float | str = "cv") -> dict:
    """cleanlab's ``find_label_issues`` (its defaults) on the out-of-fold probabilities of the
    linear probe. ``C="cv"``: the probe of the train peer, C from ``PEER_CS`` by stratified 5-fold
    cross-validation (log loss) on the noisy labels, then ``cross_val_predict`` at that C; a number:
    that C."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    started = time.perf_counter()
    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(noisy).min())), shuffle=True, random_state=seed)
    with one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if C == "cv":
            C = float(np.atleast_1d(LogisticRegressionCV(Cs=PEER_CS, cv=folds, scoring="neg_log_loss", max_iter=5000, random_state=seed).fit(x, noisy).C_)[0])
        probs = cross_val_predict(LogisticRegression(C=C, max_iter=5000, random_state=seed), x, noisy, cv=folds, method="predict_proba")
        issues = find_label_issues(noisy, probs)
        quality = get_label_quality_scores(noisy, probs)
    ranking = np.argsort(quality, kind="stable")
    return {**score_flags(np.flatnonzero(issues), ranking, flipped), "C": C, "oof_accuracy": float(np.mean(probs.argmax(1) == noisy)), "seconds": round(time.perf_counter() - started, 1)}


RUNNERS = {"train": run_train, "cluster": run_cluster, "near_duplicates": run_near_duplicates, "label_issues": run_label_issues}


# -- tables -----------------------------------------------------------------------------------

# per capability: (column title, getter of the figure, higher is better)
COLUMNS = {
    "train": [
        ("imagerec acc", lambda r: r["imagerec"]["accuracy"], True),
        ("imagerec ECE", lambda r: r["imagerec"]["ece"], False),
        ("peer acc", lambda r: r["peer"]["accuracy"], True),
        ("peer ECE", lambda r: r["peer"]["ece"], False),
        ("Δ acc", lambda r: r["imagerec"]["accuracy"] - r["peer"]["accuracy"], True),
    ],
    "cluster": [
        ("k-means ACC", lambda r: r["kmeans"]["acc"], True),
        ("k-means NMI", lambda r: r["kmeans"]["nmi"], True),
        ("deep ACC", lambda r: r["deep"]["acc"], True),
        ("deep NMI", lambda r: r["deep"]["nmi"], True),
        ("peer ACC", lambda r: r["peer"]["acc"], True),
        ("peer NMI", lambda r: r["peer"]["nmi"], True),
        ("Δ ACC (best imagerec - peer)", lambda r: max(r["kmeans"]["acc"], r["deep"]["acc"]) - r["peer"]["acc"], True),
    ],
    "near_duplicates": [
        ("imagerec recall @ P>=0.95", lambda r: r["imagerec"]["best"]["recall"], True),
        ("imagerec recall @ P_all>=0.95", lambda r: r["imagerec"]["best_all_pairs"]["recall"], True),
        ("imagerec default recall", lambda r: r["imagerec"]["at_default"]["recall"], True),
        ("imagerec default P", lambda r: r["imagerec"]["at_default"]["precision"], True),
        ("imagerec default P_all", lambda r: r["imagerec"]["at_default"]["precision_all"], True),
        ("PHash recall @ P>=0.95", lambda r: r["peer_phash"]["best"]["recall"] if r["peer_phash"]["available"] else None, True),
        ("plain cosine recall @ P>=0.95", lambda r: r["peer_plain_cosine"]["best"]["recall"], True),
        ("plain cosine recall @ P_all>=0.95", lambda r: r["peer_plain_cosine"]["best_all_pairs"]["recall"], True),
    ],
    "label_issues": [
        ("imagerec precision", lambda r: r["imagerec"]["precision"], True),
        ("imagerec recall", lambda r: r["imagerec"]["recall"], True),
        ("imagerec P@k", lambda r: r["imagerec"]["p_at_k"], True),
        ("peer precision", lambda r: r["peer"]["precision"], True),
        ("peer recall", lambda r: r["peer"]["recall"], True),
        ("peer P@k", lambda r: r["peer"]["p_at_k"], True),
    ],
}


def describe(capability: str, r: dict) -> str:
    if capability == "train":
        return f"{r['imagerec']['train_images']} / {r['imagerec']['test_images']}"
    if capability == "cluster":
        return f"{r['n_images']}, k={r['k']}"
    if capability == "near_duplicates":
        return f"{r['train_images']} + {r['copies']}"
    return f"{r['train_images']}, {r['flipped']} flipped"


def markdown(capability: str, sets: dict) -> str:
    cols = COLUMNS[capability]
    size_title = {"train": "train / test images", "cluster": "images, k", "near_duplicates": "images + copies", "label_issues": "images, flips"}[capability]
    lines = [f"| set | {size_title} | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    done = {name: r for name, r in sets.items() if "error" not in r}
    for name, r in sets.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} |" + " |" * len(cols))
            continue
        size = describe(capability, r)
        cells = []
        for title, get, _ in cols:
            v = get(r)
            cells.append("n/a" if v is None else f"{v:+.3f}" if "Δ" in title else f"{v:.3f}")
        lines.append(f"| {name} | {size} | " + " | ".join(cells) + " |")
    if done:
        means, worsts = [], []
        for title, get, higher in cols:
            vals = {n: get(r) for n, r in done.items() if get(r) is not None}
            if not vals:
                means.append("n/a")
                worsts.append("n/a")
                continue
            means.append(f"{np.mean(list(vals.values())):+.3f}" if "Δ" in title else f"{np.mean(list(vals.values())):.3f}")
            worst = (min if higher else max)(vals, key=vals.get)
            worsts.append((f"{vals[worst]:+.3f}" if "Δ" in title else f"{vals[worst]:.3f}") + f" ({worst})")
        lines.append(f"| **mean** ({len(done)} sets) | | " + " | ".join(means) + " |")
        lines.append("| **worst set** | | " + " | ".join(worsts) + " |")
    return "\n".join(lines)


def summary(capability: str, sets: dict) -> dict:
    done = {n: r for n, r in sets.items() if "error" not in r}
    out = {}
    for title, get, higher in COLUMNS[capability]:
        vals = {n: get(r) for n, r in done.items() if get(r) is not None}
        if vals:
            worst = (min if higher else max)(vals, key=vals.get)
            out[title] = {"mean": float(np.mean(list(vals.values()))), "worst": float(vals[worst]), "worst_set": worst}
    return out


# -- main -------------------------------------------------------------------------------------


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "unknown")
    except OSError:
        model = "unknown"
    return f"{model}, {os.cpu_count()} CPU cores"


def git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capability", choices=(*CAPABILITIES, "all"), required=True)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of: {', '.join(SETS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CIFAR draws, copies, flips, training and folds")
    parser.add_argument("--seeds", type=int, default=3, help="cluster: seeds 0..S-1 per method (figures are their mean)")
    parser.add_argument("--time-budget", type=float, default=4.0, help="train: minutes per set")
    parser.add_argument("--copies", type=int, default=36, help="near_duplicates: planted copies per set (36: each single transform 3 times, each of the 15 pairs at least once)")
    parser.add_argument("--noise", type=float, default=0.05, help="label_issues: share of train labels moved")
    parser.add_argument("--work", default="/tmp/imagerec-suite", help="caches, CIFAR subset links, planted copies, runs")
    parser.add_argument("--results", default=str(RESULTS), help="folder for suite_<capability>.json")
    parser.add_argument("--train-param", action="append", default=[], metavar="KEY=VALUE",
                        help="train: a TrainConfig value other than its default (repeatable), to measure a candidate default")
    parser.add_argument("--tag", default="", help="written to suite_<capability>_<tag>.json (a candidate's run beside the defaults')")
    args = parser.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        parser.error(f"unknown set(s) {unknown}; pick from {', '.join(SETS)}")
    capabilities = CAPABILITIES if args.capability == "all" else (args.capability,)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    meta = {
        "command": shlex.join(["python", *sys.argv]), "machine": machine(),
        "git_commit": git("rev-parse", "HEAD"), "imagerec_dirty": bool(git("status", "--porcelain", "--", "imagerec")),
    }  # fmt: skip
    cache: dict[str, SetData] = {}
    for capability in capabilities:
        started = time.perf_counter()
        out = {
            "capability": capability, **meta, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg(), "settings": {k: v for k, v in vars(args).items() if k not in ("capability", "sets")},
            "sets": {},
        }  # fmt: skip
        for name in sets:
            t = time.perf_counter()
            print(f"[{capability}] {name} ...", flush=True)
            try:
                data = cache.get(name) or cache.setdefault(name, SetData(name, work, args.seed))
                result = RUNNERS[capability](data, args)
            except Exception as e:  # one set's failure is reported, the others still run
                import traceback

                traceback.print_exc()
                result = {"error": f"{type(e).__name__}: {e}"}
            result["wall_s"] = round(time.perf_counter() - t, 1)
            out["sets"][name] = result
            print(f"[{capability}] {name} done in {result['wall_s']} s: " + json.dumps(_brief(capability, result)), flush=True)
            write_results(out, args, sets, capability, started)  # after every set: a run stopped early keeps what it measured
        path = write_results(out, args, sets, capability, started)
        print(f"\n## {capability} ({out['wall_s'] / 60:.1f} min, {meta['machine']}, {out['date']})\n")
        print(out["markdown"] + "\n", flush=True)
        print(f"wrote {path}", flush=True)


def write_results(out: dict, args, sets: list[str], capability: str, started: float) -> Path:
    """``suite_<capability>[_<tag>].json`` with the sets measured so far; a partial run updates
    the sets it ran and keeps the others from the file (named in ``sets_from_earlier_runs``)."""
    out["wall_s"] = round(time.perf_counter() - started, 1)
    out["loadavg_end"] = os.getloadavg()
    path = Path(args.results) / f"suite_{capability}{'_' + args.tag if args.tag else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = dict(out)
    if set(sets) != set(SETS) and path.exists():
        old = json.loads(path.read_text())
        old_sets = {n: r for n, r in old.get("sets", {}).items() if n not in out["sets"]}
        if old_sets:
            earlier = old.get("sets_from_earlier_runs", {})
            merged["sets_from_earlier_runs"] = {n: earlier.get(n) or {"date": old.get("date"), "command": old.get("command")} for n in old_sets}
            merged["sets"] = {n: out["sets"].get(n) or old_sets[n] for n in SETS if n in out["sets"] or n in old_sets}
    merged["summary"] = summary(capability, merged["sets"])
    merged["markdown"] = markdown(capability, merged["sets"])
    path.write_text(json.dumps(merged, indent=1, default=_jsonable) + "\n")
    out["markdown"] = merged["markdown"]
    return path


def _brief(capability: str, r: dict) -> dict:
    if "error" in r:
        return {"error": r["error"]}
    return {title: (round(get(r), 4) if get(r) is not None else None) for title, get, _ in COLUMNS[capability]}


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


if __name__ == "__main__":
    main()
