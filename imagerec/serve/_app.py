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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile

from .._decode import DEFAULT_MAX_PIXELS, DecodeError
from .._version import __version__
from ..errors import ImagerecError
from ._batcher import Batcher
from ._engines import Engine, load_engine
from ._images import decode_bytes
from ._web import HttpMetrics, base_app

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


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


class _Server:
    """The state behind the routes: engine, batcher, pools, limits and metrics."""

    def __init__(self, engine: Engine, config: ServeConfig, metrics: ServeMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.batcher = Batcher(
            self._forward, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
            on_batch=metrics.batch_size.observe, arriving=lambda: self.arriving,
        )
        threads = config.decode_threads or min(4, os.cpu_count() or 1)
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="imagerec-decode")
        self.in_flight = 0  # admitted, not yet answered
        self.arriving = 0  # admitted, not yet queued for the model (reading, decoding)
        self.ready = False

    def _forward(self, kind: tuple, batch: np.ndarray) -> np.ndarray:
        if kind[0] == "features":
            return self.engine.features(batch)
        return self.engine.logits(batch, tta=kind[1])

    async def warm_up(self) -> None:
        """One forward pass of each kind, so the first request does not pay for it; then ready."""
        size = self.engine.preprocessing["input_size"]
        blank = np.zeros((1, 3, size, size), dtype=np.float32)
        await self.batcher.submit(("logits", False), blank)
        if self.engine.embed_dim:
            await self.batcher.submit(("features",), blank)
        self.ready = True

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

    async def run(self, request: Request, kind: tuple) -> tuple[list[str], np.ndarray]:
        """Read, decode and prepare the request's images, then run them in a shared batch.

        Returns:
            (file names, the model's outputs: float32 (N, C) logits or (N, D) features).
        """
        self.arriving += 1
        try:
            files = await self._read(request)
            loop = asyncio.get_running_loop()
            batch = await loop.run_in_executor(self.decoders, self._prepare, files)
        finally:
            self.arriving -= 1
        return [name for name, _ in files], await self.batcher.submit(kind, batch)

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

    def _prepare(self, files: list[tuple[str, bytes]]) -> np.ndarray:
        prepared = []
        for name, data in files:
            try:
                image = decode_bytes(data, self.config.max_pixels)
            except DecodeError as e:
                self.metrics.skipped.inc()
                raise HTTPException(400, f"{name}: {e}") from None
            prepared.append(self.engine.prepare(image))
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
        token: when set, every endpoint but ``/health`` needs ``Authorization: Bearer TOKEN``.
        config: limits and batching (:class:`ServeConfig`).

    Returns:
        The FastAPI app: ``POST /predict``, ``POST /embed``, ``GET /model``, ``/health``,
        ``/ready``, ``/metrics`` and the OpenAPI docs at ``/docs``.

    Raises:
        ImagerecError: an unreadable model or a limit out of range (checked before returning).
    """
    config = (config or ServeConfig()).check()
    if not isinstance(model, Engine):
        model = load_engine(model, engine=engine, device=device, threads=threads)
    metrics = ServeMetrics()
    server = _Server(model, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        blas = _limit_blas(config.blas_threads)
        server.batcher.start()
        warm = asyncio.create_task(server.warm_up())
        try:
            yield
        finally:
            warm.cancel()
            await server.batcher.stop()
            server.decoders.shutdown(wait=False)
            if blas is not None:
                blas.restore_original_limits()

    app = base_app(
        title="imagerec serve", version=__version__, metrics=metrics,
        max_body_bytes=int(config.max_body_mb * 1_000_000), token=token, lifespan=lifespan,
    )
    app.state.server = server
    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: _Server) -> None:
    engine, metrics = server.engine, server.metrics

    @app.post("/predict", summary="Classes of one or more images (multipart files or raw bytes)")
    async def predict(
        request: Request,
        top_k: int = Query(5, ge=1, description="classes per image, best first"),
        tta: bool = Query(False, description="average with the mirrored image"),
    ):
        async with server.admitted():
            names, logits = await server.run(request, ("logits", tta))
        return {"predictions": [_top(name, row, engine.classes, top_k) for name, row in zip(names, _softmax(logits / engine.temperature))]}

    @app.post("/embed", summary="Feature vectors of one or more images (the backbone's embedding)")
    async def embed(request: Request):
        if not engine.embed_dim:
            raise HTTPException(
                501,
                f"{engine.path.name}: an exported .onnx holds no embedding output; serve the checkpoint or run "
                "folder it came from (imagerec serve RUN) to get /embed",
            )
        async with server.admitted():
            names, features = await server.run(request, ("features",))
        return {"dim": int(features.shape[1]), "embeddings": [{"file": n, "vector": v.tolist()} for n, v in zip(names, features)]}

    @app.get("/model", summary="Class names, preprocessing, backbone, versions and the model file's SHA-256")
    async def model_info():
        return engine.describe()

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
