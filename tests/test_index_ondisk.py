"""The on-disk IVF-PQ index (past exact_max): streamed from parts, re-ranked exactly, --add, killed writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import imagerec.index._build as build_module
from imagerec import Embeddings, ImagerecError, Preprocessing, build_index, load_index
from imagerec.index import _ondisk, add_to_index

from .conftest import run_cli

PP = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 1.0)


def _clustered(n: int, dim: int = 32, seed: int = 0, prefix: str = "v", labelled: bool = True) -> Embeddings:
    """n vectors around 50 centres (so neighbours mean something), with labels a, b, c."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(50, dim))
    x = (centres[rng.integers(0, 50, n)] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32)
    labels = rng.integers(0, 3, n) if labelled else None
    return Embeddings(x, [f"/virtual/{prefix}{i:06d}.png" for i in range(n)], labels, ["a", "b", "c"] if labelled else None,
                      "efficientnet_lite0", PP)  # fmt: skip


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _parts(tmp_path, n: int = 3000, count: int = 3, shards: bool = True, **kw) -> tuple[list, Embeddings]:
    whole = _clustered(n, **kw)
    files = []
    for i in range(count):
        rows = np.arange(i, n, count)
        part = Embeddings(whole.features[rows], [whole.paths[r] for r in rows], whole.labels[rows], whole.classes, whole.backbone, PP)
        shard = {"shard": {"index": i, "count": count, "images": n}} if shards else {}
        files.append(part.save(tmp_path / f"part-{i}.npz", meta=shard))
    return files, whole


def test_past_exact_max_the_parts_are_streamed_into_an_on_disk_index(tmp_path, monkeypatch):
    files, whole = _parts(tmp_path)
    monkeypatch.setattr(build_module, "merge_parts", lambda *a: pytest.fail("the parts must not be merged in memory"))
    index = build_index(files, tmp_path / "idx", exact_max=1000, progress=False)
    assert index.kind == "ivfpq" and len(index) == 3000 and "IVF-PQ search on disk" in index.describe()
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["faiss_index"].startswith("IVF") and "HNSW32,PQ" in meta["faiss_index"] and meta["count"] == 3000
    assert (tmp_path / "idx" / meta["lists"]).stat().st_size > 0  # the inverted lists are a file
    assert (tmp_path / "idx" / meta["vectors"]).stat().st_size == 3000 * 32 * 2  # float16 rows

    # every list probed and every vector re-ranked: exact cosine on the float16 vectors
    x = _unit(whole.features)
    reloaded = load_index(tmp_path / "idx")
    order = {p: i for i, p in enumerate(reloaded.items.paths)}
    queries = x[:50]
    scores, ids = reloaded.search_vectors(queries, 10, nprobe=meta["nlist"], rerank=3000)
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    found = np.asarray([[order[whole.paths[t]] for t in row] for row in truth])
    assert (ids[:, 0] == found[:, 0]).all()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, found)]) >= 0.99
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-3)

    # the defaults (32 lists, 200 candidates) on clustered data
    _, ids = reloaded.search_vectors(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, found)]) >= 0.9

    hits = reloaded.search_features(whole.features[:3], ["q0", "q1", "q2"], top_k=2)
    assert list(hits.columns) == ["query", "rank", "path", "score", "label"]
    assert hits["path"][::2].tolist() == whole.paths[:3]
    assert hits["label"][::2].tolist() == [whole.classes[i] for i in whole.labels[:3]]


def test_add_to_the_on_disk_index_embeds_nothing_twice(tmp_path):
    build_index(_clustered(2000), tmp_path / "idx", exact_max=500)
    first = json.loads((tmp_path / "idx" / "meta.json").read_text())
    new = _clustered(300, seed=1, prefix="n")
    done = add_to_index(tmp_path / "idx", new)
    assert done.added == 300 and done.already == 0 and len(done.index) == 2300 and done.index.kind == "ivfpq"
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["trained"] == first["trained"] and meta["lists"] != first["lists"]  # same training, lists merged again
    assert not list((tmp_path / "idx").rglob("block-*.faiss"))  # the blocks of codes are in the lists now
    assert not (tmp_path / "idx" / first["lists"]).exists()  # the old generation's lists are gone
    hits = done.index.search_features(new.features[:5], new.paths[:5], top_k=1)
    assert hits["path"].tolist() == new.paths[:5]
    again = add_to_index(tmp_path / "idx", new)
    assert again.added == 0 and again.already == 300 and len(load_index(tmp_path / "idx")) == 2300


