"""Training configuration: defaults in one dataclass, a file may override them, flags override the file."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..data.transforms import AUGMENTS
from ..errors import ImagerecError

RECIPES = ("transfer", "seed")


def _field(default, help: str):
    """A configuration field whose help text the command line shows."""
    return field(default=default, metadata={"help": help})


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
NORM_STATS = ("auto", "adapt", "frozen")


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of ``imagerec train``, with its default.

    The default is the transfer-learning recipe: stage 1 trains the new head on the frozen
    backbone (batch norm in eval mode), stage 2 fine-tunes the backbone too, at a lower learning
    rate, except its first ``freeze_groups`` layer groups (the stem and the earliest stages, whose
    batch norm still adapts: the backward pass skips them); linear warm-up then one-cycle
    (cosine) decay; SGD with Nesterov momentum; label smoothing; no weight decay on norm and bias
    parameters.

    ``recipe="seed"`` replaces all of that with the origin document's recipe, exactly:
    ``seed_cnn``, ToTensor + Normalize(0.5), SGD lr 0.001 momentum 0.9, batch 4, 2 epochs,
    no augmentation, no validation split, running loss printed every 2,000 mini-batches.
    """

    recipe: str = _field("transfer", "transfer (two-stage fine-tuning) or seed (the origin document's recipe, exactly)")
    backbone: str = _field("efficientnet_lite0", "registry name (see 'imagerec models')")
    pretrained: bool = _field(True, "start from ImageNet weights where the backbone has them")
    image_size: int | None = _field(None, "px; None: 96 for small (<= 64 px) images, else the backbone's")
    epochs: float = _field(3.0, 'stage 2 epochs (whole passes over the training split)')
    time_budget: float | None = _field(None, 'minutes for the whole run; the schedule is planned to fit')
    probe: bool = _field(
        True, "stage 0 (LP-FT): fit the new head to convergence on the frozen features (a linear probe) before fine-tuning; pretrained backbones, training splits up to 5,000 images (larger ones: the head stage)"
    )
    norm_stats: str = _field(
        "auto", "stage 2 batch-norm statistics: adapt (train mode), frozen (the pretrained ones), or auto (frozen after the probe, else adapt)"
    )
    head_epochs: float = _field(0.2, 'stage 1: epochs training only the new head (0 = skip; skipped after the probe)')
    batch_size: int = _field(64, 'images per optimizer step (per process under torchrun)')
    lr: float = _field(0.08, 'peak learning rate of the head in stage 2, for lr_batch images per step')
    lr_batch: int = _field(64, 'lr and head_lr are for this many images per step; scaled linearly for other batch sizes')
    backbone_lr_scale: float = _field(0.5, 'backbone peak lr = lr * this (stage 2)')
    freeze_groups: int = _field(
        4, "stage 2: keep the first N layer groups of a pretrained backbone (stem, then stages) frozen; backward skips them, their batch norm still adapts (0: tune all)"
    )
    head_lr: float = _field(0.02, 'stage 1 learning rate (head only)')
    probe_lr_scale: float = _field(
        0.1, "after the probe, stage 2's learning rates (head and backbone) are these x this: the fitted head needs small steps (at 1, one step undid the probe)"
    )
    optimizer: str = _field("sgd", "sgd or adamw")
    momentum: float = _field(0.9, "SGD momentum")
    nesterov: bool = _field(True, "Nesterov momentum (SGD)")
    weight_decay: float = _field(5e-5, 'not applied to norm and bias parameters')
    label_smoothing: float = _field(0.1, "share of the target spread over all classes")
    warmup: float = _field(0.1, 'share of stage-2 steps with a linear warm-up')
    schedule: str = _field("onecycle", 'onecycle: warm-up then cosine to 0; cosine: no warm-up; constant')
    resize_from: float = _field(
        1.0, "progressive resizing: stage 2 trains at this share of the input size for its first 70% of steps, then grows to the full size by 85% (FFCV's schedule); 1: off; e.g. 0.67: 64 then 96 px"
    )
    ema: float = _field(
        0.0, "decay per step of a moving average of the weights, validated and saved as best (timm ModelEmaV3, with warm-up; 0: off; e.g. 0.999)"
    )
    augment: str = _field("default", 'none | default (scale, crop, rotation, flip) | strong (+TrivialAugment, erasing)')
    val_fraction: float = _field(0.1, 'share of the training split held out for validation')
    patience: int | None = _field(None, 'stop after this many epochs without a better val accuracy')
    save_every: int = _field(500, 'also save last.safetensors every N steps (0: at epoch ends only)')
    log_every: int = _field(0, 'print the running loss every N steps (0: progress bar only)')
    tta: bool = _field(True, 'evaluate with the horizontal flip averaged in')
    calibrate: bool = _field(True, 'fit a temperature on the validation split: honest probabilities (no split: T=1)')
    test_size: bool = _field(
        True, "after training, choose the input size for prediction (1, 7/6 or 4/3 x the training size) on the validation split (FixRes)"
    )
    precision: str = _field("auto", 'auto (bf16 autocast on a GPU where it measures faster; fp32 on a CPU), bf16 or fp32')
    seed: int = _field(0, "seed of the split, the order, the augmentation and the head's initialisation")
    device: str = _field("auto", "cpu, cuda, cuda:N or auto")
    workers: int | None = _field(None, 'decoding processes for large images (default: CPUs)')
    max_pixels: int | None = _field(None, "skip images with more pixels (decompression-bomb guard)")
    allow_outside: bool = _field(False, "read manifest rows that point outside the manifest's folder")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ImagerecError` naming the first value that breaks its rule."""
        for f in fields(self):  # inf and nan pass ``> 0`` checks or break them with a traceback later
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ImagerecError(f"{f.name}={value} must be a finite number; see 'imagerec train --help' for the defaults")
        rules = [
            (self.recipe in RECIPES, f"recipe={self.recipe!r} must be one of {RECIPES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"schedule={self.schedule!r} must be one of {SCHEDULES}"),
            (self.precision in PRECISIONS, f"precision={self.precision!r} must be one of {PRECISIONS}"),
            (self.norm_stats in NORM_STATS, f"norm_stats={self.norm_stats!r} must be one of {NORM_STATS}"),
            (self.augment in AUGMENTS, f"augment={self.augment!r} must be one of {AUGMENTS}"),
            (self.epochs > 0, f"epochs={self.epochs} must be > 0"),
            (self.freeze_groups >= 0, f"freeze_groups={self.freeze_groups} must be >= 0 (0: fine-tune every layer)"),
            (self.head_epochs >= 0, f"head_epochs={self.head_epochs} must be >= 0"),
            (self.time_budget is None or self.time_budget > 0, f"time_budget={self.time_budget} must be > 0 minutes"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.lr_batch >= 1, f"lr_batch={self.lr_batch} must be >= 1"),
            (self.lr > 0 and self.head_lr > 0, f"lr={self.lr}, head_lr={self.head_lr} must be > 0"),
            (0 <= self.backbone_lr_scale <= 10, f"backbone_lr_scale={self.backbone_lr_scale} must be in [0, 10]"),
            (0 < self.probe_lr_scale <= 10, f"probe_lr_scale={self.probe_lr_scale} must be in (0, 10]"),
            (0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)"),
            (0 <= self.warmup < 1, f"warmup={self.warmup} must be in [0, 1)"),
            (0.25 <= self.resize_from <= 1, f"resize_from={self.resize_from} must be in [0.25, 1] (1: off; e.g. 0.67 starts 96 px training at 64 px)"),
            (0 <= self.ema < 1, f"ema={self.ema} must be in [0, 1): the decay per step, e.g. 0.999 (0: off)"),
            (0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)"),
            (self.patience is None or self.patience >= 1, f"patience={self.patience} must be >= 1"),
            (self.save_every >= 0 and self.log_every >= 0, "save_every and log_every must be >= 0"),
            (self.max_pixels is None or self.max_pixels >= 1, f"max_pixels={self.max_pixels} must be >= 1"),
            (self.workers is None or self.workers >= 0, f"workers={self.workers} must be >= 0 (0: decode in the main process)"),
        ]
        for ok, message in rules:
            if not ok:
                raise ImagerecError(f"{message}; see 'imagerec train --help' for the defaults")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self) -> TrainConfig:
        """The configuration actually run: ``recipe="seed"`` pins the origin document's
        hyperparameters; operational settings (device, seed, save_every, log_every...) stay."""
        if self.recipe != "seed":
            return self
        return replace(
            self,
            backbone="seed_cnn",
            pretrained=False,
            image_size=32,
            epochs=2.0,
            probe=False,
            head_epochs=0.0,
            freeze_groups=0,
            batch_size=4,
            lr=0.001,
            lr_batch=4,
            backbone_lr_scale=1.0,
            optimizer="sgd",
            momentum=0.9,
            nesterov=False,
            weight_decay=0.0,
            label_smoothing=0.0,
            warmup=0.0,
            schedule="constant",
            augment="none",
            val_fraction=0.0,
            log_every=self.log_every or 2000,
            tta=False,
            precision="fp32",
        )


def load_config(path: str | os.PathLike | None, **overrides) -> TrainConfig:
    """Defaults, then the file (TOML or JSON), then ``overrides`` whose value is not None.

    Raises:
        ImagerecError: unreadable file, unknown key, or a value that breaks its rule.
    """
    values: dict = {}
    if path is not None:
        values = _read_config_file(Path(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ImagerecError(f"unknown configuration key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ImagerecError(f"bad configuration value: {e}") from None


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ImagerecError(f"{path}: no such configuration file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
        else:
            data = tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ImagerecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from None
    if not isinstance(data, dict):
        raise ImagerecError(f"{path}: a configuration file holds key = value pairs")
    return data
