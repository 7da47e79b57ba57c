"""Structured channel pruning with torch-pruning, then a short fine-tune to recover accuracy.

Whole channels are removed, not single weights, so the pruned model is its backbone with
narrower layers: smaller and faster on any runtime, with no sparse kernels. torch-pruning traces
the model once to find the layers whose channels must be removed together (a residual add, a
depthwise convolution and its neighbours, the batch norm after a convolution) and ranks each
such group by the L2 norm of its weights. The classifier layer keeps all its outputs.

Fine-tuning changes the scale of the logits, so the source's calibration temperature no longer
fits: a new one is fitted on held-out images the fine-tune never saw (the same validation split
training held out, by default), as training does.

The checkpoint written is an ordinary imagerec checkpoint:
:func:`imagerec.checkpoint.model_from_checkpoint` narrows the registry backbone to the stored
shapes, so it loads, predicts and exports like any other, with no pickle.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._engine import Loop, Progress, StepOutput, WarmupCosine
from .._optim import decay_groups
from ..checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from ..data import decode_small_images, has_val_split, iter_batches, load_images
from ..errors import ImagerecError
from ..inference import predict_source, resolve_device
from ..training._calibrate import calibration_meta
from ..training._calibrate import describe as describe_calibration

LR_BATCH = 64  # lr is the peak learning rate for this many images per step; scaled linearly
_META_KEPT = ("backbone", "classes", "preprocessing", "config", "data")


ROUND_TO = 8  # channels kept per layer: a multiple of 8, which vectorised CPU kernels need to stay fast


def prune(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    amount: float,
    data: str | os.PathLike,
    epochs: float = 1.0,
    steps: int | None = None,
    lr: float = 0.05,
    batch_size: int = 64,
    image_size: int | None = None,
    seed: int = 0,
    val_fraction: float | None = None,
    device: str = "auto",
    progress: bool = True,
    allow_outside: bool = False,
) -> Path:
    """Remove a share of the channels of every layer of a classifier, then fine-tune it briefly.

    Args:
        checkpoint: an imagerec checkpoint or run folder (its best checkpoint).
        out: the checkpoint file to write (``.safetensors``).
        amount: share of the channels removed from each prunable layer, in (0, 1). A layer
            keeps ``(1 - amount)`` of its inputs and outputs, so the parameters of the
            convolutions shrink to about ``(1 - amount) ** 2`` of their number.
        data: the labelled data set to fine-tune on (see :func:`imagerec.data.load_images`; its
            ``train`` split is used); its class names must be those of the checkpoint.
        epochs: fine-tuning length in passes over the data (ignored when ``steps`` is given).
        steps: fine-tuning length in optimizer steps; 0 skips fine-tuning.
        lr: peak learning rate for 64 images per step (scaled linearly with ``batch_size``).
        batch_size: images per step.
        image_size: input side in pixels for fine-tuning and the saved preprocessing; default
            the checkpoint's.
        seed: seed of the data order, the augmentation and dropout.
        val_fraction: share of each class of ``data`` held out of the fine-tune to fit the new
            calibration temperature on, when ``data`` has no validation folder. Default: the
            checkpoint's own (its training config's ``val_fraction`` and ``seed``), so the
            held-out images are those training held out. 0 and no validation folder: T = 1.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        progress: show a progress bar.
        allow_outside: read manifest rows of ``data`` that point outside the manifest's folder.

    Returns:
        The path written. Its ``meta["compression"]`` records ``prune`` (the amount),
        ``params_before``, ``params_after``, ``fine_tune_steps`` and ``fine_tune_images``; its
        ``meta["temperature"]`` and ``meta["calibration"]`` the temperature fitted after the
        fine-tune (absent when there were no held-out images or the source was trained with
        ``calibrate=False``).

    Raises:
        ImagerecError: torch-pruning is not installed, ``amount`` is outside (0, 1), a bad
            number, unlabelled data, or data whose classes differ from the checkpoint's.
    """
    # 1. Validate at the boundary.
    if not 0.0 < amount < 1.0:
        raise ImagerecError(f"amount={amount} must be in (0, 1): the share of channels removed, e.g. 0.3")
    if steps is None and not epochs > 0:
        raise ImagerecError(f"epochs={epochs} must be > 0 (or pass steps=0 to skip fine-tuning)")
    if steps is not None and steps < 0:
        raise ImagerecError(f"steps={steps} must be >= 0; 0 skips fine-tuning")
    if not lr > 0 or batch_size < 1:
        raise ImagerecError(f"lr={lr} must be > 0 and batch_size={batch_size} >= 1; e.g. lr=0.05, batch_size=64")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ImagerecError(f"val_fraction={val_fraction} must be in [0, 1): the share held out to calibrate on, e.g. 0.1")
    tp = _import_torch_pruning()
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    pp = model.preprocessing.resolve(image_size)
    trained = ckpt.meta.get("config") or {}
    held_out = dict(val_fraction=trained.get("val_fraction", 0.0) if val_fraction is None else val_fraction, seed=trained.get("seed", 0))
    source = _labelled_source(data, "train", ckpt.meta["classes"], progress, allow_outside, **held_out)
    calibrate = trained.get("calibrate", True)
    val_source = None
    if calibrate and has_val_split(data, held_out["val_fraction"]):
        val_source = _labelled_source(data, "val", ckpt.meta["classes"], progress, allow_outside, **held_out)
    batch_size = min(batch_size, len(source))  # a small data set is one batch per step
    steps_per_epoch = len(source) // batch_size
    total = steps if steps is not None else max(1, round(epochs * steps_per_epoch))
    dev = resolve_device(device)

    # 2. Prune: rank each group of coupled channels by L2 norm; drop the weakest share.
    params_before = _count_params(model)
    example = torch.zeros(1, 3, pp.input_size, pp.input_size)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=amount,
        ignored_layers=[model.get_classifier()],
        round_to=ROUND_TO,
    )
    pruner.step()
    params_after = _count_params(model)
    _say(f"pruned {amount:.0%} of the channels: {params_before:,} -> {params_after:,} parameters ({params_after / params_before:.1%})")

    # 3. Fine-tune to recover what pruning cost.
    loss = _fine_tune(model.to(dev), source, pp, total, lr * batch_size / LR_BATCH, batch_size, seed, dev, progress)

    # 4. Calibrate again: the fine-tune changed the logits, so the source's temperature is stale.
    meta = {k: ckpt.meta[k] for k in _META_KEPT if k in ckpt.meta}
    if calibrate:
        meta.update(_calibration(model, val_source, pp, trained.get("tta", False), dev))
    else:
        _say("calibration: off, as the checkpoint was trained (calibrate=False): probabilities stay uncalibrated (T=1)")

    # 5. Save an ordinary checkpoint: the source's facts, plus how it was compressed.
    meta["preprocessing"] = pp.to_dict()
    meta["compression"] = dict(
        ckpt.meta.get("compression", {}),
        prune=amount,
        params_before=params_before,
        params_after=params_after,
        fine_tune_steps=total,
        fine_tune_images=len(source),
        fine_tune_loss=loss,
        source=str(ckpt.path),
    )
    model = model.cpu().eval()
    return save_checkpoint(out, Checkpoint(model=model.state_dict(), meta=meta))


def _import_torch_pruning():
    try:
        import torch_pruning  # noqa: PLC0415 - an optional dependency
    except ImportError:
        raise ImagerecError("pruning needs the torch-pruning package; install it with: pip install 'imagerec[compress]'") from None
    return torch_pruning


def _labelled_source(data, split: str, classes: list[str], progress: bool, allow_outside: bool, val_fraction: float, seed: int):
    """The ``split`` of ``data``, labelled in the checkpoint's class order."""
    source = load_images(data, split, val_fraction=val_fraction, seed=seed, allow_outside=allow_outside)
    if not source.labelled:
        raise ImagerecError(f"{source.root}: fine-tuning needs labels: arrange images as DIR/<class>/*, or give a CSV manifest path,label")
    if sorted(source.classes) != sorted(classes):
        raise ImagerecError(
            f"{source.root}: classes {source.classes} differ from the checkpoint's {list(classes)}; "
            "fine-tune on the data set the model was trained on"
        )
    order = np.array([classes.index(name) for name in source.classes], dtype=np.int64)
    source.labels = order[source.labels]
    source.classes = list(classes)
    return decode_small_images(source, progress=progress) or source


