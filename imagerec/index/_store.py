"""The INDEX_DIR folder: a FAISS index, the images it holds, and a meta JSON, written atomically.

Layout (generation ``G`` counts the writes; ``meta.json`` names the current one)::

    INDEX_DIR/meta.json         backbone, preprocessing, imagerec version, metric, kind, count...
    INDEX_DIR/index-G.faiss     the vectors (L2-normalised float32, inner product = cosine)
    INDEX_DIR/items-G.csv       path,label,identity: one row per vector, in the index's order

A write puts the new generation's files beside the old ones, then replaces ``meta.json``
atomically (the commit point), then deletes the old generation. A killed write therefore
leaves the previous index whole; its orphan files are removed by the next write.

``meta.json`` records the SHA-256 of both files; a read checks every field's type and both
checksums before FAISS parses a byte, so a damaged or swapped file is one line, never a FAISS
read of arbitrary bytes (which can ask for any amount of memory). Like a checkpoint's, the
checksums catch damage, not forgers.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._identity import file_identity
from .._io import atomic_path, file_sha256, write_text_atomic
from .._version import __version__
from ..data import Preprocessing
from ..errors import ImagerecError, ImagerecWarning

META_FILE = "meta.json"
FORMAT = 2  # 2: meta.json records the SHA-256 of the generation's two files (flat, IVF); the on-disk IVF-PQ kind
_GENERATION_FILE = re.compile(r"(index|items)-([0-9]+)\.(faiss|csv)")
EXACT_MAX = 1_000_000  # up to this many vectors the search is exact (IndexFlatIP); IVF beyond
NPROBE = 32  # IVF lists visited per query (recall@10 measured in docs/BENCHMARKS.md)
TRAIN_PER_LIST = 50  # IVF k-means training sample: this many vectors per list (FAISS wants >= 39)


@dataclass
class Items:
    """What each vector of the index is.

    Attributes:
        paths: absolute image paths (``FILE#ROW`` for images held in arrays), in index order.
        labels: class name of each image ("" when unknown), or None for an unlabelled index.
        identities: :func:`imagerec._identity.file_identity` of each file when it was indexed.
    """

    paths: list[str]
    labels: list[str] | None
    identities: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: Items) -> Items:
        labels = None
        if self.labels is not None or other.labels is not None:
            labels = (self.labels or [""] * len(self)) + (other.labels or [""] * len(other))
        return Items(self.paths + other.paths, labels, self.identities + other.identities)

    def take(self, ids) -> tuple[list[str], list[str] | None]:
        """The paths of rows ``ids``, and their labels (None for an unlabelled index)."""
        return [self.paths[i] for i in ids], (None if self.labels is None else [self.labels[i] for i in ids])

    @classmethod
    def from_embeddings(cls, paths, labels, classes) -> Items:
        """Items for embedded images; each file's identity is read now."""
        paths = [os.path.abspath(p) for p in paths]
        names = None if labels is None else [classes[int(i)] for i in labels]
        return cls(paths, names, [file_identity(p) for p in paths])


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (all-zero rows stay zero), as FAISS wants them."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def make_faiss(vectors: np.ndarray, exact_max: int = EXACT_MAX, seed: int = 0):
    """A FAISS index over L2-normalised ``vectors`` (N, D): exact up to ``exact_max``, IVF beyond.

    Returns:
        (index, description): description holds ``kind`` ("flat" or "ivf"), ``faiss_index``,
        and for IVF ``nlist`` (about 4 sqrt(N) lists, trained on a sample) and ``nprobe``.
    """
    import faiss  # noqa: PLC0415 - heavy; only the index commands need it

    n, dim = vectors.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"kind": "flat", "faiss_index": "IndexFlatIP"}
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 4))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False)
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = min(NPROBE, nlist)
    return index, {"kind": "ivf", "faiss_index": "IndexIVFFlat", "nlist": nlist, "nprobe": index.nprobe}


def all_vectors(index) -> np.ndarray:
    """Every vector of a flat index, (N, D) float32 (to rebuild it as IVF without re-embedding)."""
    return index.reconstruct_n(0, index.ntotal)


