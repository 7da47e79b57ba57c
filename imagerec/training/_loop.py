"""The training loop, top to bottom.

``train(data, out, config)``:

1. load the training and validation splits (small images decoded once, into the cache);
2. build the backbone with a new head for the data set's classes;
3. stage 0 (LP-FT, :mod:`._probe`): for a pretrained backbone and a training split of at most
   5,000 images, fit the head as a linear probe on the frozen features, judged on validation
   as epoch 0 (fine-tuning's epochs replace it only when they validate as well);
4. plan the run (:class:`~imagerec.training._plan.Plan`): steps per epoch, the head-only stage,
   the total steps, bf16 or fp32. With a time budget (:class:`~imagerec.training._plan.Budget`) a
   few steps are timed on a copy of the model and the number of steps fixed so that the run
   finishes inside it; after the first 30 real steps of stage 2 (a quarter of a shorter one),
   and at a quarter and half of the run, it is fixed again from the measured pace, so the
   learning-rate schedule still completes on time and the budget is used;
5. train, on the step loop every imagerec trainer shares (:mod:`imagerec._engine`): stage 1 the
   head alone on the frozen backbone, stage 2 everything (DDP under torchrun); with
   ``resize_from`` below 1, the first steps at a smaller input size (progressive resizing);
   with ``ema``, a moving average of the weights; validate and save checkpoints at every epoch end, ``last``
   every ``save_every`` steps too, ``best`` at the highest validation accuracy or within one
   standard error of it, the latest such epoch (the averaged weights, with ``ema``); stop early
   after ``patience`` epochs without a higher accuracy. Each of these
   is a callback (:mod:`._stage`, :mod:`._callbacks`);
6. choose the input size for prediction on the validation split (FixRes), and say what the
   temperature fitted.

The run folder is locked for the whole run (by rank 0, the only writer under torchrun), and a
resumed run must find the data it started with: the same classes in the same order, the same
number of training images and the same preprocessing, or it stops before decoding anything.

Everything random is drawn from ``(seed, epoch, step, rank)``: the order of each epoch, each
batch's augmentation, dropout. A run resumed from a checkpoint at step k therefore continues
exactly as the uninterrupted run would have (for in-memory data; folders of large photos
resume at the right batch with fresh augmentation draws). One exception: ``last`` does not
hold the moving average of ``ema``, so a resumed run starts it again from the resumed weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from .._engine import EMA, Loop, Progress
from .._lock import run_lock
from ..backbones import create_backbone, list_backbones
from ..checkpoint import BEST, LAST, load_checkpoint, resolve_checkpoint, save_checkpoint
from ..data import DEFAULT_MAX_PIXELS, ImageSource, decode_small_images, has_val_split, iter_batches, load_images
from ..errors import ImagerecError
from ..inference import predict_source
from ._calibrate import calibration_meta
from ._calibrate import describe as describe_calibration
from ._callbacks import EpochEnd, Replan, RunningLoss, SkipLog, describe_data, make_checkpoint, write_config
from ._config import TrainConfig
from ._distributed import World, setup, teardown
from ._plan import RESIZE_RAMP, Budget, Plan, make_plan
from ._probe import fit_probe, wants_probe
from ._stage import Stages, step_seed

SMALL_IMAGE_TRAIN_SIZE = 96  # px: small images are upsampled to this by default (see docs/MODELS.md)
TEST_SIZE_SCALES = (7 / 6, 4 / 3)  # larger inputs tried at prediction time (96 px: 112, 128)
TEST_SIZE_MARGIN = 0.005  # a larger size must beat the training size by this much validation accuracy, or one standard error


@dataclass
class TrainResult:
    """What a finished run left behind.

    Attributes:
        run_dir: the run folder (checkpoints, metrics.csv, config.json).
        classes: class names, in label order.
        history: one dict per epoch: the rows of metrics.csv.
        plan: the run's :class:`Plan` (steps per epoch, head steps, total steps, precision, timing).
        best_epoch: the epoch (1-based) saved as ``best`` by this call (None: none was, e.g. a
            resumed run that had already finished).
    """

    run_dir: Path
    classes: list[str]
    history: list[dict] = field(default_factory=list)
    plan: Plan | None = None
    best_epoch: int | None = None

    @property
    def best_val_accuracy(self) -> float | None:
        values = [row["val_acc"] for row in self.history if row.get("val_acc") is not None]
        return max(values) if values else None


def train(
    data: str | os.PathLike | ImageSource | tuple[ImageSource, ImageSource | None] | None,
    out: str | os.PathLike | None,
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    predict_after: int = 0,
) -> TrainResult:
    """Fine-tune (or train from scratch) a registry backbone on a labelled data set.

    Args:
        data: a labelled data set spec (see :func:`~imagerec.data.load_images`), an ImageSource
            (no validation split), or a pair of ImageSources (train, val or None). May be None
            when resuming: the run's own data is used.
        out: the run folder to write (None when resuming: the resumed folder).
        config: hyperparameters (defaults: the transfer recipe).
        resume: a run folder (or its ``last.safetensors``) to continue.
        progress: show a progress bar.
        predict_after: images the caller will predict right after training, inside the same
            time budget (quickstart's test split): the budget keeps time for them, at the
            largest input size the run may choose for prediction.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ImagerecError: bad data or configuration, an existing run folder without ``resume``,
            or a time budget too short for a single step.
    """
    started = time.perf_counter()
    if resume is None and (data is None or out is None):
        raise ImagerecError("train needs DATA and --out RUN_DIR (or --resume RUN_DIR)")
    run_dir = Path(out) if out is not None else resolve_checkpoint(resume, LAST).parent
    # Only the process that writes (rank 0 under torchrun) holds the run folder's lock.
    writer = int(os.environ.get("RANK", "0")) == 0
    with run_lock(run_dir, "training run") if writer else contextlib.nullcontext():
        if writer:
            _remove_stale_temporaries(run_dir)
        state = None
        if resume is not None:
            state = load_checkpoint(resume, LAST)
            if state.optimizer is None:
                raise ImagerecError(f"{state.path}: holds no optimizer state, so it cannot be resumed; resume from a run's {LAST}")
            config = _resumed_config(state)
            data = data if data is not None else state.meta["data"]
        cfg = (config or TrainConfig()).resolved()
        if state is None and (run_dir / LAST).exists():
            raise ImagerecError(f"{run_dir}: already holds a run; continue it with --resume {run_dir}, or pick another --out")
        world = setup(cfg.device)
        try:
            return _train(data, run_dir, cfg, state, world, started, progress and world.main, predict_after)
        finally:
            teardown(world)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Remove the temporary files a killed writer left (``.NAME.XXXX.tmp...``): with the folder's
    lock held, no other process can be writing them."""
    for path in run_dir.glob(".*.tmp*"):
        if path.is_file():
            path.unlink(missing_ok=True)


def _resumed_config(state) -> TrainConfig:
    """The run's own configuration, from its checkpoint (keys this imagerec no longer knows dropped)."""
    known = {f.name for f in fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in state.meta["config"].items() if k in known})
    except (KeyError, TypeError, AttributeError) as e:
        raise ImagerecError(f"{state.path}: broken metadata: no usable training configuration ({e}); start a new run with --out") from None


