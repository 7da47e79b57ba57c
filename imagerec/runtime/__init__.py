"""Run exported imagerec classifiers with ONNX Runtime, numpy and Pillow: no PyTorch needed.

>>> import imagerec.runtime as rt
>>> model = rt.load("runs/photos/model.onnx")     # written by `imagerec export runs/photos`
>>> model.predict(["a.jpg", "b.png"])              # class names (None for unreadable files)
>>> model.predict_proba("photos/", tta=True)       # float32 (N, C)

The ONNX file carries the class names and preprocessing (see ``imagerec._metadata``), and
:func:`preprocess` reproduces ``imagerec.data.transforms.eval_transform`` in numpy (to about
1e-5), so the probabilities are those of :class:`imagerec.Classifier` on the same images.
Nothing here imports torch, torchvision or timm.
"""

from __future__ import annotations

from ._model import OnnxClassifier, load
from ._preprocess import Preprocessing, preprocess

__all__ = ["OnnxClassifier", "Preprocessing", "load", "preprocess"]
