"""The stages of the transfer recipe: what trains, its optimizer and schedule, and one step;
and :class:`Stages`, the loop's step function and the callback that moves from one to the next."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._engine import Callback, Loop, StepOutput, WarmupCosine
from .._optim import decay_groups
from ..backbones import early_parameters
from ..inference import autocast
from ._config import TrainConfig
from ._distributed import World


class Stage:
    """One stage of the recipe: what trains, its optimizer and its learning-rate schedule.

    Stage 1 trains the head alone: the backbone is frozen and kept in eval mode (batch-norm
    statistics stay those of the pretrained weights). Stage 2 trains everything but the first
    ``freeze`` layer groups (whose batch-norm statistics still adapt, in train mode), the
    backbone at ``lr * backbone_lr_scale`` (both times ``lr_scale``: ``probe_lr_scale`` after
    the probe); under torchrun it runs through
    DistributedDataParallel. Frozen early layers save most of the backward pass where the
    feature maps are largest: with 4 groups, steps 1.6x faster at 96 px and 2.1x at 128 px on a
    CPU (docs/BENCHMARKS.md).
    """

    def __init__(self, number: int, model: nn.Module, cfg: TrainConfig, world: World, head_steps: int, freeze: int = 0,
                 frozen_norm: bool = False, lr_scale: float = 1.0):
        self.number, self.model, self.cfg, self.world, self.frozen_norm = number, model, cfg, world, frozen_norm
        head = list(model.get_classifier().parameters())
        head_ids = {id(p) for p in head}
        scale = cfg.batch_size * world.size / cfg.lr_batch  # the linear scaling rule
        if number == 1:
            for p in model.parameters():
                p.requires_grad_(id(p) in head_ids)
            groups = [{"params": head, "weight_decay": 0.0, "peak_lr": cfg.head_lr * scale}]
            self.net = model
        else:
            frozen = {id(p) for p in early_parameters(model, freeze)}
            for p in model.parameters():
                p.requires_grad_(id(p) not in frozen)
            groups = []
            for is_head, share in ((False, cfg.backbone_lr_scale), (True, 1.0)):
                params = [p for p in model.parameters() if (id(p) in head_ids) == is_head and p.requires_grad]
                groups += decay_groups(params, cfg.weight_decay, cfg.lr * share * scale * lr_scale)
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
        # Stage 1: cosine to 0 at the end of the head steps; stage 2: the configured schedule to the run's end.
        if number == 1:
            self.schedule = WarmupCosine(self.optimizer, end=head_steps)
        else:
            warmup = cfg.warmup if cfg.schedule == "onecycle" else 0.0
            self.schedule = WarmupCosine(self.optimizer, warmup, start=head_steps, constant=cfg.schedule == "constant")

    def apply_mode(self) -> None:
        """Train mode for what trains: the head alone in stage 1 (batch norm frozen), all in stage
        2, where batch norm keeps its pretrained statistics with ``frozen_norm`` (its scale and
        shift still train)."""
        if self.number == 1:
            self.model.eval()
            self.model.get_classifier().train()
            return
        self.model.train()
        if self.frozen_norm:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def step(self, batch, criterion, bf16: bool, size: int | None = None) -> tuple[int, float, int]:
        """One optimizer step, on the batch resized to ``size`` px where that differs from its
        own (progressive resizing); returns (images, summed loss, correct predictions)."""
        device = self.world.device
        images = batch.images.to(device, non_blocking=True)
        if size is not None and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
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


class Stages(Callback):
    """The loop's step function, and the callback that runs the right stage at each step.

    Before each step: stage 1 until the plan's head steps, then stage 2 (each built when it
    begins; a resumed run's optimizer state restored into the stage it was saved in), its
    learning rate and input size for this step, and the seed of the step's dropout, drawn from
    ``(seed, epoch, step, rank)``.

    Args:
        plan: the run's :class:`~imagerec.training._plan.Plan` (head steps, frozen groups,
            precision, the input size of each step).
        skipped: gets the images each batch left out (unreadable).
        resumed: the checkpoint a resumed run continues (None for a new run).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, world: World, plan, criterion, skipped, resumed=None):
        self.model, self.cfg, self.world, self.plan = model, cfg, world, plan
        self.criterion, self.skipped, self.resumed = criterion, skipped, resumed
        self.stage: Stage | None = None
        self.size: int = plan.image_size

    def on_step_start(self, loop: Loop) -> None:
        wanted = 1 if loop.step < self.plan.head_steps else 2
        if self.stage is None or self.stage.number != wanted:
            self.stage = Stage(wanted, self.model, self.cfg, self.world, self.plan.head_steps, self.plan.freeze_groups,
                               self.plan.frozen_norm, self.plan.lr_scale)
            if self.resumed is not None and self.resumed.meta.get("stage") == wanted:
                self.stage.optimizer.load_state_dict(self.resumed.optimizer)
        self.stage.schedule.on_step_start(loop)
        self.size = self.plan.size_at(loop.step)
        torch.manual_seed(step_seed(self.cfg.seed, loop.epoch, loop.step, self.world.rank))  # dropout and the like

    def step(self, batch) -> StepOutput | None:
        self.skipped.add(batch.skipped)
        if batch.labels is None or not len(batch.labels):
            return None  # every image of this batch was unreadable: no update, the step still counts
        n, loss, correct = self.stage.step(batch, self.criterion, self.plan.bf16, self.size)
        return StepOutput(n, loss, correct)


def step_seed(*parts: int) -> int:
    """A seed drawn from integers (seed, epoch, step, rank...): the same parts, the same seed."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
