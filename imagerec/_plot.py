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
    """Write ``fig`` as a PNG atomically and close it.

    Every text is drawn literally: labels come from folder and file names, and a ``$`` in one
    (``price $^{$``) would otherwise be parsed as mathtext and fail the whole report.
    """
    import matplotlib  # noqa: PLC0415
    from matplotlib.text import Text  # noqa: PLC0415

    for text in fig.findobj(Text):
        text.set_parse_math(False)
    try:
        with matplotlib.rc_context({"text.parse_math": False}), atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")  # ticks made while drawing read the rc
    finally:
        pyplot().close(fig)
