"""The training loop, top to bottom.

``train(data, out, config)``:

1. load the training and validation splits (small images decoded once, into the cache);
2. build the backbone with a new head for the data set's classes;
3. plan the run: steps per epoch, the head-only stage, the total steps, bf16 or fp32. With a
   time budget a few steps are timed on a copy of the model and the number of steps fixed so
   that the run finishes inside it; after the first 30 real steps of stage 2 it is fixed again
   from their measured pace (once, before the schedule has gone far), so the learning-rate
   schedule still completes;
4. train: stage 1 the head alone on the frozen backbone, stage 2 everything (DDP under
   torchrun); validate and save checkpoints at every epoch end, ``last`` every
   ``save_every`` steps too, ``best`` on a better validation accuracy; stop early after
   ``patience`` epochs without progress.

The run folder is locked for the whole run (by rank 0, the only writer under torchrun), and a
resumed run must find the data it started with: the same classes in the same order, the same
number of training images and the same preprocessing, or it stops before decoding anything.

Everything random is drawn from ``(seed, epoch, step, rank)``: the order of each epoch, each
batch's augmentation, dropout. A run resumed from a checkpoint at step k therefore continues
exactly as the uninterrupted run would have (for in-memory data; folders of large photos
resume at the right batch with fresh augmentation draws).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .._io import write_text_atomic
from .._lock import run_lock
from .._optim import decay_groups, set_lr, warmup_cosine
from ..backbones import create_backbone, early_parameters, list_backbones
from ..checkpoint import BEST, LAST, Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from ..data import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    decode_small_images,
    iter_batches,
    load_images,
    report_skipped,
)
from ..errors import ImagerecError
from ..inference import Predictions, autocast, predict_source
from ._calibrate import calibration_meta
from ._config import TrainConfig
from ._distributed import World, setup, teardown

SMALL_IMAGE_TRAIN_SIZE = 96  # px: small images are upsampled to this by default (see docs/MODELS.md)


@dataclass
class TrainResult:
    """What a finished run left behind.

    Attributes:
        run_dir: the run folder (checkpoints, metrics.csv, config.json).
        classes: class names, in label order.
        history: one dict per epoch: the rows of metrics.csv.
        plan: steps per epoch, head steps, total steps, precision, timing measurements.
    """

    run_dir: Path
    classes: list[str]
    history: list[dict] = field(default_factory=list)
    plan: dict = field(default_factory=dict)

    @property
    def best_val_accuracy(self) -> float | None:
        values = [row["val_acc"] for row in self.history if row.get("val_acc") is not None]
        return max(values) if values else None


def train(
    data: str | os.PathLike | ImageSource | None,
    out: str | os.PathLike | None,
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune (or train from scratch) a registry backbone on a labelled data set.

    Args:
        data: a labelled data set spec (see :func:`~imagerec.data.load_images`) or ImageSource.
            May be None when resuming: the run's own data is used.
        out: the run folder to write (None when resuming: the resumed folder).
        config: hyperparameters (defaults: the transfer recipe).
        resume: a run folder (or its ``last.safetensors``) to continue.
        progress: show a progress bar.

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
            return _train(data, run_dir, cfg, state, world, started, progress and world.main)
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


def _train(data, run_dir: Path, cfg: TrainConfig, state, world: World, started: float, progress: bool) -> TrainResult:
    # 1. Data: the training split and a validation split (its own folder, or a stratified carve-out).
    #    A resumed run must see the data it started with (checked before any image is decoded).
    train_src, val_src, listed = _load_splits(data, cfg, progress, expect=None if state is None else state.meta)
    classes = train_src.classes
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _say(f"training on {train_src.describe()}; validating on {val_src.describe() if val_src else 'nothing'}")

    # 2. Model: the backbone with a new head for these classes.
    pretrained = cfg.pretrained and cfg.backbone in list_backbones(pretrained=True)
    torch.manual_seed(cfg.seed)  # the new head's (or a from-scratch model's) initial weights
    model = create_backbone(cfg.backbone, num_classes=len(classes), pretrained=pretrained)
    image_size = cfg.image_size or _default_size(model, train_src)
    pp = model.preprocessing.resolve(image_size, 1.0 if _is_small(train_src) else None)
    if state is not None:
        _check_same_data(state.meta, "preprocessing", state.meta.get("preprocessing"), json.loads(json.dumps(pp.to_dict())))
    model = model.to(world.device, memory_format=torch.channels_last)

    # 3. Plan: fixed once, saved in every checkpoint, reused on resume.
    if state is None:
        plan = _plan(cfg, model, pretrained, train_src, val_src, pp, world, started)
        step, history = 0, []
    else:
        model.load_state_dict(state.model)
        plan, step, history = state.meta["plan"], state.meta["step"], state.meta["history"]
        if step >= plan["total_steps"]:
            _say(f"{run_dir}: this run already finished ({step} of {plan['total_steps']} steps)")
            return TrainResult(run_dir, classes, history, plan)
    bf16, steps_per_epoch, head_steps, total = plan["bf16"], plan["steps_per_epoch"], plan["head_steps"], plan["total_steps"]
    freeze = plan.get("freeze_groups", 0)  # plans from before freezing existed trained every layer
    if world.main:
        _write_config(run_dir, cfg, plan, data)
        _say(
            f"plan: {total} steps of {cfg.batch_size * world.size} images ({total / steps_per_epoch:.2f} epochs, "
            f"{head_steps} head-only), {pp.input_size} px, {'bf16' if bf16 else 'fp32'}, {world.size} process(es)"
            + (f", first {freeze} layer groups frozen" if freeze else "")
        )

    # 4. Train.
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    stage = None
    meta = {
        "backbone": cfg.backbone, "classes": classes, "preprocessing": pp.to_dict(), "config": cfg.to_dict(), "plan": plan,
        "data": str(data), "train_images": listed,
    }
    skipped = _SkipLog(train_src.skipped + (val_src.skipped if val_src else []), run_dir if world.main else None)
    skipped.report()
    images_per_step = cfg.batch_size * world.size
    bar = tqdm(total=total * images_per_step, initial=step * images_per_step, unit="img", disable=not progress, smoothing=0.05)
    writer = _tensorboard(run_dir) if world.main else None
    best = max([row["val_acc"] for row in history if row.get("val_acc") is not None], default=-1.0)
    stale, calibrated = 0, meta
    while step < total:
        epoch, first_batch = divmod(step, steps_per_epoch)
        seen = loss_sum = correct = running = 0.0
        epoch_start = time.perf_counter()
        for batch in _epoch_batches(train_src, pp, cfg, world, epoch, first_batch):
            skipped.add(batch.skipped)
            if batch.labels is None or not len(batch.labels):
                # Every image of this batch was unreadable: no update, but the step still counts,
                # so that step k stays batch k of the epoch (resume depends on it).
                step += 1
                bar.update(images_per_step)
                if step >= total:
                    break
                continue
            # 4a. The stage: head only (frozen backbone) until head_steps, then all but the first groups.
            wanted = 1 if step < head_steps else 2
            if stage is None or stage.number != wanted:
                stage = _Stage(wanted, model, cfg, world, head_steps, total, freeze)
                if state is not None and state.meta.get("stage") == wanted:
                    stage.optimizer.load_state_dict(state.optimizer)
            # 4b. One optimizer step.
            stage.set_lr(step)
            torch.manual_seed(_seed(cfg.seed, epoch, step, world.rank))  # dropout and the like
            n, batch_loss, batch_correct = stage.step(batch, criterion, bf16)
            seen, loss_sum, correct = seen + n, loss_sum + batch_loss, correct + batch_correct
            step += 1
            bar.update(images_per_step)
            # 4c. With a time budget, fix the number of steps again from the pace of the real steps.
            replan_at = plan.get("replan_at") if state is None else None
            if replan_at and step == replan_at - REPLAN_AFTER + REPLAN_SKIP:
                pace_start = time.perf_counter()
            elif replan_at and step == replan_at:
                measured = (time.perf_counter() - pace_start) / (REPLAN_AFTER - REPLAN_SKIP)
                measured = world.sum(measured)[0] / world.size  # every process must agree on the total
                total = _replan(cfg, plan, step, measured, val_src, world, started)
                plan.update(total_steps=total, replan_at=None, timing={**plan["timing"], "measured_step_s": measured})
                stage.resize(total)
                bar.total = total * images_per_step
                if world.main:
                    _write_config(run_dir, cfg, plan, data)
                    bar.write(f"imagerec: re-plan: {measured:.3f} s per step measured, {total} steps in all", file=sys.stderr)
            if step % 20 == 0:  # a refreshed postfix costs more than a small model's step
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", stage=stage.number, refresh=False)
            running += batch_loss / n
            in_epoch = step - epoch * steps_per_epoch
            if cfg.log_every and in_epoch % cfg.log_every == 0:
                if world.main:  # as the origin document prints it: the mean loss of the last log_every steps
                    bar.write(f"[{epoch + 1}, {in_epoch:5d}] loss: {running / cfg.log_every:.3f}", file=sys.stderr)
                running = 0.0
            if step >= total:
                break
            if cfg.save_every and step % cfg.save_every == 0 and step % steps_per_epoch and world.main:
                save_checkpoint(run_dir / LAST, _checkpoint(model, stage, meta, step, history))

        # 4d. Epoch end (or plan end): validate, record, save.
        train_seconds = time.perf_counter() - epoch_start
        seen, loss_sum, correct = world.sum(seen, loss_sum, correct)
        if stage is None:
            raise ImagerecError(f"{train_src.root}: no training image of this epoch could be read; see {run_dir / 'skipped.csv'}")
        val_loss, val_acc, val_out = _validate(model, val_src, pp, cfg, world, bf16, skipped)
        stage.apply_mode()
        row = {
            "epoch": epoch + 1,
            "step": step,
            "stage": stage.number,
            "lr": stage.optimizer.param_groups[-1]["lr"],
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "images_per_s": seen / max(train_seconds, 1e-9),  # training steps only, all processes
            "elapsed_s": time.perf_counter() - started,
        }
        history.append(row)
        improved = val_acc is None or val_acc > best
        best, stale = (val_acc if val_acc is not None else best, 0) if improved else (best, stale + 1)
        if world.main:
            skipped.report()
            if improved:
                calibrated = _calibrated(meta, cfg, val_src, val_out)  # from this model's own validation pass
                save_checkpoint(run_dir / BEST, _checkpoint(model, None, calibrated, step, history))
            save_checkpoint(run_dir / LAST, _checkpoint(model, stage, meta, step, history))
            _write_metrics(run_dir, history)
            _log_row(writer, row)
            val_text = f"val_loss {val_loss:.4f} val_acc {val_acc:.4f}" if val_acc is not None else "no validation split"
            bar.write(f"epoch {epoch + 1}: train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} {val_text}", file=sys.stderr)
        if cfg.patience and stale >= cfg.patience:
            if world.main:
                bar.write(f"early stop: no better val_acc for {stale} epoch(s)", file=sys.stderr)
            break
    bar.close()
    if writer:
        writer.close()
    if world.main and cfg.calibrate:
        _say(_calibration_text(calibrated))
    return TrainResult(run_dir, classes, history, plan)


# ---------------------------------------------------------------------------------------------
# 1. Data


def _load_splits(data, cfg: TrainConfig, progress: bool, expect: dict | None = None) -> tuple[ImageSource, ImageSource | None, int]:
    """The training and validation splits, and the number of training images listed (before
    decoding, which may skip some). With ``expect`` (a resumed run's metadata) the classes and
    that number must be the run's, checked before any image is decoded."""
    max_pixels = cfg.max_pixels or DEFAULT_MAX_PIXELS
    if isinstance(data, ImageSource):
        train_src, val_src = data, None
    else:
        train_src = load_images(data, "train", val_fraction=cfg.val_fraction, seed=cfg.seed, max_pixels=max_pixels, allow_outside=cfg.allow_outside)
        val_src = None
        if cfg.val_fraction > 0 or _has_val_folder(data):
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


class _SkipLog:
    """Images left out of training, each once, reported on stderr and in ``RUN/skipped.csv``."""

    def __init__(self, initial, run_dir: Path | None):
        self.items = {s.path: s for s in initial}
        self.run_dir, self.reported = run_dir, 0

    def add(self, pairs) -> None:
        for _, item in pairs:
            self.items.setdefault(item.path, item)

    def report(self) -> None:
        """At most once per new set of skips (an epoch end), so the console is not flooded."""
        if self.run_dir is not None and len(self.items) > self.reported:
            report_skipped(list(self.items.values()), self.run_dir)
            self.reported = len(self.items)


def _has_val_folder(data) -> bool:
    path = Path(os.fspath(data))
    return path.is_dir() and any((path / name).is_dir() for name in ("val", "valid", "validation"))


def _is_small(source: ImageSource) -> bool:
    return source.pixels is not None


def _default_size(model: nn.Module, source: ImageSource) -> int:
    if model.preprocessing.fixed_input_size or not _is_small(source):
        return model.preprocessing.input_size
    return SMALL_IMAGE_TRAIN_SIZE


def _write_config(run_dir: Path, cfg: TrainConfig, plan: dict, data) -> None:
    """The resolved configuration and the plan, beside the run's outputs."""
    write_text_atomic(run_dir / "config.json", json.dumps({"config": cfg.to_dict(), "plan": plan, "data": str(data)}, indent=2))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


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
        seed=_seed(cfg.seed, epoch, world.rank),
        workers=cfg.workers,
        drop_last=True,
        start_batch=first_batch,
        prefetch=world.device.type != "cpu",  # on a CPU a prefetch thread competes with the step for cores
    )


