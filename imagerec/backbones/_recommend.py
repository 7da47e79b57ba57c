"""Answer the origin document's question "how do I choose a pretrained model?" by a written rule.

The rule (also in docs/MODELS.md), from data set size, task complexity and compute:

1. Images per class ``k = images / classes`` sets the strategy. Below 100 per class there are
   too few images to move millions of weights without over-fitting: keep the backbone frozen
   and fit a linear head on its embeddings (``linear-probe``). From 100 per class, fine-tune the
   whole network with the two-stage transfer recipe (``fine-tune``). A GPU and at least 50,000
   small images (at most 64 px a side) are the one case where training ``cifar_resnet18`` from
   scratch competes (``from-scratch``).
2. Compute sets the size. On a CPU, EfficientNet-Lite0 (the cheapest ImageNet backbone, 0.4 G
   multiply-adds at 224 px); Lite1 when the task is complex (more than 100 classes) and there
   are at least 20,000 images to learn it from. On a GPU, Lite2 (best ImageNet accuracy).
3. Small images (at most 64 px) are upsampled: to 96 px on a CPU (measured on CIFAR-10: a
   training step at 96 px costs half of one at 128 px, so a time budget buys twice the
   epochs), to the backbone's default size on a GPU. Larger images use the default size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ImagerecError
from ._registry import _entry

DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Recommendation:
    """A backbone, how to train it and at which input size, with the reasons."""

    backbone: str
    strategy: str
    image_size: int
    reasons: list[str] = field(default_factory=list)


def recommend_backbone(
    num_images: int, *, num_classes: int = 10, device: str = "cpu", image_side: int | None = None
) -> Recommendation:
    """Recommend a backbone, a strategy and an input size (see the module docstring's rule).

    Args:
        num_images: labelled training images.
        num_classes: classes to tell apart (the task's complexity).
        device: ``"cpu"`` or ``"gpu"``.
        image_side: the longer side of the images in pixels, if known.

    Raises:
        ImagerecError: a count below its minimum or an unknown device.
    """
    if num_images < 1:
        raise ImagerecError(f"--images {num_images}: must be at least 1 labelled image")
    if num_classes < 2:
        raise ImagerecError(f"--classes {num_classes}: a classifier needs at least 2 classes")
    if device not in DEVICES:
        raise ImagerecError(f"--device {device!r}: must be one of {DEVICES}")
    if image_side is not None and image_side < 1:
        raise ImagerecError(f"--image-side {image_side}: must be a positive number of pixels")
    per_class = num_images / num_classes
    small = image_side is not None and image_side <= 64
    reasons = [f"{per_class:,.0f} images per class"]

    if device == "gpu" and small and num_images >= 50_000:
        reasons.append("a GPU and >= 50,000 small images: a CIFAR ResNet trained from scratch competes")
        return Recommendation("cifar_resnet18", "from-scratch", 32, reasons)

    if per_class < 100:
        strategy = "linear-probe"
        reasons.append("< 100 per class: freeze the pretrained backbone, fit a linear head on its embeddings")
    else:
        strategy = "fine-tune"
        reasons.append(">= 100 per class: fine-tune the whole pretrained network (two-stage transfer recipe)")

    if device == "gpu":
        backbone = "efficientnet_lite2"
        reasons.append("GPU: the most accurate ImageNet backbone, EfficientNet-Lite2")
    elif num_classes > 100 and num_images >= 20_000:
        backbone = "efficientnet_lite1"
        reasons.append("CPU, > 100 classes and >= 20,000 images: the larger EfficientNet-Lite1")
    else:
        backbone = "efficientnet_lite0"
        reasons.append("CPU: the cheapest ImageNet backbone, EfficientNet-Lite0")

    default_size = _entry(backbone).preprocessing.input_size
    if small and device == "cpu":
        size = 96
        reasons.append("small images on a CPU: upsample to 96 px, not the default size")
    else:
        size = default_size
    return Recommendation(backbone, strategy, size, reasons)
