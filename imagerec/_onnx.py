"""ONNX export of a model that keeps the model contract, and ONNX Runtime sessions.

Used by ``imagerec embed`` (ONNX Runtime runs EfficientNet-Lite on a CPU faster than PyTorch
eager, with the same features to about 1e-5) and by ``imagerec export``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_path


class FeatureModel(nn.Module):
    """``model`` with its embedding as output: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int,
    *,
    metadata: dict[str, str] | None = None,
    opset: int = 17,
    output_name: str = "output",
) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis, input ``images`` (N, 3, S, S) float32.

    Args:
        model: a module in any mode; it is exported in eval mode and left in eval mode.
        path: the ``.onnx`` file (written atomically).
        image_size: the input side S.
        metadata: string key/values stored in the model's metadata_props.
        opset: ONNX opset version.
        output_name: name of the graph output.
    """
    import onnx  # noqa: PLC0415 - only needed when exporting

    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
        # the TorchScript exporter handles the TensorFlow "same" padding of EfficientNet-Lite;
        # PyTorch marks it legacy, so its deprecation notice is silenced here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(tmp),
            input_names=["images"],
            output_names=[output_name],
            dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        if metadata:
            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(proto, str(tmp))
    model.eval()  # the exporter restores the wrapper's mode, which may be training
    return Path(path)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session with all graph optimisations."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
