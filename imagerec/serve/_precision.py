"""Decided by measurement at start-up: int8 or fp32, and how large a batch pays.

**int8 or fp32**: ONNX Runtime's int8 is not faster on every CPU.

A run folder served with the ONNX engine may hold, beside its checkpoint, the int8 file
``imagerec compress RUN --quantize int8`` wrote from it (``model.int8.onnx``, or
``CHECKPOINT-STEM.int8.onnx``; one made from another checkpoint, as its recorded
``source_sha256`` tells, is not used). With ``precision="auto"`` the server then times both on
this machine at start-up (and at each reload) and serves the faster, but int8 only when the file
records that it keeps fp32's top class on at least ``min_int8_agreement`` of its calibration
images. The figures are logged and answered on ``GET /model`` (``precision``).

**Batch size**: the server batches concurrent requests up to ``max_batch_size``, but a batch
only pays where the CPU runs it faster per image. :func:`pick_batch_size` times the model at
batch sizes 1, 2, 4, ... up to the ceiling and serves at the largest within 5 % of the best time
per image (``GET /model``: ``batching``).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from ..errors import ImagerecError
from ._engines import Engine, OnnxEngine

log = logging.getLogger("imagerec.serve")

PRECISIONS = ("auto", "fp32", "int8")
TIMING_BATCH = 8  # images per timed forward pass (at most max_batch_size)
TIMING_REPEATS = 5  # timed passes of each model, interleaved; the median counts


def int8_beside(checkpoint: Path, sha256: str) -> tuple[Path | None, str]:
    """The int8 ``.onnx`` made from this checkpoint beside it, or (None, why there is none)."""
    import onnx  # noqa: PLC0415 - reads the metadata without building a session

    from .._metadata import KEY_COMPRESSION  # noqa: PLC0415

    names = dict.fromkeys([checkpoint.parent / "model.int8.onnx", checkpoint.parent / f"{checkpoint.stem}.int8.onnx"])
    found = [path for path in names if path.is_file()]
    for path in found:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        try:
            compression = json.loads(props.get(KEY_COMPRESSION) or "{}")
        except json.JSONDecodeError:
            continue
        if compression.get("quantize", "").startswith("int8") and compression.get("source_sha256") == sha256:
            return path, ""
    if found:
        return None, f"{', '.join(p.name for p in found)} beside it was made from another checkpoint"
    return None, f"no int8 file beside it (imagerec compress {checkpoint.parent} --quantize int8 --calib DATA writes one)"


def ms_per_image(engines: list[Engine], batch: int) -> list[float]:
    """Median milliseconds per image of each engine's logits at ``batch``, timed interleaved."""
    size = engines[0].preprocessing["input_size"]
    images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    times: list[list[float]] = [[] for _ in engines]
    for engine in engines:  # warm-up: the first pass of a shape allocates
        engine.logits(images)
    for _ in range(TIMING_REPEATS):
        for engine, kept in zip(engines, times):
            start = time.perf_counter()
            engine.logits(images)
            kept.append((time.perf_counter() - start) * 1000 / batch)
    return [statistics.median(t) for t in times]