# ---------------------------------------------------------------------------------------------
# 3. Plan


REPLAN_SKIP, REPLAN_AFTER = 5, 30  # stage-2 steps: warm-up steps not timed, steps before the re-plan


def _plan(cfg, model, pretrained, train_src, val_src, pp, world: World, started: float) -> dict:
    freeze = cfg.freeze_groups if pretrained else 0  # frozen random weights would never learn
    steps_per_epoch = (len(train_src) // world.size) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ImagerecError(
            f"batch_size={cfg.batch_size} x {world.size} process(es) is more than the {len(train_src)} training images; lower --batch-size"
        )
    head_steps = round(cfg.head_epochs * steps_per_epoch) if pretrained else 0
    timing = {}
    bf16 = cfg.precision == "bf16"
    if cfg.precision == "auto" or cfg.time_budget:
        batch = next(iter(_epoch_batches(train_src, pp, cfg, world, 0, 0)))
        timing["fp32_step_s"] = _time_steps(model, batch, cfg, freeze, head=False, bf16=False)
        if cfg.precision == "auto" and _bf16_possible(world.device):
            timing["bf16_step_s"] = _time_steps(model, batch, cfg, freeze, head=False, bf16=True)
            bf16 = timing["bf16_step_s"] < 0.9 * timing["fp32_step_s"]
    if cfg.time_budget is None:
        full_steps = max(1, round(cfg.epochs * steps_per_epoch))
    else:
        timing["step_s"] = timing["bf16_step_s" if bf16 else "fp32_step_s"]
        timing["head_step_s"] = _time_steps(model, batch, cfg, freeze, head=True, bf16=bf16) if head_steps else 0.0
        timing["eval_image_s"] = _time_eval(model, batch, cfg, bf16)
        head_steps, full_steps = _fit_budget(cfg, timing, steps_per_epoch, head_steps, val_src, world, started)
    replan_at = head_steps + REPLAN_AFTER if cfg.time_budget and full_steps >= 2 * REPLAN_AFTER else None
    return {
        "replan_at": replan_at,
        "steps_per_epoch": steps_per_epoch,
        "head_steps": head_steps,
        "total_steps": head_steps + full_steps,
        "freeze_groups": freeze,
        "bf16": bf16,
        "image_size": pp.input_size,
        "world_size": world.size,
        "timing": timing,
    }


