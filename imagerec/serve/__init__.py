"""Serve a trained imagerec model over HTTP: batched, bounded and observable.

>>> from imagerec.serve import create_app
>>> app = create_app("runs/photos")        # a run folder, a checkpoint or an .onnx
>>> # uvicorn.run(app)  or  your_app.mount("/classifier", app)

``POST /predict`` and ``POST /embed`` take images as multipart files or raw bytes;
``GET /model``, ``/health``, ``/ready``, ``/metrics`` (Prometheus) and ``/docs`` (OpenAPI);
``POST /admin/reload`` (behind the token) or ``ServeConfig(watch=True)`` serves a run folder's
new best checkpoint once it is checked and warmed up, without a failed request (``_reload``).
Concurrent requests share forward passes (dynamic batching); limits on body size, pixels,
queue and time answer 413, 400, 503 and 504 with a JSON body ``{"error": ...}``.
The web plumbing (JSON errors, body limit, bearer token, request metrics) is
:func:`base_app`, for other imagerec web apps to build on.
"""

from __future__ import annotations

from ._app import ServeConfig, ServeMetrics, create_app
from ._engines import Engine, OnnxEngine, TorchEngine, load_engine
from ._run import TOKEN_ENV, check_listen, serve
from ._web import HttpMetrics, base_app, json_error

__all__ = [
    "Engine",
    "HttpMetrics",
    "OnnxEngine",
    "ServeConfig",
    "ServeMetrics",
    "TOKEN_ENV",
    "TorchEngine",
    "base_app",
    "check_listen",
    "create_app",
    "json_error",
    "load_engine",
    "serve",
]
