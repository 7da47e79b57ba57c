"""Near-duplicate groups and leaks across splits of an index too large for RAM, in blocks.

``audit_index(INDEX_DIR)`` queries the index (any kind; built for the on-disk IVF-PQ one) with
its own vectors, a block of rows at a time, keeps only the accepted edges (cosine at or above
the threshold: near-duplicates are rare, so the edges are few), then takes the connected
components of that sparse graph. What it holds besides the index: one block's candidates, the
edges, a split code (1 byte) and a component label (4 bytes) per vector. It never holds the
(N, k) neighbour matrix :func:`~imagerec.audit.audit` keeps, nor the vectors themselves.

The checks are those of the embeddings alone (no thumbnails: the images of a 10M-vector index
are not decoded again): an edge where the cosine reaches the threshold.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from ..errors import ImagerecError
from ._api import _split_of
from ._duplicates import NEAR_DUPLICATE_K, NEAR_DUPLICATE_THRESHOLD, group_table

BLOCK = 4096  # rows queried at once
SPLITS = ("", "train", "val", "test")  # split codes 0..3


@dataclass
class IndexAudit:
    """What :func:`audit_index` found.

    Attributes:
        near_duplicates: one row per member of every group (as :func:`~imagerec.audit.audit`'s
            table: ``group``, ``index``, ``path``, ``keep``, ``similarity``, ``split``, ``kind``).
        leakage: test or val rows with a near-copy in train: ``index``, ``path``, ``split``,
            ``train_index``, ``train_path``, ``similarity``.
        summary: counts, the threshold, the search, seconds.
    """

    near_duplicates: pd.DataFrame
    leakage: pd.DataFrame
    summary: dict


def audit_index(
    index_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
    k: int = NEAR_DUPLICATE_K,
    nprobe: int | None = None,
    rerank: int | None = None,
    block: int = BLOCK,
    progress: bool = True,
) -> IndexAudit:
    """Near-duplicate groups and train/test leaks of every vector of an index, in blocks.

    Args:
        index_dir: a folder from :func:`~imagerec.build_index` (its paths' folders, such as
            ``DIR/train/...`` and ``DIR/test/...``, give the splits for the leakage check).
        out: folder for ``near_duplicates.csv``, ``leakage.csv`` and ``summary.json``; None writes nothing.
        threshold: cosine similarity a pair needs to be near-duplicates (leakage uses it too).
        k: neighbours searched per vector.
        nprobe, rerank: of the index's search (default: the index's own).
        block: vectors queried at once.
        progress: a progress bar over the blocks.

    Returns:
        An :class:`IndexAudit`.

    Raises:
        ImagerecError: bad arguments (before any work), or not an index.
    """
    from ..index import load_index  # noqa: PLC0415 - the index layer, only for this check

    if not 0 < threshold <= 1:
        raise ImagerecError(f"threshold={threshold} is a cosine similarity and must be in (0, 1]; try {NEAR_DUPLICATE_THRESHOLD}")
    for name, value in (("k", k), ("block", block)):
        if value < 1:
            raise ImagerecError(f"{name}={value} must be at least 1")
    if out is not None and Path(out).is_file():
        raise ImagerecError(f"out={out}: is a file; give a folder for the audit run")
    index = load_index(index_dir)
    n = len(index)
    started = time.perf_counter()

    # 1. the split of every row (1 byte each), in one pass over the items
    split = np.zeros(n, np.int8)
    code = {name: i for i, name in enumerate(SPLITS)}
    start = 0
    for paths in _path_blocks(index.items):
        split[start : start + len(paths)] = [code[_split_of(p)] for p in paths]
        start += len(paths)

    # 2. every row's neighbours, a block at a time; only the accepted edges are kept
    stored = _stored(index)
    rows, cols, sims = [], [], []
    kk = max(1, min(k, n - 1))
    for start in tqdm(range(0, n, block), desc="near-duplicates", unit="block", disable=not progress):
        q = _rows(index, stored, start, min(n, start + block))
        s, i = index.search_vectors(q, kk + 1, nprobe=nprobe, rerank=rerank)
        _release(index, stored)
        own = i == np.arange(start, start + len(i))[:, None]
        accept = (i >= 0) & ~own & (s >= threshold)
        r, c = np.nonzero(accept)
        rows.append(r + start)
        cols.append(i[r, c])
        sims.append(s[r, c])
    a, b, w = (np.concatenate(x) if x else np.zeros(0) for x in (rows, cols, sims))
    a, b = a.astype(np.int64), b.astype(np.int64)
    searched = time.perf_counter() - started

    # 3. connected components of the sparse graph; the group table over the members only
    _, label = connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)), directed=False)
    sizes = np.bincount(label)
    members = np.flatnonzero(sizes[label] > 1)
    names = np.asarray(SPLITS)
    local = label[members]
    vectors = _rows(index, stored, members) if len(members) else np.zeros((0, 1), np.float32)
    groups = group_table(local, vectors, np.ones(len(members)), names[split[members]], "near")
    groups["index"] = members[groups["index"].to_numpy(dtype=np.int64)] if len(groups) else groups["index"]
    paths, _ = index.items.take(groups["index"].tolist())
    groups.insert(2, "path", paths)

    # 4. leaks: a test or val row's most similar accepted neighbour in train (a direct edge)
    out_of_train = np.asarray([code["val"], code["test"]])
    forward = np.isin(split[a], out_of_train) & (split[b] == code["train"])
    backward = np.isin(split[b], out_of_train) & (split[a] == code["train"])  # a training row found the held-out one
    leaks = pd.DataFrame({"index": np.concatenate([a[forward], b[backward]]), "train_index": np.concatenate([b[forward], a[backward]]),
                          "similarity": np.concatenate([w[forward], w[backward]]).astype(np.float32)})  # fmt: skip
    leaks = leaks.sort_values(["index", "similarity"], ascending=[True, False], kind="stable").drop_duplicates("index")
    leaks = leaks.sort_values(["similarity", "index"], ascending=[False, True], kind="stable").reset_index(drop=True)
    leaks.insert(1, "split", names[split[leaks["index"].to_numpy(dtype=np.int64)]] if len(leaks) else [])
    leaks.insert(1, "path", index.items.take(leaks["index"].tolist())[0])
    leaks["train_path"] = index.items.take(leaks["train_index"].tolist())[0]

    summary = {
        "index": str(index_dir), "n_vectors": n, "kind": index.kind, "search": index.describe(), "threshold": threshold,
        "neighbours": kk, "edges": int(len(a)),
        "counts": {"near_duplicates": {"groups": int(groups["group"].nunique()) if len(groups) else 0, "images": int(len(groups)),
                                       "to_remove": int((~groups["keep"]).sum()) if len(groups) else 0},
                   "leakage": {"rows": int(len(leaks))}},
        "splits": {name or "(none)": int(c) for name, c in zip(SPLITS, np.bincount(split, minlength=4)) if c},
        "seconds": {"search": round(searched, 3), "total": round(time.perf_counter() - started, 3)},
    }  # fmt: skip
    if out is not None:
        _write(Path(out), groups, leaks, summary)
    return IndexAudit(groups, leaks, summary)


def _path_blocks(items, block: int = 100_000):
    """The indexed paths in order, a block at a time (read from disk for the on-disk kind)."""
    if hasattr(items, "iter_blocks"):
        for rows in items.iter_blocks(block):
            yield [r[0] for r in rows]
    else:
        for start in range(0, len(items), block):
            yield items.paths[start : start + block]


def _stored(index):
    """The float16 rows of an on-disk index (memory-mapped), or None for an in-memory one."""
    if index.kind != "ivfpq":
        return None
    from ..index import _ondisk  # noqa: PLC0415

    return _ondisk.vectors_of(index.folder, index.meta)


def _release(index, stored) -> None:
    """Keep the resident memory to a block: unmap the float16 rows read so far (the page cache keeps them)."""
    if stored is not None:
        from ..index import _ondisk  # noqa: PLC0415

        for vectors in (stored, index._vectors):
            if vectors is not None:
                _ondisk.release(vectors)


def _rows(index, stored, start, stop=None) -> np.ndarray:
    """float32 unit vectors of rows ``start:stop`` (or of the sorted rows ``start``, an array) of the index."""
    if stored is not None:
        x = np.asarray(stored[start:stop] if stop is not None else stored[start], dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if stop is not None:
        return index.faiss_index.reconstruct_n(int(start), int(stop - start))
    return np.stack([index.faiss_index.reconstruct(int(i)) for i in start]) if len(start) else np.zeros((0, index.faiss_index.d), np.float32)


def _write(run: Path, groups: pd.DataFrame, leaks: pd.DataFrame, summary: dict) -> None:
    from .._io import write_text_atomic  # noqa: PLC0415
    from ._report import write_json  # noqa: PLC0415

    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run / "near_duplicates.csv", groups.to_csv(index=False))
    write_text_atomic(run / "leakage.csv", leaks.to_csv(index=False))
    write_json(run / "summary.json", summary)
