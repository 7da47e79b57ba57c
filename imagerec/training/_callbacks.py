"""The training run's own callbacks on the engine's step loop (:mod:`imagerec._engine`).

- :class:`Replan`: the time budget fits the run again from the pace of the first real steps;
- :class:`RunningLoss`: the origin document's log line, the mean loss of the last N steps;
- :class:`EpochEnd`: validation, the history row, the best and last checkpoints, early stopping;
  between epochs, ``last.safetensors`` every ``save_every`` steps, so a killed run loses little.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._engine import EMA, Callback, Loop, StepOutput
from .._io import write_text_atomic
from ..checkpoint import BEST, LAST, Checkpoint, save_checkpoint
from ..data import ImageSource, report_skipped
from ..errors import ImagerecError
from ..inference import Predictions, predict_source
from ._calibrate import calibration_meta
from ._config import TrainConfig
from ._distributed import World
from ._plan import REPLAN_AFTER, REPLAN_SHARES, REPLAN_SKIP, REPLAN_WINDOW, Budget, Plan
from ._stage import Stages


class Replan(Callback):
    """Fits the number of steps to the time budget again from the pace of the real steps: first
    at ``plan.replan_at`` (30 steps into stage 2, from its steps 5-30, as the first ones warm up;
    a run of fewer than 60 steps at a quarter of stage 2), then at ``REPLAN_SHARES`` of the run
    (25% and 50%, each from every step since the last fit), so that a machine whose speed
    drifts, or a first window that ran slow or fast, still ends on time with the budget used.
    The pace is the median of each step's time (from one step's end to the next's) over the time
    that step was priced at, at its input size: a few steps slowed by another process (a burst
    of a few seconds on a shared machine) or by a validation pass do not count, while a machine
    that is slower throughout is measured as such. Later fits move the learning-rate schedule
    little: at 25% of a cosine, 40% more steps raise the rate from 85% to 93% of its peak."""

    def __init__(self, budget: Budget, plan: Plan, val_images: int, world: World, save_config):
        self.budget, self.plan, self.val_images, self.world, self.save_config = budget, plan, val_images, world, save_config
        long_run = plan.replan_at is not None and plan.replan_at - plan.head_steps >= REPLAN_AFTER
        self.start = plan.head_steps + (REPLAN_SKIP if long_run else 1)  # the first steps of stage 2 warm up
        self.paces: list[float] = []
        self.last_end: float | None = None

    def on_step_end(self, loop: Loop, out: StepOutput | None) -> None:
        plan = self.plan
        if plan.replan_at is None or loop.step < self.start:
            return
        now = time.perf_counter()
        if self.last_end is not None:
            self.paces.append((now - self.last_end) / plan.priced_step_s(loop.step))
        self.last_end = now
        if loop.step == plan.replan_at:
            pace = self.world.sum(float(np.median(self.paces)))[0] / self.world.size  # every process must agree on the total
            loop.total = plan.total_steps = self.budget.refit(plan, loop.step, pace, self.val_images)
            measured = pace * plan.priced_step_s(loop.step)
            plan.timing["measured_step_s"] = measured
            done = plan.timing.setdefault("replans", [])
            done.append({"step": loop.step, "step_s": round(measured, 4), "total_steps": plan.total_steps})
            window = min(REPLAN_WINDOW, max(4, (plan.total_steps - plan.head_steps) // 5))
            later = [round(share * plan.total_steps) for share in REPLAN_SHARES[len(done) - 1 :]]  # each share once
            plan.replan_at = next((at for at in later if at >= loop.step + window), None)
            self.paces = []
            if self.world.main:
                self.save_config()
                tqdm.write(f"imagerec: re-plan: at step {loop.step}, {measured:.3f} s per step measured, {plan.total_steps} steps in all", file=sys.stderr)
            self.last_end = time.perf_counter()


class RunningLoss(Callback):
    """As the origin document prints it: ``[epoch, step] loss: x``, the mean loss of the last
    ``every`` steps of the epoch (``every`` = 0: never)."""

    def __init__(self, every: int, main: bool):
        self.every, self.main, self.running = every, main, 0.0

    def on_step_end(self, loop: Loop, out: StepOutput | None) -> None:
        if not self.every:
            return
        if out is not None:
            self.running += out.loss / out.images
        in_epoch = loop.step - loop.epoch * loop.steps_per_epoch
        if in_epoch % self.every == 0:
            if self.main:
                tqdm.write(f"[{loop.epoch + 1}, {in_epoch:5d}] loss: {self.running / self.every:.3f}", file=sys.stderr)
            self.running = 0.0

    def on_epoch_end(self, loop: Loop) -> None:
        self.running = 0.0


class EpochEnd(Callback):
    """At each epoch's end (or the run's): validate, record a row of ``metrics.csv``, save
    ``last`` and ``best`` (with a temperature fitted on that validation pass) when the validation
    accuracy is the highest so far, or within one standard error of it (:func:`within_one_se`)
    with a validation loss no higher than that of the weights kept (:func:`not_worse`), so that
    ``best`` is the latest epoch the validation split cannot tell from the best one;
    stop after ``cfg.patience`` epochs without a higher accuracy. Between epochs, ``last`` is
    also saved every ``cfg.save_every`` steps, so a killed run loses little.

    With an :class:`~imagerec._engine.EMA`, the averaged weights are validated and saved as
    ``best``; ``last`` keeps the trained weights and the optimizer, to resume.

    Attributes:
        history: the rows so far (a resumed run's first).
        calibrated: the metadata of the best checkpoint written last.
    """

    def __init__(self, run_dir: Path, model, stages: Stages, ema: EMA | None, meta: dict, plan: Plan, history: list[dict],
                 val_src: ImageSource | None, pp, cfg: TrainConfig, world: World, skipped, started: float):
        self.run_dir, self.model, self.stages, self.ema, self.meta, self.plan = run_dir, model, stages, ema, meta, plan
        self.history, self.val_src, self.pp, self.cfg, self.world = history, val_src, pp, cfg, world
        self.skipped, self.started, self.calibrated = skipped, started, meta
        self.kept_epoch: int | None = None
        self.kept_loss: float | None = None  # the validation loss of the weights saved as best (a resumed run: unknown)
        self.best = max([row["val_acc"] for row in history if row.get("val_acc") is not None], default=-1.0)
        self.stale = 0
        self.writer = _tensorboard(run_dir) if world.main else None

    def on_step_end(self, loop: Loop, out: StepOutput | None) -> None:
        every = self.cfg.save_every
        if every and loop.step % every == 0 and loop.step % loop.steps_per_epoch and loop.step < loop.total and self.world.main:
            save_checkpoint(self.run_dir / LAST, self._checkpoint(loop.step, last=True))

    def on_epoch_end(self, loop: Loop) -> None:
        train_seconds = time.perf_counter() - loop.epoch_started
        seen, loss_sum, correct = self.world.sum(loop.images, loop.loss, loop.correct)
        if not seen:
            raise ImagerecError(f"no training image of epoch {loop.epoch + 1} could be read; see {self.run_dir / 'skipped.csv'}")
        stage = self.stages.stage
        row = {
            "epoch": loop.epoch + 1,
            "step": loop.step,
            "stage": stage.number,
            "lr": stage.optimizer.param_groups[-1]["lr"],
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
        }
        self._judge(row, seen / max(train_seconds, 1e-9), stage)  # images_per_s: training steps only, all processes
        if self.cfg.patience and self.stale >= self.cfg.patience:
            loop.stop = f"no better val_acc for {self.stale} epoch(s)"
            if self.world.main:
                tqdm.write(f"early stop: {loop.stop}", file=sys.stderr)

    def judge_probe(self, probe: dict) -> None:
        """Epoch 0: the probed head on the frozen backbone (stage 0, :mod:`._probe`), validated and
        saved as ``best`` like an epoch, so that fine-tuning's epochs replace it only when the
        validation split cannot tell them from it or finds them better (:func:`within_one_se`)."""
        row = {"epoch": 0, "step": 0, "stage": 0, "lr": 0.0, "train_loss": probe["train_loss"], "train_acc": probe["train_acc"]}
        self._judge(row, probe["images_per_s"], None)

    def _judge(self, row: dict, images_per_s: float, stage) -> None:
        """Validate, record the row, keep the weights as ``best`` when they are as good as the
        best so far (within one standard error) and save; ``stage`` None: nothing to resume (the
        probe), so ``last`` is not written."""
        val_loss, val_acc, val_out, val_images = validate(self._judged, self.val_src, self.pp, self.cfg, self.world, self.plan.bf16, self.skipped)
        if stage is not None:
            stage.apply_mode()
        row = dict(row, val_loss=val_loss, val_acc=val_acc, images_per_s=images_per_s, elapsed_s=time.perf_counter() - self.started)
        self.history.append(row)
        improved = val_acc is None or val_acc > self.best
        kept = improved or (within_one_se(val_acc, self.best, val_images) and not_worse(val_loss, self.kept_loss))
        self.best, self.stale = (val_acc if val_acc is not None else self.best, 0) if improved else (self.best, self.stale + 1)
        if kept:
            self.kept_epoch, self.kept_loss = row["epoch"], val_loss
            self.calibrated = calibrated(self.meta, self.cfg, self.val_src, val_out, self.world)  # from this model's own validation pass
        if self.world.main:
            self.skipped.report()
            if kept:
                save_checkpoint(self.run_dir / BEST, self._checkpoint(row["step"], last=False, stage=stage))
            if stage is not None:
                save_checkpoint(self.run_dir / LAST, self._checkpoint(row["step"], last=True, stage=stage))
            write_metrics(self.run_dir, self.history)
            _log_row(self.writer, row)
            val_text = f"val_loss {val_loss:.4f} val_acc {val_acc:.4f}" if val_acc is not None else "no validation split"
            name = f"epoch {row['epoch']}" if stage is not None else "probe"
            tqdm.write(f"{name}: train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} {val_text}", file=sys.stderr)

    def on_end(self, loop: Loop) -> None:
        if self.writer is not None:
            self.writer.close()

    @property
    def _judged(self):
        """The weights validated and saved as best: the moving average with ``ema``, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def _checkpoint(self, step: int, last: bool, stage=None) -> Checkpoint:
        """``last``: the trained weights and the optimizer (to resume); else the weights judged
        on validation, with the calibrated metadata (the best checkpoint)."""
        if last:
            return make_checkpoint(self.model, stage or self.stages.stage, self.meta, self.plan, step, self.history)
        return make_checkpoint(self._judged, None, self.calibrated, self.plan, step, self.history)


class SkipLog:
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


def within_one_se(val_acc: float | None, best: float, images: int) -> bool:
    """Whether ``val_acc`` is within one standard error of the ``best`` accuracy on ``images``
    validation images (Breiman's one-standard-error rule; the binomial error, at least one
    image). On 30 images that is 1-2 images, which is noise: a later epoch that ties or nearly
    ties an earlier one is kept. On 2,000 it is about 0.7 points."""
    if val_acc is None or best < 0 or not images:
        return False
    return val_acc >= best - max(math.sqrt(best * (1 - best) / images), 1 / images) - 1e-9


def not_worse(val_loss: float | None, kept_loss: float | None) -> bool:
    """Whether a later epoch whose accuracy ties the kept one's (within one standard error)
    may replace it: its validation loss is no higher. On nine validation images the standard
    error is more than one image: a fine-tuning epoch that had collapsed (1 of 9 right) tied the
    probe (2 of 9) and replaced it, and scored 0.025 on the test split (skin lesions, 10
    labelled images a class). Accuracy on a few images cannot tell them apart; the loss can."""
    return val_loss is None or kept_loss is None or val_loss <= kept_loss + 1e-9


def validate(model, val_src, pp, cfg, world: World, bf16: bool, skipped: SkipLog) -> tuple[float | None, float | None, Predictions | None, int]:
    """(loss, accuracy, this process's predictions, images read by all processes) on the
    validation split, each process its shard."""
    if val_src is None:
        return None, None, None, 0
    shard = np.arange(len(val_src))[world.rank :: world.size]
    out = predict_source(model, val_src, pp, batch_size=128, tta=cfg.tta, device=world.device, bf16=bf16, indices=shard, workers=cfg.workers)
    skipped.add((None, item) for item in out.skipped)
    correct = float((out.proba.argmax(1) == val_src.labels[out.indices]).sum())
    loss_sum, correct, n = world.sum(out.loss_sum, correct, float(len(out.indices)))
    return loss_sum / max(n, 1), correct / max(n, 1), out, int(n)


def calibrated(meta: dict, cfg: TrainConfig, val_src: ImageSource | None, val_out: Predictions | None, world: World) -> dict:
    """``meta`` with the temperature fitted on the validation predictions of every process's
    shard, on the main process (every process calls it; the others get ``meta`` back).

    No validation split, no readable validation image, or ``calibrate=False``: T is left out (1).
    """
    if not cfg.calibrate or val_out is None:
        return meta
    raw_proba, labels = world.gather(val_out.raw_proba), world.gather(val_src.labels[val_out.indices])
    return dict(meta, **calibration_meta(raw_proba, labels)) if world.main and len(labels) else meta


def make_checkpoint(model, stage, meta, plan: Plan, step, history) -> Checkpoint:
    return Checkpoint(
        model=model.state_dict(),
        meta=dict(meta, plan=plan.to_dict(), step=step, history=history, stage=stage.number if stage else None),
        optimizer=stage.optimizer.state_dict() if stage else None,
    )


def describe_data(data) -> str:
    """The data spec as the run records it: a spec as given, an ImageSource by its root."""
    if isinstance(data, ImageSource):
        return data.root
    if isinstance(data, tuple):
        return " | ".join(describe_data(d) for d in data if d is not None)
    return str(data)


def write_config(run_dir: Path, cfg: TrainConfig, plan: Plan, data) -> None:
    """The resolved configuration and the plan, beside the run's outputs."""
    write_text_atomic(run_dir / "config.json", json.dumps({"config": cfg.to_dict(), "plan": plan.to_dict(), "data": describe_data(data)}, indent=2))


def write_metrics(run_dir: Path, history: list[dict]) -> None:
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
