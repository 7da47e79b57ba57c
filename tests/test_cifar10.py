"""The canonical CIFAR-10 python batches: read, downloaded (from a local tarball), refused when
offline, and read safely (a tampered pickle cannot run code)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import pickle
import tarfile
import threading

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

from imagerec import ImagerecError, load_images
from imagerec.data import load_cifar10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_batches(folder, per_batch=2, test_size=3):
    """Tiny batch files in the canonical format (dicts with bytes keys, pickled)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_size)]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f, protocol=2)
    return folder


@contextlib.contextmanager
def serve_folder(folder):
    """An HTTP server on the loopback address serving ``folder``, for the download path."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_tarball(tmp_path):
    src = write_batches(tmp_path / "build" / "cifar-10-batches-py")
    tarball = tmp_path / "www" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return src, tarball


def test_reads_local_batches(tmp_path):
    folder = write_batches(tmp_path / "cifar-10-batches-py")
    train = load_cifar10(tmp_path, train=True)  # the parent folder works too
    test = load_cifar10(folder, train=False)
    assert len(train) == 10 and len(test) == 3
    assert train.classes == CLASSES
    assert train.pixels.shape == (10, 32, 32, 3) and train.pixels.dtype == np.uint8
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # channel planes (R, G, B) of 1,024 values each become one H x W x 3 picture
    np.testing.assert_array_equal(test.pixels[1, :, :, 0].ravel(), raw[b"data"][1, :1024])
    np.testing.assert_array_equal(test.pixels[1, :, :, 2].ravel(), raw[b"data"][1, 2048:])
    assert test.labels.tolist() == raw[b"labels"]


def test_load_images_understands_cifar_specs(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py")
    assert len(load_images(f"cifar10:{tmp_path}", "test")) == 3
    assert len(load_images(tmp_path / "cifar-10-batches-py", "train")) == 10
    assert len(load_images(tmp_path)) == 13


def test_download_uses_torchvision_with_checksums(tmp_path, monkeypatch, imagerec_home):
    src, tarball = make_tarball(tmp_path)

    def md5(path):
        return hashlib.md5(path.read_bytes()).hexdigest()

    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(tarball))
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(src / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(src / "test_batch")]])
    with serve_folder(tarball.parent) as url:
        monkeypatch.setattr(CIFAR10, "url", f"{url}/{tarball.name}")
        source = load_images("cifar10", "test")
    assert len(source) == 3
    assert (imagerec_home / "datasets" / "cifar-10-batches-py" / "test_batch").is_file()
    assert len(load_images("cifar10", "train")) == 10  # from the cache, no server needed


def test_download_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    _, tarball = make_tarball(tmp_path)
    with serve_folder(tarball.parent) as url:
        monkeypatch.setattr(CIFAR10, "url", f"{url}/{tarball.name}")
        with pytest.raises(ImagerecError, match="checksum"):
            load_images("cifar10", "test")


def test_offline_download_error_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(ImagerecError, match=r"could not download CIFAR-10.*--data"):
        load_images("cifar10", "test")


def test_tampered_batch_cannot_run_code(tmp_path):
    folder = write_batches(tmp_path / "cifar-10-batches-py")

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(ImagerecError, match=r"refused to load (__builtin__|builtins)\.print"):
        load_cifar10(folder, train=False)


def test_missing_batch_file(tmp_path):
    folder = write_batches(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").unlink()
    with pytest.raises(ImagerecError, match="data_batch_3: CIFAR-10 batch file is missing"):
        load_cifar10(folder, train=True)


def test_folder_without_batches(tmp_path):
    with pytest.raises(ImagerecError, match="no CIFAR-10 batches there"):
        load_cifar10(tmp_path, train=False)
