"""The feature stage: one cache keyed on file content, one rule for small images, the run lock,
and adaptation under the decompression-bomb limit."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import imagerec.features._cache as cache_module
from imagerec import Embeddings, ImagerecError, Preprocessing, create_backbone, load_images
from imagerec._lock import run_lock
from imagerec.clustering import cluster_images
from imagerec.features import (
    IDENTITY_FILE,
    SMALL_IMAGE_BACKBONE,
    SMALL_IMAGE_SIZE,
    adapt_backbone,
    auto_backbone,
    compute_features,
)

from .conftest import make_image


def _replace_keeping_size_and_mtime(path, seed):
    """Write other pixels to ``path`` with exactly its old size and modification time (``cp`` then
    ``touch -r``): only the content (and the inode's change time) tells them apart."""
    st = os.stat(path)
    other = path.with_name("other.bmp")
    make_image(other, (32, 32), seed=seed, fmt="BMP")  # BMP: the same size in bytes for every image
    assert other.stat().st_size == st.st_size
    shutil.copyfile(other, path)
    other.unlink()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def seed_cnn():
    """One instance, so that its (random, unpretrained) weights are the same for every call."""
    torch.manual_seed(0)
    return create_backbone("seed_cnn", num_classes=0)


def _bmp_folder(root, n=6):
    for i in range(n):
        make_image(root / f"{i:02d}.bmp", (32, 32), seed=i, fmt="BMP")
    return root


def test_replaced_images_are_re_embedded_and_said(tmp_path, seed_cnn, capsys, monkeypatch):
    data = _bmp_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    first = compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    assert (run / "embeddings.npz").is_file() and (run / IDENTITY_FILE).is_file()
    for i in (1, 4):
        _replace_keeping_size_and_mtime(data / f"{i:02d}.bmp", seed=100 + i)
    capsys.readouterr()
    again = compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    assert "re-embedding 2 changed images (4 reused" in capsys.readouterr().err
    monkeypatch.setenv("IMAGEREC_HOME", str(tmp_path / "empty_home"))  # nor the decode cache (keyed on mtime)
    fresh = compute_features(data, backbone=seed_cnn, progress=False)
    np.testing.assert_allclose(again.embeddings.features, fresh.embeddings.features, atol=1e-5)
    changed = ~np.isclose(first.embeddings.features, again.embeddings.features, atol=1e-5).all(axis=1)
    assert changed.tolist() == [False, True, False, False, True, False]


def test_unchanged_images_are_not_embedded_again(tmp_path, seed_cnn, monkeypatch, capsys):
    data = _bmp_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    first = compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    monkeypatch.setattr(cache_module, "embed", lambda *a, **k: pytest.fail("unchanged images were embedded again"))
    again = compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    np.testing.assert_array_equal(again.embeddings.features, first.embeddings.features)
    assert "re-embedding" not in capsys.readouterr().err


def test_new_images_only_are_embedded(tmp_path, seed_cnn, monkeypatch, capsys):
    data = _bmp_folder(tmp_path / "imgs", n=4)
    run = tmp_path / "run"
    compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    make_image(data / "99.bmp", (32, 32), seed=99, fmt="BMP")
    seen = []
    real = cache_module.embed
    monkeypatch.setattr(cache_module, "embed", lambda source, *a, **k: seen.append(len(source)) or real(source, *a, **k))
    again = compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    assert seen == [1] and len(again.embeddings) == 5
    assert "re-embedding 0 changed and 1 new images (4 reused" in capsys.readouterr().err


def test_other_weights_or_views_do_not_reuse_the_cache(tmp_path, seed_cnn, capsys):
    data = _bmp_folder(tmp_path / "imgs", n=3)
    run = tmp_path / "run"
    compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    capsys.readouterr()
    other = compute_features(data, backbone=seed_cnn, tta=True, cache_dir=run, progress=False)
    assert "re-embedding all 3 images" in capsys.readouterr().err
    assert other.embeddings.backbone == "seed_cnn+flip"
    with torch.no_grad():
        next(seed_cnn.parameters()).add_(0.5)  # the same name, other weights (an adapted backbone)
    compute_features(data, backbone=seed_cnn, tta=True, cache_dir=run, progress=False)
    assert "re-embedding all 3 images" in capsys.readouterr().err


def test_cluster_run_again_after_every_image_was_replaced_gives_new_features(tmp_path, seed_cnn, capsys):
    """Issue 10 item 3: the same --out after all images were replaced under the same names."""
    data = _bmp_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    first = cluster_images(data, "kmeans", 2, out=run, backbone=seed_cnn, pca_dim=None, map_method="pca", progress=False)
    for i in range(6):
        _replace_keeping_size_and_mtime(data / f"{i:02d}.bmp", seed=200 + i)
    again = cluster_images(data, "kmeans", 2, out=run, backbone=seed_cnn, pca_dim=None, map_method="pca", progress=False)
    assert "re-embedding 6 changed images (0 reused" in capsys.readouterr().err
    assert not np.allclose(first.features, again.features, atol=1e-4)


def test_small_images_get_the_one_small_image_rule(tmp_path):
    data = _bmp_folder(tmp_path / "imgs", n=3)
    name, size, source = auto_backbone(load_images(data), None)
    assert (name, size) == (SMALL_IMAGE_BACKBONE, SMALL_IMAGE_SIZE) and source.pixels is not None
    assert auto_backbone(load_images(data), 64)[1] == 64  # the user's size wins
    make_image(tmp_path / "big" / "a.png", (200, 150), seed=1)
    make_image(tmp_path / "big" / "b.png", (180, 150), seed=2)
    name, size, source = auto_backbone(load_images(tmp_path / "big"), None)
    assert (name, size, source.pixels) == ("efficientnet_lite0", None, None)


def test_a_locked_run_folder_is_refused(tmp_path, seed_cnn):
    data = _bmp_folder(tmp_path / "imgs", n=3)
    run = tmp_path / "run"
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import textwrap  # noqa: PLC0415

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from imagerec._lock import run_lock
            with run_lock({str(run)!r}, "test"):
                print("locked", flush=True); time.sleep(30)
        """)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ImagerecError, match=rf"another imagerec cluster run is writing this folder \(process {holder.pid}\)"):
            cluster_images(data, "kmeans", 2, out=run, backbone=seed_cnn, progress=False)
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run):  # released when the holder died
        pass


def test_adapt_keeps_the_decompression_bomb_limit(tmp_path, monkeypatch):
    """Issue 10 item 17: --adapt read every image with the default limit, ignoring --max-pixels."""
    for i in range(3):
        make_image(tmp_path / "photos" / f"{i}.png", (80, 70), seed=i)
    make_image(tmp_path / "photos" / "huge.png", (300, 300), seed=9)
    source = load_images(tmp_path / "photos", max_pixels=80 * 80)
    seen = []
    import imagerec.features._adapt as adapt_module  # noqa: PLC0415

    real = adapt_module.load_rgb
    monkeypatch.setattr(adapt_module, "load_rgb", lambda path, max_pixels=None: seen.append(max_pixels) or real(path, max_pixels))
    pixels = adapt_module._pixels(source, 16, progress=False)
    assert set(seen) == {80 * 80} and len(pixels) == 3  # the 300 x 300 image is over the limit


def test_embeddings_given_are_checked_and_prepared(tmp_path):
    features = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    emb = Embeddings(features, [f"{i}.png" for i in range(10)], None, None, "x", Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    result = compute_features(emb, pca_dim=4)
    assert result.prepared.shape == (10, 4)
    np.testing.assert_allclose(np.linalg.norm(result.prepared, axis=1), 1, atol=1e-5)
    emb.features[3, 0] = np.nan
    with pytest.raises(ImagerecError, match=r"1 image\(s\) have NaN .*first: 3\.png"):
        compute_features(emb)
    with pytest.raises(ImagerecError, match="adapt needs the images"):
        compute_features(emb, adapt="simclr")
    with pytest.raises(ImagerecError, match="adapt='byol' is not one of"):
        compute_features(tmp_path, adapt="byol")


def test_adapt_backbone_is_reexported_where_it_was():
    from imagerec.clustering._adapt import adapt_backbone as old  # noqa: PLC0415

    assert old is adapt_backbone


def test_a_file_that_became_unreadable_is_a_skip_not_a_crash(tmp_path, seed_cnn):
    data = _bmp_folder(tmp_path / "imgs", n=4)
    run = tmp_path / "run"
    compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    (data / "02.bmp").write_bytes(b"not an image any more")
    again = compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)
    assert len(again.embeddings) == 3 and [s.path for s in again.embeddings.skipped] == [str(data / "02.bmp")]
    third = compute_features(data, backbone=seed_cnn, cache_dir=run, progress=False)  # remembered as unreadable
    assert [s.path for s in third.embeddings.skipped] == [str(data / "02.bmp")]


def test_small_images_of_several_sizes_get_the_small_image_rule_too(tmp_path):
    make_image(tmp_path / "mixed" / "a.png", (32, 32), seed=1)
    make_image(tmp_path / "mixed" / "b.png", (20, 24), seed=2)  # a resized copy, say
    name, size, source = auto_backbone(load_images(tmp_path / "mixed"), None)
    assert (name, size, source.pixels) == (SMALL_IMAGE_BACKBONE, SMALL_IMAGE_SIZE, None)
