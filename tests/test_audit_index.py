"""The audit of an index's vectors in blocks: planted near-copies grouped, leaks named, like the in-memory audit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagerec import Embeddings, ImagerecError, Preprocessing, build_index
from imagerec.audit import audit_index, knn, near_groups
from imagerec.index import SearchIndex

from .conftest import assert_user_error, run_cli

PP = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 1.0)


def _planted(n: int = 3000, dim: int = 32, copies: int = 60, seed: int = 0):
    """Distinct unit vectors (pairwise cosine far below 0.9) in train and test folders, with planted
    near-copies (cosine about 0.995); returns (embeddings, copy rows, their originals)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    copy = rng.choice(np.arange(n // 2, n), copies, replace=False)
    original = rng.choice(np.setdiff1d(np.arange(n), copy), copies, replace=False)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[copy] = x[original] + 0.1 * rng.normal(size=(copies, dim)).astype(np.float32) / np.sqrt(dim)
    split = np.where(np.arange(n) < n * 4 // 5, "train", "test")
    paths = [f"/virtual/{split[i]}/c/{i:06d}.png" for i in range(n)]
    return Embeddings(x, paths, None, None, "efficientnet_lite0", PP), copy, original


def test_planted_copies_are_grouped_in_blocks_like_the_in_memory_audit(tmp_path, monkeypatch):
    data, copy, original = _planted()
    build_index(data, tmp_path / "idx", exact_max=1000)
    shapes = []
    search = SearchIndex.search_vectors
    monkeypatch.setattr(SearchIndex, "search_vectors", lambda self, q, k, **kw: shapes.append(q.shape) or search(self, q, k, **kw))
    done = audit_index(tmp_path / "idx", threshold=0.9, block=500, progress=False, out=tmp_path / "run")
    assert max(s[0] for s in shapes) == 500 and len(shapes) == 6  # 3,000 vectors queried 500 at a time

    table = done.near_duplicates
    group = dict(zip(table["index"], table["group"]))
    grouped = np.mean([c in group and group.get(o) == group[c] for c, o in zip(copy, original)])
    assert grouped == 1.0
    x = data.features
    sims, ids, _ = knn(x, 10, exact=True)
    expected = near_groups(sims, ids, 0.9)
    assert set(table["index"]) == set(np.flatnonzero(expected >= 0))  # the same images as the exact in-memory grouping
    assert (table.groupby("group")["keep"].sum() == 1).all()
    assert table["path"].tolist() == [data.paths[i] for i in table["index"]]

    # leaks: each planted copy in test whose original is in train
    split = np.asarray(["train" if "/train/" in p else "test" for p in data.paths])
    leaking = {int(c) for c, o in zip(copy, original) if split[c] == "test" and split[o] == "train"}
    leaking |= {int(o) for c, o in zip(copy, original) if split[o] == "test" and split[c] == "train"}
    assert leaking and set(done.leakage["index"]) == leaking
    assert (done.leakage["split"] == "test").all() and done.leakage["train_path"].str.contains("/train/").all()
    assert done.leakage["similarity"].is_monotonic_decreasing

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["counts"]["near_duplicates"]["groups"] == table["group"].nunique() and summary["kind"] == "ivfpq"
    assert (tmp_path / "run" / "near_duplicates.csv").is_file() and (tmp_path / "run" / "leakage.csv").is_file()


def test_a_flat_index_is_audited_the_same_way(tmp_path):
    data, copy, original = _planted(n=800, copies=20)
    build_index(data, tmp_path / "idx")
    done = audit_index(tmp_path / "idx", threshold=0.9, progress=False)
    group = dict(zip(done.near_duplicates["index"], done.near_duplicates["group"]))
    assert all(c in group and group.get(o) == group[c] for c, o in zip(copy, original))


def test_bad_arguments_and_the_cli(tmp_path, capsys):
    data, _, _ = _planted(n=600, copies=10)
    build_index(data, tmp_path / "idx", exact_max=200)
    with pytest.raises(ImagerecError, match=r"threshold=1.5 is a cosine similarity and must be in \(0, 1\]"):
        audit_index(tmp_path / "idx", threshold=1.5)
    with pytest.raises(ImagerecError, match="not an imagerec index|no such folder"):
        audit_index(tmp_path / "nothing")
    code, out, err = run_cli(capsys, "audit", tmp_path / "idx", "--out", tmp_path / "run", "--near-duplicates-threshold", "0.9", "--no-progress")
    assert code == 0, err
    assert "600 vectors of the index audited in blocks" in out and "near_duplicates: " in out
    assert_user_error(*run_cli(capsys, "audit", tmp_path / "idx", "--out", tmp_path / "r2", "--checks", "quality")[::2], "is an index")
