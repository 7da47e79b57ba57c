"""The plan of a training run, and the time budget that fits it and fits it again.

A :class:`Plan` fixes the run before its first step: steps per epoch, the head-only steps, the
total, the frozen layer groups, the precision. It is saved in every checkpoint and reused on
resume. With a time budget, :class:`Budget` chooses the most steps whose cost fits: first from a
few steps timed on a copy of the model, then again (:meth:`Budget.refit`) from the pace of
the first ``REPLAN_AFTER`` real steps and at a quarter and half of the run, early enough that
the learning-rate schedule still ends on time.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from ..errors import ImagerecError
from ..inference import autocast
from ._config import TrainConfig
from ._distributed import World
from ._stage import Stage

REPLAN_SKIP, REPLAN_AFTER = 5, 30  # stage-2 steps: warm-up steps not timed, steps before the first re-plan
REPLAN_SHARES, REPLAN_WINDOW = (0.25, 0.5), 50  # later re-plans: at these shares of the run, each over at least this many steps
SAVE_S = 1.0  # seconds per checkpoint written (generous for a 20-50 MB file)
RESIZE_RAMP = (0.70, 0.85)  # progressive resizing: the share of stage-2 steps where the size starts and ends growing


@dataclass
class Plan:
    """How a run trains, fixed before its first step.

    Attributes:
        steps_per_epoch: optimizer steps in one pass over this process's share of the images.
        head_steps: the first steps, which train the new head alone.
        total_steps: every step of the run, head steps included.
        freeze_groups: early layer groups kept frozen in stage 2.
        bf16: train in bfloat16 autocast.
        image_size: the input size, px.
        start_size: the input size of the first steps (progressive resizing; ``image_size``: off).
        world_size: processes (torchrun), each with ``steps_per_epoch`` steps an epoch.
        timing: seconds measured for the budget (``full_step_s``, ``start_step_s`` with
            progressive resizing, ``step_s`` their mean over the schedule, ``head_step_s``,
            ``eval_image_s``; after a re-plan ``measured_step_s`` and ``replans``, one entry a fit).
        replan_at: the step at which the budget fits the run again (None: no re-plan left).
        frozen_norm: stage 2 keeps the pretrained batch-norm statistics (eval mode) while the
            weights train (``norm_stats``; auto: after the probe).
        lr_scale: stage 2's learning rates are the configured ones times this
            (``probe_lr_scale`` after the probe, else 1).
    """

    steps_per_epoch: int
    head_steps: int
    total_steps: int
    freeze_groups: int
    bf16: bool
    image_size: int
    world_size: int
    timing: dict = field(default_factory=dict)
    replan_at: int | None = None
    start_size: int | None = None
    frozen_norm: bool = False
    lr_scale: float = 1.0

    def __post_init__(self):
        self.start_size = self.start_size or self.image_size

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def size_at(self, step: int) -> int:
        """The input size of ``step``: ``start_size`` for the head steps and the first 70% of
        stage 2, growing in steps of 8 px to ``image_size`` by 85%, which the last steps train
        at (progressive resizing: cheap small steps early, the full size where it matters)."""
        stage2 = max(1, self.total_steps - self.head_steps)
        return resize_schedule(max(0, step - self.head_steps) / stage2, self.start_size, self.image_size)

    def priced_step_s(self, step: int) -> float:
        """Seconds the budget priced ``step`` at: the timed step, at that step's input size."""
        return step_s_at(self.timing, self.size_at(step), self.start_size, self.image_size)

    def mean_step_s(self, after: int) -> float:
        """The budget's price of each step after ``after``: their mean over the resizing schedule."""
        return mean_step_s(self.timing, self.start_size, self.image_size, after=after / self.total_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Plan:
        """A plan read back from a checkpoint; older plans have no ``freeze_groups`` (they trained every layer).

        Raises:
            ImagerecError: not a plan (``where`` names the file).
        """
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{"freeze_groups": 0, **{k: v for k, v in data.items() if k in known}})  # and start_size = image_size
        except (TypeError, AttributeError) as e:
            raise ImagerecError(f"{where}: broken metadata: no usable training plan ({e}); start a new run with --out") from None


