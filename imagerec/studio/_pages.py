"""Server-rendered HTML: plain f-strings, every value from the data or the user through ``esc``.

No template engine (Jinja2 is not a dependency); the few shapes repeat through small functions.
"""

from __future__ import annotations

import html
import time
from typing import Iterable, Sequence
from urllib.parse import quote

NAV = [("/", "Overview"), ("/groups", "Groups"), ("/review", "Review"), ("/audit", "Audit"), ("/search", "Search"), ("/train", "Train"),
       ("/predict", "Predict"), ("/export", "Export"), ("/history", "History")]


def esc(value) -> str:
    """HTML-escape anything (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def url_arg(value) -> str:
    return quote(str(value), safe="")


def layout(title: str, body: str, token: str, active: str = "") -> str:
    """The page around ``body``; the CSRF token travels in a meta tag for the script's POSTs."""
    links = "".join(
        f'<a href="{href}"{" class=active" if href == active else ""}>{esc(label)}</a>' for href, label in NAV
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{esc(token)}"><title>{esc(title)} - imagerec studio</title>
<link rel="stylesheet" href="/static/studio.css"></head>
<body><header><b>imagerec studio</b><nav>{links}</nav>
<button id="undo" title="Undo the last action (Ctrl+Z)">Undo</button></header>
<main><h1>{esc(title)}</h1><div id="message" role="status"></div>
{body}</main><script src="/static/studio.js"></script></body></html>"""


def thumb(image_id: int, caption: str = "", selectable: bool = True, href: str | None = None) -> str:
    """One lazy thumbnail; ``data-id`` makes it selectable in a grid."""
    img = f'<img loading="lazy" src="/thumb/{int(image_id)}" alt="image {int(image_id)}" width="96" height="96">'
    if href:
        img = f'<a href="{esc(href)}">{img}</a>'
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    attr = f' data-id="{int(image_id)}"' if selectable else ""
    return f'<figure class="thumb"{attr}>{img}{cap}</figure>'


def table(header: Sequence[str], rows: Iterable[Sequence], cls: str = "") -> str:
    """A table whose cells are escaped, except cells given as ``Raw``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """Markup already escaped by the caller."""


def group_options(groups, exclude: int | None = None) -> str:
    return "".join(f'<option value="{g.id}">{esc(g.name)} ({g.count})</option>' for g in groups if g.id != exclude)


def pager(base: str, page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    prev = f'<a id="prev" href="{esc(base)}?page={page - 1}">&larr; previous</a>' if page > 1 else ""
    nxt = f'<a id="next" href="{esc(base)}?page={page + 1}">next &rarr;</a>' if page < pages else ""
    return f'<p class="pager">{prev} page {page} of {pages} {nxt}</p>'


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def selection_toolbar(groups, current: int | None) -> str:
    """Move / junk / new class for the selected images; the script wires the buttons."""
    return f"""<div class="toolbar" id="toolbar">
<span id="selected">0 selected</span>
<label>move to <select id="target">{group_options(groups, current)}</select></label>
<button id="move" title="Move the selected images (M)">Move</button>
<input id="newname" placeholder="or a new class name" maxlength="80">
<button id="movenew">Move to new class</button>
<button id="junk" title="Mark the selected images as junk (J)">Junk</button>
<button id="duplicate" title="Mark the selected images as duplicates, left out like junk (D)">Duplicate</button>
<span class="help">click, shift-click or drag to select; A all, Esc none, M move, J junk, D duplicate, Ctrl+Z undo, &larr; &rarr; pages</span>
</div>"""
