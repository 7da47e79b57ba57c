"""Embeddings: every image turned into a feature vector by a backbone.

The file format is a numpy ``.npz`` archive, read with numpy alone (``allow_pickle=False``):

* ``features``: float32 array (N, D), one row per image;
* ``paths``: str array (N,), the image each row came from;
* ``labels``: int64 array (N,) indexing ``classes`` (absent for unlabelled images);
* ``classes``: str array of class names (absent for unlabelled images);
* ``meta``: a JSON string: backbone, preprocessing, imagerec version.

pandas users: ``d = np.load(f); pd.DataFrame(d["features"], index=d["paths"])``.

A run with an output file is resumable: finished chunks of images are written to
``OUT.partial/`` as they complete, and a run started again with the same inputs continues
from there. The output file is written atomically at the end and the partial folder removed.
The partial folder records each image's identity (size, mtime_ns, inode, ctime_ns and a hash
of small files, :func:`imagerec._identity.file_identity`): a resumed run whose images changed
says "re-embedding N changed images" and embeds again the chunks that hold them.

Paths are stored as Python reads them: a file name that is not UTF-8 keeps its bytes (as
surrogate escapes, ``os.fsencode(path)`` gives them back); messages and CSV files show such
bytes as ``\\xNN``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._decode import display_path
from ._home import cache_dir
from ._identity import file_identity
from ._io import atomic_path, write_text_atomic
from ._lock import output_lock
from ._onnx import FeatureModel, export_onnx, onnx_session
from ._version import __version__
from .checkpoint import feature_model
from .data import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    Preprocessing,
    Skipped,
    decode_small_images,
    iter_batches,
    load_images,
    report_skipped,
)
from .errors import ImagerecError, ImagerecWarning
from .inference import resolve_device

CHUNK = 2048  # images per resumable chunk


@dataclass
class Embeddings:
    """Feature vectors of a set of images.

    Attributes:
        features: float32 array of shape (N, D).
        paths: the image of each row.
        labels: int64 array of shape (N,), or None when unlabelled.
        classes: class names, or None when unlabelled.
        backbone: name of the backbone that made them.
        preprocessing: how the images were prepared.
        skipped: images that could not be read (not in ``features``).
    """

    features: np.ndarray
    paths: list[str]
    labels: np.ndarray | None
    classes: list[str] | None
    backbone: str
    preprocessing: Preprocessing
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> Path:
        """Write the ``.npz`` file atomically (see the module docstring for its layout).

        Args:
            path: the file.
            meta: more entries for the file's ``meta`` JSON (e.g. a part's ``shard`` record),
                written in the same atomic step.
        """
        path = Path(path)
        arrays = {
            "features": self.features.astype(np.float32, copy=False),
            "paths": np.asarray(self.paths, dtype=str),
            "meta": np.asarray(json.dumps({**self._meta(), **(meta or {})})),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels.astype(np.int64, copy=False)
            arrays["classes"] = np.asarray(self.classes, dtype=str)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        return path

    def _meta(self) -> dict:
        return {
            "backbone": self.backbone,
            "preprocessing": self.preprocessing.to_dict(),
            "imagerec_version": __version__,
            "skipped": len(self.skipped),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        """Read a file written by :meth:`save`.

        Every array's header is checked against the bytes the archive holds before anything is
        allocated (a damaged or forged shape cannot ask for terabytes), and the arrays against
        each other: float (N, D) finite features, N non-empty path strings, labels within the classes.

        Raises:
            ImagerecError: the file is missing, or not a complete imagerec embeddings file.
        """
        shown = display_path(path)
        try:
            arrays = _read_npz(path)
            loaded = cls._from_arrays(arrays)
        except FileNotFoundError:
            raise ImagerecError(f"{shown}: no such embeddings file; make one with 'imagerec embed'") from None
        except IsADirectoryError:
            raise ImagerecError(f"{shown}: is a folder, not an embeddings file; give the .npz that 'imagerec embed' wrote") from None
        except _NotEmbeddings as e:
            raise ImagerecError(f"{shown}: not an imagerec embeddings file ({e}); make one with 'imagerec embed'") from None
        except MemoryError:
            raise ImagerecError(f"{shown}: its arrays do not fit in memory; embed fewer images per file (imagerec embed --shard)") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError, TypeError, OSError) as e:
            what = " ".join(str(e).split()) or "unreadable"
            raise ImagerecError(f"{shown}: a damaged embeddings file ({what}); make it again with 'imagerec embed'") from None
        problem = loaded._inconsistency()
        if problem:
            raise ImagerecError(f"{shown}: a damaged embeddings file: {problem}; make it again with 'imagerec embed'")
        return loaded

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray]) -> Embeddings:
        for key in ("features", "paths", "meta"):
            if key not in arrays:
                raise _NotEmbeddings(f"no {key!r} array; it holds {', '.join(sorted(arrays)) or 'nothing'}")
        if ("labels" in arrays) != ("classes" in arrays):
            raise _NotEmbeddings("labels without classes or classes without labels")
        meta = arrays["meta"]
        meta = json.loads(str(meta)) if meta.ndim == 0 and meta.dtype.kind == "U" else None
        if not isinstance(meta, dict) or not isinstance(meta.get("backbone"), str) or not isinstance(meta.get("preprocessing"), dict):
            raise _NotEmbeddings("its meta is not a JSON object with a backbone name and preprocessing")
        for key in ("paths", "classes"):
            if key in arrays and (arrays[key].ndim != 1 or arrays[key].dtype.kind != "U"):
                raise _NotEmbeddings(f"{key} of dtype {arrays[key].dtype} and shape {arrays[key].shape} are not a list of text")
        labelled = "labels" in arrays
        return cls(
            features=arrays["features"],
            paths=arrays["paths"].tolist(),
            labels=arrays["labels"] if labelled else None,
            classes=arrays["classes"].tolist() if labelled else None,
            backbone=meta["backbone"],
            preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        )

    def _inconsistency(self) -> str | None:
        """What does not fit together in a loaded file, or None."""
        f = self.features
        if f.ndim != 2 or not np.issubdtype(f.dtype, np.floating) or (len(f) and f.shape[1] == 0):
            return f"features of dtype {f.dtype} and shape {f.shape} are not a float (N, D) array with D >= 1"
        if len(self.paths) != len(f):
            return f"{len(self.paths)} paths for {len(f)} rows of features"
        bad = next((i for i, p in enumerate(self.paths) if not p or "\0" in p), None)
        if bad is not None:
            return f"path {bad} is {display_path(self.paths[bad])!r}, which no file can be named"
        finite = _finite_rows(f)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            return f"{int((~finite).sum())} row(s) hold NaN or infinite features (first: {display_path(self.paths[first])})"
        if self.labels is not None:
            if self.labels.ndim != 1 or len(self.labels) != len(f) or not np.issubdtype(self.labels.dtype, np.integer):
                return f"labels of shape {self.labels.shape} for {len(f)} rows"
            if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
                return f"labels outside 0..{len(self.classes) - 1} for {len(self.classes)} classes"
        return None


class _NotEmbeddings(ValueError):
    """An archive that reads but is not what :meth:`Embeddings.save` writes."""


DEFLATE_RATIO = 1032  # the most a deflated stream expands (zlib's documented limit, 1032:1)


def _read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive, each header checked against the bytes the archive
    holds before its array is allocated (no pickles, no object arrays)."""
    size = os.path.getsize(path)
    arrays = {}
    with open(path, "rb") as raw:
        if raw.read(4) != b"PK\x03\x04":
            raise _NotEmbeddings("not an .npz (zip) archive")
        with zipfile.ZipFile(raw) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                limit = info.compress_size * (DEFLATE_RATIO if info.compress_type == zipfile.ZIP_DEFLATED else 1)
                if info.header_offset + info.compress_size > size or info.file_size > limit:
                    raise _NotEmbeddings(f"its {name} entry claims {info.file_size:,} bytes that the {size:,}-byte file cannot hold")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        raise _NotEmbeddings(f"its {name} entry is .npy version {version}, not 1.0 or 2.0")
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(member)
                    if dtype.hasobject:
                        raise _NotEmbeddings(f"its {name} entry is an array of Python objects, which imagerec never writes")
                    declared = math.prod(shape) * dtype.itemsize
                    if declared > info.file_size - member.tell():
                        raise _NotEmbeddings(
                            f"its {name} entry declares shape {shape} of {dtype} ({declared:,} bytes) but holds {info.file_size - member.tell():,}"
                        )
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def _finite_rows(features: np.ndarray, block: int = 65536) -> np.ndarray:
    """Whether each row is free of NaN and infinity, a block at a time (no N x D mask)."""
    return np.concatenate([np.isfinite(features[i : i + block]).all(axis=1) for i in range(0, len(features), block)] or [np.ones(0, bool)])


