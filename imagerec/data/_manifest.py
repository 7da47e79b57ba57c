"""CSV manifests that imagerec writes, and the folders each one may read.

A manifest read from anywhere may only name images inside its own folder (see
:func:`imagerec.data.load_images`): a manifest from someone else must not make imagerec read
``/etc`` or ``~/.ssh``. A manifest that imagerec itself wrote (``cluster --export-manifest``,
``audit --export-manifest``, the studio's export) names the user's images wherever they are, so
:func:`write_manifest` also records, in imagerec's home folder, the folders that manifest lists.
Reading it later accepts rows in those folders without ``--allow-outside``, after the user has
renamed its labels or removed rows; a row added in another folder is still refused. The record is
keyed by the manifest's real path: a manifest copied or moved elsewhere is an ordinary one again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Iterable

from .._decode import display_path
from .._home import cache_dir
from .._io import write_text_atomic


def write_manifest(path: str | os.PathLike, rows: Iterable[tuple[str, str | None]], *, labelled: bool = True) -> int:
    """Write a ``path,label`` CSV manifest atomically, and trust the folders it names.

    Args:
        path: the CSV file to write.
        rows: (image path, label) pairs; the label is ignored when ``labelled`` is False.
        labelled: write the label column.

    Returns:
        The number of rows written. Images whose names are not UTF-8 cannot be written into a
        UTF-8 CSV: they are left out and named on stderr.
    """
    text, folders, written, unwritable = _csv(rows, labelled)
    write_text_atomic(path, text)
    _record(Path(path), folders)
    if unwritable:
        print(
            f"imagerec: {path}: left out {len(unwritable)} image(s) whose names are not UTF-8 (a CSV manifest "
            f"cannot hold them; rename them): {', '.join(unwritable[:5])}",
            file=sys.stderr,
        )
    return written


def manifest_csv(rows: Iterable[tuple[str, str | None]], *, labelled: bool = True) -> str:
    """The text :func:`write_manifest` writes (absolute paths; names that are not UTF-8 left out),
    for a manifest sent rather than saved (a download)."""
    return _csv(rows, labelled)[0]


def _csv(rows, labelled: bool) -> tuple[str, set[str], int, list[str]]:
    """(CSV text, folders named, rows written, display names of the rows left out)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"] if labelled else ["path"])
    folders, written, unwritable = set(), 0, []
    for image, label in rows:
        image = os.path.abspath(image)
        try:
            image.encode("utf-8")
        except UnicodeEncodeError:
            unwritable.append(display_path(image))
            continue
        writer.writerow([image, label] if labelled else [image])
        folders.add(os.path.dirname(image))
        written += 1
    return buf.getvalue(), folders, written, unwritable


def trusted_folders(path: str | os.PathLike) -> frozenset[str]:
    """The folders that imagerec recorded when it wrote the manifest at ``path`` (empty if none)."""
    real = os.path.realpath(path)
    try:
        data = json.loads(_record_file(real).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return frozenset()
    if not isinstance(data, dict) or data.get("manifest") != real or not isinstance(data.get("folders"), list):
        return frozenset()
    return frozenset(str(f) for f in data["folders"])


def _record(path: Path, folders: set[str]) -> None:
    real = os.path.realpath(path)
    write_text_atomic(_record_file(real), json.dumps({"manifest": real, "folders": sorted(folders)}))


def _record_file(real: str) -> Path:
    key = hashlib.sha256(os.fsencode(real)).hexdigest()[:32]
    return cache_dir("manifests") / f"{key}.json"
