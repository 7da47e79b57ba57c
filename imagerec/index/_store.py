"""The INDEX_DIR folder: a FAISS index, the images it holds, and a meta JSON, written atomically.

Layout (generation ``G`` counts the writes; ``meta.json`` names the current one)::

    INDEX_DIR/meta.json         backbone, preprocessing, imagerec version, metric, kind, count...
    INDEX_DIR/index-G.faiss     the vectors (L2-normalised float32, inner product = cosine)
    INDEX_DIR/items-G.csv       path,label,identity: one row per vector, in the index's order

A write puts the new generation's files beside the old ones, then replaces ``meta.json``
atomically (the commit point), then deletes the old generation. A killed write therefore
leaves the previous index whole; its orphan files are removed by the next write.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._identity import file_identity
from .._io import atomic_path, write_text_atomic
from .._version import __version__
from ..data import Preprocessing
from ..errors import ImagerecError

META_FILE = "meta.json"
FORMAT = 2  # 2: the on-disk IVF-PQ kind; flat and IVF folders are still written as 1, readable by older versions
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
    """The meta JSON of an index folder.

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
        Preprocessing.from_dict(meta["preprocessing"])
        meta["backbone"], meta["generation"], meta["kind"], meta["count"]  # noqa: B018 - required keys
    except (ValueError, KeyError) as e:
        raise ImagerecError(f"{path}: not an imagerec index meta file ({e}); rebuild the index with 'imagerec index'") from None
    if meta.get("format", 0) > FORMAT:
        raise ImagerecError(f"{folder}: index format {meta['format']} is newer than this imagerec's ({FORMAT}); upgrade imagerec")
    return meta


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
    try:
        index = faiss.read_index(str(folder / f"index-{g}.faiss"))
        table = pd.read_csv(folder / f"items-{g}.csv", dtype=str, keep_default_na=False)
    except (OSError, RuntimeError, ValueError) as e:
        raise ImagerecError(f"{folder}: index files of generation {g} are unreadable ({e}); rebuild the index") from None
    if hasattr(index, "nprobe"):
        index.nprobe = int(meta.get("nprobe", NPROBE))
    labels = table["label"].tolist() if meta.get("labelled") else None
    items = Items(table["path"].tolist(), labels, table["identity"].tolist())
    if not index.ntotal == len(items) == meta["count"]:
        raise ImagerecError(
            f"{folder}: the index holds {index.ntotal:,} vectors but lists {len(items):,} images "
            f"(meta says {meta['count']:,}); rebuild it with 'imagerec index'"
        )
    return meta, index, items


def next_generation(folder: str | os.PathLike) -> int:
    """The generation the next write of ``folder`` makes (1 for a new folder)."""
    folder = Path(folder)
    old = (folder / META_FILE).is_file() and read_meta(folder)["generation"]
    return (old or 0) + 1


def write(folder: str | os.PathLike, index, items: Items, meta: dict) -> dict:
    """Write a new generation of an in-memory index (flat, IVF) to its folder (the caller holds its lock).

    ``meta`` needs ``backbone``, ``preprocessing`` and the keys of :func:`make_faiss`'s
    description; this fills in the rest (count, dim, generation, version...).
    """
    import faiss  # noqa: PLC0415

    folder = Path(folder)
    g = next_generation(folder)
    with atomic_path(folder / f"index-{g}.faiss", suffix=".faiss") as tmp:
        faiss.write_index(index, str(tmp))
    table = pd.DataFrame({"path": items.paths, "label": items.labels or [""] * len(items), "identity": items.identities})
    with atomic_path(folder / f"items-{g}.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    return commit(folder, meta, g, count=int(index.ntotal), dim=int(index.d), labelled=items.labels is not None)


def commit(folder: Path, meta: dict, g: int, *, count: int, dim: int, labelled: bool) -> dict:
    """Replace ``meta.json`` with generation ``g``'s (the commit point), then delete older files."""
    from . import _ondisk  # noqa: PLC0415

    meta = {
        **meta,
        "format": FORMAT if meta.get("kind") == "ivfpq" else 1,
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
