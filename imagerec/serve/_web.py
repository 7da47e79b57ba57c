"""The web plumbing imagerec's HTTP apps share: JSON errors, a body limit, a bearer token, metrics.

Any imagerec web app (``imagerec serve`` now, a later studio app) is built by :func:`base_app`:
every error reaches the client as a JSON body ``{"error": "..."}`` with the right 4xx/5xx
status and never a traceback (an unexpected exception is logged here, on the server); a request
body over the limit is refused with 413 before it is read (from ``Content-Length``) or as soon
as it passes the limit (a chunked body); with a token set, every path but the open ones needs
``Authorization: Bearer TOKEN``; and each request is counted in the app's own Prometheus
registry by route, method-independent, and status.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

log = logging.getLogger("imagerec.serve")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HttpMetrics:
    """Request counts and latencies in a registry of the app's own (two apps never share one).

    Attributes:
        registry: the ``CollectorRegistry`` that ``/metrics`` renders.
        requests: counter ``imagerec_http_requests_total{endpoint, status}``.
        latency: histogram ``imagerec_http_request_seconds{endpoint}``.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "imagerec_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "imagerec_http_request_seconds", "Time from request to response", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )


def base_app(
    *,
    title: str,
    version: str,
    metrics: HttpMetrics,
    max_body_bytes: int,
    token: str | None = None,
    open_paths: Iterable[str] = ("/health",),
    **fastapi_kwargs,
) -> FastAPI:
    """A FastAPI app with imagerec's JSON errors, body limit, token check and request metrics.

    Args:
        title: shown in the OpenAPI docs at ``/docs``.
        version: the app's version in the OpenAPI document.
        metrics: where requests are counted.
        max_body_bytes: larger request bodies get a 413.
        token: when set, every path except ``open_paths`` needs ``Authorization: Bearer TOKEN``.
        open_paths: paths answered without the token (liveness probes).
        **fastapi_kwargs: passed to ``FastAPI`` (e.g. ``lifespan``).

    Returns:
        The app; add routes to it.
    """
    app = FastAPI(title=title, version=version, **fastapi_kwargs)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected_error)
    # added innermost first: metrics sees the final status of everything, the token check
    # refuses before any body is read, and the body limit wraps the endpoint's reads
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    if token:
        app.add_middleware(_BearerToken, token=token, open_paths=frozenset(open_paths))
    app.add_middleware(_Metrics, metrics=metrics)
    return app


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape of imagerec's apps: ``{"error": message}`` with ``status``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    return json_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return json_error(422, f"{where}: {first.get('msg', 'invalid request')} (got {first.get('input')!r})")


async def _client_gone(request, exc: ClientDisconnect) -> JSONResponse:
    # the client's fault, not the server's: a 400 (in the metrics too), no traceback in the log
    log.info("client disconnected before the end of its request body: %s %s", request.method, request.scope["path"])
    return json_error(400, "the request body ended early: the client disconnected before sending all of it")


async def _unexpected_error(request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback (uvicorn's error log) after this response is sent
    log.error("unexpected error on %s %s: %r", request.method, request.url.path, exc)
    return json_error(500, "internal server error; the server log has the details")


def endpoint_name(app, scope) -> str:
    """The route template of a request (``/predict``), or ``other`` for unknown paths.

    Using templates, not raw paths, keeps the metrics' label sets bounded.
    """
    for route in app.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "other"


class _Metrics:
    """ASGI middleware: counts each request by endpoint and status, and times it."""

    def __init__(self, app, metrics: HttpMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_name(scope["app"], scope) if "app" in scope else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class BodyTooLarge(HTTPException):
    """A request body over the limit (413)."""

    def __init__(self, limit: int, seen: int):
        super().__init__(
            413,
            f"request body of {seen:,}+ bytes is over the limit of {limit:,} bytes; send fewer or smaller "
            "images per request (the server's --max-body-mb raises the limit)",
        )


class _BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by Content-Length or while reading."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = json_error(413, BodyTooLarge(self.limit, int(declared)).detail)
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit, seen)
            return message

        await self.app(scope, counted_receive, send)


class _BearerToken:
    """ASGI middleware: 401 unless ``Authorization: Bearer TOKEN`` (compared in constant time)."""

    def __init__(self, app, token: str, open_paths: frozenset[str]):
        self.app, self.expected, self.open_paths = app, f"Bearer {token}".encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            reason = "missing" if not given else "wrong"
            response = json_error(
                401,
                f"{reason} bearer token; send the header 'Authorization: Bearer TOKEN' with the server's token",
                {"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
