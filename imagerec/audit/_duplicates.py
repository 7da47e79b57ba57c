"""Exact duplicates, near-duplicates and leaks across splits, as groups, without an N x N matrix.

* Exact duplicates: images whose decoded RGB pixels are identical (same hash of the decoded
  array, so a PNG and a lossless re-save of it match, whatever their metadata).
* Near-duplicates: the ``k`` nearest neighbours of every image by cosine similarity of its
  embedding (FAISS: exact inner-product search up to ``EXACT_SEARCH_MAX`` images, an inverted
  file index beyond, queried in blocks); an edge where the similarity reaches the threshold, or
  where it reaches a lower floor and the two images' small colour thumbnails correlate at a
  pixel threshold or more (either way round, for mirrored copies): tiny or heavily compressed
  copies lose their embedding similarity before their layout; or where the two images are each
  other's nearest neighbour from a mutual floor on and their similarity stands above both images'
  second-nearest by a margin (a rank test, not one absolute cosine: in a collection of
  look-alikes, such as hand signs on one background or brain scans, unrelated images reach
  cosines that a cropped or rotated copy of a varied photo does not, but a copy still stands
  out from its image's other neighbours). Then the connected components of that sparse graph
  (scipy). Exact duplicates are joined too.
  Memory is O(N k). The embeddings are flip-averaged by default (see :func:`imagerec.audit.audit`),
  so a mirrored copy embeds like its original.
* The member kept in each group: one from the training split where there is one (a leak is
  removed from the test side), then the largest in pixels, then the first.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Defaults chosen on the development suite, worst set first (benchmarks/suite.py --capability
# near_duplicates; docs/BENCHMARKS.md and docs/MODELS.md), by kind of collection: (cosine that
# suffices alone, thumbnail correlation that confirms a candidate, candidate floor, mutual
# nearest-neighbour floor, its margin over the second-nearest). Small images (CIFAR-like) embed
# poorly once resized or compressed but their 16 px thumbnail is nearly the whole image; photos
# embed well, and their thumbnail is a coarse sketch that unrelated scenes (sky over sea) share.
NEAR_DUPLICATE_DEFAULTS = {"small": (0.90, 0.93, 0.60, 0.80, 0.08), "photos": (0.96, 0.99, 0.50, 0.80, 0.08)}
NEAR_DUPLICATE_THRESHOLD, PIXEL_THRESHOLD, CANDIDATE_FLOOR, MUTUAL_FLOOR, MUTUAL_MARGIN = NEAR_DUPLICATE_DEFAULTS["photos"]
NEAR_DUPLICATE_K = 10  # neighbours searched per image
EXACT_SEARCH_MAX = 200_000  # images: exact search up to here, an IVF index beyond
SEARCH_BLOCK = 4096  # query rows per FAISS call


def knn(features: np.ndarray, k: int, *, exact: bool | None = None, nprobe: int = 16, seed: int = 0):
    """The ``k`` nearest other rows of every row by inner product (rows should be unit length).

    Args:
        features: float32 array (N, D), L2-normalised.
        k: neighbours per row (capped at N - 1).
        exact: True: ``IndexFlatIP``; False: ``IndexIVFFlat`` (sqrt(N) * 4 lists, ``nprobe`` of them
            searched); None: exact up to ``EXACT_SEARCH_MAX`` rows.
        nprobe: inverted lists searched per query (IVF only).
        seed: of the IVF's k-means training sample.

    Returns:
        (similarities float32 (N, k), indices int64 (N, k), method name); -1 marks no neighbour.
    """
    import faiss  # noqa: PLC0415 - only the neighbour checks need it

    x = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x.shape
    k = max(1, min(k, n - 1))
    exact = n <= EXACT_SEARCH_MAX if exact is None else exact
    if exact:
        index, method = faiss.IndexFlatIP(d), "exact inner product (faiss IndexFlatIP)"
    else:
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, min(n, 32 * nlist), replace=False)
        index.cp.niter = 10  # coarse cells suffice: a near-duplicate sits in its original's cell
        index.train(x[np.sort(sample)])
        index.nprobe = nprobe
        method = f"inverted file (faiss IndexIVFFlat, {nlist} lists, nprobe {nprobe})"
    index.add(x)
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for start in range(0, n, SEARCH_BLOCK):
        s, i = index.search(x[start : start + SEARCH_BLOCK], k + 1)
        own = i == np.arange(start, start + len(i))[:, None]
        own[~own.any(axis=1), -1] = True  # an exact copy may come first: drop the last hit instead
        sims[start : start + len(i)] = s[~own].reshape(len(i), k)
        ids[start : start + len(i)] = i[~own].reshape(len(i), k)
    return sims, ids, method


def exact_groups(pixel_hash: pd.Series) -> np.ndarray:
    """Group id per image (-1: no exact copy), images with the same non-empty hash together."""
    h = pixel_hash.to_numpy()
    valid = h != ""
    codes, counts = np.unique(h[valid], return_inverse=True, return_counts=True)[1:]
    group = np.full(len(h), -1, np.int64)
    group[valid] = np.where(counts[codes] > 1, codes, -1)
    return group


def edges(
    sims: np.ndarray,
    ids: np.ndarray,
    threshold: float,
    thumbs: np.ndarray | None = None,
    pixel_threshold: float = PIXEL_THRESHOLD,
    floor: float = CANDIDATE_FLOOR,
    mutual: float | None = MUTUAL_FLOOR,
    margin: float = MUTUAL_MARGIN,
) -> np.ndarray:
    """Which kNN pairs are near-duplicates: bool (N, k).

    Args:
        sims, ids: the result of :func:`knn` (neighbours most similar first).
        threshold: cosine similarity that suffices on its own.
        thumbs: float32 (N, T*T*3) zero-mean unit-norm colour thumbnails, or None (embeddings only).
        pixel_threshold: thumbnail correlation that confirms a candidate at ``floor`` or more.
        floor: cosine similarity a pair needs to be a candidate for the thumbnail check.
        mutual: cosine similarity from which two images that are each other's nearest neighbour
            are near-duplicates when their similarity exceeds the second-nearest neighbour's of
            both by ``margin`` or more; None: no such rank test.
        margin: that margin, in cosine similarity.
    """
    valid = ids >= 0
    accept = valid & (sims >= threshold)
    if mutual is not None and sims.shape[1] >= 2:
        nearest = np.clip(ids[:, 0], 0, None)
        second = np.where(ids[:, 1] >= 0, sims[:, 1], -1.0)
        each_other = (ids[:, 0] >= 0) & (ids[nearest, 0] == np.arange(len(ids)))
        stands_out = sims[:, 0] - np.maximum(second, second[nearest]) >= margin
        accept[:, 0] |= each_other & (sims[:, 0] >= mutual) & stands_out
    if thumbs is None:
        return accept
    rows, cols = np.nonzero(valid & ~accept & (sims >= min(floor, threshold)))
    if len(rows):
        side = int(round(np.sqrt(thumbs.shape[1] // 3)))
        a, b = thumbs[rows], thumbs[ids[rows, cols]]
        mirrored = b.reshape(-1, side, side, 3)[:, :, ::-1].reshape(len(b), -1)
        corr = np.maximum(np.einsum("ij,ij->i", a, b), np.einsum("ij,ij->i", a, mirrored))
        accept[rows, cols] = corr >= pixel_threshold
    return accept


def near_groups(
    sims: np.ndarray, ids: np.ndarray, threshold: float | np.ndarray, exact_group: np.ndarray | None = None
) -> np.ndarray:
    """Group id per image (-1: alone): connected components of the kNN edges at ``threshold``.

    Args:
        sims: float (N, k) neighbour similarities; ids: int (N, k) neighbour rows (-1: none).
        threshold: cosine similarity an edge needs, or the bool (N, k) edges of :func:`edges`.
        exact_group: exact-duplicate group per image (joined as edges too), or None.

    Returns:
        int64 array (N,).
    """
    n = len(sims)
    accept = threshold if isinstance(threshold, np.ndarray) else (sims >= threshold) & (ids >= 0)
    rows, cols = np.nonzero(accept)
    a, b = rows, ids[rows, cols]
    if exact_group is not None and (exact_group >= 0).any():
        idx = np.flatnonzero(exact_group >= 0)
        order = idx[np.argsort(exact_group[idx], kind="stable")]
        same = exact_group[order[1:]] == exact_group[order[:-1]]
        a, b = np.concatenate([a, order[:-1][same]]), np.concatenate([b, order[1:][same]])
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    sizes = np.bincount(label)
    return np.where(sizes[label] > 1, label, -1).astype(np.int64)


def group_table(group: np.ndarray, features: np.ndarray | None, area: np.ndarray, split: np.ndarray, kind: str) -> pd.DataFrame:
    """One row per member of every group, with the member to keep named.

    Args:
        group: group id per image (-1: in no group).
        features: L2-normalised float32 (N, D) for the similarity to the kept member, or None (1.0).
        area: pixels per image (width x height); split: ``"train"``/``"val"``/``"test"``/``""``.
        kind: ``"exact"`` or ``"near"``.

    Returns:
        DataFrame ``group`` (0.. by decreasing size), ``index``, ``keep``, ``similarity`` (to the
        kept member), ``split``, ``kind``; groups largest first, the kept member first in each.
    """
    members = np.flatnonzero(group >= 0)
    columns = ["group", "index", "keep", "similarity", "split", "kind"]
    if not len(members):
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in zip(columns, ["int64", "int64", "bool", "float32", "str", "str"])})
    # keep: train first, then the largest, then the first index
    order = np.lexsort((members, -area[members], split[members] != "train", group[members]))
    members = members[order]
    g = group[members]
    first = np.r_[True, g[1:] != g[:-1]]
    keeper = members[first][np.cumsum(first) - 1]
    if features is None:
        similarity = np.ones(len(members), np.float32)
    else:
        similarity = np.einsum("ij,ij->i", features[members], features[keeper]).astype(np.float32)
    table = pd.DataFrame({"old": g, "index": members, "keep": first, "similarity": similarity, "split": split[members], "kind": kind})
    sizes = table.groupby("old")["index"].transform("size")
    table = table.assign(_size=sizes, _first=table.groupby("old")["index"].transform("min"))
    table = table.sort_values(["_size", "_first", "old", "keep", "similarity"], ascending=[False, True, True, False, False], kind="stable")
    renumber = {old: new for new, old in enumerate(pd.unique(table["old"]))}
    table.insert(0, "group", table["old"].map(renumber).astype(np.int64))
    return table.drop(columns=["old", "_size", "_first"]).reset_index(drop=True)


def leak_table(
    sims: np.ndarray, ids: np.ndarray, threshold: float | np.ndarray, split: np.ndarray, exact_group: np.ndarray
) -> pd.DataFrame:
    """Test or validation images with a near- or exact duplicate in the training split.

    A leak is a direct neighbour (not a chain through a group): the most similar training image
    among an image's ``k`` nearest, at or above the threshold; or an exact copy in training.

    Args:
        sims, ids: the kNN result of :func:`knn`.
        threshold: cosine similarity a near-duplicate needs, or the bool (N, k) edges of :func:`edges`.
        split: ``"train"``/``"val"``/``"test"``/``""`` per image.
        exact_group: exact-duplicate group per image (-1: none).

    Returns:
        DataFrame ``index`` (the test/val image), ``split``, ``train_index`` (its training copy),
        ``similarity``, ``exact``; most similar first.
    """
    held_out = np.isin(split, ["test", "val"])
    rows = np.flatnonzero(held_out)
    neighbour_split = split[np.clip(ids[rows], 0, None)]
    accept = threshold if isinstance(threshold, np.ndarray) else (sims >= threshold) & (ids >= 0)
    ok = accept[rows] & (neighbour_split == "train")
    found = ok.any(axis=1)
    best = np.argmax(ok, axis=1)  # neighbours come most similar first
    leaks = {int(r): (int(ids[r, c]), float(sims[r, c]), False) for r, c in zip(rows[found], best[found])}
    for gid in np.unique(exact_group[exact_group >= 0]):
        members = np.flatnonzero(exact_group == gid)
        train = members[split[members] == "train"]
        if len(train):
            for m in members[held_out[members]]:
                leaks[int(m)] = (int(train[0]), 1.0, True)
    table = pd.DataFrame(
        [(i, split[i], t, s, e) for i, (t, s, e) in leaks.items()],
        columns=["index", "split", "train_index", "similarity", "exact"],
    )
    return table.sort_values(["similarity", "index"], ascending=[False, True], kind="stable").reset_index(drop=True)
