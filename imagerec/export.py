"""``imagerec export``: a trained classifier as ONNX (for ``imagerec.runtime``) or TorchScript.

The ONNX file has a dynamic batch axis, input ``images`` (N, 3, S, S) float32 and output
``logits`` (N, C) (raw: before temperature scaling), and carries the class names, preprocessing
and calibration temperature in its metadata (see
``imagerec._metadata``), so ``imagerec.runtime`` can run it with no PyTorch and prepare images
exactly as training did. Every export is checked before it takes the file's name: the model is
written to a temporary file beside ``out``, run on a random batch, and renamed over ``out`` only
when it gives PyTorch's logits. A failed export (a check, an exporter error, a full disk) leaves
the previous file at ``out`` as it was.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._io import atomic_path
from ._metadata import OUTPUT_NAME, onnx_metadata
from ._onnx import export_onnx, onnx_session
from .checkpoint import checkpoint_temperature, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .errors import ImagerecError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
PARITY_RTOL = 1e-4  # relative to the largest logit of the batch


def export_model(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    format: str = "onnx",
    image_size: int | None = None,
    opset: int = 17,
) -> Path:
    """Export the classifier in ``checkpoint`` (a file, or a run folder's best checkpoint).

    Args:
        checkpoint: an imagerec checkpoint or run folder.
        out: the file to write; default ``model.onnx`` / ``model.pt`` beside the checkpoint.
        format: ``"onnx"`` or ``"torchscript"``.
        image_size: input side in pixels; default the size the model was trained at.
        opset: ONNX opset version.

    Returns:
        The path written.

    Raises:
        ImagerecError: an unknown format, a file that is not an imagerec checkpoint, an image size
            the model cannot take, or an export whose outputs differ from PyTorch's.
    """
    if format not in FORMATS:
        raise ImagerecError(f"format {format!r} is not one of {', '.join(FORMATS)}; e.g. --format onnx")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    pp = model.preprocessing.resolve(image_size)
    out = Path(out) if out is not None else resolve_checkpoint(checkpoint).parent / f"model{FORMATS[format]}"
    if out.suffix != FORMATS[format]:
        raise ImagerecError(f"{out}: a {format} file should end in {FORMATS[format]}; e.g. --out model{FORMATS[format]}")
    compression = ckpt.meta.get("compression", {})
    temperature = checkpoint_temperature(ckpt)
    metadata = onnx_metadata(ckpt.meta["backbone"], ckpt.meta["classes"], pp.to_dict(), compression, temperature)
    example = torch.randn(4, 3, pp.input_size, pp.input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(example).numpy()
    with atomic_path(out, suffix=FORMATS[format]) as tmp:  # renamed over ``out`` only if the check passes
        if format == "onnx":
            export_onnx(model, tmp, pp.input_size, metadata=metadata, opset=opset, output_name=OUTPUT_NAME)
            got = onnx_session(tmp).run(None, {"images": example.numpy()})[0]
        else:
            got = _export_torchscript(model, tmp, example, metadata)
        _check_parity(out, expected, got)
    return out


def _export_torchscript(model: nn.Module, out: Path, example: torch.Tensor, metadata: dict[str, str]) -> np.ndarray:
    """Trace ``model`` to TorchScript with the metadata as an extra file ``imagerec.json``.

    PyTorch marks TorchScript deprecated in favour of torch.export, but LibTorch and PyTorch
    Mobile still load only TorchScript, so it is offered, with the notices silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(model, example[:1])
        torch.jit.save(traced, str(out), _extra_files={"imagerec.json": json.dumps(metadata)})
        with torch.inference_mode():
            return torch.jit.load(str(out))(example).numpy()


def _check_parity(path: Path, expected: np.ndarray, got: np.ndarray) -> None:
    kept = "the previous file there is kept" if path.exists() else "nothing was written"
    if not np.isfinite(expected).all():  # a diverged run: the exporter is not to blame
        raise ImagerecError(
            f"{path}: the checkpoint's own logits in PyTorch are not finite (NaN or infinity) on a random batch, so "
            f"{kept}; its weights are broken (a diverged training run?): export another checkpoint"
        )
    error = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-6))
    if not error <= PARITY_RTOL:
        raise ImagerecError(
            f"{path}: the exported model's logits differ from PyTorch's by {error:.2e} (relative; the rule is "
            f"<= {PARITY_RTOL:g}), so the new file was removed and {kept}; try another --opset or --format torchscript"
        )
