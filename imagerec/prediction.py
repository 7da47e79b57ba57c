"""``imagerec predict``: the top-k classes of new images, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import os
import warnings

import numpy as np

from ._decode import display_path, expand_paths
from .classifier import Classifier, as_source
from .data import ImageSource, Skipped, report_skipped
from .errors import SkippedImagesWarning


def predict_top_k(
    checkpoint: str | os.PathLike,
    images,
    *,
    top_k: int = 3,
    tta: bool = False,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Predict ``images`` (files, folders, globs) with a checkpoint.

    A name that exists is a file before it is a glob (``photo[1].jpg``). Unreadable images
    are rows with an ``error`` and are reported as every command reports skips: a count and
    the first few on stderr, and the full list in ``NAME.skipped.csv`` beside ``out``.

    Args:
        checkpoint: a run folder, checkpoint or exported ``.onnx`` model.
        images: file paths, folders and glob patterns (or a data set spec / ImageSource).
        top_k: classes per image.
        tta: average with the mirrored image.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        out: the file the predictions will be written to, if any (for the skipped list).

    Returns:
        One dict per image: ``path``, ``top`` (list of (class, probability), best first) and
        ``error`` (the reason an unreadable image was skipped, else None).

    Raises:
        ImagerecError: an unreadable checkpoint, or a path that does not exist.
    """
    clf = Classifier.load(checkpoint, device=device)
    source = _as_source(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)  # reported per row below
        proba = clf.predict_proba(source, tta=tta)
    reasons = {s.path: s.reason for s in clf.last_skipped_}
    rows = []
    for path, row in zip(source.paths, proba):
        if np.isnan(row).any():
            rows.append({"path": path, "top": [], "error": reasons.get(path, "unreadable")})
            continue
        best = np.argsort(-row, kind="stable")[:top_k]
        rows.append({"path": path, "top": [(clf.classes_[i], float(row[i])) for i in best], "error": None})
    report_skipped([Skipped(r["path"], r["error"]) for r in rows if r["error"]], out)
    return rows


def _as_source(images) -> ImageSource:
    """Paths expanded with an existing name taken as a file before it is read as a glob."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, (str, os.PathLike)) for i in images):
        paths = expand_paths(images)
        return ImageSource(paths, None, None, root=os.path.dirname(paths[0]) or ".")
    return as_source(images)


def format_predictions(rows: list[dict], fmt: str = "table") -> str:
    """Render :func:`predict_top_k` rows as ``table``, ``csv`` or ``json`` text.

    A file name that is not UTF-8 is shown with its odd bytes as ``\\xNN`` escapes.
    """
    rows = [{**r, "path": display_path(r["path"])} for r in rows]
    if fmt == "json":
        return json.dumps([{**r, "top": [{"class": c, "probability": p} for c, p in r["top"]]} for r in rows], indent=2) + "\n"
    k = max((len(r["top"]) for r in rows), default=0)
    header = ["path"] + [f"{kind}{i + 1}" for i in range(k) for kind in ("class", "p")] + ["error"]
    body = [[r["path"]] + [x for c, p in r["top"] for x in (c, f"{p:.4f}")] + [""] * (2 * (k - len(r["top"]))) + [r["error"] or ""] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(body)
        return buf.getvalue()
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return "".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() + "\n" for line in [header, *body])
