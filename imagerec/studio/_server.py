"""Run the studio on 127.0.0.1 with uvicorn."""

from __future__ import annotations

import os
import socket
import threading
import webbrowser

from ..errors import ImagerecError
from ._setup import default_project

HOST = "127.0.0.1"


def serve(data: str | None, project: str | None = None, *, port: int = 8765, open_browser: bool = False,
          k: int | str | None = None, backbone: str = "auto", image_size: int | None = None) -> None:
    """Open (or start) a project and serve it until interrupted.

    Args:
        data: the photos; may be None to reopen an existing ``project``.
        project: the project folder (default: ``<data>.studio`` beside the data).
        port: TCP port on 127.0.0.1 (0: any free port).
        open_browser: open the default browser on the studio's URL.
        k: clusters for unlabelled photos (a number or ``"auto"``).
        backbone: backbone that embeds photos for clustering and search.
        image_size: input side of that embedding.

    Raises:
        ImagerecError: neither data nor project, a port in use, or unreadable data.
    """
    import uvicorn  # noqa: PLC0415

    from ._app import create_app  # noqa: PLC0415

    if data is None and project is None:
        raise ImagerecError("give the photos (imagerec studio DATA) or an existing project (--project DIR)")
    if not 0 <= port <= 65535:
        raise ImagerecError(f"--port {port} must be between 0 and 65535; e.g. 8765")
    folder = project or os.fspath(default_project(data))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as e:
        sock.close()
        raise ImagerecError(f"port {port} on {HOST} is not free ({e.strerror}); pick another with --port, or 0 for any") from None
    app = create_app(folder, data, k=k, backbone=backbone, image_size=image_size)
    url = f"http://{HOST}:{sock.getsockname()[1]}/"
    print(f"imagerec studio: project {folder}\nopen {url}  (Ctrl+C stops it)", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