def _calibration(model, val_source, pp, tta: bool, device) -> dict:
    """The temperature fitted on the held-out images (see :func:`imagerec.training._calibrate.calibration_meta`)."""
    out = predict_source(model, val_source, pp, tta=tta, device=device) if val_source is not None else None
    if out is not None and not len(out.indices):
        _say(f"calibration: no held-out image of {val_source.root} could be read: probabilities stay uncalibrated (T=1)")
        return {}
    meta = calibration_meta(out.raw_proba, val_source.labels[out.indices]) if out is not None else {}
    _say(describe_calibration(meta, "held-out images"))
    return meta


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fine_tune(model, source, pp, total: int, peak_lr: float, batch_size: int, seed: int, device, progress: bool) -> float | None:
    """SGD with Nesterov momentum, linear warm-up then cosine decay, label smoothing 0.1.

    Returns:
        The mean training loss of the last epoch, or None when ``total`` is 0.

    Raises:
        ImagerecError: no image of the data set could be read.
    """
    if total == 0:
        return None
    optimizer = torch.optim.SGD(decay_groups(model.parameters(), 5e-5, peak_lr), lr=peak_lr, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def batches(epoch: int, first: int):
        return iter_batches(source, pp, batch_size=batch_size, augment="default", shuffle=True, seed=seed + epoch, drop_last=True)

    def step(batch) -> StepOutput | None:
        if batch.labels is None or not len(batch.labels):
            return None  # every image of this batch was unreadable
        torch.manual_seed(seed * 1_000_003 + loop.step)  # dropout
        logits = model(batch.images.to(device))
        loss = criterion(logits, batch.labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return StepOutput(len(batch.labels), float(loss.detach()) * len(batch.labels))

    model.train()
    callbacks = [WarmupCosine(optimizer, warmup=0.1), Progress("fine-tune", progress, every=10)]
    loop = Loop(step, batches, total=total, steps_per_epoch=max(1, len(source) // batch_size), callbacks=callbacks)
    loop.run()
    model.eval()
    if not loop.images:
        raise ImagerecError(f"{source.root}: no image could be read for fine-tuning; check the data set")
    return loop.loss / loop.images


def _say(text: str) -> None:
    print(f"imagerec: {text}", file=sys.stderr)