def embed(
    data: str | os.PathLike | ImageSource,
    backbone: str | nn.Module = "efficientnet_lite0",
    *,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: str = "auto",
    progress: bool = True,
    allow_outside: bool = False,
) -> Embeddings:
    """Embed images with a backbone's pooled features (``forward_head(pre_logits=True)``).

    Args:
        data: a data set spec for :func:`~imagerec.data.load_images`, or an ImageSource.
        backbone: a registry name (pretrained weights where it has them), or a model that keeps
            the model contract and carries ``preprocessing``.
        out: ``.npz`` file to write; with it the run is resumable (see the module docstring).
        split: ``"train"``, ``"val"``, ``"test"`` or None (all images).
        image_size: input side in pixels (default: the backbone's).
        crop_pct: centre-crop share; default: the backbone's, but 1.0 (no crop) for images smaller
            than the input, which are upsampled whole.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        workers: decoding processes for folders of large images (default: number of CPUs).
        max_pixels: decompression-bomb limit per image.
        engine: ``"torch"`` (PyTorch, channels_last, inference mode), ``"onnx"`` (the model
            exported once to ONNX, cached in imagerec's cache, run by ONNX Runtime: faster on
            a CPU, same features to about 1e-5) or ``"auto"`` (onnx on a CPU where
            onnxruntime is installed, else torch).
        progress: show a progress bar with images/s and ETA.
        allow_outside: read CSV manifest rows whose paths lead outside the manifest's folder
            (``--allow-outside``); without it they are reported as skipped.

    Returns:
        The :class:`Embeddings` (also written to ``out`` when given).

    Raises:
        ImagerecError: bad arguments, an ``out`` that cannot be written (checked before any
            work), unreadable data, or no readable image at all.
    """
    if batch_size < 1:
        raise ImagerecError(f"batch_size={batch_size} must be at least 1; try 64")
    if workers is not None and workers < 0:
        raise ImagerecError(
            f"workers={workers} must be 0 or more (0 decodes in this process); leave it out to use every CPU"
        )
    out = _check_out(out)
    source = data if isinstance(data, ImageSource) else load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)
    model = feature_model(backbone)
    name = getattr(model, "backbone_name", type(model).__name__)
    pp = model.preprocessing.resolve(image_size, crop_pct)  # validated before any decoding
    with output_lock(out, "embed run") if out else contextlib.nullcontext():  # before any decoding: a second run stops at once
        source = decode_small_images(source, progress=progress) or source
        if crop_pct is None and source.pixels is not None and max(source.pixels.shape[1:3]) < pp.input_size:
            pp = pp.resolve(crop_pct=1.0)  # small images are upsampled whole, not cropped
        weights = _weights_digest(model, pp, name)
        compute = _feature_function(model, pp, engine, resolve_device(device), weights)
        return _embed_chunks(source, name, pp, compute, out, weights, batch_size, workers, progress)


