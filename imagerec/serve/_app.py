"""``create_app(model)``: a trained imagerec model as a FastAPI app, batched, bounded and observable.

Life of a ``POST /predict``:

1. admission: with ``max_queue`` requests already in the server, answer 503 + Retry-After
   at once (memory stays bounded; a client knows to come back) instead of queueing more;
2. read the body (multipart files, or raw image bytes): over ``max_body_mb`` -> 413;
3. decode and prepare the images in the decoding thread pool, off the event loop
   (format allow-list, pixel limit): a bad image -> 400 naming the file and the problem;
4. queue the prepared images for the :class:`~imagerec.serve._batcher.Batcher`, which runs
   concurrent requests as one forward pass in its own thread (waiting up to ``max_wait_ms``
   for requests still being decoded, never when none are);
5. softmax, top-k, JSON. Steps 2-5 have ``timeout_s`` in all, else 504.

The request reads the model once, at step 3, and keeps it to the end: a new version swapped in
meanwhile (``POST /admin/reload``, ``--watch``: see :mod:`imagerec.serve._reload`) answers the
requests that start after the swap. Every answer names its version in ``X-Imagerec-Model``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile

from .._decode import DEFAULT_MAX_PIXELS, DecodeError
from .._version import __version__
from ..errors import ImagerecError
from ._batcher import Batcher
from ._engines import Engine, load_engine, reload_source
from ._images import decode_bytes
from ._precision import PRECISIONS, pick_batch_size, pick_precision
from ._reload import Refused, Reloader, Version
from ._web import HttpMetrics, base_app, log

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
VERSION_HEADER = "X-Imagerec-Model"  # SHA-256 of the model file that answered


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits and batching; every field is a flag of ``imagerec serve``.

    Attributes:
        max_batch_size: images per forward pass at most.
        max_wait_ms: how long a request waits for others to share its forward pass.
        max_queue: requests in the server at once (reading, decoding, queued or running);
            beyond that, 503 with Retry-After.
        max_images: images per request at most.
        max_body_mb: request bodies larger than this many megabytes (10^6 bytes) get a 413.
        timeout_s: seconds a request may take from admission to answer, else 504.
        max_pixels: images with more pixels are refused (a decompression-bomb guard).
        decode_threads: threads that decode and prepare images (None: min(4, CPUs)).
        blas_threads: numpy's BLAS threads while the app runs (None: leave them alone). The
            resize of :func:`imagerec.runtime.preprocess` is two matrix products; each decoding
            thread running a multi-threaded BLAS oversubscribes the CPU (a 150 px photo took
            109 ms instead of 1.1 ms on a busy 2-core machine), so the pool gives the parallelism.
        watch: reload the run folder's best checkpoint (or the checkpoint served) whenever it
            changes, as ``POST /admin/reload`` does; needs a run folder or checkpoint.
        watch_interval_s: how often the watched checkpoint's time and size are looked at.
        precision: ``"auto"``: when the run folder holds the int8 file made from its checkpoint,
            time both at start-up (and at each reload) and serve the faster, int8 only if it keeps
            fp32's top class on at least ``min_int8_agreement`` of its calibration images;
            ``"fp32"``; ``"int8"`` (the file must be there). See :mod:`imagerec.serve._precision`.
        min_int8_agreement: the share of calibration images on which the int8 file must give
            fp32's top class (as ``imagerec compress`` recorded it) to be chosen for speed.
        tune_batch: time the model at batch sizes 1, 2, 4, ... up to ``max_batch_size`` at
            start-up and batch at most as many as still run fastest per image (within 5 %); a
            batch that runs slower per image than single images only adds latency and memory.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_images: int = 64
    max_body_mb: float = 20.0
    timeout_s: float = 30.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_threads: int | None = None
    blas_threads: int | None = 1
    watch: bool = False
    watch_interval_s: float = 2.0
    precision: str = "auto"
    min_int8_agreement: float = 0.99
    tune_batch: bool = True

    def check(self) -> ServeConfig:
        """Raise ImagerecError naming the first value out of range; else return self."""
        rules = [
            ("max_batch_size", self.max_batch_size >= 1, ">= 1, e.g. 32"),
            ("max_wait_ms", self.max_wait_ms >= 0, ">= 0 milliseconds, e.g. 5"),
            ("max_queue", self.max_queue >= 1, ">= 1 request, e.g. 256"),
            ("max_images", self.max_images >= 1, ">= 1 image per request, e.g. 64"),
            ("max_body_mb", self.max_body_mb > 0, "> 0 megabytes, e.g. 20"),
            ("timeout_s", self.timeout_s > 0, "> 0 seconds, e.g. 30"),
            ("max_pixels", self.max_pixels >= 1, ">= 1 pixel"),
            ("decode_threads", self.decode_threads is None or self.decode_threads >= 1, ">= 1 thread, or None"),
            ("blas_threads", self.blas_threads is None or self.blas_threads >= 1, ">= 1 thread, or None"),
            ("watch_interval_s", self.watch_interval_s > 0, "> 0 seconds, e.g. 2"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("min_int8_agreement", 0 <= self.min_int8_agreement <= 1, "a share in [0, 1], e.g. 0.99"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ImagerecError(f"{name}={getattr(self, name)!r} must be {rule}")
        return self


class ServeMetrics(HttpMetrics):
    """:class:`HttpMetrics` plus the model's: batch sizes, images decoded and skipped, queue."""

    def __init__(self):
        super().__init__()
        self.batch_size = Histogram(
            "imagerec_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.decoded = Counter("imagerec_images_decoded", "Images decoded and prepared", registry=self.registry)
        self.skipped = Counter("imagerec_images_skipped", "Images refused as unreadable or too large", registry=self.registry)
        self.in_flight = Gauge("imagerec_requests_in_flight", "Model requests admitted and not yet answered", registry=self.registry)
        self.rejected = Counter("imagerec_requests_rejected", "Requests refused with 503 (server full)", registry=self.registry)
        self.reloads = Counter(
            "imagerec_model_reloads", "New model versions tried, by outcome", ["outcome"], registry=self.registry
        )


class _Server:
    """The state behind the routes: engine and its version, batcher, pools, limits and metrics."""

    def __init__(
        self, engine: Engine, config: ServeConfig, metrics: ServeMetrics, reloader: Reloader | None = None,
        batching: dict | None = None,
    ):
        self.engine, self.config, self.metrics, self.reloader = engine, config, metrics, reloader
        self.batching = batching or {"chosen": config.max_batch_size, "rule": "--max-batch-size"}
        self.version = Version.of(engine)
        self._reloading = asyncio.Lock()
        self._reload_pool = ThreadPoolExecutor(1, thread_name_prefix="imagerec-reload")
        self.batcher = Batcher(
            self._forward, max_batch_size=self.batching["chosen"], max_wait_ms=config.max_wait_ms,
            on_batch=metrics.batch_size.observe, arriving=lambda: self.arriving,
        )
        threads = config.decode_threads or min(4, os.cpu_count() or 1)
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="imagerec-decode")
        self.in_flight = 0  # admitted, not yet answered
        self.arriving = 0  # admitted, not yet queued for the model (reading, decoding)
        self.ready = False

    @staticmethod
    def _forward(kind: tuple, batch: np.ndarray) -> np.ndarray:
        engine = kind[0]  # the request's own engine: batches never mix versions
        if kind[1] == "features":
            return engine.features(batch)
        return engine.logits(batch, tta=kind[2])

    async def warm_up(self) -> None:
        """One forward pass of each kind, so the first request does not pay for it; then ready."""
        engine = self.engine
        size = engine.preprocessing["input_size"]
        blank = np.zeros((1, 3, size, size), dtype=np.float32)
        await self.batcher.submit((engine, "logits", False), blank)
        if engine.embed_dim:
            await self.batcher.submit((engine, "features"), blank)
        self.ready = True

    async def reload(self) -> dict:
        """Build, check and warm up the source's current checkpoint, then swap it in.

        Returns:
            ``{"status": "swapped" | "unchanged", "version": ..., "previous": ...}``.

        Raises:
            Refused: the candidate failed a check; the version serving is kept.
        """
        async with self._reloading:  # one at a time; a second caller then finds it unchanged
            loop = asyncio.get_running_loop()
            try:
                built = await loop.run_in_executor(self._reload_pool, self.reloader.candidate, self.engine.sha256)
            except Refused:
                self.metrics.reloads.labels("refused").inc()
                raise
            if built is None:
                return {"status": "unchanged", "version": vars(self.version)}
            old = self.version
            # the swap: on the event loop with no await in between, so every request sees old or new
            self.engine, self.version = built[0], Version.of(built[0])
            self.reloader.swapped(old, self.version)
            self.metrics.reloads.labels("swapped").inc()
            return {"status": "swapped", "version": vars(self.version), "previous": vars(old)}

    async def watch(self) -> None:
        """Reload whenever the source's checkpoint changes (looked at every ``watch_interval_s``)."""
        while True:
            try:
                if self.reloader.changed():
                    await self.reload()
            except Refused:
                pass  # logged, and kept for /model, by the reloader
            except Exception:  # noqa: BLE001 - a bug here must not stop the watching, nor the server
                log.exception("reload: the watch of %s failed; it goes on", self.reloader.source)
            await asyncio.sleep(self.config.watch_interval_s)

    def close(self) -> None:
        self.decoders.shutdown(wait=False)
        self._reload_pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def admitted(self):
        """Count a model request in; 503 with Retry-After when ``max_queue`` are already in."""
        if self.in_flight >= self.config.max_queue:
            self.metrics.rejected.inc()
            raise HTTPException(
                503,
                f"server full: {self.in_flight} requests in progress, the limit (--max-queue) is "
                f"{self.config.max_queue}; retry after the Retry-After seconds",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                yield
        except TimeoutError:
            raise HTTPException(
                504, f"the request took over {self.config.timeout_s:g} s (the server's --timeout); retry, or send fewer images"
            ) from None
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def run(self, request: Request, kind: tuple) -> tuple[Engine, list[str], np.ndarray]:
        """Read, decode and prepare the request's images, then run them in a shared batch.

        Args:
            kind: ``("logits", tta)`` or ``("features",)``.

        Returns:
            (the engine that answered, file names, its outputs: float32 (N, C) logits or (N, D) features).
        """
        self.arriving += 1
        try:
            files = await self._read(request)
            engine = self.engine  # read once: this request stays on this version to its end
            loop = asyncio.get_running_loop()
            batch = await loop.run_in_executor(self.decoders, self._prepare, engine, files)
        finally:
            self.arriving -= 1
        return engine, [name for name, _ in files], await self.batcher.submit((engine, *kind), batch)

    async def _read(self, request: Request) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip(" \t").lower()  # case-insensitive, blanks around it (RFC 9110)
        if media == "multipart/form-data":
            limit = self.config.max_images
            async with request.form(max_files=limit, max_fields=limit) as form:
                files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if isinstance(f, UploadFile)]
            if not files:
                raise HTTPException(400, "the form holds no files; send images as files, e.g. curl -F file=@cat.jpg URL")
            return files
        if media in ("", "application/octet-stream") or media.startswith("image/"):
            body = await request.body()
            if not body:
                raise HTTPException(400, "empty request body; send an image (curl --data-binary @cat.jpg) or a multipart form")
            return [("body", body)]
        raise HTTPException(
            415, f"content type {ctype!r} is not accepted; send multipart/form-data files or raw image bytes (image/*)"
        )

    def _prepare(self, engine: Engine, files: list[tuple[str, bytes]]) -> np.ndarray:
        prepared = []
        for name, data in files:
            try:
                image = decode_bytes(data, self.config.max_pixels)
            except DecodeError as e:
                self.metrics.skipped.inc()
                raise HTTPException(400, f"{name}: {e}") from None
            prepared.append(engine.prepare(image))
            self.metrics.decoded.inc()
        return np.stack(prepared)