def _bf16_possible(device: torch.device) -> bool:
    """Whether ``precision="auto"`` times bf16 at all: on a GPU that supports it. Not on a CPU:
    training there measured slower in bf16 (docs/BENCHMARKS.md), and a choice made by timing would
    make the same CPU run's numbers depend on how busy the machine was (``--precision bf16``
    still forces it)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _time_steps(model, batch, cfg, freeze: int, head: bool, bf16: bool, reps: int = 5) -> float:
    """Seconds per training step, measured on a copy of the model (the real one is untouched):
    the median of ``reps`` steps, so that one step slowed by another process does not count."""
    clone = copy.deepcopy(model)
    stage = _Stage(1 if head else 2, clone, cfg, World(0, 1, next(model.parameters()).device), 1, 1, freeze)
    criterion = nn.CrossEntropyLoss()
    stage.step(batch, criterion, bf16)  # warm-up: allocations, kernel selection
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        stage.step(batch, criterion, bf16)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _time_eval(model, batch, cfg, bf16: bool) -> float:
    device = next(model.parameters()).device
    images = batch.images.to(device)
    model.eval()
    with torch.inference_mode(), autocast(device, bf16):
        model(images)
        start = time.perf_counter()
        for _ in range(2 if cfg.tta else 1):
            model(images)
        seconds = time.perf_counter() - start
    return seconds / len(images)


def _fit_budget(cfg, timing, steps_per_epoch, head_steps, val_src, world, started) -> tuple[int, int]:
    """The most stage-2 steps whose measured cost fits the time budget (with a safety margin)."""
    budget = cfg.time_budget * 60 * 0.95 - (time.perf_counter() - started) - 5.0
    val_cost = (len(val_src) / world.size if val_src else 0) * timing["eval_image_s"] * 1.2
    save_cost = 1.0  # seconds per checkpoint written (generous for a 20-50 MB file)

    def cost(steps: int) -> float:
        total = head_steps + steps
        epochs = math.ceil(total / steps_per_epoch)
        saves = epochs * 2 + (total // cfg.save_every if cfg.save_every else 0)
        return head_steps * timing["head_step_s"] + steps * timing["step_s"] + epochs * val_cost + saves * save_cost

    if cost(1) > budget and head_steps:
        head_steps = 0  # no time for a separate head stage
    if cost(1) > budget:
        raise ImagerecError(
            f"--time-budget {cfg.time_budget} min is too short: one step takes {timing['step_s']:.2f} s and one "
            f"validation pass {val_cost:.0f} s after {time.perf_counter() - started:.0f} s of setup; raise the budget"
        )
    return head_steps, _most_steps_within(budget, cost)


def _most_steps_within(budget: float, cost) -> int:
    """The largest n >= 1 with cost(n) <= budget (1 if none), for a cost increasing in n."""
    low, high = 1, 1
    while cost(high * 2) <= budget:
        high *= 2
    high *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= budget else (low, middle)
    return low


def _replan(cfg, plan: dict, step: int, step_s: float, val_src, world, started: float) -> int:
    """The total steps that fit what is left of the time budget, at the measured ``step_s``.

    The plan's first estimate times steps on a copy of the model; the real loop (data
    preparation, a warm optimizer, a busier memory) is often slower, so after the first
    ``REPLAN_AFTER`` steps of stage 2 the number of steps is fixed again from their own pace.
    """
    spe, timing = plan["steps_per_epoch"], plan["timing"]
    budget = cfg.time_budget * 60 * 0.95 - (time.perf_counter() - started) - 5.0
    val_cost = (len(val_src) / world.size if val_src else 0) * timing["eval_image_s"] * 1.2

    def cost(more: int) -> float:
        epochs = math.ceil((step + more) / spe) - step // spe
        saves = epochs * 2 + ((step + more) // cfg.save_every - step // cfg.save_every if cfg.save_every else 0)
        return more * step_s + epochs * val_cost + saves * 1.0

    return step + _most_steps_within(budget, cost)


# ---------------------------------------------------------------------------------------------
# 4. Train


class _Stage:
    """One stage of the recipe: what trains, its optimizer and its learning-rate schedule.

    Stage 1 trains the head alone: the backbone is frozen and kept in eval mode (batch-norm
    statistics stay those of the pretrained weights). Stage 2 trains everything but the first
    ``freeze`` layer groups (whose batch-norm statistics still adapt, in train mode), the
    backbone at ``lr * backbone_lr_scale``; under torchrun it runs through
    DistributedDataParallel. Frozen early layers save most of the backward pass where the
    feature maps are largest: with 4 groups, steps 1.6x faster at 96 px and 2.1x at 128 px on a
    CPU (docs/BENCHMARKS.md).
    """

    def __init__(self, number: int, model: nn.Module, cfg: TrainConfig, world: World, head_steps: int, total_steps: int, freeze: int = 0):
        self.number, self.model, self.cfg, self.world = number, model, cfg, world
        head = list(model.get_classifier().parameters())
        head_ids = {id(p) for p in head}
        scale = cfg.batch_size * world.size / cfg.lr_batch  # the linear scaling rule
        if number == 1:
            for p in model.parameters():
                p.requires_grad_(id(p) in head_ids)
            groups = [{"params": head, "weight_decay": 0.0, "peak_lr": cfg.head_lr * scale}]
            self.start, self.steps, self.schedule, self.warmup = 0, head_steps, "cosine", 0
            self.net = model
        else:
            frozen = {id(p) for p in early_parameters(model, freeze)}
            for p in model.parameters():
                p.requires_grad_(id(p) not in frozen)
            groups = []
            for is_head, share in ((False, cfg.backbone_lr_scale), (True, 1.0)):
                params = [p for p in model.parameters() if (id(p) in head_ids) == is_head and p.requires_grad]
                groups += decay_groups(params, cfg.weight_decay, cfg.lr * share * scale)
            self.start, self.steps, self.schedule = head_steps, total_steps - head_steps, cfg.schedule
            self.warmup = round(cfg.warmup * self.steps) if cfg.schedule == "onecycle" else 0
            self.net = model
            if world.size > 1:
                device_ids = [world.device] if world.device.type == "cuda" else None
                self.net = DistributedDataParallel(model, device_ids=device_ids)
        self.apply_mode()
        if cfg.optimizer == "sgd":
            nesterov = cfg.nesterov and cfg.momentum > 0
            self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=nesterov)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=0.0)

    def resize(self, total_steps: int) -> None:
        """Stretch or shrink the schedule of stage 2 to end at ``total_steps``."""
        self.steps = total_steps - self.start
        self.warmup = round(self.cfg.warmup * self.steps) if self.schedule == "onecycle" else 0

    def apply_mode(self) -> None:
        """Train mode for what trains: the head alone in stage 1 (batch norm frozen), all in stage 2."""
        if self.number == 1:
            self.model.eval()
            self.model.get_classifier().train()
        else:
            self.model.train()

    def set_lr(self, step: int) -> None:
        """Set every group's learning rate for global ``step``: warm-up, then cosine to 0."""
        i, n = step - self.start, max(self.steps, 1)
        set_lr(self.optimizer, 1.0 if self.schedule == "constant" else warmup_cosine(i, n, self.warmup))

    def step(self, batch, criterion, bf16: bool) -> tuple[int, float, int]:
        """One optimizer step; returns (images, summed loss, correct predictions)."""
        device = self.world.device
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with autocast(device, bf16):
            if self.number == 1:
                with torch.no_grad():
                    features = self.model.forward_features(images)
                logits = self.model.forward_head(features)
            else:
                logits = self.net(images)
        loss = criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.number == 1:
            self.world.average_gradients(self.model.get_classifier().parameters())
        self.optimizer.step()
        n = len(labels)
        return n, float(loss.detach()) * n, int((logits.argmax(1) == labels).sum())


