"""Backbones trained from scratch on small images: the origin document's CNN and a CIFAR ResNet."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import Preprocessing
from ._registry import register_backbone

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class SeedCNN(nn.Module):
    """The origin document's CNN: two 5x5 convolutions with max pooling, then three fully
    connected layers (400 -> 120 -> 84 -> classes), for 32x32 inputs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.num_features = 84
        self.num_classes = num_classes
        self.fc3 = nn.Linear(84, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) -> (N, 16, 5, 5)."""
        x = self.pool(F.relu(self.conv1(x)))
        return self.pool(F.relu(self.conv2(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, 16, 5, 5) -> logits (N, num_classes), or the 84-d embedding with ``pre_logits``."""
        x = torch.flatten(x, 1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return x if pre_logits else self.fc3(x)

    def get_classifier(self) -> nn.Module:
        return self.fc3

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc3 = nn.Linear(84, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_backbone(
    "seed_cnn",
    preprocessing=Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0, fixed_input_size=True),
    description="the origin document's small CNN (2 conv + 3 fully connected), 32x32 input",
    num_classes=10,
)
def seed_cnn(pretrained: bool) -> nn.Module:
    # Seeded from torch's initial seed, drawn on a forked generator: the same weights on every
    # call in a process (so its embeddings are deterministic), the run's seed when training has
    # called ``torch.manual_seed(seed)``, and the caller's random state left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed())
        return SeedCNN(10)


@register_backbone(
    "cifar_resnet18",
    preprocessing=Preprocessing(32, CIFAR_MEAN, CIFAR_STD, "bilinear", 1.0),
    description="ResNet-18 for 32x32 input (3x3 stem, no max pool), trained from scratch",
    num_classes=10,
)
def cifar_resnet18(pretrained: bool) -> nn.Module:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    # An ImageNet stem shrinks 32 px to 8 px before the first block; CIFAR ResNets keep 32 px.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