def create_app(
    model: str | os.PathLike | Engine,
    *,
    engine: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    token: str | None = None,
    config: ServeConfig | None = None,
) -> FastAPI:
    """A trained model as an ASGI app; run it with uvicorn or mount it in your own app.

    Args:
        model: a run folder, a checkpoint, an ``.onnx`` (int8 included), or a loaded :class:`Engine`.
        engine: ``"onnx"`` (ONNX Runtime), ``"torch"`` or ``"auto"`` (onnx on the CPU).
        device: ``cpu``, ``cuda``, ``cuda:N`` (with the torch engine) or ``auto``.
        threads: ONNX Runtime's CPU threads (None: all cores).
        token: when set, every endpoint but ``/health`` needs ``Authorization: Bearer TOKEN``;
            ``POST /admin/reload`` needs it always (without one it answers 403).
        config: limits, batching and watching (:class:`ServeConfig`).

    Returns:
        The FastAPI app: ``POST /predict``, ``POST /embed``, ``GET /model``, ``/health``,
        ``/ready``, ``/metrics``, ``POST /admin/reload`` and the OpenAPI docs at ``/docs``.

    Raises:
        ImagerecError: an unreadable model, a limit out of range, or ``watch`` with a model that
            cannot be reloaded (an ``.onnx`` or an :class:`Engine`), checked before returning.
    """
    config = (config or ServeConfig()).check()
    source = None if isinstance(model, Engine) else reload_source(model)
    if config.watch and source is None:
        raise ImagerecError(
            f"--watch needs a run folder or a .safetensors checkpoint to watch, not {_name(model)}: a new version "
            "is checked against PyTorch before it is served; serve the run folder (imagerec serve RUN --watch)"
        )
    if not isinstance(model, Engine):
        model = load_engine(model, engine=engine, device=device, threads=threads)
        model = pick_precision(model, config.precision, config.min_int8_agreement, config.max_batch_size, threads)
    kind = model.name  # a new version runs on the engine the server started with

    def build(path: os.PathLike) -> Engine:
        fp32 = load_engine(path, engine=kind, device=device, threads=threads)
        return pick_precision(fp32, config.precision, config.min_int8_agreement, config.max_batch_size, threads)

    reloader = Reloader(source, build) if source is not None else None
    batching = None
    if config.tune_batch:
        batching = pick_batch_size(model, config.max_batch_size, threads)[1]
    metrics = ServeMetrics()
    server = _Server(model, config, metrics, reloader, batching)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        blas = _limit_blas(config.blas_threads)
        server.batcher.start()
        tasks = [asyncio.create_task(server.warm_up())]
        if config.watch:
            tasks.append(asyncio.create_task(server.watch(), name="imagerec-watch"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await server.batcher.stop()
            server.close()
            if blas is not None:
                blas.restore_original_limits()

    app = base_app(
        title="imagerec serve", version=__version__, metrics=metrics,
        max_body_bytes=int(config.max_body_mb * 1_000_000), token=token, lifespan=lifespan,
    )
    app.state.server = server
    _add_routes(app, server, token)
    return app


def _name(model) -> str:
    return f"the loaded engine of {model.path}" if isinstance(model, Engine) else str(model)


def _add_routes(app: FastAPI, server: _Server, token: str | None) -> None:
    metrics = server.metrics

    @app.post("/predict", summary="Classes of one or more images (multipart files or raw bytes)")
    async def predict(
        request: Request,
        top_k: int = Query(5, ge=1, description="classes per image, best first"),
        tta: bool = Query(False, description="average with the mirrored image"),
    ):
        async with server.admitted():
            engine, names, logits = await server.run(request, ("logits", tta))
        body = {"predictions": [_top(name, row, engine.classes, top_k) for name, row in zip(names, _softmax(logits / engine.temperature))]}
        return JSONResponse(body, headers={VERSION_HEADER: engine.sha256})

    @app.post("/embed", summary="Feature vectors of one or more images (the backbone's embedding)")
    async def embed(request: Request):
        if not server.engine.embed_dim:
            raise HTTPException(
                501,
                f"{server.engine.path.name}: an exported .onnx holds no embedding output; serve the checkpoint or run "
                "folder it came from (imagerec serve RUN) to get /embed",
            )
        async with server.admitted():
            engine, names, features = await server.run(request, ("features",))
        body = {"dim": int(features.shape[1]), "embeddings": [{"file": n, "vector": v.tolist()} for n, v in zip(names, features)]}
        return JSONResponse(body, headers={VERSION_HEADER: engine.sha256})

    @app.get("/model", summary="Class names, preprocessing, backbone, versions, the version serving and the last reload")
    async def model_info():
        reload = server.reloader.describe() if server.reloader else {"source": None, "last": None}
        return {
            **server.engine.describe(), "version": vars(server.version), "batching": server.batching,
            "reload": {**reload, "watch": server.config.watch},
        }

    @app.post("/admin/reload", summary="Serve the source's current checkpoint: checked, warmed up, swapped in (needs the token)")
    async def admin_reload():
        if not token:
            raise HTTPException(
                403, "POST /admin/reload needs the server's token, and this server has none: start it with --token TOKEN "
                "(or IMAGEREC_SERVE_TOKEN) and send 'Authorization: Bearer TOKEN'",
            )
        if server.reloader is None:
            raise HTTPException(
                409, f"this server serves {_name(server.engine)}, which cannot be reloaded: start it on a run folder or "
                ".safetensors checkpoint (imagerec serve RUN) to reload new versions",
            )
        try:
            return await server.reload()
        except Refused as e:
            raise HTTPException(
                409, f"the new checkpoint was refused: {e}; still serving sha256 {server.version.sha256}",
            ) from None

    @app.get("/health", summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and warmed up")
    async def ready():
        if not server.ready:
            raise HTTPException(503, "the model is warming up; retry shortly", headers={"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _limit_blas(threads: int | None):
    """Limit numpy's BLAS to ``threads`` (process-wide, restored at shutdown); None: leave it."""
    if threads is None:
        return None
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - installed with scikit-learn

    return threadpool_limits(limits=threads, user_api="blas")


def _top(name: str, proba: np.ndarray, classes: list[str], k: int) -> dict:
    best = np.argsort(-proba, kind="stable")[:k]  # as imagerec predict orders them
    top = [{"class": classes[i], "probability": float(proba[i])} for i in best]
    return {"file": name, "class": top[0]["class"], "probability": top[0]["probability"], "top": top}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
