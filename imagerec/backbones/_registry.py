"""The backbone registry: backbone names are the API.

Each backbone is a small builder function under ``@register_backbone``. Every model the
registry returns keeps one contract (timm's), on which embedding, training, compression and
export depend, whatever the architecture:

* ``forward_features(x)``: image batch (N, 3, H, W) -> feature map;
* ``forward_head(features, pre_logits=False)``: feature map -> logits (N, num_classes), or the
  pooled embedding (N, num_features) with ``pre_logits=True``;
* ``reset_classifier(num_classes)``: a new, randomly initialised head (0: none);
* ``get_classifier()``: the head module (trained alone in the first stage of transfer learning);
* attributes ``num_features``, ``num_classes``, ``preprocessing`` (a
  :class:`~imagerec.data.Preprocessing`) and ``backbone_name``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import ImagerecError


@dataclass(frozen=True)
class _Entry:
    builder: Callable[[bool], nn.Module]
    preprocessing: Preprocessing
    description: str
    num_classes: int
    imagenet_top1: float | None
    weights: str | None


@dataclass(frozen=True)
class ModelCard:
    """What a user needs to choose a backbone.

    Attributes:
        name: registry name.
        description: one line: architecture and where its weights come from.
        params: parameters of the backbone with its default head.
        macs: multiply-accumulates for one image at the default input size.
        num_features: length of the embedding (``forward_head(pre_logits=True)``).
        imagenet_top1: ImageNet top-1 accuracy (%) of the pretrained weights, where known.
        weights: where the pretrained weights come from, or None (random initialisation).
        preprocessing: the default input size, mean, std and interpolation.
    """

    name: str
    description: str
    params: int
    macs: int
    num_features: int
    imagenet_top1: float | None
    weights: str | None
    preprocessing: Preprocessing


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str,
    *,
    preprocessing: Preprocessing,
    description: str,
    num_classes: int,
    imagenet_top1: float | None = None,
    weights: str | None = None,
) -> Callable:
    """Register ``builder(pretrained: bool) -> nn.Module`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorate(builder: Callable[[bool], nn.Module]) -> Callable[[bool], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered; pick another name")
        _REGISTRY[name] = _Entry(builder, preprocessing, description, num_classes, imagenet_top1, weights)
        return builder

    return decorate


def list_backbones(pretrained: bool = False) -> list[str]:
    """Registered backbone names, sorted; only those with pretrained weights if ``pretrained``."""
    return sorted(n for n, e in _REGISTRY.items() if e.weights or not pretrained)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ImagerecError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")
    return _REGISTRY[name]


def create_backbone(name: str, num_classes: int | None = None, pretrained: bool | None = None) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: a name from :func:`list_backbones`.
        num_classes: size of a new classification head; None keeps the default head (ImageNet's
            1,000 classes for pretrained backbones), 0 removes it (features only).
        pretrained: True to require pretrained weights, False for random initialisation, None to
            use weights when the backbone has them.

    Returns:
        An ``nn.Module`` in eval mode that keeps the model contract (see the module docstring).

    Raises:
        ImagerecError: unknown name, negative ``num_classes``, or ``pretrained=True`` for a
            backbone without weights.
    """
    entry = _entry(name)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise ImagerecError(f"num_classes={num_classes!r} must be a whole number >= 0 (0: no head)")
    if pretrained and not entry.weights:
        raise ImagerecError(
            f"backbone {name!r} has no pretrained weights; use pretrained=False or one of: "
            f"{', '.join(list_backbones(pretrained=True))}"
        )
    use_weights = bool(entry.weights) if pretrained is None else pretrained
    model = entry.builder(use_weights)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    model.preprocessing = entry.preprocessing
    model.backbone_name = name
    return model.eval()


def early_parameters(model: nn.Module, groups: int) -> list[nn.Parameter]:
    """The parameters of the first ``groups`` layer groups of ``model``, from the input side.

    The groups are timm's coarse ``group_matcher`` ones: the stem, then each stage of blocks. A
    model without a group matcher (``seed_cnn``) has none; the classifier never counts.
    """
    if groups <= 0 or not hasattr(model, "group_matcher"):
        return []
    from timm.models import group_parameters  # noqa: PLC0415 - only the timm backbones need it

    by_group = group_parameters(model, model.group_matcher(coarse=True))
    names = {name for gid in sorted(by_group)[:groups] for name in by_group[gid]}
    head = {id(p) for p in model.get_classifier().parameters()}
    return [p for name, p in model.named_parameters() if name in names and id(p) not in head]


@functools.lru_cache(maxsize=None)
def model_card(name: str) -> ModelCard:
    """The :class:`ModelCard` of a backbone; size and cost are measured on the model itself."""
    entry = _entry(name)
    model = entry.builder(False).eval()
    size = entry.preprocessing.input_size
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return ModelCard(
        name=name,
        description=entry.description,
        params=sum(p.numel() for p in model.parameters()),
        macs=counter.get_total_flops() // 2,
        num_features=model.num_features,
        imagenet_top1=entry.imagenet_top1,
        weights=entry.weights,
        preprocessing=entry.preprocessing,
    )


def model_cards() -> list[ModelCard]:
    """The cards of all registered backbones, sorted by name."""
    return [model_card(name) for name in list_backbones()]