def describe(meta: dict) -> str:
    """One line: what kind of search the index does, over how many vectors, made how."""
    if meta["kind"] == "flat":
        how = "exact inner-product search (FAISS IndexFlatIP)"
    elif meta["kind"] == "ivfpq":
        how = (f"approximate IVF-PQ search on disk (FAISS {meta['faiss_index']}, {meta['nprobe']} lists probed per query, "
               f"{meta['rerank']} candidates re-ranked by exact cosine on float16 vectors)")  # fmt: skip
    else:
        how = f"approximate IVF search (FAISS IndexIVFFlat, {meta['nlist']:,} lists, {meta['nprobe']} probed per query)"
    pp = meta["preprocessing"]
    return (
        f"{how} over {meta['count']:,} vectors of {meta['dim']} dims; exact up to {meta['exact_max']:,}; "
        f"backbone {meta['backbone']} at {pp['input_size']} px"
    )


def read_meta(folder: str | os.PathLike) -> dict:
    """The meta JSON of an index folder, every field checked.

    Raises:
        ImagerecError: the folder is missing or is not an imagerec index.
    """
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        what = "no such folder" if not folder.exists() else f"not an imagerec index (no {META_FILE})"
        raise ImagerecError(f"{folder}: {what}; make one with 'imagerec index DATA --out {folder}'")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        problem = _meta_problem(meta)
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        problem = " ".join(str(e).split())
    if problem:
        raise ImagerecError(f"{path}: not an imagerec index meta file ({problem}); rebuild the index with 'imagerec index DATA --out {folder}'")
    if meta.get("format", 0) > FORMAT:
        raise ImagerecError(f"{folder}: index format {meta['format']} is newer than this imagerec's ({FORMAT}); upgrade imagerec")
    return meta


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _meta_problem(meta) -> str | None:
    """What is wrong with a parsed meta JSON, or None."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    for key, least in (("generation", 1), ("count", 0), ("dim", 1), ("exact_max", 1), ("format", 0)):
        if key in meta or key != "format":
            if not _whole(meta.get(key), least):
                return f"{key} is {meta.get(key)!r}, not a whole number >= {least}"
    if not isinstance(meta.get("backbone"), str) or not isinstance(meta.get("preprocessing"), dict):
        return "no backbone name or preprocessing"
    Preprocessing.from_dict(meta["preprocessing"])
    if meta.get("kind") not in ("flat", "ivf", "ivfpq"):
        return f"kind is {meta.get('kind')!r}, not 'flat', 'ivf' or 'ivfpq'"
    if meta["kind"] == "ivf" and not (_whole(meta.get("nlist"), 1) and _whole(meta.get("nprobe"), 1)):
        return f"an IVF index with nlist {meta.get('nlist')!r} and nprobe {meta.get('nprobe')!r}, not whole numbers >= 1"
    if not isinstance(meta.get("labelled", False), bool):
        return f"labelled is {meta['labelled']!r}, not true or false"
    sums = meta.get("sha256")
    if meta["kind"] != "ivfpq" and (meta.get("format", 0) >= 2 or sums is not None):  # the on-disk kind checks its own files
        if not (isinstance(sums, dict) and all(isinstance(sums.get(k), str) for k in ("index", "items"))):
            return f"sha256 is {sums!r}, not the checksums of the index and items files"
    return None


def _check_sums(folder: Path, meta: dict, files: dict[str, Path]) -> None:
    """Refuse files whose SHA-256 is not the one meta.json recorded (format 1 has none: a warning)."""
    sums = meta.get("sha256")
    if sums is None:
        warnings.warn(
            f"{folder}: an index written before imagerec recorded checksums; its files are read unchecked. "
            "The next 'imagerec index --add' (or a rebuild) records them",
            ImagerecWarning,
            stacklevel=3,
        )
        return
    for key, path in files.items():
        if not path.is_file():
            raise ImagerecError(f"{path}: missing from the index; rebuild the index with 'imagerec index DATA --out {folder}'")
        if file_sha256(path) != sums[key]:
            raise ImagerecError(
                f"{path}: its SHA-256 is not the one {META_FILE} recorded (the file is damaged or was replaced); "
                f"rebuild the index with 'imagerec index DATA --out {folder}'"
            )


def read(folder: str | os.PathLike) -> tuple[dict, object, Items]:
    """(meta, faiss index, items) of an index folder, checked to agree with each other.

    Raises:
        ImagerecError: not an index, or its files are missing or disagree.
    """
    import faiss  # noqa: PLC0415

    folder = Path(folder)
    meta = read_meta(folder)
    if meta["kind"] == "ivfpq":
        from . import _ondisk  # noqa: PLC0415

        index, _, items = _ondisk.read(folder, meta)
        return meta, index, items
    g = meta["generation"]
    files = {"index": folder / f"index-{g}.faiss", "items": folder / f"items-{g}.csv"}
    _check_sums(folder, meta, files)
    try:
        with open(files["index"], "rb") as f:  # a name that is not UTF-8 too (see write)
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        table = pd.read_csv(files["items"], dtype=str, keep_default_na=False)
    except (OSError, RuntimeError, ValueError) as e:
        raise ImagerecError(f"{folder}: index files of generation {g} are unreadable ({' '.join(str(e).split())[:200]}); rebuild the index") from None
    if not {"path", "label", "identity"} <= set(table.columns):
        raise ImagerecError(f"{files['items']}: not an items table (columns {list(table.columns)}, not path,label,identity); rebuild the index")
    if hasattr(index, "nprobe"):
        index.nprobe = int(meta.get("nprobe", NPROBE))
    labels = table["label"].tolist() if meta.get("labelled") else None
    items = Items(table["path"].tolist(), labels, table["identity"].tolist())
    if not index.ntotal == len(items) == meta["count"] or index.d != meta["dim"]:
        raise ImagerecError(
            f"{folder}: the index holds {index.ntotal:,} vectors of {index.d} dims but lists {len(items):,} images "
            f"(meta says {meta['count']:,} of {meta['dim']}); rebuild it with 'imagerec index'"
        )
    return meta, index, items


def next_generation(folder: str | os.PathLike) -> int:
    """The generation the next write of ``folder`` makes (1 for a new folder)."""
    return current_generation(folder) + 1


def write(folder: str | os.PathLike, index, items: Items, meta: dict) -> dict:
    """Write a new generation of an in-memory index (flat, IVF) to its folder (the caller holds its lock).

    ``meta`` needs ``backbone``, ``preprocessing`` and the keys of :func:`make_faiss`'s
    description; this fills in the rest (count, dim, generation, version...).
    """
    import faiss  # noqa: PLC0415

    folder = Path(folder)
    g = next_generation(folder)
    table = pd.DataFrame({"path": items.paths, "label": items.labels or [""] * len(items), "identity": items.identities})
    with atomic_path(folder / f"items-{g}.csv", suffix=".csv") as tmp:  # first: a name that cannot be written fails before the vectors are
        table.to_csv(tmp, index=False)
        items_sum = file_sha256(tmp)
    try:
        with atomic_path(folder / f"index-{g}.faiss", suffix=".faiss") as tmp:
            with open(tmp, "wb") as f:  # through Python's file: FAISS's own open() takes no name that is not UTF-8
                faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
            index_sum = file_sha256(tmp)
    except BaseException:
        (folder / f"items-{g}.csv").unlink(missing_ok=True)  # not committed: no orphan
        raise
    return commit(folder, {**meta, "sha256": {"index": index_sum, "items": items_sum}}, g, count=int(index.ntotal), dim=int(index.d),
                  labelled=items.labels is not None)


def commit(folder: Path, meta: dict, g: int, *, count: int, dim: int, labelled: bool) -> dict:
    """Replace ``meta.json`` with generation ``g``'s (the commit point), then delete older files."""
    from . import _ondisk  # noqa: PLC0415

    meta = {
        **meta,
        "format": FORMAT,
        "generation": g,
        "imagerec_version": __version__,
        "metric": "inner_product",
        "normalization": "l2",
        "count": count,
        "dim": dim,
        "labelled": labelled,
    }
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")  # the commit point
    keep = _ondisk.files_of(meta) if meta.get("kind") == "ivfpq" else {f"index-{g}.faiss", f"items-{g}.csv"}
    _ondisk.remove_stale(folder, keep)
    return meta


def generation_files(folder: str | os.PathLike) -> list[Path]:
    """The ``index-G.faiss`` and ``items-G.csv`` files in a folder (any generation)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if _GENERATION_FILE.fullmatch(p.name)) if folder.is_dir() else []


def current_generation(folder: str | os.PathLike) -> int:
    """The generation meta.json names, or, where it is missing or damaged (a rebuild), the highest
    generation of the files there; 0 for a new folder."""
    try:
        return read_meta(folder)["generation"]
    except ImagerecError:
        return max((int(_GENERATION_FILE.fullmatch(p.name)[2]) for p in generation_files(folder)), default=0)