def _train(data, run_dir: Path, cfg: TrainConfig, state, world: World, started: float, progress: bool, predict_after: int) -> TrainResult:
    # 1. Data: the training split and a validation split (its own folder, or a stratified carve-out).
    #    A resumed run must see the data it started with (checked before any image is decoded).
    train_src, val_src, listed = load_splits(data, cfg, progress, expect=None if state is None else state.meta)
    classes = train_src.classes
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _say(f"training on {train_src.describe()}; validating on {val_src.describe() if val_src else 'nothing'}")
    per_process = len(train_src) // world.size
    if 1 <= per_process < cfg.batch_size:  # a split smaller than one batch: the whole split is the batch
        if world.main:
            _say(f"batch size {cfg.batch_size} is more than the {per_process} training images a process has: batches of {per_process}")
        cfg = replace(cfg, batch_size=per_process)

    # 2. Model: the backbone with a new head for these classes.
    pretrained = cfg.pretrained and cfg.backbone in list_backbones(pretrained=True)
    torch.manual_seed(cfg.seed)  # the new head's (or a from-scratch model's) initial weights
    model = create_backbone(cfg.backbone, num_classes=len(classes), pretrained=pretrained)
    image_size = cfg.image_size or _default_size(model, train_src)
    pp = model.preprocessing.resolve(image_size, 1.0 if _is_small(train_src) else None)
    if state is not None:
        _check_same_data(state.meta, "preprocessing", state.meta.get("preprocessing"), json.loads(json.dumps(pp.to_dict())))
    model = model.to(world.device, memory_format=torch.channels_last)

    # 3. Stage 0 (LP-FT): a small split of a pretrained backbone starts from a linear probe fitted
    #    to convergence on the frozen features; the head-only SGD stage is then skipped. It runs
    #    before the plan, so a time budget plans the rest in the time left.
    probe = None
    if state is None and wants_probe(pretrained, len(train_src), cfg.probe):
        probe = fit_probe(model, train_src, pp, world.device, label_smoothing=cfg.label_smoothing, seed=cfg.seed, max_pixels=cfg.max_pixels, progress=progress)
        if world.main:
            _say(f"probe: the head fitted on the frozen features of {probe['images']} images (C={probe['C']:g}, logits scaled by {probe['scale']:.3f}, {probe['seconds']:.1f} s)")

    # 4. Plan: fixed once, saved in every checkpoint, reused on resume.
    #    The budget keeps time for what follows training: the input-size search (the validation
    #    split at each size tried), then the caller's ``predict_after`` images at the largest size.
    val_images = len(val_src) if val_src else 0
    scales = [1.0, *TEST_SIZE_SCALES] if _searches_test_size(cfg, pretrained, model, val_src) else []
    final_images = val_images * sum(k * k for k in scales) + predict_after * max(scales, default=1.0) ** 2
    budget = Budget(cfg, world, started, final_images) if cfg.time_budget else None
    if state is None:
        plan = make_plan(cfg, model, pretrained, len(train_src), val_images, pp.input_size, world, budget,
                         lambda: next(iter(_epoch_batches(train_src, pp, cfg, world, 0, 0))), probed=probe is not None)
        step, history = 0, []
    else:
        model.load_state_dict(state.model)
        plan, step, history = Plan.from_dict(state.meta["plan"], str(state.path)), state.meta["step"], state.meta["history"]
        plan.replan_at = None  # a resumed run keeps the plan it saved
        if step >= plan.total_steps:
            _say(f"{run_dir}: this run already finished ({step} of {plan.total_steps} steps)")
            return TrainResult(run_dir, classes, history, plan)
    if world.main and not plan.total_steps:
        write_config(run_dir, cfg, plan, data)
        _say("plan: no fine-tuning step fits the time budget after the probe; the probe is the model (raise --time-budget to fine-tune)")
    elif world.main:
        write_config(run_dir, cfg, plan, data)
        _say(
            f"plan: {plan.total_steps} steps of {cfg.batch_size * world.size} images ({plan.epochs:.2f} epochs, "
            f"{plan.head_steps} head-only), {_sizes_text(plan)}, {'bf16' if plan.bf16 else 'fp32'}, {world.size} process(es)"
            + (f", first {plan.freeze_groups} layer groups frozen" if plan.freeze_groups else "")
        )

    # 5. Train: the engine's step loop. The stages (which layers train, the learning rate), the
    #    moving average, the progress bar, the re-plan against the budget and the epoch end
    #    (validate, save, stop early) are its callbacks, called in this order.
    meta = {
        "backbone": cfg.backbone, "classes": classes, "preprocessing": pp.to_dict(), "config": cfg.to_dict(),
        "data": describe_data(data), "train_images": listed, **({"probe": {k: probe[k] for k in ("C", "images")}} if probe else {}),
    }
    skipped = SkipLog(train_src.skipped + (val_src.skipped if val_src else []), run_dir if world.main else None)
    skipped.report()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    stages = Stages(model, cfg, world, plan, criterion, skipped, state)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    epoch_end = EpochEnd(run_dir, model, stages, ema, meta, plan, history, val_src, pp, cfg, world, skipped, started)
    if probe is not None:
        epoch_end.judge_probe(probe)  # epoch 0: fine-tuning must validate as well to replace it
    callbacks = [
        stages,
        *([ema] if ema else []),
        Progress("train", progress, per_step=cfg.batch_size * world.size, unit="img", every=20),
        RunningLoss(cfg.log_every, world.main),
        *([Replan(budget, plan, val_images, world, lambda: write_config(run_dir, cfg, plan, data))] if plan.replan_at else []),
        epoch_end,
    ]
    Loop(
        stages.step,
        lambda epoch, first: _epoch_batches(train_src, pp, cfg, world, epoch, first),
        total=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        start=step,
        callbacks=callbacks,
    ).run()

    # 6. The input size for prediction, chosen on the validation split (the best checkpoint, rewritten).
    if world.main and _searches_test_size(cfg, pretrained, model, val_src):
        epoch_end.calibrated = _choose_test_size(run_dir, model, val_src, pp, cfg, world, plan.bf16) or epoch_end.calibrated
    if world.main and cfg.calibrate:
        _say(describe_calibration(epoch_end.calibrated))
    return TrainResult(run_dir, classes, history, plan, epoch_end.kept_epoch)


