"""Compression of a trained classifier: int8 quantization and structured pruning.

* :func:`quantize` turns a checkpoint (or its fp32 ONNX export) into an ONNX file that ONNX
  Runtime runs with int8 arithmetic: static QDQ quantization calibrated on a few hundred images,
  or dynamic quantization of the linear layers.
* :func:`prune` removes a share of the channels of every layer (torch-pruning, an optional
  dependency: ``pip install 'imagerec[compress]'``), fine-tunes briefly, and writes an ordinary
  imagerec checkpoint that loads, predicts, exports and quantizes like any other.

Both record what they did in the model's ``compression`` metadata.

>>> prune("runs/photos", "runs/photos/pruned.safetensors", amount=0.3, data="photos/")
>>> export_model("runs/photos/pruned.safetensors", "pruned.onnx")
>>> quantize("pruned.onnx", "pruned.int8.onnx", calib="photos/")
"""

from ._prune import prune
from ._quantize import CALIBRATION_METHODS, MODES, quantize

__all__ = ["CALIBRATION_METHODS", "MODES", "prune", "quantize"]
