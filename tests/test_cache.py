"""The decode cache: small images are decoded once, kept outside the data folder, and rebuilt
when a file changes; unreadable files are left out and reported."""

from __future__ import annotations

import os

import numpy as np
import pytest

from imagerec import load_images
from imagerec.data import _cache, decode_small_images, load_rgb

from .conftest import make_class_folder, make_image


def test_small_images_are_decoded_into_an_array(class_folder, imagerec_home):
    source = load_images(class_folder)
    cached = decode_small_images(source, progress=False)
    assert cached.pixels.shape == (12, 32, 32, 3) and cached.pixels.dtype == np.uint8
    assert cached.labels.tolist() == source.labels.tolist()
    for i in (0, 5, 11):
        np.testing.assert_array_equal(cached.pixels[i], np.asarray(load_rgb(source.paths[i])))
    assert list((imagerec_home / "decoded").glob("*.npy"))
    assert not any(p.suffix == ".npy" for p in class_folder.rglob("*"))  # nothing beside the data


def test_second_call_maps_the_cache_without_decoding(class_folder, monkeypatch):
    first = decode_small_images(load_images(class_folder), progress=False)

    def fail(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(_cache, "_build", fail)
    second = decode_small_images(load_images(class_folder), progress=False)
    assert isinstance(second.pixels, np.memmap)
    np.testing.assert_array_equal(first.pixels, second.pixels)


def test_a_changed_file_gives_a_new_cache(class_folder, imagerec_home):
    decode_small_images(load_images(class_folder), progress=False)
    path = class_folder / "cat" / "000.png"
    make_image(path, seed=99)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file systems
    again = decode_small_images(load_images(class_folder), progress=False)
    np.testing.assert_array_equal(again.pixels[0], np.asarray(load_rgb(path)))
    assert len(list((imagerec_home / "decoded").glob("*.npy"))) == 2


def test_unreadable_files_are_left_out_and_labels_stay_aligned(class_folder):
    (class_folder / "cat" / "001.png").write_bytes(b"")
    (class_folder / "dog" / "002.png").write_text("not a png")
    source = load_images(class_folder)
    cached = decode_small_images(source, progress=False)
    assert len(cached) == 10
    assert sorted(os.path.basename(s.path) for s in cached.skipped) == ["001.png", "002.png"]
    for i in range(len(cached)):
        np.testing.assert_array_equal(cached.pixels[i], np.asarray(load_rgb(cached.paths[i])))
        assert cached.classes[cached.labels[i]] in cached.paths[i]


def test_large_images_are_not_cached(tmp_path):
    root = make_class_folder(tmp_path / "big", size=(80, 80), per_class=2)
    assert decode_small_images(load_images(root), progress=False) is None


def test_mixed_sizes_abort_the_cache(tmp_path):
    root = make_class_folder(tmp_path / "mixed", classes=("a",), per_class=40)
    make_image(root / "a" / "033.png", size=(30, 32))  # not among the probed files
    assert decode_small_images(load_images(root), progress=False) is None


@pytest.mark.parametrize("workers", [1, 2])
def test_result_does_not_depend_on_workers(class_folder, workers, monkeypatch):
    monkeypatch.setattr(_cache, "_CHUNK", 5)
    cached = decode_small_images(load_images(class_folder), progress=False, workers=workers)
    assert cached.pixels.shape[0] == 12
    np.testing.assert_array_equal(cached.pixels[7], np.asarray(load_rgb(cached.paths[7])))


def _replace_keeping_size_and_mtime(path, donor):
    """``cp donor path`` then ``touch -r``: other pixels, the same size and mtime."""
    st = os.stat(path)
    assert os.path.getsize(donor) == st.st_size
    with open(donor, "rb") as src, open(path, "r+b") as dst:  # cp writes in place: same inode
        dst.write(src.read())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_file_replaced_with_the_same_size_and_mtime_is_decoded_again(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=3, ext=".bmp")  # BMP: same size, same bytes count
    donor = make_image(tmp_path / "donor.bmp", seed=77)
    first = decode_small_images(load_images(root), progress=False)
    old = np.array(first.pixels[0])
    _replace_keeping_size_and_mtime(root / "cat" / "000.bmp", donor)
    again = decode_small_images(load_images(root), progress=False)
    np.testing.assert_array_equal(again.pixels[0], np.asarray(load_rgb(donor)))
    assert not np.array_equal(again.pixels[0], old)


def test_mixed_sizes_leave_no_array_and_are_not_decoded_again(tmp_path, imagerec_home, monkeypatch):
    root = make_class_folder(tmp_path / "mixed", classes=("a",), per_class=40)
    make_image(root / "a" / "033.png", size=(30, 32))  # not among the probed files
    assert decode_small_images(load_images(root), progress=False) is None
    folder = imagerec_home / "decoded"
    assert list(folder.glob("*.npy")) == [] and [p for p in folder.iterdir() if p.name.startswith(".")] == []

    def fail(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(_cache, "_decode_all", fail)
    assert decode_small_images(load_images(root), progress=False) is None


def test_a_non_utf8_file_name_is_cached_and_reported(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2)
    bad = root / "cat" / os.fsdecode(b"caf\xe9.png")
    bad.write_bytes(b"broken")
    make_image(root / "cat" / os.fsdecode(b"ol\xe9.png"), seed=5)
    for _ in range(2):  # built, then read back from the cache
        cached = decode_small_images(load_images(root), progress=False)
        assert len(cached) == 5 and [s.path for s in cached.skipped] == [str(bad)]
        assert any(p.endswith(os.fsdecode(b"ol\xe9.png")) for p in cached.paths)
