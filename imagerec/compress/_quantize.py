"""Post-training quantization of an exported classifier with ONNX Runtime.

``int8``: static quantization in QDQ form. Weights are int8 with one scale per output channel,
activations uint8 (U8S8, the fast path of ONNX Runtime on x86 CPUs with VNNI). The activation
ranges come from running the fp32 model on a few hundred calibration images, prepared exactly as
the model's own preprocessing says. ``quant_pre_process`` first folds batch norms and infers
shapes, so every convolution can be quantized.

``dynamic``: the weights of the linear layers (MatMul) only, int8; activations are quantized on
the fly at inference, so no calibration data is needed. Convolutions stay fp32, so this mode
suits models whose weight is mostly in fully connected layers (``seed_cnn``).

The output keeps every metadata key of the fp32 model and records in ``imagerec.compression``
how it was quantized, so ``imagerec.runtime`` prepares images as before; the SHA-256 of the file it
was made from (``source_sha256``: the checkpoint, or the fp32 ``.onnx``); and, for ``int8``, how
often its top class is the fp32 model's on the calibration images (``fp32_top1_agreement``), the
accuracy ``imagerec serve`` holds it to before it chooses int8 for speed.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .._io import atomic_path
from .._metadata import INPUT_NAME, KEY_CLASSES, KEY_COMPRESSION, KEY_FORMAT, KEY_PREPROCESSING, ONNX_FORMAT
from .._onnx import onnx_session
from ..data import Preprocessing, iter_batches, load_images
from ..errors import ImagerecError, SkippedImagesWarning
from ..export import export_model

MODES = ("int8", "dynamic")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str = "int8",
    calib: str | os.PathLike | None = None,
    calib_images: int = 512,
    split: str | None = None,
    batch_size: int = 32,
    seed: int = 0,
    method: str = "minmax",
    allow_outside: bool = False,
) -> Path:
    """Quantize a classifier to an ONNX file that ONNX Runtime runs with int8 arithmetic.

    Args:
        model: an imagerec checkpoint or run folder (exported to fp32 ONNX first), or an ONNX
            file written by :func:`imagerec.export.export_model`.
        out: the ``.onnx`` file to write (atomically).
        mode: ``"int8"`` (static, QDQ, per-channel int8 weights, uint8 activations; needs
            ``calib``) or ``"dynamic"`` (int8 weights of the linear layers only; no calibration).
        calib: calibration images, anything :func:`imagerec.data.load_images` accepts (a folder,
            a split root, a CSV manifest); labels are not needed. Required for ``"int8"``.
        calib_images: at most this many images are drawn from ``calib`` (seeded, without
            replacement); a few hundred are plenty for MinMax ranges.
        split: which split of ``calib`` to draw from (``"train"``, ``"val"``, ``"test"``), or None
            for every image.
        batch_size: calibration images per ONNX Runtime call.
        seed: seed of the draw.
        method: how activation ranges are set from the calibration outputs: ``"minmax"`` (the
            observed range), ``"percentile"`` (clips the top 0.001 % of values) or ``"entropy"``
            (KL divergence). Percentile and entropy keep every calibration activation in memory
            (an ONNX Runtime limitation): lower ``calib_images`` for large inputs.
        allow_outside: read manifest rows of ``calib`` that point outside the manifest's folder.

    Returns:
        The path written.

    Raises:
        ImagerecError: an unknown mode or method, ``calib`` missing for ``"int8"``, calibration
            images none of which can be read, a bad number, an output not ending in ``.onnx``, or
            a model that is neither an imagerec checkpoint nor an imagerec ONNX file.
    """
    # 1. Validate the arguments before any work.
    if mode not in MODES:
        raise ImagerecError(f"mode={mode!r} is not one of {', '.join(MODES)}; use 'int8' (with calib images) or 'dynamic'")
    if method not in CALIBRATION_METHODS:
        raise ImagerecError(f"method={method!r} is not one of {', '.join(CALIBRATION_METHODS)}; 'minmax' is the usual choice")
    if mode == "int8" and calib is None:
        raise ImagerecError("mode 'int8' needs calibration images: pass calib=FOLDER (a few hundred images like those the model will see), or use mode='dynamic'")
    if calib_images < 1 or batch_size < 1:
        raise ImagerecError(f"calib_images={calib_images} and batch_size={batch_size} must be >= 1; e.g. calib_images=512, batch_size=32")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ImagerecError(f"{out}: the quantized model is an ONNX file and should end in .onnx; e.g. model.int8.onnx")
    source = load_images(calib, split, allow_outside=allow_outside) if mode == "int8" else None  # a bad path fails here, before any export

    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415 - heavy import

    with tempfile.TemporaryDirectory(prefix="imagerec-quantize-") as tmp:
        # 2. The fp32 ONNX model and its metadata (class names, preprocessing).
        fp32 = _fp32_onnx(model, Path(tmp) / "fp32.onnx")
        metadata = _imagerec_metadata(fp32, model)
        # 3. Fold batch norms and infer every tensor's shape, so every layer can be quantized.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        # 4. Quantize.
        quantized = Path(tmp) / "quantized.onnx"
        pp = Preprocessing.from_dict(json.loads(metadata[KEY_PREPROCESSING]))
        if mode == "int8":
            n_images, check, agreement = _quantize_static(prepared, quantized, source, pp, calib_images, batch_size, seed, method)
            compression = {
                "quantize": "int8-static-qdq-per-channel",
                "activations": "uint8",
                "weights": "int8",
                "calibration": method,
                "calib_images": n_images,
                "fp32_top1_agreement": agreement,
            }
        else:
            _quantize_dynamic(prepared, quantized)
            check = np.random.default_rng(seed).standard_normal((2, 3, pp.input_size, pp.input_size), dtype=np.float32)
            compression = {"quantize": "int8-dynamic-matmul", "weights": "int8"}
        # 5. Write the metadata, check that ONNX Runtime runs the result, then move it into place.
        previous = json.loads(metadata.get(KEY_COMPRESSION) or "{}")
        compression["source_sha256"] = _source_sha256(model, fp32)
        metadata[KEY_COMPRESSION] = json.dumps({**previous, **compression})
        with atomic_path(out, suffix=".onnx") as target:
            _save_with_metadata(quantized, target, metadata)
            onnx_session(target).run(None, {INPUT_NAME: check})
    return out


def _source_sha256(model: str | os.PathLike, fp32: Path) -> str:
    """SHA-256 of what the int8 file was made from: the checkpoint, or the fp32 ``.onnx`` given."""
    import hashlib  # noqa: PLC0415

    from ..checkpoint import resolve_checkpoint  # noqa: PLC0415

    source = Path(model)
    path = source if source.is_file() and source.suffix.lower() == ".onnx" else resolve_checkpoint(source)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fp32_onnx(model: str | os.PathLike, path: Path) -> Path:
    """``model`` itself when it is an ONNX file, else its checkpoint exported to ``path``."""
    source = Path(model)
    if source.is_file() and source.suffix.lower() == ".onnx":
        return source
    return export_model(source, path, format="onnx")


def _imagerec_metadata(path: Path, model) -> dict[str, str]:
    import onnx  # noqa: PLC0415

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types for a damaged file
        raise ImagerecError(f"{model}: not a readable ONNX file ({type(e).__name__}); export one with 'imagerec export'") from None
    metadata = {p.key: p.value for p in proto.metadata_props}
    if metadata.get(KEY_FORMAT) != ONNX_FORMAT or KEY_PREPROCESSING not in metadata:
        raise ImagerecError(
            f"{model}: an ONNX file without imagerec metadata (class names, preprocessing); "
            "quantize the checkpoint or an ONNX file written by 'imagerec export'"
        )
    compression = _metadata_json(model, metadata, KEY_COMPRESSION, "{}", dict)
    pp = _metadata_json(model, metadata, KEY_PREPROCESSING, "", dict)
    classes = _metadata_json(model, metadata, KEY_CLASSES, "[]", list)
    if not all(isinstance(c, str) for c in classes):
        raise ImagerecError(f"{model}: broken imagerec metadata: {KEY_CLASSES} must be a list of names; export the model again")
    try:
        Preprocessing.from_dict(pp)
    except (TypeError, ValueError, KeyError) as e:
        raise ImagerecError(f"{model}: broken imagerec metadata: {KEY_PREPROCESSING} ({e}); export the model again") from None
    if "quantize" in compression:
        raise ImagerecError(f"{model}: is already quantized; quantize the fp32 checkpoint or its fp32 export instead")
    return metadata


def _metadata_json(model, metadata: dict[str, str], key: str, default: str, kind: type):
    """The JSON value of ``key``, which must be a ``kind``; one ImagerecError otherwise."""
    try:
        value = json.loads(metadata.get(key) or default)
    except json.JSONDecodeError as e:
        raise ImagerecError(f"{model}: broken imagerec metadata: {key} is not valid JSON ({e}); export the model again") from None
    if not isinstance(value, kind):
        raise ImagerecError(f"{model}: broken imagerec metadata: {key} is a JSON {type(value).__name__}, not a {kind.__name__}; export the model again")
    return value


def _save_with_metadata(source: Path, target: Path, metadata: dict[str, str]) -> None:
    import onnx  # noqa: PLC0415

    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))


# ---------------------------------------------------------------------------------------------
# int8: static, QDQ, calibrated


def _quantize_static(prepared, quantized, source, pp, calib_images, batch_size, seed, method) -> tuple[int, np.ndarray, float]:
    """Calibrate and quantize; returns (calibration images used, the first calibration batch,
    the share of them whose top class the int8 model gives as the fp32 one does)."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """Hands ONNX Runtime one batch at a time and counts the images."""

        def __init__(self, batches: Iterator[np.ndarray]):
            self.batches, self.images = batches, 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.images += len(batch)
            return {INPUT_NAME: batch}

    drawn = np.sort(np.random.default_rng(seed).permutation(len(source))[:calib_images])
    skipped: list = []
    batches = _calibration_batches(source, pp, drawn, batch_size, skipped)
    first = next(batches, None)
    if first is None:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise ImagerecError(
            f"{source.root}: none of the {len(drawn)} calibration image(s) drawn could be read "
            f"({len(skipped)} skipped: {reasons}); pass a calib folder of readable images"
        )
    reader = Reader(itertools.chain([first], batches))
    # Only the layers that compute on image data: TF "same" padding computes its pads with float
    # arithmetic on the input's shape at run time, and quantizing that arithmetic rounds the pads.
    excluded = _shape_arithmetic_nodes(prepared)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    # MinMax keeps only each batch's reduced min and max per tensor, so it needs no flushing (ORT's
    # CalibMaxIntermediateOutputs would even drop the batches it flushes, not merge them)
    extra = {}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    quantize_static(
        str(prepared),
        str(quantized),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=methods[method],
        nodes_to_exclude=excluded,
        extra_options=extra,
    )
    if skipped:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        warnings.warn(f"{len(skipped)} calibration image(s) could not be read and were left out: {shown}", SkippedImagesWarning, stacklevel=3)
    # how often int8 keeps fp32's top class, on the same images (decoded again: a few hundred
    # prepared images would take hundreds of MB to keep)
    fp32_session, int8_session = onnx_session(prepared), onnx_session(quantized)
    same = seen = 0
    for batch in _calibration_batches(source, pp, drawn, batch_size, []):
        reference = fp32_session.run(None, {INPUT_NAME: batch})[0].argmax(1)
        same += int((int8_session.run(None, {INPUT_NAME: batch})[0].argmax(1) == reference).sum())
        seen += len(batch)
    return reader.images, first, round(same / seen, 4)


def _shape_arithmetic_nodes(path: Path) -> list[str]:
    """Names of the nodes that no image value flows into (shape arithmetic, constants).

    Nodes without a name are named here (the file is rewritten), so that they can be excluded.
    """
    import onnx  # noqa: PLC0415

    proto = onnx.load(str(path))
    data = {graph_input.name for graph_input in proto.graph.input}  # tensors computed from pixel values
    data -= {init.name for init in proto.graph.initializer}
    excluded, renamed = [], False
    for index, node in enumerate(proto.graph.node):  # ONNX graphs are topologically sorted
        if not node.name:
            node.name, renamed = f"{node.op_type}_{index}", True
        if node.op_type in ("Shape", "Size") or not any(name in data for name in node.input):
            excluded.append(node.name)  # its outputs depend on shapes or constants alone
        else:
            data.update(node.output)
    if renamed:
        onnx.save(proto, str(path))
    return excluded


def _calibration_batches(source, pp, indices, batch_size, skipped: list) -> Iterator[np.ndarray]:
    """Float32 arrays of shape (N, 3, S, S), prepared as at evaluation; appends unreadable images to ``skipped``."""
    for batch in iter_batches(source, pp, batch_size=batch_size, indices=indices, augment=None, workers=min(4, os.cpu_count() or 1)):
        skipped += [s for _, s in batch.skipped]
        if len(batch.images):
            yield np.ascontiguousarray(batch.images.numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# dynamic: linear layers only


def _quantize_dynamic(prepared: Path, quantized: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    # PyTorch exports nn.Linear as Gemm; the dynamic quantizer rewrites each Gemm as MatMul + Add
    # first, so "MatMul" covers every linear layer and leaves the convolutions in fp32.
    quantize_dynamic(str(prepared), str(quantized), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