def _validate(
    model, val_src, pp, cfg, world: World, bf16: bool, skipped: _SkipLog
) -> tuple[float | None, float | None, Predictions | None]:
    if val_src is None:
        return None, None, None
    shard = np.arange(len(val_src))[world.rank :: world.size]
    out = predict_source(model, val_src, pp, batch_size=128, tta=cfg.tta, device=world.device, bf16=bf16, indices=shard, workers=cfg.workers)
    skipped.add((None, item) for item in out.skipped)
    correct = float((out.proba.argmax(1) == val_src.labels[out.indices]).sum())
    loss_sum, correct, n = world.sum(out.loss_sum, correct, float(len(out.indices)))
    return loss_sum / max(n, 1), correct / max(n, 1), out


def _calibrated(meta: dict, cfg: TrainConfig, val_src: ImageSource | None, val_out: Predictions | None) -> dict:
    """``meta`` with the temperature fitted on the validation predictions (this process's shard).

    No validation split, no readable validation image, or ``calibrate=False``: T is left out (1).
    """
    if not cfg.calibrate or val_out is None or not len(val_out.indices):
        return meta
    return dict(meta, **calibration_meta(val_out.raw_proba, val_src.labels[val_out.indices]))


def _calibration_text(meta: dict) -> str:
    facts = meta.get("calibration")
    if facts is None:
        return "calibration: no held-out images (val_fraction=0, no val folder): probabilities stay uncalibrated (T=1)"
    return (
        f"calibration: temperature {meta['temperature']:.3f} fitted on {facts['images']} validation images "
        f"(NLL {facts['nll_before']:.4f} -> {facts['nll_after']:.4f})"
    )


def _checkpoint(model, stage, meta, step, history) -> Checkpoint:
    return Checkpoint(
        model=model.state_dict(),
        meta=dict(meta, step=step, history=history, stage=stage.number if stage else None),
        optimizer=stage.optimizer.state_dict() if stage else None,
    )


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _log_row(writer, row: dict) -> None:
    if writer is None:
        return
    for key, value in row.items():
        if isinstance(value, (int, float)) and key not in ("epoch", "step"):
            writer.add_scalar(key, value, row["step"])


def _say(text: str) -> None:
    print(f"imagerec: {text}", file=sys.stderr)