def make_plan(cfg: TrainConfig, model: nn.Module, pretrained: bool, train_images: int, val_images: int, image_size: int,
              world: World, budget: Budget | None, sample_batch, probed: bool = False) -> Plan:
    """The plan of a new run: from the epochs asked for, or from what fits the time budget.

    Args:
        train_images, val_images: images in the splits (all processes).
        sample_batch: a function returning one training batch, to time steps on.
        probed: the head was fitted by the probe (stage 0): no head-only stage.
    """
    freeze = cfg.freeze_groups if pretrained else 0  # frozen random weights would never learn
    steps_per_epoch = (train_images // world.size) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ImagerecError(
            f"batch_size={cfg.batch_size} x {world.size} process(es) is more than the {train_images} training images; lower --batch-size"
        )
    head_steps = round(cfg.head_epochs * steps_per_epoch) if pretrained and not probed else 0
    frozen_norm = cfg.norm_stats == "frozen" or (cfg.norm_stats == "auto" and probed)
    lr_scale = cfg.probe_lr_scale if probed else 1.0
    start_size = max(8, 8 * round(image_size * cfg.resize_from / 8))
    timing = {}
    bf16 = cfg.precision == "bf16"
    if cfg.precision == "auto" or budget is not None:
        batch = sample_batch()
        timing["fp32_step_s"] = _time_steps(model, batch, cfg, freeze, head=False, bf16=False)
        if cfg.precision == "auto" and _bf16_possible(world.device):
            timing["bf16_step_s"] = _time_steps(model, batch, cfg, freeze, head=False, bf16=True)
            bf16 = timing["bf16_step_s"] < 0.9 * timing["fp32_step_s"]
    if budget is None:
        full_steps = max(1, round(cfg.epochs * steps_per_epoch))
    else:
        timing["full_step_s"] = timing["bf16_step_s" if bf16 else "fp32_step_s"]
        if start_size != image_size:
            timing["start_step_s"] = _time_steps(model, batch, cfg, freeze, head=False, bf16=bf16, size=start_size)
        timing["step_s"] = mean_step_s(timing, start_size, image_size)
        timing["head_step_s"] = _time_steps(model, batch, cfg, freeze, head=True, bf16=bf16) if head_steps else 0.0
        timing["eval_image_s"] = _time_eval(model, batch, cfg, bf16)
        head_steps, full_steps = budget.fit(timing, steps_per_epoch, head_steps, val_images, probed)
    replan_at = _first_fit(head_steps, full_steps) if budget is not None else None
    return Plan(steps_per_epoch, head_steps, head_steps + full_steps, freeze, bf16, image_size, world.size, timing, replan_at, start_size, frozen_norm, lr_scale)


def _first_fit(head_steps: int, full_steps: int) -> int | None:
    """The step of the first re-plan: ``REPLAN_AFTER`` steps into stage 2, or, for a run too
    short for that, a quarter of the way through stage 2 (None: fewer than 4 steps there)."""
    if full_steps >= 2 * REPLAN_AFTER:
        return head_steps + REPLAN_AFTER
    quarter = round(REPLAN_SHARES[0] * full_steps)
    return head_steps + quarter if quarter >= 4 else None


def resize_schedule(progress: float, start: int, end: int) -> int:
    """The input size at ``progress`` (0 to 1) through stage 2: ``start`` until ``RESIZE_RAMP[0]``,
    then linearly (in steps of 8 px) to ``end`` at ``RESIZE_RAMP[1]``, ``end`` after."""
    low, high = RESIZE_RAMP
    share = min(1.0, max(0.0, (progress - low) / (high - low)))
    return end if start == end else 8 * round((start + (end - start) * share) / 8)


def step_s_at(timing: dict, size: int, start: int, end: int) -> float:
    """Seconds of a stage-2 step at ``size``: interpolated, in pixels, between the timed steps at
    the start and the full size (a step's cost grows with the pixels of its feature maps)."""
    if start == end or "start_step_s" not in timing:
        return timing["full_step_s"]
    share = (size * size - start * start) / (end * end - start * start)
    return timing["start_step_s"] + share * (timing["full_step_s"] - timing["start_step_s"])


def mean_step_s(timing: dict, start: int, end: int, after: float = 0.0) -> float:
    """The mean seconds of a stage-2 step over the resizing schedule, from ``after`` (a share of
    the run) to its end: the budget's price of a step."""
    grid = after + (1 - after) * (np.arange(1000) + 0.5) / 1000
    return float(np.mean([step_s_at(timing, resize_schedule(p, start, end), start, end) for p in grid]))


