"""Adapt a backbone to the user's images without labels, before clustering or auditing them.

ImageNet features describe ImageNet photos. On other images (CIFAR's 32 px thumbnails, say)
similar images are often not neighbours, and no clustering of those features can recover the
classes. :func:`adapt_backbone` fine-tunes the backbone on the images themselves with SimCLR's
contrastive objective (Chen et al., ICML 2020): two random views of each image (crop, flip,
colour jitter, grayscale) must embed closer to each other than to the other images of the batch.
No labels and no cluster assignments are used, so there is no confirmation bias to design out:
the model never trains on its own guesses. Starting from ImageNet weights, a few epochs at low
resolution are enough, which keeps it affordable on a CPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps
from torch import nn
from tqdm.auto import tqdm

from .._decode import load_rgb
from .._engine import Loop, Progress, StepOutput, WarmupCosine
from .._optim import decay_groups
from ..checkpoint import feature_model
from ..data import BatchAugment, ImageSource, decode_small_images
from ..errors import ImagerecError
from ..inference import resolve_device

ADAPT_METHODS = ("simclr",)


class _Projector(nn.Module):
    """SimCLR's projection head: the loss acts on its output, the clusters use the features before."""

    def __init__(self, in_features: int, hidden: int = 512, out_features: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for projections ``z`` (2B, D): rows i and i + B are views of one image."""
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an image is not its own positive
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def adapt_backbone(
    source: ImageSource,
    backbone: str | nn.Module = "efficientnet_lite0",
    *,
    method: str = "simclr",
    epochs: float = 8.0,
    image_size: int = 64,
    batch_size: int = 128,
    lr: float = 0.05,
    temperature: float = 0.2,
    weight_decay: float = 1e-5,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune ``backbone`` on ``source``'s images with a contrastive objective (no labels).

    Args:
        source: the images to adapt to (their labels, if any, are ignored).
        backbone: registry name (its ImageNet weights are the start) or a model that keeps the
            model contract (``forward_features``/``forward_head``, ``num_features``).
        method: ``"simclr"``.
        epochs: passes over the images (fractions allowed).
        image_size: side of the views in pixels; the returned model's input size.
        batch_size: images per step (each gives two views).
        lr: peak SGD learning rate per 256 images, with 5% warm-up then cosine decay.
        temperature: of the contrastive softmax.
        weight_decay: on weights, not on norms and biases.
        crop_scale: range of a view's share of the image area.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: seeds the order, the views and the head.
        progress: show a progress bar with the loss.

    Returns:
        The adapted backbone, in eval mode, with no classifier (``num_classes=0``) and
        ``preprocessing`` at ``image_size`` with no centre crop.

    Raises:
        ImagerecError: an unknown method, a bad value, or fewer than two readable images.
    """
    if method not in ADAPT_METHODS:
        raise ImagerecError(f"adapt method {method!r} is not one of {ADAPT_METHODS}")
    for name, value in (("epochs", epochs), ("lr", lr), ("temperature", temperature)):
        if not value > 0:
            raise ImagerecError(f"{name}={value} must be > 0")
    if batch_size < 2:
        raise ImagerecError(f"batch_size={batch_size} must be at least 2: the other images of a batch are the negatives")
    torch_device = resolve_device(device)
    model = feature_model(backbone)
    if model.num_classes != 0:
        model.reset_classifier(0)
    pp = model.preprocessing.resolve(image_size, crop_pct=1.0)
    pixels = _pixels(source, image_size, progress)
    if len(pixels) < 2:
        raise ImagerecError(f"{source.root}: {len(pixels)} readable image(s); adapting needs at least 2")
    batch_size = min(batch_size, len(pixels))

    # 1. the model, its projection head, the views and the optimiser
    torch.manual_seed(seed)
    projector = _Projector(model.num_features)
    model.train().to(torch_device, memory_format=torch.channels_last)
    projector.train().to(torch_device)
    augment = BatchAugment(pp, "contrastive", scale=crop_scale, degrees=0.0)
    params = [p for m in (model, projector) for p in m.parameters()]
    peak = lr * batch_size / 256
    optimizer = torch.optim.SGD(decay_groups(params, weight_decay, peak), lr=peak, momentum=0.9, nesterov=True)
    steps_per_epoch = len(pixels) // batch_size
    total = max(1, round(epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)

    # 2. the loop: two views of each image, pulled together, pushed from the rest of the batch
    def batches(epoch: int, first: int):
        order = torch.randperm(len(pixels), generator=generator)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            yield torch.from_numpy(pixels[order[start : start + batch_size].numpy()]).permute(0, 3, 1, 2)

    def step(images: torch.Tensor) -> StepOutput:
        views = torch.cat([augment(images, generator), augment(images, generator)])
        views = views.to(torch_device, memory_format=torch.channels_last)
        z = projector(model.forward_head(model.forward_features(views), pre_logits=True))
        loss = nt_xent(z, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return StepOutput(len(images), float(loss.detach()) * len(images))

    started = time.perf_counter()
    callbacks = [WarmupCosine(optimizer, warmup=0.05), Progress(f"adapt ({method})", progress)]
    Loop(step, batches, total=total, steps_per_epoch=steps_per_epoch, callbacks=callbacks).run()
    model.adapt_info = {"method": method, "steps": total, "seconds": round(time.perf_counter() - started, 1)}
    model.preprocessing = pp
    return model.eval().cpu().to(memory_format=torch.contiguous_format)


def _pixels(source: ImageSource, image_size: int, progress: bool) -> np.ndarray:
    """uint8 array (N, H, W, 3) of the readable images: small ones as they are, others fitted to
    a square of twice ``image_size`` (views are crops of it, so little detail is lost)."""
    small = decode_small_images(source, progress=progress) if source.pixels is None else source
    if small is not None and small.pixels is not None:
        return np.asarray(small.pixels)
    side = 2 * image_size
    arrays = []
    for path in tqdm(source.paths, desc="load images", unit="img", disable=not progress):
        try:
            image = load_rgb(path, source.max_pixels)  # the same decompression-bomb limit as embedding
        except Exception:  # noqa: BLE001 - an unreadable image is left out, as embedding does
            continue
        arrays.append(np.asarray(ImageOps.fit(image, (side, side))))
    return np.stack(arrays) if arrays else np.zeros((0, side, side, 3), np.uint8)
