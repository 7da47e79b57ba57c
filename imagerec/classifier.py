"""``Classifier``: train, load, predict and evaluate, in scikit-learn's manner.

>>> clf = Classifier("efficientnet_lite0", epochs=3).fit("photos/", out="runs/photos")
>>> clf = Classifier.load("runs/photos")          # a run folder means its best checkpoint
>>> clf.predict(["a.jpg", "b.png"])               # class names (None for unreadable files)
>>> clf.evaluate("photos/", split="val").summary["accuracy"]
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._decode import expand_paths
from ._lock import run_lock
from .checkpoint import BEST, checkpoint_temperature, load_checkpoint, model_from_checkpoint
from .data import DEFAULT_MAX_PIXELS, ImageSource, eval_transform, load_images, report_skipped, to_rgb
from .errors import ImagerecError, SkippedImagesWarning
from .evaluation import EvaluationReport, build_report, write_report
from .inference import Predictions, autocast, calibrated_softmax, forward_logits, predict_source, resolve_device
from .training import TrainResult, load_config, train

ImageInput = str | os.PathLike | Image.Image


class Classifier:
    """An image classifier on a registry backbone.

    Args:
        backbone: registry name (see ``imagerec models``).
        config_file: optional TOML or JSON file of :class:`~imagerec.training.TrainConfig` values.
        **params: any :class:`~imagerec.training.TrainConfig` field (``epochs=5``,
            ``time_budget=20``, ``recipe="seed"``...); they override the file.

    Attributes (after ``fit`` or ``load``):
        model_: the trained network (eval mode); None for an ONNX model.
        runtime_: the :class:`imagerec.runtime.OnnxClassifier` of an ONNX model, else None.
        classes_: class names, in label order.
        preprocessing_: how images are prepared for ``model_``.
        temperature_: the calibration temperature T fitted after training (1: none); every
            probability is softmax(logits / T).
        meta_: everything the checkpoint records (configuration, metrics, plan).
        history_: metrics per epoch (after ``fit``).
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, config_file: str | os.PathLike | None = None, **params):
        self.backbone = backbone
        self.config_file = config_file
        self.params = params

    # -- training ----------------------------------------------------------------------------

    def fit(self, data, out: str | os.PathLike, *, resume: str | os.PathLike | None = None, progress: bool = True) -> Classifier:
        """Train on ``data`` (a labelled data set spec or ImageSource), writing the run to ``out``."""
        config = load_config(self.config_file, backbone=self.backbone, **self.params)
        result: TrainResult = train(data, out, config, resume=resume, progress=progress)
        self._adopt(result.run_dir)
        self.history_ = result.history
        return self

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> Classifier:
        """A classifier from a checkpoint file, a run folder (its best checkpoint), or an ONNX
        file written by ``imagerec export`` / ``imagerec compress`` (run by ONNX Runtime).

        Raises:
            ImagerecError: not a readable imagerec checkpoint or exported model.
        """
        clf = cls.__new__(cls)
        if str(path).lower().endswith(".onnx"):
            clf._adopt_onnx(path, device)
        else:
            clf._adopt(path, device)
        clf.backbone, clf.config_file, clf.params = clf.meta_["backbone"], None, {}
        return clf

    def _adopt(self, path, device: str = "cpu") -> None:
        ckpt = load_checkpoint(path, BEST)
        model = model_from_checkpoint(ckpt)
        self.device_ = resolve_device(device)
        self.model_ = model.eval().to(self.device_, memory_format=torch.channels_last)
        self.runtime_ = None
        self.classes_ = list(ckpt.meta["classes"])
        self.preprocessing_ = model.preprocessing
        self.temperature_ = checkpoint_temperature(ckpt)
        self.meta_ = ckpt.meta
        self.path_ = ckpt.path

    def _adopt_onnx(self, path, device: str) -> None:
        from . import runtime  # noqa: PLC0415

        if resolve_device(device).type != "cpu":
            raise ImagerecError(f"{path}: an ONNX model runs on the CPU here; use --device cpu, or the checkpoint for {device}")
        self.runtime_ = runtime.load(path)
        self.model_ = None
        self.device_ = torch.device("cpu")
        self.classes_ = list(self.runtime_.classes)
        self.preprocessing_ = self.runtime_.preprocessing
        self.temperature_ = self.runtime_.temperature
        self.meta_ = {"backbone": self.runtime_.backbone, "classes": self.classes_, "compression": self.runtime_.compression}
        self.path_ = self.runtime_.path

    def _predictions(self, source: ImageSource, *, tta: bool, batch_size: int, progress: bool = False, desc: str = "predict") -> Predictions:
        """Probabilities of ``source``'s readable images, by PyTorch or (an .onnx model) ONNX Runtime."""
        if self.runtime_ is None:
            return predict_source(
                self.model_, source, self.preprocessing_, batch_size=batch_size, tta=tta, device=self.device_,
                progress=progress, desc=desc, temperature=self.temperature_,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedImagesWarning)  # reported by the caller
            proba = self.runtime_.predict_proba(source.paths, tta=tta, batch_size=batch_size)
        rows = np.flatnonzero(~np.isnan(proba).any(axis=1))
        loss_sum = 0.0
        if source.labels is not None and len(rows):
            loss_sum = float(-np.log(np.clip(proba[rows, np.asarray(source.labels)[rows]], 1e-12, None)).sum())
        proba = proba[rows]
        raw = _uncalibrated(proba, self.temperature_)
        return Predictions(proba, rows, loss_sum, list(self.runtime_.last_skipped), raw_proba=raw)

    # -- inference ---------------------------------------------------------------------------

    def predict_proba(self, images, *, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """Class probabilities, float32 array (N, C); a row of NaN for an unreadable image.

        Args:
            images: a data set spec, an ImageSource, or a list of file paths, folders, globs
                and PIL images.
            tta: average with the mirrored image (test-time augmentation).
        """
        self._check_fitted()
        if _is_pil_list(images):
            return self._proba_of_pil(images, tta)
        source = as_source(images)
        out = self._predictions(source, tta=tta, batch_size=batch_size)
        proba = np.full((len(source), len(self.classes_)), np.nan, dtype=np.float32)
        proba[out.indices] = out.proba
        if out.skipped:
            first = "; ".join(f"{s.path}: {s.reason}" for s in out.skipped[:3])
            warnings.warn(f"{len(out.skipped)} image(s) could not be read: {first}", SkippedImagesWarning, stacklevel=2)
        self.last_paths_ = source.paths
        self.last_skipped_ = out.skipped
        return proba

    def predict(self, images, *, tta: bool = False, batch_size: int = 64) -> list[str | None]:
        """The most probable class name of each image (None for an unreadable image)."""
        proba = self.predict_proba(images, tta=tta, batch_size=batch_size)
        return [None if np.isnan(row).any() else self.classes_[int(row.argmax())] for row in proba]

    def _proba_of_pil(self, images: Sequence[Image.Image], tta: bool) -> np.ndarray:
        if self.runtime_ is not None:
            return self.runtime_.predict_proba(list(images), tta=tta)
        transform = eval_transform(self.preprocessing_)
        batch = torch.stack([transform(to_rgb(img)) for img in images]).to(self.device_)
        with torch.inference_mode(), autocast(self.device_, False):
            logits = forward_logits(self.model_, batch.contiguous(memory_format=torch.channels_last), tta)
        return calibrated_softmax(logits, self.temperature_).cpu().numpy()

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(
        self,
        data,
        *,
        split: str | None = "auto",
        out: str | os.PathLike | None = None,
        tta: bool = False,
        batch_size: int = 128,
        max_pixels: int | None = None,
        allow_outside: bool = False,
        progress: bool = False,
    ) -> EvaluationReport:
        """Accuracy, top-k, per-class metrics, confusion matrix and calibration on labelled data.

        Args:
            data: a labelled data set spec or ImageSource.
            split: which split; ``"auto"`` takes ``test`` where the data set has one, else all.
            out: a folder for the report files (see :func:`~imagerec.evaluation.write_report`).
            tta: average each prediction with the mirrored image's.
            max_pixels: decompression-bomb limit per image.
            allow_outside: read manifest rows that point outside the manifest's folder.

        Raises:
            ImagerecError: unlabelled data, class names the checkpoint does not know, an ``out``
                that is a file or that another process is writing (checked before the work), or
                data of which no image could be read.
        """
        self._check_fitted()
        with run_lock(out, "evaluation") if out is not None else contextlib.nullcontext():
            return self._evaluate(data, split, out, tta, batch_size, max_pixels, allow_outside, progress)

    def _evaluate(self, data, split, out, tta: bool, batch_size: int, max_pixels, allow_outside: bool, progress: bool) -> EvaluationReport:
        if isinstance(data, ImageSource):
            source = data
        else:
            source = _load_eval_split(data, split, max_pixels or DEFAULT_MAX_PIXELS, allow_outside)
        if not source.labelled:
            raise ImagerecError(f"{source.root}: evaluation needs labels: DIR/<class>/* folders or a CSV manifest path,label")
        labels = self._map_labels(source)
        out_pred = self._predictions(source, tta=tta, batch_size=batch_size, progress=progress, desc="evaluate")
        skipped = list(source.skipped) + list(out_pred.skipped)
        report_skipped(skipped, out)  # like embed: a console line, and skipped.csv in ``out``
        rows = out_pred.indices
        if not len(rows):
            where = f"; see {Path(out) / 'skipped.csv'}" if out is not None else ""
            raise ImagerecError(f"{source.root}: none of its {len(source)} image(s) could be read, so there is nothing to evaluate{where}")
        report = build_report(
            out_pred.proba,
            labels[rows],
            [source.paths[i] for i in rows],
            self.classes_,
            loss_sum=out_pred.loss_sum,
            skipped=len(skipped),
            raw_proba=out_pred.raw_proba,
            temperature=self.temperature_,
        )
        report.summary.update(checkpoint=str(self.path_), data=str(source.root), tta=tta)
        if out is not None:
            write_report(report, out, source)
        return report

    def _map_labels(self, source: ImageSource) -> np.ndarray:
        unknown = [c for c in source.classes if c not in self.classes_]
        if unknown:
            raise ImagerecError(
                f"{source.root}: class(es) {unknown} are not among the checkpoint's classes {self.classes_}; "
                "rename the folders to match, or evaluate a checkpoint trained on these classes"
            )
        mapping = np.asarray([self.classes_.index(c) for c in source.classes], dtype=np.int64)
        mapped = mapping[source.labels]
        source.labels, source.classes = mapped, list(self.classes_)  # the loss uses the model's indices
        return mapped

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ImagerecError("this Classifier is not trained yet; call fit(...) or Classifier.load(path) first")


def _load_eval_split(data, split: str | None, max_pixels: int, allow_outside: bool) -> ImageSource:
    if split != "auto":
        return load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)
    try:
        return load_images(data, "test", max_pixels=max_pixels, allow_outside=allow_outside)
    except ImagerecError as e:
        if "no test" not in str(e):
            raise
        return load_images(data, None, max_pixels=max_pixels, allow_outside=allow_outside)


def _uncalibrated(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits) from softmax(logits / T): log(proba) * T is the logits up to a per-row constant.

    Probabilities that underflowed to 0 stay (about) 0.
    """
    if temperature == 1.0:
        return proba
    scaled = np.log(np.clip(proba.astype(np.float64), 1e-300, None)) * temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _is_pil_list(images) -> bool:
    return isinstance(images, (list, tuple)) and bool(images) and all(isinstance(i, Image.Image) for i in images)


def as_source(images) -> ImageSource:
    """An unlabelled ImageSource from files, folders and globs (or a data set spec / source).

    Raises:
        ImagerecError: a path that does not exist, or a glob that matches no image.
    """
    if isinstance(images, ImageSource):
        return images
    items: Iterable = [images] if isinstance(images, (str, os.PathLike)) else images
    paths = expand_paths(items)  # a name that exists is a file before it is a glob
    if not paths:
        raise ImagerecError("no images given; pass files, folders or glob patterns")
    return ImageSource(paths, None, None, root=Path(paths[0]).parent.as_posix())
