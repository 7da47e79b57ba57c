"""``imagerec serve``: run :func:`create_app` under uvicorn, refusing unsafe listening addresses."""

from __future__ import annotations

import logging
import os

from ..errors import ImagerecError
from ._app import ServeConfig, create_app

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_ENV = "IMAGEREC_SERVE_TOKEN"
GRACE_S = 30  # seconds SIGTERM waits for requests in flight


def check_listen(host: str, port: int, token: str | None, insecure_no_token: bool) -> None:
    """Refuse a bad port, and a non-loopback host without a token (unless told it is wanted).

    Raises:
        ImagerecError: the port is out of range, or ``host`` reaches beyond this machine with no token.
    """
    if not 0 <= port <= 65535:
        raise ImagerecError(f"port {port} is not in 0-65535; e.g. --port 8000")
    if host not in LOOPBACK and not token and not insecure_no_token:
        raise ImagerecError(
            f"host {host!r} listens beyond this machine, so a token is required: pass --token TOKEN or set "
            f"{TOKEN_ENV} (or --insecure-no-token behind your own authenticating proxy)"
        )


def serve(
    model: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    insecure_no_token: bool = False,
    engine: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    config: ServeConfig | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``model`` over HTTP until SIGINT or SIGTERM (which let requests in flight finish).

    Args:
        model: a run folder, a checkpoint or an ``.onnx`` (see :func:`create_app`).
        host: address to listen on; anything but loopback needs ``token`` or ``insecure_no_token``.
        port: TCP port.
        token: bearer token; default the ``IMAGEREC_SERVE_TOKEN`` environment variable.
        insecure_no_token: allow a non-loopback host without a token.
        engine, device, threads, config: as :func:`create_app`.
        log_level: uvicorn's log level.

    Raises:
        ImagerecError: an unsafe address, a bad limit or an unreadable model, before listening.
    """
    import uvicorn  # noqa: PLC0415

    token = token or os.environ.get(TOKEN_ENV) or None
    check_listen(host, port, token, insecure_no_token)
    _log_to_stderr(log_level)
    app = create_app(model, engine=engine, device=device, threads=threads, token=token, config=config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACE_S)


def _log_to_stderr(level: str) -> None:
    """The server's own log (reloads, unexpected errors) on stderr beside uvicorn's, at its level."""
    log = logging.getLogger("imagerec.serve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # as uvicorn's lines
        log.addHandler(handler)
        log.setLevel(level.upper())