def _searches_test_size(cfg: TrainConfig, pretrained: bool, model: nn.Module, val_src) -> bool:
    return cfg.test_size and pretrained and val_src is not None and not model.preprocessing.fixed_input_size


def _choose_test_size(run_dir: Path, model, val_src, pp, cfg: TrainConfig, world: World, bf16: bool) -> dict | None:
    """Evaluate the best checkpoint at the training size and larger ones on the validation split;
    keep a larger size only where it scores :func:`size_margin` better (FixRes, Touvron et al.
    2019: random-resized-crop training sees objects larger than a centre-cropped test image at the
    same size). The best checkpoint is rewritten with that input size and a temperature refitted
    at it. Returns its new metadata, or None when the training size stays.
    """
    best = load_checkpoint(run_dir / BEST)
    model.load_state_dict(best.model)
    model.eval()
    labels = val_src.labels
    scores, outs = {}, {}
    for size in [pp.input_size] + [8 * round(pp.input_size * k / 8) for k in TEST_SIZE_SCALES]:
        out = predict_source(model, val_src, replace(pp, input_size=size), batch_size=128, tta=cfg.tta, device=world.device, bf16=bf16)
        scores[size] = float((out.proba.argmax(1) == labels[out.indices]).mean()) if len(out.indices) else 0.0
        outs[size] = out
    margin = size_margin(scores[pp.input_size], len(outs[pp.input_size].indices))
    chosen = max(scores, key=lambda size: (scores[size] - (0 if size == pp.input_size else margin), -size))
    tried = ", ".join(f"{size} px {acc:.4f}" for size, acc in scores.items())
    if chosen == pp.input_size:
        _say(f"input size for prediction: {chosen} px, the training size (validation accuracy: {tried})")
        return None
    meta = dict(best.meta, preprocessing=replace(pp, input_size=chosen).to_dict(), test_size={"trained_at": pp.input_size, "val_acc": scores})
    if cfg.calibrate:
        meta.update(calibration_meta(outs[chosen].raw_proba, labels[outs[chosen].indices]))
    meta = {k: v for k, v in meta.items() if k not in ("step", "history", "stage")}
    save_checkpoint(run_dir / BEST, make_checkpoint(model, None, meta, Plan.from_dict(best.meta["plan"], str(best.path)), best.meta["step"], best.meta["history"]))
    _say(f"input size for prediction: {chosen} px, trained at {pp.input_size} px (validation accuracy: {tried})")
    return meta