def _embed_chunks(source, name, pp, compute, out, weights, batch_size, workers, progress) -> Embeddings:
    """Embed every image not already in ``OUT.partial/``, then write ``out`` (the caller holds its lock)."""
    partial = _Partial(Path(f"{out}.partial"), _fingerprint(source, weights), source.paths) if out else None
    done = partial.load() if partial else {}
    todo = [s for s in range(0, len(source), CHUNK) if s not in done]
    indices = np.concatenate([np.arange(s, min(s + CHUNK, len(source))) for s in todo]) if todo else np.empty(0, np.int64)
    finished = sum(len(c["indices"]) + len(c["skipped"]) for c in done.values())

    bar = tqdm(total=len(source), initial=finished, desc=f"embed {name}", unit="img", disable=not progress, smoothing=0.1)
    collector = _ChunkCollector(len(source), todo, partial, done)
    for batch in iter_batches(source, pp, batch_size=batch_size, indices=indices, workers=workers):
        features = compute(batch.images) if len(batch.indices) else np.zeros((0, 0), np.float32)
        collector.add(batch.indices.numpy(), features, batch.skipped)
        bar.update(len(batch.indices) + len(batch.skipped))
    bar.close()

    result = collector.result(source, name, pp)
    if len(result) == 0:
        if partial:
            partial.remove()  # nothing worth resuming
        raise ImagerecError(f"{source.root}: none of its {len(source)} images could be read; see the skipped list")
    if out:
        result.save(out)
        partial.remove()
    report_skipped(result.skipped, out)
    return result


