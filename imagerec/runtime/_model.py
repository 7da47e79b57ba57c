"""``OnnxClassifier``: an exported imagerec classifier run by ONNX Runtime, with no PyTorch.

It reads the class names and preprocessing that ``imagerec export`` stored in the ONNX file
(see ``imagerec._metadata``) and answers like :class:`imagerec.Classifier`: the same
probabilities, a row of NaN for an unreadable image, and a
:class:`~imagerec.errors.SkippedImagesWarning` naming it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .._decode import DEFAULT_MAX_PIXELS, DecodeError, Skipped, expand_paths, load_rgb
from .._metadata import (
    INPUT_NAME,
    KEY_BACKBONE,
    KEY_CLASSES,
    KEY_COMPRESSION,
    KEY_FORMAT,
    KEY_PREPROCESSING,
    KEY_TEMPERATURE,
    KEY_VERSION,
    ONNX_FORMAT,
    OUTPUT_NAME,
    check_temperature,
)
from ..errors import ImagerecError, SkippedImagesWarning
from ._preprocess import Preprocessing, _preprocess, as_rgb_array

DEFAULT_NAME = "model.onnx"  # what ``imagerec export`` writes into a run folder


class OnnxClassifier:
    """An exported classifier; make one with :func:`imagerec.runtime.load`.

    Attributes:
        classes: class names, in logit order.
        preprocessing: how images are prepared (input size, mean, std, interpolation, crop).
        backbone: registry name of the backbone the model was trained on.
        compression: how the model was compressed (``{}`` when it was not).
        temperature: the calibration temperature T fitted after training: ``predict_proba`` gives
            softmax(logits / T); ``logits`` stay raw. 1 for models exported before calibration.
        version: the imagerec version that exported the model.
        path: the ONNX file.
        last_skipped: the unreadable images of the last ``predict_proba`` call.
    """

    def __init__(self, path: Path, session, metadata: dict[str, str]):
        self.path = path
        self._session = session
        self.classes: list[str] = _json(path, metadata, KEY_CLASSES, list)
        self.preprocessing = _preprocessing(path, _json(path, metadata, KEY_PREPROCESSING, dict))
        self.backbone: str = metadata.get(KEY_BACKBONE, "")
        self.version: str = metadata.get(KEY_VERSION, "")
        self.compression: dict = _json(path, metadata, KEY_COMPRESSION, dict) if KEY_COMPRESSION in metadata else {}
        self.temperature = _temperature(path, metadata)
        self.last_skipped: list[Skipped] = []
        self._check_graph()

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, backbone={self.backbone!r}, classes={len(self.classes)})"

    def _check_graph(self) -> None:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise ImagerecError(
                f"{self.path}: the graph has inputs {[i.name for i in inputs]} and outputs "
                f"{[o.name for o in outputs]}, not {INPUT_NAME!r} -> {OUTPUT_NAME!r}; re-export it with imagerec export"
            )
        shape, size = inputs[0].shape, self.preprocessing.input_size
        if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (3, size, size))):
            raise ImagerecError(
                f"{self.path}: input shape {shape} does not take (N, 3, {size}, {size}) images as its "
                "preprocessing says; re-export it with imagerec export"
            )
        logits = next(o for o in outputs if o.name == OUTPUT_NAME).shape
        if len(logits) != 2 or (isinstance(logits[1], int) and logits[1] != len(self.classes)):
            raise ImagerecError(
                f"{self.path}: output shape {logits} does not give {len(self.classes)} logits per image, "
                "one per class name; re-export it with imagerec export"
            )

    # -- inference ---------------------------------------------------------------------------

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw output for prepared images.

        Args:
            batch: float array of shape (N, 3, S, S), prepared by :func:`imagerec.runtime.preprocess`
                (S = ``preprocessing.input_size``).

        Returns:
            float32 array of shape (N, C), C = ``len(classes)``.

        Raises:
            ImagerecError: ``batch`` is not of that shape.
        """
        size = self.preprocessing.input_size
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or not np.issubdtype(batch.dtype, np.floating):
            raise ImagerecError(
                f"a batch of dtype {batch.dtype} and shape {batch.shape} is not float images of shape "
                f"(N, 3, {size}, {size}); prepare each image with imagerec.runtime.preprocess and np.stack them"
            )
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], dtype=np.float32)

    def predict_proba(
        self, images, *, tta: bool = False, batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        """Class probabilities, float32 array (N, C); a row of NaN for an unreadable image.

        The probabilities are softmax(logits / ``temperature``), calibrated as training fitted.

        Args:
            images: a file path, folder or glob, a PIL image, a uint8 array of shape (H, W, 3)
                (or (N, H, W, 3) for N images), or a list of any of these. A folder means every
                image under it, a glob every image it matches, in sorted order.
            tta: average the logits with those of the mirrored image (test-time augmentation).
            batch_size: images per call of the model.
            max_pixels: refuse image files with more pixels than this (a decompression-bomb guard).

        Returns:
            float32 array (N, C), one row per image, in the order given.

        Raises:
            ImagerecError: a path that does not exist, a glob that matches nothing, no images,
                an object that is not an image, or ``batch_size`` < 1.

        Warns:
            SkippedImagesWarning: some files could not be read; their rows are NaN.
        """
        return self._predict_proba(images, tta, batch_size, max_pixels, stacklevel=3)

    def predict(
        self, images, *, tta: bool = False, batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> list[str | None]:
        """The most probable class name of each image (None for an unreadable image).

        Args, Raises and Warns: as :meth:`predict_proba`.
        """
        proba = self._predict_proba(images, tta, batch_size, max_pixels, stacklevel=3)
        return [None if np.isnan(row).any() else self.classes[int(row.argmax())] for row in proba]

    def _predict_proba(self, images, tta: bool, batch_size: int, max_pixels: int, stacklevel: int) -> np.ndarray:
        if batch_size < 1:
            raise ImagerecError(f"batch_size={batch_size} must be >= 1; e.g. 32")
        items = _expand(images)
        proba = np.full((len(items), len(self.classes)), np.nan, dtype=np.float32)
        skipped: list[Skipped] = []
        for start in range(0, len(items), batch_size):
            rows, prepared = [], []
            for row, item in enumerate(items[start : start + batch_size], start):
                try:
                    pixels = _pixels(item, max_pixels)
                except DecodeError as e:
                    skipped.append(Skipped(os.fspath(item), str(e)))
                    continue
                rows.append(row)
                prepared.append(_preprocess(pixels, self.preprocessing))
            if rows:
                proba[rows] = _softmax(self._logits_tta(np.stack(prepared), tta) / self.temperature)
        self.last_skipped = skipped
        if skipped:
            first = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
            warnings.warn(
                f"{len(skipped)} image(s) could not be read: {first}", SkippedImagesWarning, stacklevel=stacklevel
            )
        return proba

    def _logits_tta(self, batch: np.ndarray, tta: bool) -> np.ndarray:
        """As ``imagerec.inference.forward_logits``: with ``tta``, logits averaged with the mirror's."""
        logits = self._run(batch)
        if tta:
            logits = (logits + self._run(np.ascontiguousarray(batch[..., ::-1]))) / 2
        return logits


def load(path: str | os.PathLike, *, threads: int | None = None) -> OnnxClassifier:
    """Open a classifier exported by ``imagerec export``.

    Args:
        path: the ``.onnx`` file, or a run folder holding ``model.onnx``.
        threads: CPU threads ONNX Runtime may use (default: its own choice, all cores).

    Returns:
        An :class:`OnnxClassifier`.

    Raises:
        ImagerecError: the file is missing, is not an ONNX model (e.g. a ``.safetensors``
            checkpoint, which must be exported first), lacks imagerec's metadata, or was written
            in a format this imagerec does not know.
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ImagerecError(f"threads={threads!r} must be a positive whole number, or None for all cores")
    path = _resolve(Path(path))
    _refuse_non_onnx(path)
    session = _session(path, threads)
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    found = metadata.get(KEY_FORMAT)
    if found is None:
        raise ImagerecError(
            f"{path}: an ONNX model without imagerec's metadata (class names and preprocessing), so it "
            "cannot be run here; export the trained checkpoint with `imagerec export CHECKPOINT --out model.onnx`"
        )
    if found != ONNX_FORMAT:
        raise ImagerecError(
            f"{path}: format {found!r} (written by imagerec {metadata.get(KEY_VERSION, '?')}) is not "
            f"{ONNX_FORMAT!r}, the one this imagerec reads; upgrade imagerec, or re-export the model with this one"
        )
    return OnnxClassifier(path, session, metadata)


def _resolve(path: Path) -> Path:
    if path.is_dir():
        if (path / DEFAULT_NAME).is_file():
            return path / DEFAULT_NAME
        raise ImagerecError(
            f"{path}: a folder without {DEFAULT_NAME}; pass the .onnx file, or export the run first "
            f"with `imagerec export {path}`"
        )
    if not path.is_file():
        raise ImagerecError(f"{path}: no such file; pass an .onnx file written by `imagerec export`")
    return path


def _refuse_non_onnx(path: Path) -> None:
    """Name the usual mistakes (a checkpoint, a TorchScript file) before ONNX Runtime's parser does."""
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix.lower() == ".safetensors" or (
        len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size
    ):
        raise ImagerecError(
            f"{path}: an imagerec checkpoint (safetensors), not an ONNX model; the runtime needs no PyTorch "
            f"and runs exported models: run `imagerec export {path}` first and load the model.onnx it writes"
        )
    if head[:4] == b"PK\x03\x04" or path.suffix.lower() in (".pt", ".pth"):
        raise ImagerecError(
            f"{path}: a PyTorch or TorchScript file, not an ONNX model; export the checkpoint with "
            "`imagerec export CHECKPOINT --format onnx` and load the .onnx file"
        )


def _session(path: Path, threads: int | None):
    import onnxruntime as ort  # imported when a model is loaded, not with the package

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class but Exception
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImagerecError(
            f"{path}: not an ONNX model that ONNX Runtime can read ({reason}); export a trained "
            "checkpoint with `imagerec export CHECKPOINT --out model.onnx`"
        ) from None


def _json(path: Path, metadata: dict[str, str], key: str, kind: type):
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise ImagerecError(f"{path}: the metadata lacks {key!r}; re-export the model with imagerec export") from None
    except json.JSONDecodeError as e:
        raise ImagerecError(
            f"{path}: metadata {key!r} is not valid JSON ({e}); re-export the model with imagerec export"
        ) from None
    if not isinstance(value, kind):
        raise ImagerecError(
            f"{path}: metadata {key!r} is a {type(value).__name__}, not a {kind.__name__}; re-export the model"
        )
    return value


def _temperature(path: Path, metadata: dict[str, str]) -> float:
    """The calibration temperature in the metadata (absent: 1, a model exported before it existed)."""
    if KEY_TEMPERATURE not in metadata:
        return 1.0
    try:
        return check_temperature(json.loads(metadata[KEY_TEMPERATURE]), str(path))
    except (json.JSONDecodeError, ValueError) as e:
        raise ImagerecError(
            f"{path}: metadata {KEY_TEMPERATURE!r} is broken ({e}); re-export the model with imagerec export"
        ) from None


def _preprocessing(path: Path, data: dict) -> Preprocessing:
    try:
        return Preprocessing.from_dict(data)
    except ImagerecError as e:
        raise ImagerecError(f"{path}: {e}") from None


def _expand(images) -> list:
    """A flat list of images: paths (folders and globs expanded), PIL images and uint8 arrays."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        items = [images]
    else:
        try:
            items = list(images)
        except TypeError:
            raise ImagerecError(
                f"images of type {type(images).__name__}: pass a path, a folder, a glob, a PIL image, a "
                "uint8 array (H, W, 3), or a list of these"
            ) from None
    flat: list = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            flat += _paths(os.fspath(item))
        else:
            as_rgb_array(item)  # refuse a wrong object now, not half-way through
            flat.append(item)
    if not flat:
        raise ImagerecError("no images given; pass files, folders or glob patterns, PIL images or arrays")
    return flat


def _paths(text: str) -> list[str]:
    """A file (an existing name before a glob), a folder searched recursively, or a glob."""
    return expand_paths([text])


def _pixels(item, max_pixels: int) -> np.ndarray:
    """uint8 (H, W, 3) pixels of one image. Raises DecodeError for an unreadable file."""
    if isinstance(item, str):
        return np.asarray(load_rgb(item, max_pixels))
    return as_rgb_array(item)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