def size_margin(accuracy: float, images: int) -> float:
    """What a larger input size must add to the training size's validation accuracy to be
    chosen: ``TEST_SIZE_MARGIN``, or the accuracy's binomial standard error where that is larger.
    On 32 validation photos one photo is 3 points: a size that wins by one photo is noise (brain
    MRI: 0.9375 at 264 px against 0.875 at 224 px, on 32 images). On CIFAR-10's 5,000 validation
    images the margin stays 0.005."""
    if images <= 0:
        return TEST_SIZE_MARGIN
    return max(TEST_SIZE_MARGIN, math.sqrt(accuracy * (1 - accuracy) / images))


# ---------------------------------------------------------------------------------------------
# 1. Data


def load_splits(data, cfg: TrainConfig, progress: bool, expect: dict | None = None) -> tuple[ImageSource, ImageSource | None, int]:
    """The training and validation splits, and the number of training images listed (before
    decoding, which may skip some). With ``expect`` (a resumed run's metadata) the classes and
    that number must be the run's, checked before any image is decoded."""
    max_pixels = cfg.max_pixels or DEFAULT_MAX_PIXELS
    if isinstance(data, ImageSource):
        train_src, val_src = data, None
    elif isinstance(data, tuple):  # (train, val) made by the caller, e.g. semi-supervised training
        train_src, val_src = data
    else:
        train_src = load_images(data, "train", val_fraction=cfg.val_fraction, seed=cfg.seed, max_pixels=max_pixels, allow_outside=cfg.allow_outside)
        val_src = None
        if has_val_split(data, cfg.val_fraction):
            val_src = load_images(data, "val", val_fraction=cfg.val_fraction, seed=cfg.seed, max_pixels=max_pixels, allow_outside=cfg.allow_outside)
    if not train_src.labelled:
        raise ImagerecError(f"{train_src.root}: training needs labels: arrange images as DIR/<class>/*, or give a CSV manifest path,label")
    if len(train_src.classes) < 2:
        raise ImagerecError(f"{train_src.root}: only one class ({train_src.classes[0]}); a classifier needs at least two class folders")
    listed = len(train_src)
    if expect is not None:
        _check_same_data(expect, "classes", expect.get("classes"), list(train_src.classes))
        if "train_images" in expect:  # runs from before this check recorded no count
            _check_same_data(expect, "training images", expect["train_images"], listed)
    train_src = decode_small_images(train_src, progress=progress) or train_src
    if val_src is not None:
        val_src = decode_small_images(val_src, progress=progress) or val_src
    return train_src, val_src, listed


