"""Data sources: every way to name a set of images, behind one :class:`ImageSource`.

``load_images(spec)`` understands:

* ``cifar10`` (downloaded once into imagerec's cache) or a folder of the canonical
  ``cifar-10-batches-py`` files;
* a folder of class folders, ``DIR/<class>/*``, and a split root ``DIR/train/<class>`` with
  ``DIR/test/<class>`` and/or ``DIR/val/<class>``;
* any other folder, searched recursively, as unlabelled images;
* a CSV manifest ``path,label`` (UTF-8) whose paths are relative to the CSV file and stay inside
  its folder unless ``allow_outside=True``; the header row is optional and may name its
  columns as it likes (see :func:`_from_manifest` for the rule).
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .._io import write_text_atomic
from ._manifest import trusted_folders
from ..errors import ImagerecError
from .._decode import DEFAULT_MAX_PIXELS, Skipped, display_path, is_image_file, load_rgb, walk_images

SPLITS = ("train", "val", "test")
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass
class ImageSource:
    """A list of images, with labels and class names when they are known.

    Attributes:
        paths: one entry per image: a file path, or ``FILE#ROW`` for images held in arrays.
        labels: int64 array of shape (N,) indexing ``classes``, or None for unlabelled images.
        classes: class names (label ``i`` is ``classes[i]``), or None for unlabelled images.
        root: the folder, file or name the images came from, for messages.
        pixels: uint8 array of shape (N, H, W, 3) when the images are held decoded in memory (the
            CIFAR batches, or small images from the decode cache); None when read from files.
        skipped: images that were found but could not be used, with the reason.
        max_pixels: the decompression-bomb limit used when decoding files.
    """

    paths: list[str]
    labels: np.ndarray | None
    classes: list[str] | None
    root: str
    pixels: np.ndarray | None = None
    skipped: list[Skipped] = field(default_factory=list)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int | None]:
        """Return image ``index`` as an RGB PIL image and its label (None when unlabelled).

        Raises:
            DecodeError: the file cannot be read (the caller records it as skipped).
        """
        label = None if self.labels is None else int(self.labels[index])
        if self.pixels is not None:
            return Image.fromarray(np.asarray(self.pixels[index])), label
        return load_rgb(self.paths[index], self.max_pixels), label

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSource:
        """A new source with only the images at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            paths=[self.paths[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            pixels=None if self.pixels is None else self.pixels[idx],
        )

    def describe(self) -> str:
        """One line for the console: how many images, classes and skipped files."""
        text = f"{len(self):,} images from {display_path(self.root)}"
        if self.classes is not None:
            text += f", {len(self.classes)} classes"
        if self.skipped:
            text += f", {len(self.skipped):,} skipped"
        return text


def load_images(
    spec: str | os.PathLike,
    split: str | None = None,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    labelled: bool | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
) -> ImageSource:
    """Open a data set by name, folder or manifest.

    Args:
        spec: ``"cifar10"``, a folder, or a ``.csv`` manifest (see the module docstring).
        split: ``"train"``, ``"val"``, ``"test"``, or None for every image.
        val_fraction: share of each class held out as ``"val"`` (and left out of ``"train"``)
            when the data set has no validation folder of its own. 0 means no carve-out.
        seed: seed of the stratified validation split.
        labelled: True to require class folders, False to read any folder as unlabelled images,
            None to decide from the layout.
        max_pixels: the decompression-bomb limit for each image.
        allow_outside: read manifest rows whose paths lead outside the manifest's folder
            (absolute, or ``..``); without it they are skipped and reported (``--allow-outside``).

    Returns:
        An :class:`ImageSource`.

    Raises:
        ImagerecError: the path does not exist, holds no images, has an empty class folder,
            lacks the requested split, or is a manifest that is not UTF-8 CSV.
    """
    if split is not None and split not in SPLITS:
        raise ImagerecError(f"split={split!r} is not one of {SPLITS} or None; pick one of those")
    if not 0.0 <= val_fraction < 1.0:
        raise ImagerecError(f"val_fraction={val_fraction} must be in [0, 1); use e.g. 0.1")
    if max_pixels < 1:
        raise ImagerecError(f"max_pixels={max_pixels} must be a positive number of pixels")
    text = os.fspath(spec)
    from ._cifar10 import is_cifar10_folder, load_cifar10  # noqa: PLC0415 - avoids an import cycle

    if text == "cifar10" or text.startswith("cifar10:"):
        folder = text.partition(":")[2] or None
        return _split_arrays(load_cifar10, folder, split, val_fraction, seed)
    path = Path(text).expanduser()
    if not path.exists():
        raise ImagerecError(
            f"{text}: no such file or folder; give a folder of images, a CSV manifest or 'cifar10'"
        )
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ImagerecError(
                f"{text}: is a file but not a .csv manifest; give a folder of images or a CSV "
                "manifest with the columns path,label"
            )
        source = _from_manifest(path, max_pixels, allow_outside)
        return _carve(source, split, val_fraction, seed, text)
    if is_cifar10_folder(path):
        return _split_arrays(load_cifar10, path, split, val_fraction, seed)

    split_dirs = _find_split_dirs(path)
    if "train" in split_dirs and len(split_dirs) > 1 and labelled is not False:
        return _from_split_root(path, split_dirs, split, val_fraction, seed, max_pixels)
    if labelled is False:
        source = _unlabelled(path, max_pixels)
    else:
        source = _from_class_folders(path, max_pixels, required=bool(labelled))
        if source is None:
            source = _unlabelled(path, max_pixels)
    return _carve(source, split, val_fraction, seed, text)


def has_val_split(spec: str | os.PathLike, val_fraction: float) -> bool:
    """Whether ``load_images(spec, "val", val_fraction=...)`` has a validation split to give: a
    carve-out (``val_fraction`` > 0), or a folder with a training folder and a validation folder
    of its own (``val``, ``valid`` or ``validation``)."""
    path = Path(os.fspath(spec)).expanduser()
    return val_fraction > 0 or (path.is_dir() and {"train", "val"} <= set(_find_split_dirs(path)))


def _split_arrays(loader, folder, split, val_fraction, seed) -> ImageSource:
    """Splits of a data set that comes as a train part and a test part (the CIFAR batches)."""
    if split == "test":
        return loader(folder, train=False)
    if split is None:
        train, test = loader(folder, train=True), loader(folder, train=False)
        return _concat([train, test])
    return _carve(loader(folder, train=True), split, val_fraction, seed, str(folder or "cifar10"))


def _find_split_dirs(path: Path) -> dict[str, Path]:
    found = {}
    for split, names in _SPLIT_FOLDERS.items():
        for name in names:
            if (path / name).is_dir():
                found[split] = path / name
                break
    return found


def _from_split_root(root, split_dirs, split, val_fraction, seed, max_pixels) -> ImageSource:
    parts = {name: _from_class_folders(folder, max_pixels, required=True) for name, folder in split_dirs.items()}
    classes = parts["train"].classes
    for name, part in parts.items():
        if part.classes != classes:
            raise ImagerecError(
                f"{split_dirs[name]}: class folders {part.classes} differ from those of "
                f"{split_dirs['train']} ({classes}); every split needs the same class folders"
            )
    if split is None:
        return replace(_concat(list(parts.values())), root=str(root))
    if split in parts and not (split == "train" and "val" not in parts):
        return parts[split]
    if split == "test":
        raise ImagerecError(
            f"{root}: has no test folder (looked for {root}/test/<class>/); use split 'val' or add one"
        )
    return _carve(parts["train"], split, val_fraction, seed, str(root))


def _carve(source: ImageSource, split, val_fraction, seed, name) -> ImageSource:
    """Apply a split to a data set with no split folders: a stratified, seeded carve-out."""
    if split is None:
        return source
    if split == "test":
        raise ImagerecError(
            f"{name}: has no test split; arrange it as DIR/train/<class> + DIR/test/<class>, or "
            "evaluate on split 'val'"
        )
    if val_fraction == 0.0:
        if split == "train":
            return source
        raise ImagerecError(
            f"{name}: has no validation folder; pass val_fraction > 0 (--val-fraction 0.1) to "
            "hold out part of the training images"
        )
    train_idx, val_idx = stratified_split(source.labels, len(source), val_fraction, seed)
    return source.subset(train_idx if split == "train" else val_idx)


def stratified_split(
    labels: np.ndarray | None, n: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..n-1`` into train and validation parts, class by class.

    Every class with at least two images gives at least one to each part, so the validation
    split sees every class. The result depends only on ``labels``, ``val_fraction`` and ``seed``.

    Returns:
        (train_indices, val_indices), each sorted.
    """
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, val = [], []
    for members in groups:
        members = rng.permutation(members)
        take = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        val.append(members[:take])
        train.append(members[take:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _concat(parts: list[ImageSource]) -> ImageSource:
    first = parts[0]
    return ImageSource(
        paths=[p for part in parts for p in part.paths],
        labels=None if first.labels is None else np.concatenate([p.labels for p in parts]),
        classes=first.classes,
        root=first.root,
        pixels=None if first.pixels is None else np.concatenate([p.pixels for p in parts]),
        skipped=[s for part in parts for s in part.skipped],
        max_pixels=first.max_pixels,
    )


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _from_class_folders(root: Path, max_pixels: int, required: bool) -> ImageSource | None:
    """``root/<class>/<image>``; None when ``root`` is not laid out so (unless ``required``)."""
    with os.scandir(root) as it:
        entries = _visible(it)
    subdirs = [e for e in entries if e.is_dir()]
    loose = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
    layout_hint = f"expected {root}/<class>/<image> with one folder per class"
    if loose or not subdirs:
        if required:
            what = f"images directly in it ({loose[0]}, ...)" if loose else "no class folders"
            raise ImagerecError(f"{root}: has {what}; {layout_hint}")
        return None
    paths, labels, classes, empty = [], [], [], []
    for sub in subdirs:
        with os.scandir(sub.path) as it:
            files = _visible(it)
        if any(e.is_dir() for e in files) and not required:
            return None  # nested folders: not a class layout, read as unlabelled photos
        images = [e.path for e in files if e.is_file() and is_image_file(e.name)]
        if not images:
            empty.append(sub.path)
            continue
        labels += [len(classes)] * len(images)
        classes.append(sub.name)
        paths += images
    if empty:
        raise ImagerecError(
            f"class folder {empty[0]} has no images ({len(empty)} empty in all); add images "
            "(jpg, jpeg, png, bmp, gif, webp, tiff) or remove the folder"
        )
    return ImageSource(paths, np.asarray(labels, dtype=np.int64), classes, str(root), max_pixels=max_pixels)


def _unlabelled(root: Path, max_pixels: int) -> ImageSource:
    paths = list(walk_images(root))  # links followed once: a link loop neither repeats nor hangs
    if not paths:
        raise ImagerecError(
            f"{root}: holds no images (searched all sub-folders for jpg, jpeg, png, bmp, gif, "
            "webp, tiff); point at a folder that has some"
        )
    return ImageSource(paths, None, None, str(root), max_pixels=max_pixels)


def _from_manifest(path: Path, max_pixels: int, allow_outside: bool = False) -> ImageSource:
    """A CSV manifest ``path[,label]``, UTF-8, paths relative to the CSV's folder.

    The first row is a header when its first cell names no image: it has no image extension
    and no such file exists (``path,label``, ``file,class``, ``filename``). A path outside the
    manifest's folder (absolute, or climbing out with ``..``) is refused as a skipped row unless
    ``allow_outside``; the check is on the path as written, so links inside the folder are the
    folder owner's choice and are followed. A manifest that imagerec wrote may also name images in
    the folders it recorded then (see :mod:`imagerec.data._manifest`).
    """
    rows = _read_manifest(path)
    base = path.parent
    if rows and _is_header(rows[0], base):
        rows = rows[1:]
    if not rows:
        raise ImagerecError(f"{path}: the manifest lists no images; write one 'path,label' row per image")
    has_labels = [len(r) > 1 and r[1].strip() != "" for r in rows]
    if any(has_labels) and not all(has_labels):
        line = has_labels.index(False) + 1
        raise ImagerecError(
            f"{path}: row {line} has no label while others do; give every row a label, or none"
        )
    inside = os.path.abspath(base)
    trusted = trusted_folders(path)  # the folders of a manifest that imagerec itself wrote
    paths, names, skipped, refused = [], [], [], 0
    for row in rows:
        file = os.path.normpath(os.path.join(inside, row[0].strip()))
        if not (allow_outside or os.path.commonpath([inside, file]) == inside or os.path.dirname(file) in trusted):
            refused += 1
            why = f"outside the manifest's folder {inside}; pass --allow-outside (allow_outside=True) to read it"
            skipped.append(Skipped(file, why))
            continue
        if not os.path.isfile(file):
            skipped.append(Skipped(file, "file not found (listed in the manifest)"))
            continue
        paths.append(file)
        names.append(row[1].strip() if len(row) > 1 else None)
    if not paths:
        why = f"{refused} are outside its folder (pass --allow-outside to read them), the others" if refused else "none"
        raise ImagerecError(
            f"{path}: none of the {len(rows)} files it lists can be read: {why} do not exist; "
            "paths are relative to the CSV"
        )
    labels = classes = None
    if all(has_labels):
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[n] for n in names], dtype=np.int64)
    return ImageSource(paths, labels, classes, str(path), skipped=skipped, max_pixels=max_pixels)


def _read_manifest(path: Path) -> list[list[str]]:
    """The non-blank rows of a UTF-8 CSV file (a byte-order mark is allowed)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError as e:
        raise ImagerecError(
            f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    except csv.Error as e:
        raise ImagerecError(f"{path}: not a readable CSV file ({e}); write one 'path,label' row per image") from None


def _is_header(row: list[str], base: Path) -> bool:
    first = row[0].strip()
    return not is_image_file(first) and not os.path.isfile(os.path.join(base, first))


def report_skipped(skipped: Sequence[Skipped], out: str | os.PathLike | None, shown: int = 5) -> Path | None:
    """Tell the user which images were left out: a count and the first few on stderr, the full
    list as CSV in ``out`` (a run folder) or beside it (a file: ``NAME.skipped.csv``).

    A file name that is not UTF-8 is written with its odd bytes as ``\\xNN`` escapes
    (see :func:`~imagerec._decode.display_path`).

    Returns:
        The CSV written, or None when nothing was skipped or no ``out`` was given.
    """
    if not skipped:
        return None
    target = None
    if out is not None:
        out = Path(out)
        target = out / "skipped.csv" if out.is_dir() or not out.suffix else out.with_suffix(".skipped.csv")
        lines = ["path,reason"] + [_csv_line(display_path(s.path), s.reason) for s in skipped]
        write_text_atomic(target, "\n".join(lines) + "\n")
    first = "; ".join(f"{display_path(s.path)}: {s.reason}" for s in skipped[:shown])
    more = f" (+{len(skipped) - shown} more)" if len(skipped) > shown else ""
    where = f"; full list in {target}" if target else ""
    print(f"imagerec: skipped {len(skipped)} unreadable image(s): {first}{more}{where}", file=sys.stderr)
    return target


def _csv_line(*cells: str) -> str:
    import io  # noqa: PLC0415

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()
