"""Integration tests on the CIFAR-10 JPEG copy in ../shared/datasets (skipped where absent)."""

from __future__ import annotations

import numpy as np
import pytest

from imagerec import embed, load_images
from imagerec.data import decode_small_images

from .conftest import CIFAR_JPEG, needs_cifar

pytestmark = [needs_cifar, pytest.mark.cifar]


def test_layout_is_read_as_a_split_root():
    train, test = load_images(CIFAR_JPEG, "train"), load_images(CIFAR_JPEG, "test")
    assert (len(train), len(test)) == (50_000, 10_000)
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.bincount(test.labels).tolist() == [1_000] * 10


def test_embed_1000_test_images(tmp_path):
    source = load_images(CIFAR_JPEG, "test").subset(np.arange(0, 10_000, 10))
    first = embed(source, "efficientnet_lite0", image_size=64, progress=False, out=tmp_path / "a.npz")
    assert first.features.shape == (1_000, 1280)
    assert np.isfinite(first.features).all()
    assert np.bincount(first.labels).tolist() == [100] * 10
    again = embed(source, "efficientnet_lite0", image_size=64, progress=False)  # warm decode cache
    np.testing.assert_array_equal(first.features, again.features)

    twice = source.subset([3, 3, 7])  # the same image twice gives the same vector
    dup = embed(twice, "efficientnet_lite0", image_size=64, progress=False)
    np.testing.assert_array_equal(dup.features[0], dup.features[1])
    np.testing.assert_allclose(dup.features[0], first.features[3], atol=1e-5)
    assert not np.allclose(dup.features[0], dup.features[2])


def test_decode_cache_matches_the_files():
    source = load_images(CIFAR_JPEG, "test").subset(np.arange(0, 10_000, 50))
    cached = decode_small_images(source, progress=False)
    assert cached.pixels.shape == (200, 32, 32, 3)
    img, _ = source[17]
    np.testing.assert_array_equal(cached.pixels[17], np.asarray(img))