def _check_same_data(meta: dict, what: str, before, now) -> None:
    """Refuse to resume when ``what`` differs from the run's record: the labels would silently change."""
    if before != now:
        raise ImagerecError(
            f"cannot resume: the data changed since the run started: {what} were {_short(before)}, now {_short(now)}; "
            f"restore the data as it was (data: {meta.get('data')}), or start a new run with --out"
        )


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_small(source: ImageSource) -> bool:
    return source.pixels is not None


def _default_size(model: nn.Module, source: ImageSource) -> int:
    if model.preprocessing.fixed_input_size or not _is_small(source):
        return model.preprocessing.input_size
    return SMALL_IMAGE_TRAIN_SIZE


def _epoch_batches(source: ImageSource, pp, cfg: TrainConfig, world: World, epoch: int, first_batch: int):
    """This process's batches of one epoch, from ``first_batch`` on (DistributedSampler order)."""
    sampler = DistributedSampler(range(len(source)), num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    return iter_batches(
        source,
        pp,
        batch_size=cfg.batch_size,
        indices=order,
        augment=cfg.augment,
        seed=step_seed(cfg.seed, epoch, world.rank),
        workers=cfg.workers,
        drop_last=True,
        start_batch=first_batch,
        prefetch=world.device.type != "cpu",  # on a CPU a prefetch thread competes with the step for cores
    )


# ---------------------------------------------------------------------------------------------
# 4. Train


def _sizes_text(plan: Plan) -> str:
    if plan.start_size == plan.image_size:
        return f"{plan.image_size} px"
    low, high = RESIZE_RAMP
    return f"{plan.start_size} px growing to {plan.image_size} px from {low:.0%} to {high:.0%} of stage 2"


def _say(text: str) -> None:
    print(f"imagerec: {text}", file=sys.stderr)
