"""The metadata an exported imagerec model carries: torch-free, shared by export and runtime.

An ONNX file written by ``imagerec export`` (or ``imagerec compress``) stores these string keys
in its ``metadata_props``, so a device without PyTorch knows the class names and how to prepare
images: the preprocessing travels with the weights.
"""

from __future__ import annotations

import json

ONNX_FORMAT = "imagerec.onnx/1"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
KEY_FORMAT = "imagerec.format"  # ONNX_FORMAT
KEY_CLASSES = "imagerec.classes"  # JSON list of class names, in logit order
KEY_PREPROCESSING = "imagerec.preprocessing"  # JSON: input_size, mean, std, interpolation, crop_pct...
KEY_BACKBONE = "imagerec.backbone"  # registry name of the backbone
KEY_VERSION = "imagerec.version"  # imagerec version that wrote the file
KEY_COMPRESSION = "imagerec.compression"  # JSON: how the model was compressed ({} when it was not)
KEY_TEMPERATURE = "imagerec.temperature"  # JSON number T: probabilities are softmax(logits / T); absent: 1


def check_temperature(value, where: str) -> float:
    """``value`` as a temperature: a finite number > 0 (not a bool).

    Raises:
        ValueError: anything else, the message naming ``where``, the value and the rule.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    if not ok:
        raise ValueError(f"{where}: temperature {value!r} must be a finite number > 0")
    return float(value)


def onnx_metadata(
    backbone: str, classes: list[str], preprocessing: dict, compression: dict | None = None, temperature: float = 1.0
) -> dict[str, str]:
    """The ``metadata_props`` of an exported classifier (all values are strings).

    Args:
        temperature: the calibration temperature fitted after training (1: none).
    """
    from ._version import __version__  # noqa: PLC0415

    pp = dict(preprocessing)
    return {
        KEY_FORMAT: ONNX_FORMAT,
        KEY_CLASSES: json.dumps(list(classes)),
        KEY_PREPROCESSING: json.dumps(pp),
        KEY_BACKBONE: backbone,
        KEY_VERSION: __version__,
        KEY_COMPRESSION: json.dumps(compression or {}),
        KEY_TEMPERATURE: json.dumps(float(temperature)),
        # plain copies for tools that do not parse JSON
        "classes": ",".join(classes),
        "mean": ",".join(str(v) for v in pp["mean"]),
        "std": ",".join(str(v) for v in pp["std"]),
        "input_size": str(pp["input_size"]),
    }
