"""``imagerec predict``: the top-k classes of new images, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import os
import warnings

import numpy as np

from .classifier import Classifier, as_source
from .errors import SkippedImagesWarning


def predict_top_k(checkpoint: str | os.PathLike, images, *, top_k: int = 3, tta: bool = False, device: str = "cpu") -> list[dict]:
    """Predict ``images`` (files, folders, globs) with a checkpoint.

    Returns:
        One dict per image: ``path``, ``top`` (list of (class, probability), best first) and
        ``error`` (the reason an unreadable image was skipped, else None).
    """
    clf = Classifier.load(checkpoint, device=device)
    source = as_source(images)
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
    return rows


def format_predictions(rows: list[dict], fmt: str = "table") -> str:
    """Render :func:`predict_top_k` rows as ``table``, ``csv`` or ``json`` text."""
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