class Budget:
    """A run's time budget: the most steps whose measured cost fits what is left of it.

    The cost of n steps counts the steps, a validation pass per epoch, the checkpoints written
    and ``final_images`` images predicted after training (the search for the input size to
    predict at, a test split the caller evaluates next; counted at the training size, so larger
    inputs count more); 5% of the budget and 5 s are kept as a margin.
    """

    def __init__(self, cfg: TrainConfig, world: World, started: float, final_images: float = 0.0):
        self.cfg, self.world, self.started, self.final_images = cfg, world, started, final_images

    def left(self) -> float:
        """Seconds left to plan with."""
        return self.cfg.time_budget * 60 * 0.95 - (time.perf_counter() - self.started) - 5.0

    def fit(self, timing: dict, steps_per_epoch: int, head_steps: int, val_images: int, probed: bool = False) -> tuple[int, int]:
        """(head steps, stage-2 steps) that fit; the head stage is dropped when there is no time
        for it. After the probe (stage 0) a budget too short for one step gives no step: the probe
        is the model.

        Raises:
            ImagerecError: not even one step fits, and there is no probe to fall back on.
        """
        budget, val_cost, every = self.left(), self._val_cost(timing, val_images), self.cfg.save_every

        def cost(steps: int) -> float:
            total = head_steps + steps
            epochs = math.ceil(total / steps_per_epoch)
            saves = epochs * 2 + (total // every if every else 0)
            after = self._predict_cost(timing, self.final_images)
            return head_steps * timing["head_step_s"] + steps * timing["step_s"] + epochs * val_cost + after + saves * SAVE_S

        if cost(1) > budget and head_steps:
            head_steps = 0  # no time for a separate head stage
        if cost(1) > budget and probed:
            return 0, 0
        if cost(1) > budget:
            raise ImagerecError(
                f"--time-budget {self.cfg.time_budget} min is too short: one step takes {timing['step_s']:.2f} s and one "
                f"validation pass {val_cost:.0f} s after {time.perf_counter() - self.started:.0f} s of setup; raise the budget"
            )
        return head_steps, _most_steps_within(budget, cost)

    def refit(self, plan: Plan, step: int, pace: float, val_images: int) -> int:
        """The total steps that fit what is left after ``step`` steps, at ``pace``: the measured
        time of a step over the time it was priced at. A machine slower than timed predicts slower
        too, so the validation passes and the images predicted after training are priced at that
        pace as well (never below their timed cost: running out of time is worse than a few steps
        fewer)."""
        budget, every, spe = self.left(), self.cfg.save_every, plan.steps_per_epoch
        step_s, slower = pace * plan.mean_step_s(after=step), max(1.0, pace)
        val_cost, after = slower * self._val_cost(plan.timing, val_images), slower * self._predict_cost(plan.timing, self.final_images)

        def cost(more: int) -> float:
            epochs = math.ceil((step + more) / spe) - step // spe
            saves = epochs * 2 + ((step + more) // every - step // every if every else 0)
            return more * step_s + epochs * val_cost + after + saves * SAVE_S

        return step + _most_steps_within(budget, cost)

    def _val_cost(self, timing: dict, val_images: int) -> float:
        return self._predict_cost(timing, val_images / self.world.size)

    def _predict_cost(self, timing: dict, images: float) -> float:
        return images * timing["eval_image_s"] * 1.2


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


def _bf16_possible(device: torch.device) -> bool:
    """Whether ``precision="auto"`` times bf16 at all: on a GPU that supports it. Not on a CPU:
    training there measured slower in bf16 (docs/BENCHMARKS.md), and a choice made by timing would
    make the same CPU run's numbers depend on how busy the machine was (``--precision bf16``
    still forces it)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _time_steps(model, batch, cfg, freeze: int, head: bool, bf16: bool, size: int | None = None, reps: int = 5) -> float:
    """Seconds per training step (at ``size``, default the batch's), measured on a copy of the
    model (the real one is untouched): the median of ``reps`` steps, so that one step slowed by
    another process does not count."""
    clone = copy.deepcopy(model)
    stage = Stage(1 if head else 2, clone, cfg, World(0, 1, next(model.parameters()).device), 1, freeze)
    criterion = nn.CrossEntropyLoss()
    stage.step(batch, criterion, bf16, size)  # warm-up: allocations, kernel selection
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        stage.step(batch, criterion, bf16, size)
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
