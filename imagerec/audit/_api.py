"""``audit``: find what is wrong with a collection before anyone trains or clusters on it."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from .._decode import Skipped
from .._lock import run_lock
from .._version import __version__
from ..data import DEFAULT_MAX_PIXELS, SMALL_IMAGE_MAX_SIDE, ImageSource, Preprocessing, decode_small_images, load_images, write_manifest
from ..embedding import Embeddings
from ..errors import ImagerecError
from ..features import check_finished, compute_features, is_embeddings_file, l2_normalize, prepare_features
from ._duplicates import (
    EXACT_SEARCH_MAX,
    NEAR_DUPLICATE_K,
    NEAR_DUPLICATE_DEFAULTS,
    NEAR_DUPLICATE_THRESHOLD,
    edges,
    exact_groups,
    group_table,
    knn,
    leak_table,
    near_groups,
)
from ._quality import QUALITY_THRESHOLDS, quality_issues
from ._scan import scan_images

CHECKS = ("exact_duplicates", "near_duplicates", "leakage", "outliers", "label_issues", "quality")
PIXEL_CHECKS = ("exact_duplicates", "quality")  # need the image files (or pixels), not only embeddings
THRESHOLD_NAMES = ("near_duplicates", "pixel_correlation", "outliers", "label_issues", *QUALITY_THRESHOLDS)
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class AuditResult:
    """What an audit found: one pandas DataFrame per check, rows most certain first.

    Every table has an ``index`` column (the row of :attr:`images`) and a ``path`` column.

    Attributes:
        images: one row per audited image: ``index``, ``path``, ``split``, ``label`` (class name or
            None), and the decode pass's figures (``width``, ``height``, ``sharpness``, ...).
        tables: ``{check: DataFrame}`` for the checks that ran, plus ``"unreadable"``
            (``path``, ``reason``: the files no reader could use).
        summary: what ``summary.json`` holds (counts per check, thresholds used, checks not run).
        run_dir: the run folder, or None.
    """

    images: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    summary: dict
    run_dir: Path | None = None
    features: np.ndarray | None = field(default=None, repr=False)

    def __getitem__(self, check: str) -> pd.DataFrame:
        return self.tables[check]

    def flagged(self, relabel: bool = False) -> np.ndarray:
        """Indices of the images a clean collection leaves out: every duplicate but the kept
        member, test/val copies of training images, outliers, images with a quality issue, and
        label issues (unless ``relabel``: they stay, with the suggested label)."""
        drop: set[int] = set()
        for name in ("exact_duplicates", "near_duplicates"):
            t = self.tables.get(name)
            if t is not None and len(t):
                drop |= set(t.loc[~t["keep"], "index"].tolist())
        for name, column in (("leakage", None), ("quality", None), ("outliers", "is_outlier")):
            t = self.tables.get(name)
            if t is not None and len(t):
                drop |= set((t[t[column]] if column else t)["index"].tolist())
        t = self.tables.get("label_issues")
        if t is not None and len(t) and not relabel:
            drop |= set(t.loc[t["is_issue"], "index"].tolist())
        return np.asarray(sorted(drop), dtype=np.int64)


def audit(
    data,
    *,
    out: str | os.PathLike | None = None,
    checks: list[str] | tuple[str, ...] | None = None,
    backbone: str | nn.Module = "auto",
    split: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    tta: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
    thresholds: dict | None = None,
    k: int = NEAR_DUPLICATE_K,
    export_manifest: str | os.PathLike | None = None,
    relabel: bool = False,
    random_state: int = 0,
    progress: bool = True,
) -> AuditResult:
    """Audit a collection: duplicates, leaks across splits, outliers, wrong labels, bad images.

    Args:
        data: a folder, a split root (``DIR/train``, ``DIR/test``...), a CSV manifest,
            ``"cifar10"``, an :class:`~imagerec.ImageSource`, or embeddings (an
            :class:`~imagerec.Embeddings` or a ``.npz`` from ``imagerec embed``: the pixel checks
            then read the files its paths name, and are left out where they cannot).
        out: run folder for ``summary.json``, one CSV (and Parquet) per check, contact sheets and
            ``report.html``; None writes nothing. Its ``embeddings.npz`` is reused for unchanged files.
        checks: any of ``CHECKS`` (default: all that apply: leakage needs a split root,
            label_issues labels).
        backbone: registry name or model; ``"auto"``: see :func:`~imagerec.features.auto_backbone`.
        split: audit one split only (``"train"``, ``"val"``, ``"test"``); None: all (leakage
            needs them all).
        image_size: embedding input side (default: the backbone's, or the small-image size).
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        tta: embed each image as the mean of it and its mirror image, so that a flipped copy
            embeds like its original (near-duplicates); False halves the embedding time. Images
            are embedded whole (no centre crop): a copy that differs at its borders still shows.
        max_pixels: decompression-bomb limit per image.
        allow_outside: read CSV manifest rows whose paths lead outside the manifest's folder.
        thresholds: overrides by check: ``near_duplicates`` (cosine similarity that suffices
            alone; leakage uses it too) and ``pixel_correlation`` (of the 16 px colour thumbnails
            that confirm a weaker candidate; above 1: embeddings alone), by default 0.90 and 0.93
            for small images (at most 64 px a side, candidates from cosine 0.60) and 0.96 and 0.99
            for photos (candidates from 0.50); besides, two images that are each other's nearest
            neighbour from cosine 0.80, 0.08 above both images' second-nearest, are near-duplicates
            (``NEAR_DUPLICATE_DEFAULTS``, chosen on the development suite); ``outliers`` (cosine distance;
            None: robust z-score), ``label_issues`` (label quality; None: cleanlab's own rule),
            and the quality ones of ``QUALITY_THRESHOLDS`` (``blurry``, ``dark``...).
        k: neighbours searched per image (near-duplicates, leakage, outliers).
        export_manifest: write this CSV (``path,label``): the collection without the flagged
            images (see :meth:`AuditResult.flagged`), readable by ``imagerec train`` and ``cluster``.
        relabel: in that manifest, keep label issues with their suggested labels.
        random_state: seed of the label probe's folds.
        progress: show progress bars.

    Returns:
        An :class:`AuditResult`.

    Raises:
        ImagerecError: bad arguments (before any work), no readable image, a locked run folder.
    """
    # 1. validate before any work
    checks = _check_checks(checks)
    thresholds = _check_thresholds(thresholds)
    if k < 1:
        raise ImagerecError(f"k={k} must be at least 1 neighbour; try the default {NEAR_DUPLICATE_K}")
    run_dir = Path(out) if out is not None else None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise ImagerecError(f"out={run_dir}: is a file; give a folder for the audit run")
    if export_manifest is not None and not str(export_manifest).lower().endswith(".csv"):
        raise ImagerecError(f"export_manifest={export_manifest}: must name a .csv file, e.g. clean.csv")
    options = dict(
        backbone=backbone, split=split, image_size=image_size, crop_pct=1.0, batch_size=batch_size, device=device, tta=tta,
        max_pixels=max_pixels, progress=progress,
    )  # fmt: skip
    plan = dict(checks=checks, thresholds=thresholds, k=k, random_state=random_state, progress=progress)
    if isinstance(data, Embeddings) or is_embeddings_file(data):
        check_finished(data, image_size=image_size)  # tta and the crop are the audit's defaults, left out for embeddings
        data = data if isinstance(data, Embeddings) else Embeddings.load(data)  # a damaged file fails before the run folder exists
    elif not isinstance(data, (Embeddings, ImageSource)):
        data = load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)  # a bad path fails before the run folder exists
    if run_dir is None:
        result = _audit(data, options, plan, None)
    else:
        with run_lock(run_dir, "audit run"):
            result = _audit(data, options, plan, run_dir)
    if export_manifest is not None:
        written, left_out = write_clean_manifest(result, export_manifest, relabel=relabel)
        result.summary["manifest"] = {"path": str(export_manifest), "rows": written, "left_out": left_out, "relabel": relabel}
        if run_dir is not None:
            from ._report import write_json  # noqa: PLC0415

            write_json(run_dir / "summary.json", result.summary)
    return result


def _audit(data, options: dict, plan: dict, run_dir: Path | None) -> AuditResult:
    """Steps 2 to 5 of :func:`audit` on validated arguments (under the run folder's lock)."""
    seconds, timer = {}, time.perf_counter()
    checks, t, k = plan["checks"], plan["thresholds"], plan["k"]

    # 2. the features (shared stage: one cache in the run folder), then the one decode pass
    if set(checks) <= set(PIXEL_CHECKS) and not (isinstance(data, Embeddings) or is_embeddings_file(data)):
        emb, source = _pixels_only(data, options)  # no check needs embeddings: none are computed
    else:
        if isinstance(data, Embeddings) or is_embeddings_file(data):
            options = {**options, "tta": False, "crop_pct": None}  # how they were embedded is decided
        feats = compute_features(data, cache_dir=run_dir, **options)
        emb, source = feats.embeddings, feats.source
        seconds.update(feats.seconds)
    n = len(emb)
    images = _image_table(emb)
    source = _pixel_source(source, emb)
    skipped: list[Skipped] = list(emb.skipped)
    not_run: dict[str, str] = {}
    timer = time.perf_counter()
    if source is not None:
        figures, bad, thumbs = scan_images(source, progress=plan["progress"])
        skipped += bad
        images = pd.concat([images, figures.drop(columns="pixel_hash")], axis=1)
        pixel_hash = figures["pixel_hash"]
    else:
        pixel_hash = thumbs = None
        for name in PIXEL_CHECKS:
            if name in checks:
                not_run[name] = "needs the image files; the embeddings' paths do not name readable files"
    seconds["scan"] = time.perf_counter() - timer

    # 3. the checks
    timer = time.perf_counter()
    x = l2_normalize(np.ascontiguousarray(emb.features, dtype=np.float32))
    if n > EXACT_SEARCH_MAX and x.shape[1] > 128:
        x = prepare_features(x, pca_dim=128)  # a million rows of 1,280 floats do not fit; cosines stay close
    split = images["split"].to_numpy().astype(str)
    area = (images["width"] * images["height"]).to_numpy() if "width" in images else np.ones(n)
    tables: dict[str, pd.DataFrame] = {}
    exact = exact_groups(pixel_hash) if pixel_hash is not None else np.full(n, -1)
    if "exact_duplicates" in checks and pixel_hash is not None:
        tables["exact_duplicates"] = group_table(exact, None, area, split, "exact")
    wants_knn = {"near_duplicates", "leakage"} & set(checks)
    if "leakage" in checks and not ({"train"} <= set(split) and ({"test", "val"} & set(split))):
        not_run["leakage"] = "needs a training split and a test or val split (a split root: DIR/train, DIR/test)"
        wants_knn.discard("leakage")
    search = None
    if wants_knn and n < 2:
        for name in wants_knn:
            not_run[name] = f"needs at least 2 images; {n} given"
    elif wants_knn:
        sims, ids, search = knn(x, k)
        kind = "small" if "width" in images and np.nanmedian(np.maximum(images["width"], images["height"])) <= SMALL_IMAGE_MAX_SIDE else "photos"
        cosine, pixel, floor, mutual, margin = NEAR_DUPLICATE_DEFAULTS[kind]
        t["near_duplicates"] = t["near_duplicates"] if t["near_duplicates"] is not None else cosine
        t["pixel_correlation"] = t["pixel_correlation"] if t["pixel_correlation"] is not None else pixel
        accept = edges(sims, ids, t["near_duplicates"], thumbs, t["pixel_correlation"], floor, mutual, margin)
        if "near_duplicates" in checks:
            tables["near_duplicates"] = group_table(near_groups(sims, ids, accept, exact), x, area, split, "near")
        if "leakage" in wants_knn:
            tables["leakage"] = leak_table(sims, ids, accept, split, exact)
    if "outliers" in checks:
        tables.update(_outliers(x, emb, t["outliers"], k, not_run))
    if "label_issues" in checks:
        tables.update(_label_issues(x, emb, t["label_issues"], plan["random_state"], not_run))
    if "quality" in checks and source is not None:
        tables["quality"] = quality_issues(images, {q: t[q] for q in QUALITY_THRESHOLDS})
    tables["unreadable"] = pd.DataFrame([(s.path, s.reason) for s in _unique(skipped)], columns=["path", "reason"])
    seconds["checks"] = time.perf_counter() - timer
    tables = {name: _with_paths(table, images) for name, table in tables.items()}

    # 4. the summary, then 5. the run folder
    summary = _summary(emb, images, tables, t, not_run, search, k, options, seconds)
    result = AuditResult(images, tables, summary, run_dir, x)
    if run_dir is not None:
        from ._report import write_run  # noqa: PLC0415 - pictures only when writing a run

        timer = time.perf_counter()
        write_run(result, source)
        seconds["report"] = time.perf_counter() - timer
        summary["seconds"] = {key: round(v, 3) for key, v in seconds.items()}
        from ._report import write_json  # noqa: PLC0415

        write_json(run_dir / "summary.json", summary)
    return result


def _check_checks(checks) -> tuple[str, ...]:
    if checks is None:
        return CHECKS
    if isinstance(checks, str):
        checks = [c.strip() for c in checks.split(",") if c.strip()]
    chosen = tuple(c.replace("-", "_") for c in checks)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown or not chosen:
        raise ImagerecError(f"checks={list(checks)!r}: {unknown or 'none given'} not among {', '.join(CHECKS)}; pick from those")
    return chosen


def _check_thresholds(thresholds) -> dict:
    given = {key.replace("-", "_"): value for key, value in dict(thresholds or {}).items()}
    unknown = sorted(set(given) - set(THRESHOLD_NAMES))
    if unknown:
        raise ImagerecError(f"thresholds {unknown}: unknown; the checks with thresholds are {', '.join(THRESHOLD_NAMES)}")
    for key, value in given.items():
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise ImagerecError(f"{key} threshold={value!r} must be a number >= 0 (or None for the default)")
    if given.get("near_duplicates") is not None and not 0 < given["near_duplicates"] <= 1:  # cosine
        raise ImagerecError(
            f"near_duplicates threshold={given['near_duplicates']} is a cosine similarity and must be in (0, 1]; "
            f"try {NEAR_DUPLICATE_THRESHOLD}"
        )
    defaults = {"near_duplicates": None, "pixel_correlation": None, "outliers": None, "label_issues": None, **QUALITY_THRESHOLDS}
    return {**defaults, **{key: v for key, v in given.items() if v is not None}}


def _split_of(path: str) -> str:
    """``train``/``val``/``test`` from a path's folders (``DIR/test/cat/1.jpg``) or CIFAR batch
    name (``test_batch#5``); ``""`` when it names none."""
    name = path.rsplit("#", 1)[0] if "#" in path else path
    base = os.path.basename(name)
    if "#" in path and base.startswith(("test_batch", "data_batch")):
        return "test" if base.startswith("test_batch") else "train"
    for part in reversed(Path(name).parent.parts[-3:]):
        if part.lower() in _SPLIT_NAMES:
            return _SPLIT_NAMES[part.lower()]
    return ""


def _image_table(emb: Embeddings) -> pd.DataFrame:
    labels = [emb.classes[i] for i in emb.labels] if emb.labels is not None else [None] * len(emb)
    return pd.DataFrame({"index": np.arange(len(emb)), "path": emb.paths, "split": [_split_of(p) for p in emb.paths], "label": labels})


def _pixel_source(source: ImageSource | None, emb: Embeddings) -> ImageSource | None:
    """The images in the order of the embeddings' rows, or None when they cannot be read."""
    if source is not None:
        position = {p: i for i, p in enumerate(source.paths)}
        return source.subset([position[p] for p in emb.paths])
    if all(os.path.isfile(p) for p in emb.paths):
        return ImageSource(list(emb.paths), emb.labels, emb.classes, "embeddings")
    return None


def _pixels_only(data, options: dict) -> tuple[Embeddings, ImageSource]:
    """The images without embedding them: an Embeddings with no features, for the row table."""
    source = data if isinstance(data, ImageSource) else load_images(data, options["split"], max_pixels=options["max_pixels"])
    source = decode_small_images(source, progress=options["progress"]) or source
    empty = Embeddings(np.zeros((len(source), 0), np.float32), list(source.paths), source.labels, source.classes,
                       "none (pixel checks only)", Preprocessing(32, (0.5,) * 3, (0.5,) * 3))  # fmt: skip
    empty.skipped = list(source.skipped)
    return empty, source


def _outliers(x: np.ndarray, emb: Embeddings, threshold, k: int, not_run: dict) -> dict:
    from ._outliers import find_outliers  # noqa: PLC0415

    if len(x) < 3:
        not_run["outliers"] = f"needs at least 3 images; {len(x)} given"
        return {}
    return {"outliers": find_outliers(x, emb.labels, threshold=threshold, k=k)}


def _label_issues(x: np.ndarray, emb: Embeddings, threshold, random_state: int, not_run: dict) -> dict:
    from ._labels import find_label_issues  # noqa: PLC0415

    if emb.labels is None:
        not_run["label_issues"] = "needs labelled images (class folders or a manifest with labels)"
        return {}
    counts = np.bincount(emb.labels, minlength=len(emb.classes))
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < 2:
        not_run["label_issues"] = "needs at least 2 classes with at least 2 images each"
        return {}
    return {"label_issues": find_label_issues(x, emb.labels, list(emb.classes), threshold=threshold, random_state=random_state)}


def _unique(skipped: list[Skipped]) -> list[Skipped]:
    seen, out = set(), []
    for s in skipped:
        if s.path not in seen:
            seen.add(s.path)
            out.append(s)
    return out


def _with_paths(table: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Add ``path`` (and ``train_path`` for leaks) beside the row indices, keeping attrs."""
    if "index" not in table or "path" in table:
        return table
    attrs = dict(table.attrs)
    paths = images["path"].to_numpy()
    table = table.copy()
    table.insert(int(list(table.columns).index("index")) + 1, "path", paths[table["index"].to_numpy(dtype=np.int64)] if len(table) else [])
    if "train_index" in table:
        table["train_path"] = paths[table["train_index"].to_numpy(dtype=np.int64)] if len(table) else []
    table.attrs.update(attrs)
    return table


def _summary(emb, images, tables, t, not_run, search, k, options, seconds) -> dict:
    counts = {}
    for name, table in tables.items():
        if name in ("exact_duplicates", "near_duplicates"):
            counts[name] = {"groups": int(table["group"].nunique()) if len(table) else 0,
                            "images": int(len(table)), "to_remove": int((~table["keep"]).sum()) if len(table) else 0}  # fmt: skip
        elif name == "outliers":
            counts[name] = {"outliers": int(table["is_outlier"].sum())}
            if "is_class_outlier" in table:
                counts[name]["class_outliers"] = int(table["is_class_outlier"].sum())
        elif name == "label_issues":
            counts[name] = {"issues": int(table["is_issue"].sum())}
        elif name == "quality":
            counts[name] = {issue: int((table["issue"] == issue).sum()) for issue in QUALITY_THRESHOLDS}
        else:
            counts[name] = {"rows": int(len(table))}
    used = dict(t)
    for name in ("outliers", "label_issues"):
        if name in tables and tables[name].attrs.get("threshold") is not None:
            used[name] = float(tables[name].attrs["threshold"])
    splits = images["split"].value_counts().to_dict()
    return {
        "n_images": int(len(emb)),
        "n_unreadable": int(len(tables["unreadable"])),
        "splits": {key or "(none)": int(v) for key, v in splits.items()},
        "classes": list(emb.classes) if emb.classes is not None else None,
        "counts": counts,
        "thresholds": used,
        "not_run": not_run,
        "features": {"backbone": emb.backbone, "input_size": emb.preprocessing.input_size, "dim": int(emb.features.shape[1]),
                     "tta": emb.backbone.endswith("+flip"), "neighbours": k, "search": search},  # fmt: skip
        "seconds": {key: round(v, 3) for key, v in seconds.items()},
        "imagerec_version": __version__,
    }


def write_clean_manifest(result: AuditResult, path: str | os.PathLike, *, relabel: bool = False) -> tuple[int, int]:
    """Write ``path,label`` rows for the images the audit did not flag (see :meth:`AuditResult.flagged`).

    Args:
        result: an audit's result.
        path: the CSV to write (atomically).
        relabel: keep label issues, with their suggested label.

    Returns:
        (rows written, images left out: flagged, or rows of an array a manifest cannot name).

    Raises:
        ImagerecError: no image could be listed.
    """
    images = result.images
    drop = set(result.flagged(relabel).tolist())
    labels = images["label"].tolist()
    t = result.tables.get("label_issues")
    if relabel and t is not None and len(t):
        for i, suggested in t.loc[t["is_issue"], ["index", "suggested_label"]].itertuples(index=False):
            labels[int(i)] = suggested
    rows = [(p, labels[i]) for i, p in enumerate(images["path"]) if i not in drop and os.path.isfile(p)]
    if not rows:
        raise ImagerecError(
            f"{path}: no image could be listed (all flagged, or images held in arrays such as the CIFAR batches); "
            "audit image files, or raise the thresholds"
        )
    written = write_manifest(path, rows, labelled=bool(images["label"].notna().any()))
    print(f"imagerec: wrote {path}: {written:,} images ({len(images) - written:,} left out)", file=sys.stderr)
    return written, len(images) - written