def pick_precision(engine: Engine, precision: str, min_agreement: float, max_batch: int, threads: int | None) -> Engine:
    """``engine`` (fp32) or the int8 engine of its checkpoint, as ``precision`` and the timings say.

    The engine returned carries ``precision``: a dict of what was served and why, with the figures.

    Raises:
        ImagerecError: ``precision="int8"`` and no int8 file made from the checkpoint beside it.
    """
    if not isinstance(engine, OnnxEngine):
        engine.precision = {"served": "fp32", "reason": "the torch engine runs the checkpoint as it is"}
        return engine
    if engine.path.suffix.lower() == ".onnx":
        given = "int8" if engine.compression.get("quantize", "").startswith("int8") else "fp32"
        if precision not in ("auto", given):
            raise ImagerecError(
                f"--precision {precision}: {engine.path} is a {given} model, served as it is; serve the run folder "
                "(its int8 file beside its checkpoint) to choose, or drop --precision"
            )
        engine.precision = {"served": given, "reason": "the .onnx given is served as it is"}
        return engine
    if precision == "fp32":
        engine.precision = {"served": "fp32", "reason": "fp32 asked for (--precision fp32)"}
        return engine
    path, missing = int8_beside(Path(engine.path), engine.sha256)
    if path is None:
        if precision == "int8":
            raise ImagerecError(f"--precision int8: {engine.path}: {missing}; or serve with --precision auto")
        engine.precision = {"served": "fp32", "reason": missing}
        return engine
    int8 = OnnxEngine(path, served=engine.path, features_path=engine.features_path, threads=threads)
    agreement = int8.compression.get("fp32_top1_agreement")
    if precision == "int8":
        int8.precision = {"served": "int8", "reason": "int8 asked for", "int8_file": str(path), "fp32_top1_agreement": agreement}
        return int8
    batch = min(TIMING_BATCH, max_batch)
    fp32_ms, int8_ms = ms_per_image([engine, int8], batch)
    accurate = agreement is not None and agreement >= min_agreement
    served = int8 if accurate and int8_ms < fp32_ms else engine
    kept = f"{agreement:.2%}" if agreement is not None else "no agreement recorded"
    if not accurate:
        reason = f"int8 keeps fp32's top class on {kept} of its calibration images; the rule is >= {min_agreement:.2%}"
    else:
        reason = f"{'int8' if served is int8 else 'fp32'} is the faster here, and int8 keeps fp32's top class on {kept} (>= {min_agreement:.2%})"
    served.precision = {
        "served": "int8" if served is int8 else "fp32", "reason": reason, "int8_file": str(path),
        "fp32_ms_per_image": round(fp32_ms, 3), "int8_ms_per_image": round(int8_ms, 3), "timing_batch": batch,
        "fp32_top1_agreement": agreement, "min_int8_agreement": min_agreement,
    }
    log.info(
        "precision: fp32 %.2f ms/image, int8 %.2f ms/image (batches of %d, median of %d); %s: serving %s",
        fp32_ms, int8_ms, batch, TIMING_REPEATS, reason, served.precision["served"],
    )
    return served


BATCH_TOLERANCE = 0.05  # a larger batch is taken while its time per image is within 5 % of the best
BATCH_REPEATS = 5  # timed passes per batch size; the fastest counts


def pick_batch_size(engine: Engine, ceiling: int, threads: int | None) -> tuple[int, dict]:
    """The batch size to serve at: the largest power of two up to ``ceiling`` whose time per image
    (the fastest of 5 passes) is within 5 % of the best, timed here on a session of its own (so that the large batches
    timed leave no memory arena behind in the one that serves).

    A batch is worth waiting for only where the CPU runs it faster per image: on one core a
    convolutional net at 224 px may run batches of 32 slower per image than single images.

    Returns:
        (the batch size, {"ms_per_image_by_batch": {size: ms}, "chosen": size, "rule": ...}).
    """
    if not isinstance(engine, OnnxEngine):
        return ceiling, {"chosen": ceiling, "rule": "not measured: the torch engine (a GPU batches well)"}
    from .. import runtime  # noqa: PLC0415

    probe = runtime.load(engine._model.path, threads=threads)
    size = probe.preprocessing.input_size
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < ceiling] + [ceiling]
    timed: dict[int, float] = {}
    rng = np.random.default_rng(0)
    for b in sizes:
        images = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        probe.logits(images)  # the first pass of a shape allocates
        runs = []
        for _ in range(BATCH_REPEATS):
            start = time.perf_counter()
            probe.logits(images)
            runs.append((time.perf_counter() - start) * 1000 / b)
        # the fastest pass: other processes on a shared machine only ever add time
        timed[b] = min(runs)
        if b >= 8 and timed[b] > (1 + 4 * BATCH_TOLERANCE) * min(timed.values()):
            break  # clearly slower per image: larger batches will not pay
    best = min(timed.values())
    chosen = max(b for b, ms in timed.items() if ms <= (1 + BATCH_TOLERANCE) * best)
    del probe
    report = {"ms_per_image_by_batch": {str(b): round(ms, 3) for b, ms in timed.items()}, "chosen": chosen,
              "rule": f"the largest batch within {BATCH_TOLERANCE:.0%} of the best time per image, at most --max-batch-size {ceiling}"}
    log.info("batch size: %s ms per image by batch size; serving batches of at most %d",
             ", ".join(f"{b}: {ms:.3g}" for b, ms in timed.items()), chosen)
    return chosen, report
