"""Embedding on Ray: parts equal to local embedding, resuming a killed run, two nodes, the CLI.

Every test but the argument checks starts a Ray cluster on this machine (a few seconds), with a
small object store and 2 CPUs, and the seed CNN or Lite0 at a small input size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerec import ImagerecError, embed
from imagerec.backbones import create_backbone
from imagerec.data import load_images
from imagerec.index import merge_parts

from .conftest import assert_user_error, run_cli

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'imagerec[ray]' to test embedding on a cluster")
from imagerec.distributed import embed_on_ray  # noqa: E402

RAY = {"num_cpus": 2, "object_store_memory": 80 * 1024**2, "include_dashboard": False}


def _folder(root: Path, n: int = 22) -> Path:
    """n distinct 32 px pictures in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return root


@pytest.fixture
def local_ray():
    ray.init(**RAY)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_parts_hold_what_local_embedding_gives(tmp_path, local_ray):
    data = _folder(tmp_path / "images")
    model = create_backbone("seed_cnn", num_classes=0)
    done = embed_on_ray(data, tmp_path / "parts", model, part_size=8, actors=2, progress=False)
    assert len(done.parts) == 3 and done.embedded == 22 and done.reused == 0 and done.skipped == 0
    assert [p.name.split("-")[1] for p in done.parts] == ["00000", "00001", "00002"]
    merged = merge_parts(done.parts)  # the shard records say the set is complete
    local = embed(data, model, progress=False, workers=0)
    assert merged.paths == local.paths and merged.preprocessing == local.preprocessing
    np.testing.assert_allclose(merged.features, local.features, atol=1e-5)
    assert merged.classes == local.classes and (merged.labels == local.labels).all()


@pytest.mark.slow
def test_a_killed_run_again_embeds_only_what_is_missing(tmp_path, local_ray):
    data = _folder(tmp_path / "images")
    model = create_backbone("seed_cnn", num_classes=0)
    first = embed_on_ray(data, tmp_path / "parts", model, part_size=8, progress=False)
    kept = {p: p.stat().st_mtime_ns for p in first.parts[1:]}
    first.parts[0].unlink()  # the run was killed before this part was written
    (tmp_path / "parts" / f".{first.parts[0].name}.x.tmp.npz").write_bytes(b"half a file")  # a half-written one
    again = embed_on_ray(data, tmp_path / "parts", model, part_size=8, progress=False)
    assert again.embedded == 8 and again.reused == 2 and again.parts == first.parts
    assert {p: p.stat().st_mtime_ns for p in again.parts[1:]} == kept  # not rewritten
    assert not list((tmp_path / "parts").glob(".part-*"))  # the half-written file is gone

    # a file changed since: its part (and only it) is embedded again; the old part file goes
    changed = sorted(data.rglob("*.png"))[-1]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
    third = embed_on_ray(data, tmp_path / "parts", model, part_size=8, progress=False)
    assert third.embedded == 6 and third.reused == 2 and third.removed == 1
    assert third.parts[:2] == first.parts[:2] and third.parts[2] != first.parts[2]
    assert sorted((tmp_path / "parts").glob("part-*.npz")) == sorted(third.parts)
    merged = merge_parts(third.parts)
    row = merged.paths.index(str(changed))
    local = embed(load_images(str(changed.parent)), model, progress=False, workers=0)
    np.testing.assert_allclose(merged.features[row], local.features[local.paths.index(str(changed))], atol=1e-5)


@pytest.mark.slow
def test_two_nodes_share_the_parts(tmp_path):
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 1024**2})
    cluster.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
    try:
        ray.init(address=cluster.address)
        data = _folder(tmp_path / "images", n=24)
        model = create_backbone("seed_cnn", num_classes=0)
        done = embed_on_ray(data, tmp_path / "parts", model, part_size=3, actors=2, progress=False)
        assert len(done.parts) == 8 and done.embedded == 24
        assert len(ray.nodes()) == 2 and len(done.nodes) == 2  # one actor on each node
        local = embed(data, model, progress=False, workers=0)
        np.testing.assert_allclose(merge_parts(done.parts).features, local.features, atol=1e-5)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_cli_embed_on_ray_then_index_the_parts(tmp_path, capsys):
    data = _folder(tmp_path / "images", n=10)
    parts = tmp_path / "parts"
    args = ["embed", data, "--ray", "--out", parts, "--part-size", "4", "--actors", "1",
            "--backbone", "efficientnet_lite0", "--image-size", "64", "--no-progress"]  # fmt: skip
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "wrote 3 part(s)" in out and "10 image(s) embedded now" in out
    code, out, err = run_cli(capsys, *args)
    assert "0 image(s) embedded now, 3 part(s) reused" in out, out + err
    files = sorted(parts.glob("part-*.npz"))
    code, out, err = run_cli(capsys, "index", "--parts", *files, "--out", tmp_path / "idx")
    assert code == 0, err
    assert "over 10 vectors" in out
    code, out, err = run_cli(capsys, "index", "--parts", *files[1:], "--out", tmp_path / "idx2")
    assert_user_error(code, err, "shard(s) 0/3 missing")


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    data = _folder(tmp_path / "images", n=2)
    with pytest.raises(ImagerecError, match="a folder for the part files"):
        embed_on_ray(data, tmp_path / "parts.npz", "seed_cnn")
    with pytest.raises(ImagerecError, match="part_size=0 must be at least 1"):
        embed_on_ray(data, tmp_path / "parts", "seed_cnn", part_size=0)
    with pytest.raises(ImagerecError, match="device 'cpu'"):
        embed_on_ray(data, tmp_path / "parts", "seed_cnn", gpus_per_actor=1, device="cpu")
    assert not ray.is_initialized() and not (tmp_path / "parts").exists()
    assert_user_error(*run_cli(capsys, "embed", data, "--out", tmp_path / "e.npz", "--part-size", "4")[::2], "apply to --ray only")
    assert_user_error(*run_cli(capsys, "embed", data, "--ray", "--shard", "0/2", "--out", tmp_path / "p")[::2], "drop --shard")
