"""The model behind the server: ONNX Runtime by default, PyTorch with ``engine="torch"``.

An engine prepares one decoded image (thread-safe, run in the decoding pool) and runs a batch
of prepared images (run in the single forward thread). Both engines prepare images as
``imagerec predict`` does for the same model, so the server's probabilities are that command's:

* an ``.onnx`` file runs in :mod:`imagerec.runtime`, as ``imagerec predict MODEL.onnx`` does;
* a checkpoint or run folder with ``engine="onnx"`` is exported once with
  :func:`imagerec.export.export_model` (which checks the export against PyTorch) into
  imagerec's cache, keyed by the checkpoint's content, together with a second graph that outputs
  the embedding (``forward_head(pre_logits=True)``) for ``/embed``;
* ``engine="torch"`` runs :class:`imagerec.Classifier`'s model, as ``imagerec predict CHECKPOINT``.

An ``.onnx`` file alone holds no embedding output, so its engine has ``embed_dim = None`` and
``/embed`` answers 501.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .._io import file_sha256
from .._version import __version__
from ..errors import ImagerecError

ENGINES = ("auto", "onnx", "torch")
CHECKPOINT_NAMES = ("best.safetensors", "last.safetensors")


class Engine:
    """What the server needs of a model.

    Attributes:
        name: ``"onnx"`` or ``"torch"``.
        path: the model file served (the ``.onnx`` or the checkpoint).
        sha256: hex SHA-256 of that file.
        classes: class names, in logit order.
        preprocessing: dict of the preprocessing (input size, mean, std, interpolation, crop).
        backbone: registry name of the backbone.
        version: the imagerec version that wrote the model ("" if unknown).
        embed_dim: width of the embedding, or None when the engine cannot embed.
        device: where the forward pass runs.
    """

    name = "?"
    embed_dim: int | None = None
    device = "cpu"
    temperature = 1.0  # calibration: probabilities are softmax(logits / temperature)
    precision: dict | None = None  # fp32 or int8, and why (see imagerec.serve._precision)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One RGB image as the model's input: float32 (3, S, S). Thread-safe."""
        raise NotImplementedError

    def logits(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Logits, float32 (N, C), of prepared images ``batch`` float32 (N, 3, S, S)."""
        raise NotImplementedError

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings, float32 (N, D), of prepared images ``batch`` float32 (N, 3, S, S)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The facts ``GET /model`` answers."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "engine": self.name,
            "device": str(self.device),
            "backbone": self.backbone,
            "classes": list(self.classes),
            "preprocessing": dict(self.preprocessing),
            "embedding_dim": self.embed_dim,
            "model_imagerec_version": self.version,
            "imagerec_version": __version__,
            "precision": self.precision,
        }


class OnnxEngine(Engine):
    """An exported classifier in ONNX Runtime (:mod:`imagerec.runtime`), torch-free.

    Args:
        onnx_path: the classifier's ``.onnx``.
        served: the file the user gave (its checksum is reported); default ``onnx_path``.
        features_path: an ``.onnx`` whose output is the embedding, or None.
        threads: ONNX Runtime's intra-op threads (None: all cores).
    """

    name = "onnx"

    def __init__(self, onnx_path: Path, served: Path | None = None, features_path: Path | None = None, threads: int | None = None):
        from .. import runtime  # noqa: PLC0415

        self._model = runtime.load(onnx_path, threads=threads)
        self.path = served or self._model.path
        self.sha256 = file_sha256(self.path)
        self.classes = list(self._model.classes)
        self._pp = self._model.preprocessing
        self.preprocessing = self._pp.to_dict()
        self.backbone = self._model.backbone
        self.version = self._model.version
        self.temperature = self._model.temperature
        self.compression = dict(self._model.compression)
        self.features_path = features_path
        self._features = None
        if features_path is not None:
            self._features = runtime._model._session(features_path, threads)
            self.embed_dim = int(self._features.get_outputs()[0].shape[1])

    def prepare(self, image: Image.Image) -> np.ndarray:
        from ..runtime._preprocess import _preprocess  # noqa: PLC0415

        return _preprocess(np.asarray(image), self._pp)

    def logits(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        # as OnnxClassifier._logits_tta, which `imagerec predict MODEL.onnx` runs
        logits = self._model.logits(batch)
        if tta:
            logits = (logits + self._model.logits(np.ascontiguousarray(batch[..., ::-1]))) / 2
        return logits

    def features(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._features.run(None, {"images": np.ascontiguousarray(batch)})[0], dtype=np.float32)


class TorchEngine(Engine):
    """A checkpoint in PyTorch, as :class:`imagerec.Classifier` runs it.

    Args:
        checkpoint: a checkpoint file.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """

    name = "torch"

    def __init__(self, checkpoint: Path, device: str = "cpu"):
        import torch  # noqa: PLC0415

        from ..classifier import Classifier  # noqa: PLC0415
        from ..data import eval_transform  # noqa: PLC0415

        self._torch = torch
        clf = Classifier.load(checkpoint, device=device)
        self._net, self.device = clf.model_, clf.device_
        self.path, self.sha256 = Path(clf.path_), file_sha256(clf.path_)
        self.classes = list(clf.classes_)
        self.preprocessing = clf.preprocessing_.to_dict()
        self.backbone = clf.meta_["backbone"]
        self.version = clf.meta_.get("imagerec_version", "")
        self.temperature = clf.temperature_
        self.embed_dim = int(getattr(self._net, "num_features", 0)) or None
        self._transform = eval_transform(clf.preprocessing_)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self._transform(image).numpy()

    def logits(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        from ..inference import forward_logits  # noqa: PLC0415

        with self._torch.inference_mode():
            x = self._to_device(batch)
            return forward_logits(self._net, x, tta).float().cpu().numpy()

    def features(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._to_device(batch)
            out = self._net.forward_head(self._net.forward_features(x), pre_logits=True)
            return out.float().cpu().numpy()

    def _to_device(self, batch: np.ndarray):
        x = self._torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self._torch.channels_last)


def load_engine(model: str | os.PathLike, *, engine: str = "auto", device: str = "cpu", threads: int | None = None) -> Engine:
    """Open ``model`` for serving.

    Args:
        model: a run folder (its best checkpoint), a ``.safetensors`` checkpoint, or an ``.onnx``
            written by ``imagerec export`` / ``imagerec compress`` (int8 included).
        engine: ``"onnx"`` (ONNX Runtime, CPU), ``"torch"`` (PyTorch), or ``"auto"``: onnx on
            the CPU, torch on a GPU.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (torch engine only for a GPU).
        threads: ONNX Runtime's CPU threads (None: all cores).

    Returns:
        The :class:`Engine`.

    Raises:
        ImagerecError: an unknown engine, a missing or unreadable model, an ``.onnx`` with
            ``engine="torch"``, or a GPU asked of the ONNX engine.
    """
    if engine not in ENGINES:
        raise ImagerecError(f"engine {engine!r} is not one of {', '.join(ENGINES)}; e.g. --engine onnx")
    path = Path(model)
    on_cpu = device == "cpu"
    if engine == "auto":
        engine = "onnx" if on_cpu else "torch"
    if engine == "onnx" and not on_cpu:
        raise ImagerecError(f"device {device!r}: the onnx engine runs on the CPU here; add --engine torch to use {device}")
    if _is_onnx(path):
        if engine == "torch":
            raise ImagerecError(
                f"{path}: an exported ONNX model runs with --engine onnx; for --engine torch pass the checkpoint or run folder"
            )
        return OnnxEngine(path if path.suffix.lower() == ".onnx" else path / "model.onnx", threads=threads)
    from ..checkpoint import resolve_checkpoint  # noqa: PLC0415 - torch is needed from here on

    checkpoint = resolve_checkpoint(path)
    if engine == "torch":
        return TorchEngine(checkpoint, device)
    onnx_path, features_path = _exported(checkpoint)
    return OnnxEngine(onnx_path, served=checkpoint, features_path=features_path, threads=threads)


def reload_source(model: str | os.PathLike) -> Path | None:
    """``model`` when a new version can be reloaded from it (a run folder or a checkpoint), else None.

    An ``.onnx`` (or a folder holding only one) cannot: a new version is checked against PyTorch.
    """
    path = Path(model)
    return None if _is_onnx(path) else path


def _is_onnx(path: Path) -> bool:
    """Whether ``path`` names an exported model: an ``.onnx``, or a folder with model.onnx and no checkpoint."""
    return path.suffix.lower() == ".onnx" or (path.is_dir() and not _checkpoint_in(path) and (path / "model.onnx").is_file())


def _checkpoint_in(folder: Path) -> bool:
    return any((folder / name).is_file() for name in CHECKPOINT_NAMES)


def _exported(checkpoint: Path) -> tuple[Path, Path]:
    """The classifier and feature graphs of ``checkpoint``, exported once into imagerec's cache."""
    from .._home import cache_dir  # noqa: PLC0415
    from .._onnx import FeatureModel, export_onnx  # noqa: PLC0415
    from ..checkpoint import load_checkpoint, model_from_checkpoint  # noqa: PLC0415
    from ..export import export_model  # noqa: PLC0415

    key = hashlib.sha256(f"{file_sha256(checkpoint)}|{__version__}".encode()).hexdigest()[:32]
    folder = cache_dir("serve")
    classifier, features = folder / f"{key}.onnx", folder / f"{key}.features.onnx"
    if not classifier.is_file():
        export_model(checkpoint, classifier)  # checked against PyTorch, written atomically
    if not features.is_file():
        model = model_from_checkpoint(load_checkpoint(checkpoint))
        export_onnx(FeatureModel(model), features, model.preprocessing.input_size, output_name="features")
    return classifier, features


