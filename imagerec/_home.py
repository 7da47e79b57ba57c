"""Where imagerec keeps downloads and caches: ``$IMAGEREC_HOME`` or ``~/.cache/imagerec``."""

from __future__ import annotations

import os
from pathlib import Path


def imagerec_home() -> Path:
    """The root folder for imagerec's downloads and caches (created on first use).

    Returns:
        ``$IMAGEREC_HOME`` when set, else ``$XDG_CACHE_HOME/imagerec`` or ``~/.cache/imagerec``.
    """
    env = os.environ.get("IMAGEREC_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "imagerec"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(kind: str) -> Path:
    """A sub-folder of :func:`imagerec_home` for one kind of cached thing (created)."""
    path = imagerec_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
