"""The canonical CIFAR-10 python batches (``cifar-10-batches-py``).

Downloaded once with torchvision's own downloader and checksums into imagerec's cache, or read
from a folder the user names. The batches are Python pickles; they are read with an unpickler
that accepts numpy arrays and plain containers only, so a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np

from .._home import cache_dir
from ..errors import ImagerecError
from ._sources import ImageSource

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"


def is_cifar10_folder(path: Path) -> bool:
    """Whether ``path`` (or its ``cifar-10-batches-py`` child) holds the CIFAR-10 batches."""
    return (path / TEST_FILES[0]).is_file() or (path / FOLDER / TEST_FILES[0]).is_file()


def load_cifar10(folder: str | os.PathLike | None = None, train: bool = True) -> ImageSource:
    """Load one split of CIFAR-10 from the python batches.

    Args:
        folder: a folder holding the batches (or their ``cifar-10-batches-py`` folder); None
            downloads them into imagerec's cache on first use.
        train: the 50,000 training images if True, else the 10,000 test images.

    Returns:
        An array-backed :class:`ImageSource` (pixels uint8 of shape (N, 32, 32, 3)).

    Raises:
        ImagerecError: the download failed (offline) or a batch file is missing or malformed.
    """
    root = _locate(folder)
    names = TRAIN_FILES if train else TEST_FILES
    classes = _read_meta(root)
    pixels, labels, paths = [], [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise ImagerecError(f"{path}: CIFAR-10 batch file is missing; re-download or copy the full {FOLDER} folder")
        batch = _unpickle(path)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), dtype=np.int64)
            data = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)
        except (KeyError, TypeError, ValueError) as e:
            raise ImagerecError(f"{path}: not a CIFAR-10 batch ({e}); re-download {FOLDER}") from None
        if len(batch_labels) != len(data) or (len(data) and not 0 <= batch_labels.min() <= batch_labels.max() < len(classes)):
            raise ImagerecError(f"{path}: labels do not match the images; re-download {FOLDER}")
        pixels.append(data)
        labels.append(batch_labels)
        paths += [f"{path}#{i}" for i in range(len(data))]
    return ImageSource(
        paths=paths,
        labels=np.concatenate(labels),
        classes=classes,
        root=str(root),
        pixels=np.ascontiguousarray(np.concatenate(pixels)),
    )


def _locate(folder) -> Path:
    if folder is not None:
        path = Path(folder).expanduser()
        if (path / FOLDER).is_dir():
            path = path / FOLDER
        if not (path / TEST_FILES[0]).is_file():
            raise ImagerecError(
                f"{folder}: no CIFAR-10 batches there (expected {FOLDER}/test_batch); point at the "
                "folder that holds data_batch_1..5 and test_batch"
            )
        return path
    root = cache_dir("datasets")
    path = root / FOLDER
    if not all((path / n).is_file() for n in TRAIN_FILES + TEST_FILES + [META_FILE]):
        _download(root)
    return path


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR10  # noqa: PLC0415 - torchvision only when downloading
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive  # noqa: PLC0415

    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except (URLError, OSError) as e:
        raise ImagerecError(
            f"could not download CIFAR-10 from {CIFAR10.url} ({e}); offline, copy {FOLDER} into "
            f"{root} or run with --data /path/to/{FOLDER} (or a folder of images)"
        ) from None
    except RuntimeError as e:  # torchvision's word for a download that fails its MD5 checksum
        raise ImagerecError(
            f"the CIFAR-10 download from {CIFAR10.url} failed its checksum ({e}); retry, or run "
            f"with --data /path/to/{FOLDER}"
        ) from None
    for name, md5 in CIFAR10.train_list + CIFAR10.test_list:
        if not check_integrity(str(root / FOLDER / name), md5):
            raise ImagerecError(f"{root / FOLDER / name}: checksum mismatch after download; delete {root / FOLDER} and retry")


def _read_meta(root: Path) -> list[str]:
    meta = root / META_FILE
    if not meta.is_file():
        return list(_DEFAULT_CLASSES)
    names = _unpickle(meta).get(b"label_names")
    if not names:
        raise ImagerecError(f"{meta}: has no label_names; re-download {FOLDER}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


_DEFAULT_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ImagerecError(f"{path}: unreadable CIFAR-10 batch ({e}); re-download {FOLDER}") from None
    if not isinstance(obj, dict):
        raise ImagerecError(f"{path}: not a CIFAR-10 batch (a {type(obj).__name__}); re-download {FOLDER}")
    return obj
