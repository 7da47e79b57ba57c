"""SimCLR adaptation moved to the feature stage (:mod:`imagerec.features`); kept here so older
imports (``from imagerec.clustering._adapt import adapt_backbone``) still work."""

from ..features._adapt import ADAPT_METHODS, adapt_backbone, nt_xent

__all__ = ["ADAPT_METHODS", "adapt_backbone", "nt_xent"]
