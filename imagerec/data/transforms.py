"""Preprocessing that travels with the weights, and the transforms built from it.

A backbone carries a :class:`Preprocessing` (mean, std, input size, interpolation, crop share);
checkpoints and embedding files store it, and every command builds its transforms from it, so
normalisation is never restated by hand.

Two forms of each transform exist:

* per image, on PIL images (torchvision.transforms.v2), for folders of large photos decoded in
  DataLoader workers;
* per batch, on uint8 tensors of shape (N, 3, H, W), for small images held decoded in memory:
  one call resizes and normalises a whole batch, and :class:`BatchAugment` draws a different
  crop, scale, rotation and flip for every image in one ``grid_sample``.

The evaluation transform is the same torchvision pipeline in both forms, so a batch and its
images one by one give the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from .._preprocessing import Preprocessing
from ..errors import ImagerecError

AUGMENTS = ("none", "default", "strong", "contrastive")


def _interp(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ImagerecError(f"interpolation {name!r} is not one of bicubic, bilinear, nearest") from None


def eval_transform(pp: Preprocessing, *, batched: bool = False) -> v2.Compose:
    """Resize, centre crop and normalise.

    Args:
        pp: the preprocessing (see :meth:`Preprocessing.resolve` for another size).
        batched: True for uint8 tensors of shape (N, 3, H, W); False for one PIL image.

    Returns:
        A transform giving float32 tensors of shape ([N,] 3, S, S) with S = ``pp.input_size``.
    """
    resize = math.floor(pp.input_size / pp.crop_pct)
    steps = [] if batched else [v2.ToImage()]
    steps += [
        v2.ToDtype(torch.float32, scale=True),  # resize in float: no rounding back to 8 bits
        v2.Resize(resize, interpolation=_interp(pp.interpolation), antialias=True),
        v2.CenterCrop(pp.input_size),
        v2.Normalize(pp.mean, pp.std),
    ]
    return v2.Compose(steps)


def train_transform(
    pp: Preprocessing, augment: str = "default", *, scale: tuple[float, float] = (0.5, 1.0), degrees: float = 10.0
) -> v2.Compose:
    """Per-image training augmentation for one PIL image.

    ``default`` is the origin document's: random scaling and cropping, rotation and horizontal
    flip. ``strong`` adds TrivialAugment (colour and geometry) and random erasing.
    ``contrastive`` adds SimCLR's colour jitter and random grayscale (for views of one image
    that must stay recognisably the same thing). ``none`` only resizes like :func:`eval_transform`.

    Returns:
        A transform giving a float32 tensor of shape (3, S, S).
    """
    _check_augment(augment)
    if augment == "none":
        return eval_transform(replace(pp, crop_pct=1.0))
    interp = _interp(pp.interpolation)
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(pp.input_size, scale=scale, interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(degrees, interpolation=InterpolationMode.BILINEAR),
    ]
    if augment == "strong":
        steps.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    if augment == "contrastive":
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4)], p=0.8), v2.RandomGrayscale(p=0.2)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pp.mean, pp.std)]
    if augment == "strong":
        steps.append(v2.RandomErasing(p=0.25))
    return v2.Compose(steps)


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise ImagerecError(f"augment={augment!r} is not one of {AUGMENTS}")


class BatchAugment(nn.Module):
    """Training augmentation for a whole batch of small images at once.

    Every image gets its own random crop (area share in ``scale``, aspect ratio in ``ratio``),
    rotation (up to ``degrees``) and horizontal flip, applied as one affine ``grid_sample`` that
    also resizes to the input size; ``strong`` adds a random erased square (cutout);
    ``contrastive`` adds colour jitter (brightness, contrast, saturation; 80% of images) and
    grayscale (20%), as SimCLR's views do.

    Args:
        pp: the preprocessing (input size, mean, std).
        augment: ``"default"``, ``"strong"``, ``"contrastive"`` or ``"none"`` (resize and
            normalise only).
        scale: range of the crop's share of the image area.
        ratio: range of the crop's aspect ratio (width / height).
        degrees: largest rotation either way.
    """

    def __init__(
        self, pp: Preprocessing, augment: str = "default", scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), degrees: float = 10.0
    ):
        super().__init__()
        _check_augment(augment)
        self.size, self.augment, self.degrees = pp.input_size, augment, degrees
        self.scale, self.ratio = scale, ratio
        self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``images``: uint8 tensor of shape (N, 3, H, W); returns float (N, 3, S, S)."""
        x = images.float().div_(255)
        n = x.shape[0]
        if self.augment == "none":
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            return (x - self.mean) / self.std

        def uniform(low, high):
            return torch.rand(n, generator=generator) * (high - low) + low

        area = uniform(*self.scale)
        log_ratio = uniform(math.log(self.ratio[0]), math.log(self.ratio[1]))
        width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # share of the image kept
        height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        shift_x, shift_y = uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)
        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack(
            [
                torch.stack([cos * width * flip, -sin * height, shift_x], 1),
                torch.stack([sin * width * flip, cos * height, shift_y], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.augment == "strong":
            x = _cutout(x, self.size // 4, generator)
        if self.augment == "contrastive":
            x = _colour_jitter(x, 0.4, generator)
        return (x - self.mean) / self.std


def _cutout(x: torch.Tensor, side: int, generator: torch.Generator | None) -> torch.Tensor:
    """Set a random ``side`` x ``side`` square of each image to 0.5 grey."""
    n, _, h, w = x.shape
    top = torch.randint(0, h - side + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, w - side + 1, (n, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return x.masked_fill(mask.unsqueeze(1), 0.5)


def _colour_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """SimCLR's colour distortion for images (N, 3, H, W) in [0, 1]: brightness, contrast and
    saturation factors in [1 - strength, 1 + strength] for 80% of images, then grayscale for 20%."""
    n = x.shape[0]

    def factor():
        return (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(x.dtype)

    jitter = (torch.rand(n, 1, 1, 1, generator=generator) < 0.8).to(x.dtype)
    gray_weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    y = (x * factor()).clamp(0, 1)  # brightness
    mean = (y * gray_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    y = ((y - mean) * factor() + mean).clamp(0, 1)  # contrast
    gray = (y * gray_weights).sum(1, keepdim=True)
    y = ((y - gray) * factor() + gray).clamp(0, 1)  # saturation
    x = jitter * y + (1 - jitter) * x
    to_gray = (torch.rand(n, 1, 1, 1, generator=generator) < 0.2).to(x.dtype)
    return to_gray * (x * gray_weights).sum(1, keepdim=True).expand_as(x) + (1 - to_gray) * x
