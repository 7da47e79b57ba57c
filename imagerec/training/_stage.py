"""One stage of the transfer recipe: what trains, its optimizer and schedule, and one step."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._optim import decay_groups, set_lr, warmup_cosine
from ..backbones import early_parameters
from ..inference import autocast
from ._config import TrainConfig
from ._distributed import World


class Stage:
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
