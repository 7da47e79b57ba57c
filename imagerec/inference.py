"""Class probabilities for a set of images: shared by validation, evaluate and predict."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSource, Preprocessing, Skipped, iter_batches
from .errors import ImagerecError


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when PyTorch sees one).

    Raises:
        ImagerecError: an unknown name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ImagerecError(f"device {name!r} is not one of cpu, cuda, cuda:N, auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ImagerecError(f"device {name!r}: no CUDA GPU is visible to PyTorch; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def forward_logits(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits (N, C) for ``images`` (N, 3, S, S); with ``tta`` averaged with the mirrored images."""
    logits = model(images)
    if tta:
        logits = (logits + model(images.flip(-1))) / 2
    return logits


@dataclass
class Predictions:
    """Model outputs for the readable images of a source.

    Attributes:
        proba: float32 array (N, C) of class probabilities.
        indices: int64 array (N,): position of each row's image in the source.
        loss_sum: summed cross-entropy of the probabilities against the labels (0 when unlabelled).
        skipped: images that could not be read.
        raw_proba: float32 array (N, C): the probabilities before temperature scaling (the
            plain softmax of the logits); the same as ``proba`` when the temperature is 1.
    """

    proba: np.ndarray
    indices: np.ndarray
    loss_sum: float
    skipped: list[Skipped]
    raw_proba: np.ndarray | None = None


def calibrated_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Probabilities (N, C) of ``logits`` (N, C) divided by ``temperature`` (temperature scaling).

    A temperature above 1 softens over-confident probabilities; it never changes the argmax.
    """
    return (logits.float() / temperature).softmax(1)


def predict_source(
    model: nn.Module,
    source: ImageSource,
    pp: Preprocessing,
    *,
    batch_size: int = 128,
    tta: bool = False,
    device: torch.device | None = None,
    bf16: bool = False,
    indices: np.ndarray | None = None,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "predict",
    temperature: float = 1.0,
) -> Predictions:
    """Run ``model`` over ``source`` (or the images at ``indices``) in eval mode.

    Args:
        temperature: the logits are divided by it before the softmax (see
            :func:`calibrated_softmax`); ``loss_sum`` is the loss of those probabilities.

    Returns:
        :class:`Predictions` in the order of ``indices`` (minus unreadable images).
    """
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    probas, raws, positions, skipped, loss_sum = [], [], [], [], 0.0
    total = len(source) if indices is None else len(indices)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    with torch.inference_mode():
        for batch in iter_batches(source, pp, batch_size=batch_size, indices=indices, workers=workers):
            skipped += [item for _, item in batch.skipped]
            if len(batch.indices):
                with autocast(device, bf16):
                    logits = forward_logits(model, batch.images.to(device, non_blocking=True), tta)
                logits = logits.float()
                if batch.labels is not None:
                    labels = batch.labels.to(device)
                    loss_sum += float(nn.functional.cross_entropy(logits / temperature, labels, reduction="sum"))
                probas.append(calibrated_softmax(logits, temperature).cpu().numpy())
                raws.append(logits.softmax(1).cpu().numpy())
                positions.append(batch.indices.numpy())
            bar.update(len(batch.indices) + len(batch.skipped))
    bar.close()
    model.train(was_training)
    classes = getattr(model, "num_classes", 0)
    return Predictions(
        proba=np.concatenate(probas) if probas else np.zeros((0, classes), np.float32),
        indices=np.concatenate(positions) if positions else np.zeros(0, np.int64),
        loss_sum=loss_sum,
        skipped=skipped,
        raw_proba=np.concatenate(raws) if raws else np.zeros((0, classes), np.float32),
    )
