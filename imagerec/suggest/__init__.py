"""Learning from the person: suggested labels for every image, and which images to label next.

::

    import imagerec
    from imagerec.suggest import suggest, select_next

    emb = imagerec.embed("photos/", "efficientnet_lite0")
    s = suggest(emb, labels)            # labels: a class name or None per image
    s.frame                             # path, label, suggested, confidence, disagrees
    s = s.update({17: "cat"})           # one more decision: the graph is reused, back in well under a second
    select_next(s.features, s.labels, budget=20, proba=s.proba)   # "label these next"

The suggestions average a linear probe and label propagation over the kNN graph of the
features (:class:`Suggester`); labelled images are judged out of fold, so ``disagrees`` flags a
label that the other labels contradict. :func:`train_semi_supervised` trains on the labelled
images and the unlabelled ones whose suggestion is surest (``imagerec train DATA --unlabeled MORE``).
"""

from ._collection import label_collection
from ._model import METHODS, MIN_CALIBRATION_LABELS, Suggester
from ._select import select_next
from ._semi import PSEUDO_SHARE, train_semi_supervised
from ._suggest import PCA_DIM, Suggestions, suggest

__all__ = [
    "METHODS", "MIN_CALIBRATION_LABELS", "PCA_DIM", "PSEUDO_SHARE", "Suggester", "Suggestions", "label_collection", "select_next",
    "suggest", "train_semi_supervised",
]  # fmt: skip
