"""matplotlib without a display, and atomic PNG writes, for every report that draws."""

from __future__ import annotations

from pathlib import Path

from ._io import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported only when a report draws)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    pyplot().close(fig)
