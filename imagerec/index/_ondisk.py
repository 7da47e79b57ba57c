"""An index that does not need its vectors in RAM: FAISS IVF-PQ, inverted lists on disk, exact re-ranking.

Past ``exact_max`` vectors :func:`~imagerec.build_index` writes this kind (``"ivfpq"``):

1. **One pass over the data**, a block at a time: the L2-normalised vectors are appended to
   ``vectors-B.f16`` (float16 rows, memory-mapped when searching), the items to ``items-B.csv``
   (path, label, identity) with each row's byte offset in ``items-B.offsets`` (so one row is read
   without reading the rest), and a 64-bit hash of each path is kept to refuse repeats.
2. **Train** an IVF-PQ index (``faiss.index_factory``: optionally PCA or OPQ first, an HNSW coarse
   quantizer, product-quantised residuals) on a sample drawn uniformly across all the vectors
   (rows of the float16 file, so across every part).
3. **Add** the vectors a block at a time, each block's codes written to ``blocks-B/block-NNNNN.faiss``,
   then merge every block's inverted lists into one on-disk file (FAISS ``OnDiskInvertedLists``,
   merged as ``faiss.contrib.ondisk.merge_ondisk`` does): ``lists-G.ivfdata``, named by
   ``index-G.faiss``; the block files are deleted once the new generation is committed.
4. **Search**: the IVF-PQ codes give ``rerank`` candidates per query; their float16 vectors are
   read from the memory-mapped file and the candidates re-ranked by exact cosine.

Peak memory is one block (``BLOCK_ROWS`` vectors), the training sample, the coarse centroids and
the path hashes (8 bytes a vector); the inverted lists, the vectors and the items stay on disk.

``--add`` appends to the float16 and items files, writes the new vectors' block of codes, and
merges the index's current lists with it into a new generation; ``meta.json`` (the commit
point) records how many rows are valid, so a killed build or add leaves the previous index
whole: rows past the count and files no committed meta names are discarded by the next write.

Why FAISS's own on-disk lists rather than autofaiss or LanceDB: FAISS is already the index
engine here (no new dependency; the same ``index_factory`` strings people tune elsewhere), and
``merge_ondisk`` is its documented route for billion-scale indexes. autofaiss wraps the same
FAISS (choosing the factory string within a memory budget) but brings its own readers and
pins, and does not re-rank; LanceDB does IVF-PQ with refinement on disk very well, but as a
second vector engine with its own table format (pylance, pyarrow) beside FAISS.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import mmap
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .._identity import file_identity
from ..errors import ImagerecError

BLOCK_ROWS = 250_000  # vectors held in RAM at once while building (float32: 256 MB at 256 dims)
CODE_BLOCK_ROWS = 2_000_000  # vectors per block file of codes (one more block per --add)
TRAIN_PER_LIST = 32  # k-means sample per inverted list (FAISS warns below 39; 32 keeps 10M trainable on 2 cores)
PQ_TRAIN_MAX = 65_536  # FAISS trains the product quantizer on at most 256 x 256 vectors anyway
NPROBE = 32  # inverted lists visited per query
RERANK = 200  # IVF-PQ candidates per query re-ranked by exact cosine (at least top_k)
PCA_ABOVE = 256  # dims: wider vectors are reduced by PCA to this many before the coarse quantizer and PQ
SEARCH_BLOCK = 256  # queries re-ranked at once


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 2 sqrt(n) (FAISS's guide says 4 to 16 sqrt(n); 2 keeps
    training 10M on 2 cores within minutes, and re-ranking 200 candidates recovers the recall)."""
    return max(1, min(int(round(2 * math.sqrt(n))), n // TRAIN_PER_LIST or 1))


def factory_for(dim: int, n: int, transform: str = "auto", pq_bytes: int | None = None) -> tuple[str, int, int]:
    """The ``faiss.index_factory`` string for ``n`` vectors of ``dim``: (string, nlist, PQ bytes).

    Args:
        dim: the vectors' dimension.
        n: how many (sets the number of inverted lists).
        transform: ``"auto"`` (PCA to 256 dims when wider), ``"pca"``, ``"opq"`` or ``"none"``.
        pq_bytes: bytes per PQ code (default: one per 8 dims after the transform, at least 8).

    Raises:
        ImagerecError: an unknown transform, or PQ bytes that do not divide the dimension.
    """
    if transform not in ("auto", "pca", "opq", "none"):
        raise ImagerecError(f"transform={transform!r} is not one of auto, pca, opq, none; auto reduces by PCA above {PCA_ABOVE} dims")
    reduced = min(dim, PCA_ABOVE) if transform in ("auto", "pca", "opq") else dim
    m = pq_bytes or max(8, reduced // 8)
    if reduced % m:
        raise ImagerecError(f"pq_bytes={m} must divide the {reduced} dims the codes quantise; try {max(8, reduced // 8)}")
    nlist = nlist_for(n)
    pre = ""
    if transform == "opq":
        pre = f"OPQ{m}_{reduced},"
    elif reduced < dim:
        pre = f"PCA{reduced},"
    return f"{pre}IVF{nlist}_HNSW32,PQ{m}x8np", nlist, m  # np: no polysemous training (minutes, for codes only re-ranked)


class LazyItems:
    """The items of an on-disk index, read a row at a time from ``items-B.csv`` by byte offset.

    ``paths`` and ``labels`` (None when unlabelled) and ``identities`` index like lists.
    """

    def __init__(self, csv_file: Path, offsets_file: Path, count: int, size: int, labelled: bool):
        self.csv_file, self.count, self.size = csv_file, count, size
        self.offsets = np.memmap(offsets_file, dtype=np.int64, mode="r", shape=(count,)) if count else np.zeros(0, np.int64)
        self.paths, self.identities = _Column(self, 0), _Column(self, 2)
        self.labels = _Column(self, 1) if labelled else None

    def __len__(self) -> int:
        return self.count

    def rows(self, ids: Iterable[int]) -> list[list[str]]:
        """``[path, label, identity]`` of each row in ``ids``."""
        out = []
        with open(self.csv_file, "rb") as f:
            for i in ids:
                start = int(self.offsets[i])
                end = int(self.offsets[i + 1]) if i + 1 < self.count else self.size
                f.seek(start)
                text = f.read(end - start).decode("utf-8", "surrogateescape")
                out.append(next(csv.reader(io.StringIO(text))))
        return out

    def take(self, ids) -> tuple[list[str], list[str] | None]:
        rows = self.rows(ids)
        return [r[0] for r in rows], ([r[1] for r in rows] if self.labels is not None else None)

    def iter_blocks(self, block: int = 100_000) -> Iterator[list[list[str]]]:
        """Every row in order, ``block`` rows at a time."""
        with open(self.csv_file, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            next(reader)  # the header
            rows: list[list[str]] = []
            for n, row in enumerate(reader):
                if n >= self.count:
                    break
                rows.append(row)
                if len(rows) == block:
                    yield rows
                    rows = []
            if rows:
                yield rows


class _Column:
    def __init__(self, items: LazyItems, column: int):
        self.items, self.column = items, column

    def __len__(self) -> int:
        return self.items.count

    def __getitem__(self, i: int) -> str:
        return self.items.rows([int(i)])[0][self.column]

    def __iter__(self):
        for rows in self.items.iter_blocks():
            yield from (r[self.column] for r in rows)


class _Writer:
    """Appends vectors and items of one build (``B``) to their files; ``commit`` gives the meta keys."""

    def __init__(self, folder: Path, build: int, dim: int, meta: dict | None = None):
        self.folder, self.dim = folder, dim
        if meta is None:  # a new build: new files
            self.names = {"vectors": f"vectors-{build}.f16", "items": f"items-{build}.csv", "offsets": f"items-{build}.offsets",
                          "blocks_dir": f"blocks-{build}"}  # fmt: skip
            self.count, self.labelled = 0, False
            for name in ("vectors", "items", "offsets"):
                (folder / self.names[name]).unlink(missing_ok=True)
            shutil.rmtree(folder / self.names["blocks_dir"], ignore_errors=True)
            (folder / self.names["items"]).write_bytes(b"path,label,identity\r\n")
        else:  # --add: drop what a killed write left past the committed rows, then append
            self.names = {key: meta[key] for key in ("vectors", "items", "offsets", "blocks_dir")}
            self.count, self.labelled = meta["count"], meta["labelled"]
            os.truncate(folder / self.names["vectors"], self.count * dim * 2)
            os.truncate(folder / self.names["offsets"], self.count * 8)
            os.truncate(folder / self.names["items"], meta["items_bytes"])
        (folder / self.names["blocks_dir"]).mkdir(exist_ok=True)
        self.vectors = open(folder / self.names["vectors"], "ab")
        self.items = open(folder / self.names["items"], "ab")
        self.offsets = open(folder / self.names["offsets"], "ab")
        self.hashes: list[np.ndarray] = []

    def append(self, features: np.ndarray, paths: list[str], labels: list[str] | None, identities: list[str] | None = None) -> None:
        from ._store import l2_normalize  # noqa: PLC0415

        if features.shape[1] != self.dim:
            raise ImagerecError(f"vectors of {features.shape[1]} dims for an index of {self.dim}; embed every part with the same backbone")
        self.vectors.write(l2_normalize(features).astype(np.float16).tobytes())
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        lines = []
        for n, path in enumerate(paths):
            buffer.seek(0)
            buffer.truncate()
            identity = identities[n] if identities is not None else file_identity(path)
            writer.writerow([path, labels[n] if labels is not None else "", identity])
            lines.append(buffer.getvalue().encode("utf-8", "surrogateescape"))
        lengths = np.fromiter((len(b) for b in lines), np.int64, len(lines))
        self.offsets.write((self.items.tell() + np.cumsum(lengths) - lengths).astype(np.int64).tobytes())
        self.items.write(b"".join(lines))
        self.hashes.append(path_hashes(paths))
        self.labelled = self.labelled or labels is not None
        self.count += len(paths)

    def close(self) -> dict:
        for f in (self.vectors, self.items, self.offsets):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {**self.names, "count": self.count, "labelled": self.labelled,
                "items_bytes": (self.folder / self.names["items"]).stat().st_size}  # fmt: skip

    def new_hashes(self) -> np.ndarray:
        return np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64)


def path_hashes(paths: list[str]) -> np.ndarray:
    """64-bit BLAKE2 hash of each path: repeats are found in 8 bytes a vector, not a set of strings."""
    return np.asarray(
        [int.from_bytes(hashlib.blake2b(os.fsencode(p), digest_size=8).digest(), "little") for p in paths], dtype=np.uint64
    )


def vectors_of(folder: Path, meta: dict) -> np.ndarray:
    """The index's float16 vectors (count, dim), memory-mapped read-only."""
    if not meta["count"]:
        return np.zeros((0, meta["dim"]), np.float16)
    return np.memmap(folder / meta["vectors"], dtype=np.float16, mode="r", shape=(meta["count"], meta["dim"]))


Blocks = Iterable[tuple]  # (features float (b, D), absolute paths, label names or None[, file identities or None])


def release(vectors: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped file this process has read (the page cache keeps them):
    reading every row once would otherwise count the whole file in the process's resident memory."""
    mapped = getattr(vectors, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_DONTNEED)


def build(folder: Path, blocks: Blocks, dim: int, meta: dict, *,
          transform: str = "auto", pq_bytes: int | None = None, seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """Write a new on-disk IVF-PQ index of ``blocks`` into ``folder`` (the caller holds its lock).

    Args:
        folder: the index folder.
        blocks: (features float (b, dim), absolute paths, label names or None[, identities]) of every
            vector, in order; identities default to the files' now.
        dim: the vectors' dimension.
        meta: the index's meta so far (backbone, preprocessing, exact_max...).
        transform, pq_bytes: see :func:`factory_for`.
        seed: of the training sample.
        progress: say each step on stderr.

    Returns:
        The committed meta.

    Raises:
        ImagerecError: a path given twice, or vectors of another dimension.
    """
    from ._store import next_generation  # noqa: PLC0415

    g = next_generation(folder)
    writer = _Writer(folder, g, dim)
    for block in blocks:  # 1. one pass: vectors, items, path hashes
        writer.append(np.asarray(block[0], dtype=np.float32), *block[1:])
        _say(progress, f"read {writer.count:,} vectors")
    hashes = writer.new_hashes()
    names = writer.close()
    _refuse_repeats(hashes, folder, names)
    n = names["count"]
    if n == 0:
        raise ImagerecError("no vectors to index; give embeddings with at least one row")
    meta = {**meta, **names, "dim": dim, "kind": "ivfpq", "build": g}
    vectors = vectors_of(folder, meta)

    # 2. train on a sample drawn across every vector
    factory, nlist, m = factory_for(dim, n, transform, pq_bytes)
    import faiss  # noqa: PLC0415

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10  # coarse cells suffice: the candidates are re-ranked exactly
    size = min(n, max(TRAIN_PER_LIST * nlist, PQ_TRAIN_MAX))
    sample = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    _say(progress, f"training {factory} on {size:,} of {n:,} vectors")
    index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    release(vectors)
    trained = f"trained-{g}.faiss"
    faiss.write_index(index, str(folder / trained))
    meta.update({"faiss_index": factory, "nlist": nlist, "pq_bytes": m, "nprobe": min(NPROBE, nlist), "rerank": RERANK,
                 "trained": trained, "train_rows": int(size)})  # fmt: skip

    # 3. add, a block of codes at a time, then merge the lists into one file on disk
    return _merge_and_commit(folder, meta, g, _add_blocks(folder, meta, 0, n, progress), progress)


def add(folder: Path, meta: dict, blocks: Blocks, known: np.ndarray,
        progress: bool = False) -> dict:  # fmt: skip
    """Append ``blocks`` to an on-disk index (the caller holds its lock and has checked the model).

    ``known``: the path hashes already indexed (:func:`indexed_hashes`), to refuse repeats.

    Returns:
        The committed meta.
    """
    from ._store import next_generation  # noqa: PLC0415

    start = meta["count"]
    writer = _Writer(folder, meta["build"], meta["dim"], meta)
    for block in blocks:
        writer.append(np.asarray(block[0], dtype=np.float32), *block[1:])
    hashes = writer.new_hashes()
    names = writer.close()
    if len(np.intersect1d(hashes, known)) or len(np.unique(hashes)) < len(hashes):
        raise ImagerecError("an added image is already in the index or listed twice; remove the repeat from the data")
    meta = {**meta, **names}
    blocks = _add_blocks(folder, meta, start, meta["count"], progress)
    return _merge_and_commit(folder, meta, next_generation(folder), blocks, progress, merged=f"index-{meta['generation']}.faiss")


def indexed_hashes(folder: Path, meta: dict) -> np.ndarray:
    """The path hashes of every indexed row, read from the items file a block at a time."""
    items = read_items(folder, meta)
    return np.concatenate([path_hashes([r[0] for r in rows]) for rows in items.iter_blocks()] or [np.zeros(0, np.uint64)])


def _add_blocks(folder: Path, meta: dict, start: int, stop: int, progress: bool) -> list[str]:
    import faiss  # noqa: PLC0415

    vectors = vectors_of(folder, meta)
    written = []
    for first in range(start, stop, CODE_BLOCK_ROWS):
        last = min(stop, first + CODE_BLOCK_ROWS)
        index = faiss.read_index(str(folder / meta["trained"]))
        for s in range(first, last, BLOCK_ROWS):
            e = min(last, s + BLOCK_ROWS)
            index.add_with_ids(np.ascontiguousarray(vectors[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
            release(vectors)
            _say(progress, f"added {e:,} of {stop:,} vectors")
        name = f"{meta['blocks_dir']}/block-{first:012d}.faiss"
        faiss.write_index(index, str(folder / name))
        written.append(name)
        del index
    return written


def _merge_and_commit(folder: Path, meta: dict, g: int, blocks: list[str], progress: bool, merged: str | None = None) -> dict:
    """Merge the lists of ``blocks`` (and of the ``merged`` index already on disk, for --add) into
    ``lists-G.ivfdata``, write ``index-G.faiss``, commit; the block files are deleted with the commit."""
    import faiss  # noqa: PLC0415

    from ._store import commit  # noqa: PLC0415

    sources = []  # (index kept alive while its lists are read)
    with _quiet_stdout():
        if merged is not None:
            sources.append(faiss.read_index(str(folder / merged), faiss.IO_FLAG_ONDISK_SAME_DIR))
        sources += [faiss.read_index(str(folder / b), faiss.IO_FLAG_MMAP) for b in blocks]
    lists = folder / f"lists-{g}.ivfdata"
    lists.unlink(missing_ok=True)
    _say(progress, f"merging {len(sources)} set(s) of inverted lists into {lists.name}")
    index = faiss.read_index(str(folder / meta["trained"]))
    ivf = faiss.extract_index_ivf(index)
    target = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists))
    inputs = faiss.InvertedListsPtrVector()
    for source in sources:
        inputs.push_back(faiss.extract_index_ivf(source).invlists)
    with _quiet_stdout():  # FAISS prints each time it grows the file
        total = target.merge_from_multiple(inputs.data(), inputs.size(), False)  # as faiss.contrib.ondisk.merge_ondisk does
    index.ntotal = ivf.ntotal = total
    ivf.replace_invlists(target, True)
    target.this.disown()
    faiss.write_index(index, str(folder / f"index-{g}.faiss"))
    del index, sources
    meta = {**meta, "lists": lists.name}
    meta.pop("blocks", None)
    return commit(folder, meta, g, count=meta["count"], dim=meta["dim"], labelled=meta["labelled"])


def read(folder: Path, meta: dict):
    """(faiss index with its lists mapped from disk, float16 vectors, lazy items) of an on-disk index."""
    import faiss  # noqa: PLC0415

    try:
        with _quiet_stdout():  # FAISS prints where it found the lists file
            index = faiss.read_index(str(folder / f"index-{meta['generation']}.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as e:
        raise ImagerecError(f"{folder}: index files of generation {meta['generation']} are unreadable ({e}); rebuild the index") from None
    if index.ntotal != meta["count"]:
        raise ImagerecError(f"{folder}: the index holds {index.ntotal:,} vectors but meta says {meta['count']:,}; rebuild it")
    set_nprobe(index, int(meta.get("nprobe", NPROBE)))
    return index, vectors_of(folder, meta), read_items(folder, meta)


def read_items(folder: Path, meta: dict) -> LazyItems:
    return LazyItems(folder / meta["items"], folder / meta["offsets"], meta["count"], meta["items_bytes"], meta["labelled"])


def set_nprobe(index, nprobe: int) -> None:
    """Lists visited per query, and the HNSW coarse quantizer's breadth to match."""
    import faiss  # noqa: PLC0415

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(64, 2 * nprobe)


def search(index, vectors: np.ndarray, queries: np.ndarray, k: int, rerank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of each query (L2-normalised float32 (Q, D)): IVF-PQ candidates re-ranked by exact cosine.

    Returns:
        (scores float32 (Q, k), ids int64 (Q, k)); -1 ids (score -inf) where fewer than k were found.
    """
    candidates = max(k, rerank)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(queries), SEARCH_BLOCK):
        q = queries[s : s + SEARCH_BLOCK]
        _, found = index.search(q, candidates)
        sims = exact_scores(vectors, q, found)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores[s : s + len(q), : order.shape[1]] = np.take_along_axis(sims, order, axis=1)
        ids[s : s + len(q), : order.shape[1]] = np.where(np.isfinite(np.take_along_axis(sims, order, axis=1)),
                                                         np.take_along_axis(found, order, axis=1), -1)  # fmt: skip
    return scores, ids


def exact_scores(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Cosine of each query (Q, D) with its candidate rows ``ids`` (Q, C) of the float16 ``vectors``; -inf for -1."""
    valid = ids >= 0
    flat = np.where(valid, ids, 0).ravel()
    order = np.argsort(flat, kind="stable")  # read the memory-mapped rows in file order
    rows = np.empty((len(flat), vectors.shape[1]), np.float32)
    rows[order] = vectors[flat[order]]
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)  # unit length again after float16 rounding
    sims = np.einsum("qcd,qd->qc", rows.reshape(*ids.shape, -1), queries, optimize=True)
    return np.where(valid, sims, -np.inf).astype(np.float32)


def files_of(meta: dict) -> set[str]:
    """The files (relative to the folder) a committed on-disk meta names."""
    names = {meta[k] for k in ("vectors", "items", "offsets", "trained", "lists")}
    return names | {f"index-{meta['generation']}.faiss"}


def remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete the index files of ``folder`` (any kind, any generation) not in ``keep`` (relative names)."""
    pattern = re.compile(r"(index-\d+\.faiss|items-\d+\.(csv|offsets)|vectors-\d+\.f16|trained-\d+\.faiss|lists-\d+\.ivfdata)")
    for f in folder.iterdir():
        if f.is_file() and pattern.fullmatch(f.name) and f.name not in keep:
            f.unlink(missing_ok=True)
        elif f.is_dir() and re.fullmatch(r"blocks-\d+", f.name):
            if not any(k.startswith(f"{f.name}/") for k in keep):
                shutil.rmtree(f, ignore_errors=True)
            else:
                for block in f.iterdir():
                    if f"{f.name}/{block.name}" not in keep:
                        block.unlink(missing_ok=True)


def _refuse_repeats(hashes: np.ndarray, folder: Path, names: dict) -> None:
    values, counts = np.unique(hashes, return_counts=True)
    if (counts > 1).any():
        first = int(np.flatnonzero(np.isin(hashes, values[counts > 1]))[0])  # in the data's order
        items = LazyItems(folder / names["items"], folder / names["offsets"], names["count"], names["items_bytes"], False)
        path = items.paths[first]
        raise ImagerecError(f"{path} is listed twice; an index holds each image once: remove the repeat from the data (or the part that repeats it)")


def part_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(rows, dims) of an embeddings ``.npz`` from its header, without reading the features."""
    try:
        with zipfile.ZipFile(path) as z, z.open("features.npy") as f:
            version = np.lib.format.read_magic(f)
            shape = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)[0]
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as e:
        raise ImagerecError(f"{path}: not an imagerec embeddings file ({e}); make it again with 'imagerec embed'") from None
    if len(shape) != 2:
        raise ImagerecError(f"{path}: features of shape {shape} are not an (N, D) array; make it again with 'imagerec embed'")
    return int(shape[0]), int(shape[1])


@contextlib.contextmanager
def _quiet_stdout():
    """Silence what FAISS's C++ prints on file descriptor 1 (it would corrupt ``--format json`` output)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_STARTED = time.perf_counter()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"imagerec index: {message} ({time.perf_counter() - _STARTED:.1f} s)", file=sys.stderr, flush=True)

