"""Backbone layer: the registry of named models, their model cards and the recommender."""

from . import _efficientnet_lite, _small  # noqa: F401 - importing registers the backbones
from ._recommend import Recommendation, recommend_backbone
from ._registry import (
    ModelCard,
    create_backbone,
    early_parameters,
    list_backbones,
    model_card,
    model_cards,
    register_backbone,
)

__all__ = [
    "ModelCard",
    "Recommendation",
    "create_backbone",
    "early_parameters",
    "list_backbones",
    "model_card",
    "model_cards",
    "recommend_backbone",
    "register_backbone",
]