def test_a_killed_add_leaves_the_index_whole(tmp_path, monkeypatch):
    build_index(_clustered(1500), tmp_path / "idx", exact_max=500)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_ondisk, "_merge_and_commit", killed)
        with pytest.raises(KeyboardInterrupt):
            add_to_index(tmp_path / "idx", _clustered(200, seed=1, prefix="n"))
    index = load_index(tmp_path / "idx")
    assert len(index) == 1500 and len(index.items) == 1500  # the rows appended before the kill are not in it
    done = add_to_index(tmp_path / "idx", _clustered(200, seed=1, prefix="n"))
    assert len(done.index) == 1700
    assert done.index.items.paths[1500] == "/virtual/n000000.png" and done.index.items.paths[1699] == "/virtual/n000199.png"
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert (tmp_path / "idx" / meta["vectors"]).stat().st_size == 1700 * 32 * 2  # the killed write's rows were cut


def test_a_flat_index_grown_past_exact_max_moves_to_disk(tmp_path):
    build_index(_clustered(300), tmp_path / "idx", exact_max=350)
    done = add_to_index(tmp_path / "idx", _clustered(100, seed=1, prefix="n", labelled=False))
    assert done.added == 100 and done.index.kind == "ivfpq" and len(done.index) == 400
    assert not list((tmp_path / "idx").glob("items-1.csv"))  # the flat generation's files are gone
    assert done.index.items.labels[0] in ("a", "b", "c") and done.index.items.labels[399] == ""


def test_repeats_and_bad_options_are_refused(tmp_path):
    files, _ = _parts(tmp_path, n=600, count=2, shards=False)
    repeat = Embeddings.load(files[0])
    repeat.save(tmp_path / "again.npz")
    with pytest.raises(ImagerecError, match=r"/virtual/v000000\.png is listed twice"):
        build_index([files[0], files[1], tmp_path / "again.npz"], tmp_path / "idx", exact_max=100)
    with pytest.raises(ImagerecError, match="transform='zca' is not one of auto, pca, opq, none"):
        build_index(files, tmp_path / "idx", exact_max=100, transform="zca")
    with pytest.raises(ImagerecError, match="must divide the 32 dims"):
        build_index(files, tmp_path / "idx", exact_max=100, pq_bytes=5)


def test_factory_strings():
    assert _ondisk.factory_for(1280, 1_000_000) == ("PCA256,IVF2000_HNSW32,PQ32x8np", 2000, 32)
    assert _ondisk.factory_for(1280, 1_000_000, "opq", 64)[0] == "OPQ64_256,IVF2000_HNSW32,PQ64x8np"
    assert _ondisk.factory_for(128, 10_000_000)[0] == "IVF6325_HNSW32,PQ16x8np"
    assert _ondisk.factory_for(1280, 4000, "none")[0] == "IVF125_HNSW32,PQ160x8np"


def test_pca_and_opq_builds_search(tmp_path):
    data = _clustered(2000, dim=64)
    x = _unit(data.features)
    for transform in ("pca", "opq"):
        index = build_index(data, tmp_path / transform, exact_max=100, transform=transform)
        _, ids = index.search_vectors(x[:20], 1)
        assert (ids[:, 0] == np.arange(20)).all(), transform  # each finds itself first


def test_cli_index_parts_on_disk_then_search_json(tmp_path, capsys):
    files, whole = _parts(tmp_path, n=1200, count=2)
    code, out, err = run_cli(capsys, "index", "--parts", *files, "--out", tmp_path / "idx", "--exact-max", "500", "--no-progress")
    assert code == 0, err
    assert "IVF-PQ search on disk" in out and "over 1,200 vectors" in out
    Embeddings(whole.features[:2], ["q0", "q1"], None, None, whole.backbone, PP).save(tmp_path / "q.npz")
    code, out, err = run_cli(capsys, "search", tmp_path / "idx", tmp_path / "q.npz", "--top-k", "3", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)  # nothing but the JSON on stdout
    assert [r["path"] for r in rows if r["rank"] == 1] == whole.paths[:2]
    code, out, err = run_cli(capsys, "index", "--parts", *files, "--out", tmp_path / "idx2", "--exact-max", "500", "--transform", "zca")
    assert code == 2 and "invalid choice" in err