def _weights_digest(model: nn.Module, pp: Preprocessing, name: str) -> str:
    """Identifies a model's weights and preprocessing."""
    digest = hashlib.sha256(json.dumps([name, pp.to_dict(), __version__]).encode())
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_out(out: str | os.PathLike | None) -> Path | None:
    """The output file, checked before any work: a ``.npz`` name in a folder that can be written.

    Raises:
        ImagerecError: an empty name, a folder, another suffix, or a place that cannot be written.
    """
    if out is None:
        return None
    text = os.fspath(out)
    if not text.strip():
        raise ImagerecError("out='' is an empty file name; name an .npz file, e.g. --out embeddings.npz")
    path, shown = Path(text), display_path(text)
    if path.is_dir():
        example = display_path(path / "embeddings.npz")
        raise ImagerecError(f"{shown}: is a folder; name an .npz file, e.g. --out {example}")
    if path.suffix.lower() != ".npz":
        example = display_path(path.with_suffix(".npz"))
        raise ImagerecError(f"{shown}: an embeddings file must end in .npz; use --out {example}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the first folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise ImagerecError(f"{shown}: {display_path(folder)} is a file, not a folder; pick another --out")
    try:  # the one sure test (permissions, read-only file systems, quotas): write a file there
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        where = display_path(folder)
        raise ImagerecError(f"{shown}: cannot write in {where} ({e.strerror}); pick another --out") from None
    return path


def _fingerprint(source: ImageSource, weights: str) -> str:
    """Identifies a run's inputs: the image paths (their contents are checked one by one, see
    :class:`_Partial`), and the model's weights and preprocessing."""
    digest = hashlib.sha256(weights.encode())
    digest.update("\n".join(source.paths).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _feature_function(model: nn.Module, pp: Preprocessing, engine: str, device: torch.device, weights: str):
    """images (N, 3, S, S) float tensor -> float32 numpy features (N, D), by PyTorch or ONNX Runtime."""
    if engine == "auto":
        engine = "auto-onnx" if device.type == "cpu" and importlib.util.find_spec("onnxruntime") else "torch"
    if engine in ("onnx", "auto-onnx"):
        if device.type != "cpu":
            raise ImagerecError(f"engine 'onnx' runs on the CPU; use engine 'torch' with device {device}")
        path = cache_dir("onnx") / f"{weights[:32]}.onnx"
        try:
            if not path.is_file():
                export_onnx(FeatureModel(model), path, pp.input_size)
            session = onnx_session(path, threads=torch.get_num_threads())
        except Exception as e:  # noqa: BLE001 - a model ONNX cannot express still embeds with PyTorch
            if engine == "onnx":
                raise
            warnings.warn(f"ONNX export failed ({e}); embedding with PyTorch instead", ImagerecWarning, stacklevel=3)
            return _feature_function(model, pp, "torch", device, weights)
        return lambda images: session.run(None, {"images": np.ascontiguousarray(images.numpy())})[0]
    if engine != "torch":
        raise ImagerecError(f"engine {engine!r} is not one of auto, torch, onnx")
    features = FeatureModel(model).eval().to(device, memory_format=torch.channels_last)

    def run(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return features(images.to(device, non_blocking=True)).float().cpu().numpy()

    return run


class _Partial:
    """The ``OUT.partial/`` folder of a resumable run: one ``.npz`` per finished chunk, and
    ``run.json`` with the run's fingerprint and the identity of every image when it started."""

    def __init__(self, folder: Path, fingerprint: str, paths: list[str]):
        self.folder, self.fingerprint, self.paths = folder, fingerprint, paths

    def load(self) -> dict[int, dict]:
        """The finished chunks whose images have not changed since; the rest start afresh."""
        meta = self.folder / "run.json"
        recorded = json.loads(meta.read_text()) if meta.is_file() else {}
        identities = [file_identity(p) for p in self.paths]
        if recorded.get("fingerprint") != self.fingerprint:
            shutil.rmtree(self.folder, ignore_errors=True)  # another run's leftovers: start afresh
            self._write_meta(identities)
            return {}
        chunks = {}
        for file in sorted(self.folder.glob("chunk_*.npz")):
            with np.load(file, allow_pickle=False) as d:
                chunks[int(file.stem[6:])] = {
                    "features": d["features"],
                    "indices": d["indices"],
                    "skipped": json.loads(str(d["skipped"])),
                }
        old = recorded.get("identities", [])
        changed = [i for i, now in enumerate(identities) if i >= len(old) or old[i] != now]
        stale = sorted({i // CHUNK * CHUNK for i in changed} & set(chunks))
        if stale:
            n = sum(1 for i in changed if i // CHUNK * CHUNK in chunks)
            print(
                f"imagerec: re-embedding {n} changed image{'s' if n != 1 else ''} since the interrupted run "
                f"(the {len(stale)} chunk(s) of up to {CHUNK} images that hold them)",
                file=sys.stderr,
            )
            for start in stale:
                del chunks[start]
                (self.folder / f"chunk_{start:09d}.npz").unlink(missing_ok=True)
        self._write_meta(identities)  # only after the stale chunks are gone (a kill in between is safe)
        return chunks

    def _write_meta(self, identities: list[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / "run.json", json.dumps({"fingerprint": self.fingerprint, "identities": identities}))

    def save(self, start: int, chunk: dict) -> None:
        with atomic_path(self.folder / f"chunk_{start:09d}.npz", suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=chunk["features"], indices=chunk["indices"], skipped=np.asarray(json.dumps(chunk["skipped"])))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _ChunkCollector:
    """Gathers batch results into chunks of ``CHUNK`` images and saves each as it completes."""

    def __init__(self, n: int, todo: list[int], partial: _Partial | None, done: dict[int, dict]):
        self.partial, self.chunks = partial, dict(done)
        self.open = {s: {"features": [], "indices": [], "skipped": [], "left": min(CHUNK, n - s)} for s in todo}

    def add(self, indices: np.ndarray, features: np.ndarray | None, skipped: list) -> None:
        starts = indices // CHUNK * CHUNK
        for start in np.unique(starts):
            mask = starts == start
            self._put(int(start), features[mask], indices[mask], [])
        for index, item in skipped:
            self._put(index // CHUNK * CHUNK, None, np.empty(0, np.int64), [[item.path, item.reason]])

    def _put(self, start: int, features, indices, skipped) -> None:
        chunk = self.open[start]
        if features is not None:
            chunk["features"].append(features)
        chunk["indices"].append(indices)
        chunk["skipped"] += skipped
        chunk["left"] -= len(indices) + len(skipped)
        if chunk["left"] == 0:
            del self.open[start]
            finished = {
                "features": np.concatenate(chunk["features"]) if chunk["features"] else np.zeros((0, 0), np.float32),
                "indices": np.concatenate(chunk["indices"]),
                "skipped": chunk["skipped"],
            }
            if self.partial:
                self.partial.save(start, finished)
            self.chunks[start] = finished

    def result(self, source: ImageSource, name: str, pp: Preprocessing) -> Embeddings:
        assert not self.open, "every chunk is complete once all batches are in"
        parts = [self.chunks[s] for s in sorted(self.chunks)]
        with_features = [p["features"] for p in parts if len(p["features"])]
        features = np.concatenate(with_features) if with_features else np.zeros((0, 0), np.float32)
        indices = np.concatenate([p["indices"] for p in parts]).astype(np.int64)
        order = np.argsort(indices, kind="stable")
        indices = indices[order]
        return Embeddings(
            features=np.ascontiguousarray(features[order]) if len(features) else features,
            paths=[source.paths[i] for i in indices],
            labels=None if source.labels is None else source.labels[indices],
            classes=source.classes,
            backbone=name,
            preprocessing=pp,
            skipped=source.skipped + [Skipped(path, why) for part in parts for path, why in part["skipped"]],
        )
