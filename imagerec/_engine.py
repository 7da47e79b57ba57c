"""The one step loop that every imagerec trainer runs, and the callbacks they share.

The classifier's training (``training``), the pruning fine-tune (``compress``), the SimCLR
adaptation of a backbone (``features``) and the SCAN clustering head (``clustering``) each say
only where their batches come from and what one step does. :class:`Loop` runs the steps epoch
by epoch and calls its callbacks around them: the learning-rate schedule
(:class:`WarmupCosine`), the weights' moving average (:class:`EMA`), the progress bar
(:class:`Progress`), and whatever a trainer adds of its own (checkpoints, validation, the time
budget).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ._optim import set_lr, warmup_cosine
from .errors import ImagerecError


@dataclass
class StepOutput:
    """What one optimizer step trained on.

    Attributes:
        images: images (or feature vectors) in the step.
        loss: the loss summed over them.
        correct: predictions that matched their label (0 where there are no labels).
    """

    images: int
    loss: float
    correct: int = 0


class Callback:
    """Hooks :class:`Loop` calls; each does nothing unless overridden."""

    def on_step_start(self, loop: Loop) -> None:
        """Before step ``loop.step`` (0-based) runs."""

    def on_step_end(self, loop: Loop, out: StepOutput | None) -> None:
        """After a step; ``loop.step`` counts it. ``out`` is None when the step trained nothing."""

    def on_epoch_end(self, loop: Loop) -> None:
        """After the last step of an epoch, or of the run."""

    def on_end(self, loop: Loop) -> None:
        """Once, when the loop stops."""


class Loop:
    """Runs ``step(batch)`` over the batches of each epoch until ``total`` steps or a callback stops it.

    Args:
        step: trains on one batch; returns a :class:`StepOutput`, or None when the batch held
            nothing to train on (the step still counts, so that step k stays batch k of its epoch).
        batches: ``batches(epoch, first)`` yields the batches of ``epoch`` from its ``first`` on.
        total: steps in the run; a callback may change ``loop.total`` while it runs.
        steps_per_epoch: batches in an epoch (the loop starts at step ``start``: epoch
            ``start // steps_per_epoch``, batch ``start % steps_per_epoch``).
        start: the first step (a resumed run's).
        callbacks: called in this order at each hook.

    Attributes:
        step, epoch, total: where the run is.
        images, loss, correct: sums over this epoch's steps so far.
        epoch_started: ``time.perf_counter()`` at the epoch's start.
        stop: set it to a reason (a string) to stop after the current step.

    Raises:
        ImagerecError: an epoch gave no batch at all (no image could be read).
    """

    def __init__(
        self,
        step: Callable[[object], StepOutput | None],
        batches: Callable[[int, int], Iterable],
        *,
        total: int,
        steps_per_epoch: int,
        start: int = 0,
        callbacks: Sequence[Callback] = (),
    ):
        self.step_fn, self.batches, self.callbacks = step, batches, list(callbacks)
        self.total, self.steps_per_epoch, self.step = total, steps_per_epoch, start
        self.epoch = start // steps_per_epoch
        self.stop: str | None = None
        self._new_epoch()

    def run(self) -> Loop:
        while self.step < self.total and self.stop is None:
            # 1. One epoch: from the batch the run stands at, to the epoch's end or the run's.
            self.epoch, first = divmod(self.step, self.steps_per_epoch)
            self._new_epoch()
            before = self.step
            for batch in self.batches(self.epoch, first):
                # 2. One step, between the callbacks.
                self._call("on_step_start")
                out = self.step_fn(batch)
                self.step += 1
                if out is not None:
                    self.images, self.loss, self.correct = self.images + out.images, self.loss + out.loss, self.correct + out.correct
                self._call("on_step_end", out)
                if self.step >= self.total or self.stop is not None:
                    break
            if self.step == before:
                raise ImagerecError(f"epoch {self.epoch + 1} gave no batch to train on; check that the images can be read")
            self._call("on_epoch_end")
        self._call("on_end")
        return self

    def _new_epoch(self) -> None:
        self.images, self.loss, self.correct = 0, 0.0, 0
        self.epoch_started = time.perf_counter()

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


class WarmupCosine(Callback):
    """Sets the learning rate before each step: each group's ``peak_lr`` times a linear warm-up
    over ``warmup`` of the steps, then a cosine decay to 0 at the schedule's end (see :mod:`._optim`).

    Args:
        optimizer: whose groups carry ``peak_lr`` (:func:`~imagerec._optim.decay_groups`).
        warmup: share of the schedule's steps spent warming up, in [0, 1).
        start: the step at which this schedule begins (a later stage's first step).
        end: the step at which it ends; None: ``loop.total``, read at every step, so a re-planned
            run still ends its schedule on time.
        constant: keep the peak rate instead (no warm-up, no decay).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float = 0.0, start: int = 0, end: int | None = None, constant: bool = False):
        self.optimizer, self.warmup, self.start, self.end, self.constant = optimizer, warmup, start, end, constant

    def on_step_start(self, loop: Loop) -> None:
        steps = max((self.end or loop.total) - self.start, 1)
        factor = 1.0 if self.constant else warmup_cosine(loop.step - self.start, steps, round(self.warmup * steps))
        set_lr(self.optimizer, factor)


class EMA(Callback):
    """An exponential moving average of a model's weights and buffers, updated after every step
    (timm's ``ModelEmaV3``, with its warm-up: the average forgets fast early in a run, slowly
    later, and never slower than ``decay``).

    Args:
        model: the model being trained (its parameters' device and dtype are kept).
        decay: the slowest forgetting rate per step, e.g. 0.998 for an average over roughly the
            last 500 steps.

    Attributes:
        module: the averaged copy of ``model`` (eval mode), to validate and save.
    """

    def __init__(self, model: nn.Module, decay: float):
        from timm.utils import ModelEmaV3  # noqa: PLC0415 - timm imports slowly; only training needs it

        self.model = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)
        self.ema.eval()

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def on_step_end(self, loop: Loop, out: StepOutput | None) -> None:
        if out is not None:
            self.ema.update(self.model, step=loop.step)


class Progress(Callback):
    """A progress bar in steps (or ``per_step`` images a step), with the epoch's mean loss
    (and accuracy, where there are labels) refreshed every ``every`` steps."""

    def __init__(self, desc: str, enabled: bool = True, per_step: int = 1, unit: str = "step", every: int = 1):
        self.desc, self.enabled, self.per_step, self.unit, self.every = desc, enabled, per_step, unit, every
        self.bar = None

    def on_step_end(self, loop: Loop, out: StepOutput | None) -> None:
        if self.bar is None:
            self.bar = tqdm(total=loop.total * self.per_step, initial=(loop.step - 1) * self.per_step, desc=self.desc,
                            unit=self.unit, disable=not self.enabled, smoothing=0.05)
        self.bar.total = loop.total * self.per_step  # a callback may have re-planned it
        self.bar.update(self.per_step)
        if loop.step % self.every == 0 and loop.images:
            stats = {"loss": f"{loop.loss / loop.images:.3f}"}
            if loop.correct:
                stats["acc"] = f"{loop.correct / loop.images:.3f}"
            self.bar.set_postfix(stats, refresh=False)

    def on_end(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
