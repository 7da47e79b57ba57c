"""Contact sheets of search results: per query, the query image then its neighbours with scores.

The clustering report's ``contact_sheet`` draws tiles without captions; a search result needs a
score under each neighbour, so this draws its own tiles (thumbnails from the same reader).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from .._io import atomic_path
from ..clustering._report import _font, paste_tile
from ..data import DEFAULT_MAX_PIXELS, load_rgb

TILE, GAP, CAPTION = 112, 6, 18


def write_sheets(results: pd.DataFrame, folder: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Path]:
    """One PNG per query in ``folder``: the query, then each neighbour captioned with rank and score.

    Args:
        results: a DataFrame from :meth:`SearchIndex.search` (query, rank, path, score).
        folder: where to write ``NNN_<query name>.png`` (created).
        max_pixels: decompression-bomb limit when reading the images.

    Returns:
        The files written, in query order. An image that cannot be read is a grey tile.
    """
    folder = Path(folder)
    written = []
    for n, (query, rows) in enumerate(results.groupby("query", sort=False)):
        tiles = [(query, "query")] + [(r.path, f"#{r.rank}  {r.score:.3f}") for r in rows.itertuples()]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(query)).stem)[:60]
        written.append(_sheet(tiles, folder / f"{n:03d}_{stem}.png", max_pixels))
    return written


def _sheet(tiles: list[tuple[str, str]], path: Path, max_pixels: int) -> Path:
    width = GAP + len(tiles) * (TILE + GAP)
    sheet = Image.new("RGB", (width, TILE + CAPTION + 2 * GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(13)
    for n, (image_path, caption) in enumerate(tiles):
        x = GAP + n * (TILE + GAP)
        paste_tile(sheet, draw, _thumbnail(image_path, max_pixels), x, GAP, TILE)
        if n == 0:  # the query: framed
            draw.rectangle([x - 2, GAP - 2, x + TILE + 1, GAP + TILE + 1], outline=(200, 30, 30), width=2)
        draw.text((x, GAP + TILE + 3), caption, fill="black", font=font)
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _thumbnail(path: str, max_pixels: int) -> Image.Image | None:
    try:
        image = load_rgb(path, max_pixels)
    except Exception:  # noqa: BLE001 - a picture that cannot be shown is left grey
        return None
    return ImageOps.fit(image, (TILE, TILE), Image.Resampling.BICUBIC)
