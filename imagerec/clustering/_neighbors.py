"""Neighbour search with bounded memory: exact, brute force, one block of rows at a time.

A block of ``rows x n`` squared distances is all that is ever held (``working_memory`` MiB of
float32), so 60,000 x 1,280 features need a few hundred MiB, never the 60k x 60k matrix. Brute
force on BLAS is also the fastest exact search in the hundreds of dimensions that embeddings
have, where trees degrade to scanning everything.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

WORKING_MEMORY_MB = 128  # one distance block (float32); the edges found in it stay of that order


def block_rows(n_columns: int, working_memory: float = WORKING_MEMORY_MB) -> int:
    """How many rows of an ``(rows, n_columns)`` float32 block fit in ``working_memory`` MiB."""
    return int(max(1, min(4096, working_memory * 2**20 // (4 * max(n_columns, 1)))))


def squared_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances, clipped at 0 (the expansion can round below it).

    Args:
        a: float array (M, D).
        b: float array (K, D).
        b_sq: ``(b * b).sum(1)``, shape (K,), when already known.

    Returns:
        float array (M, K).
    """
    if b_sq is None:
        b_sq = np.einsum("ij,ij->i", b, b)
    d2 = a @ b.T
    d2 *= -2
    d2 += np.einsum("ij,ij->i", a, a)[:, None]
    d2 += b_sq[None, :]
    np.maximum(d2, 0, out=d2)
    return d2


def iter_blocks(
    x: np.ndarray, y: np.ndarray, working_memory: float = WORKING_MEMORY_MB
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, squared distances of x[start:start+rows] to every row of y)``."""
    y_sq = np.einsum("ij,ij->i", y, y)
    step = block_rows(len(y), working_memory)
    for start in range(0, len(x), step):
        yield start, squared_distances(x[start : start + step], y, y_sq)


def knn(x: np.ndarray, n_neighbors: int, working_memory: float = WORKING_MEMORY_MB) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest other rows (itself excluded), nearest first.

    Args:
        x: float array (N, D).
        n_neighbors: neighbours per row, at most N - 1.
        working_memory: MiB for one block of distances.

    Returns:
        (distances, indices): float array (N, n_neighbors) of Euclidean distances and int64
        array (N, n_neighbors).
    """
    assert 1 <= n_neighbors < len(x), "callers check n_neighbors against N"
    n = len(x)
    distances = np.empty((n, n_neighbors), np.float32)
    indices = np.empty((n, n_neighbors), np.int64)
    for start, d2 in iter_blocks(x, x, working_memory):
        rows = np.arange(start, start + len(d2))
        d2[np.arange(len(d2)), rows] = np.inf  # not one's own neighbour
        part = np.argpartition(d2, n_neighbors - 1, axis=1)[:, :n_neighbors]
        part_d2 = np.take_along_axis(d2, part, axis=1)
        order = np.lexsort((part, part_d2), axis=1)  # ties by index, so results are reproducible
        indices[rows] = np.take_along_axis(part, order, axis=1)
        distances[rows] = np.sqrt(np.take_along_axis(part_d2, order, axis=1))
    return distances, indices


def nearest_centres(
    x: np.ndarray, centres: np.ndarray, working_memory: float = WORKING_MEMORY_MB
) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centre of each row.

    Args:
        x: float array (N, D).
        centres: float array (K, D).
        working_memory: MiB for one block of distances.

    Returns:
        (labels, distances): int64 array (N,) and float array (N,) of Euclidean distances.
    """
    labels = np.empty(len(x), np.int64)
    distances = np.empty(len(x), np.float64)
    centres = centres.astype(x.dtype, copy=False)
    for start, d2 in iter_blocks(x, centres, working_memory):
        stop = start + len(d2)
        labels[start:stop] = d2.argmin(1)
        distances[start:stop] = np.sqrt(d2[np.arange(len(d2)), labels[start:stop]])
    return labels, distances
