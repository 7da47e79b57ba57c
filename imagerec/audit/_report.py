"""The audit's run folder: tables, contact sheets and a self-contained ``report.html``."""

from __future__ import annotations

import html
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import atomic_path, write_text_atomic
from PIL import Image, ImageDraw

from ..clustering._report import _CSS, ImageReader, _data_uri, _font, contact_sheet, csv_text

SHOWN = 24  # findings (or duplicate groups) per check in report.html and on each contact sheet
_TITLES = {
    "exact_duplicates": "Exact duplicates (identical decoded pixels)",
    "near_duplicates": "Near-duplicates (re-encoded, resized, cropped, flipped, recoloured copies)",
    "leakage": "Leakage: test or val images with a copy in train",
    "outliers": "Outliers: far from every other image",
    "label_issues": "Label issues: the given label is probably wrong",
    "quality": "Image quality",
    "unreadable": "Unreadable files",
}
_EXTRA_CSS = """
.group{display:flex;gap:4px;align-items:flex-start;margin:.3em 0;padding:.3em;border:1px solid #ddd;background:white}
.group figure{margin:0;font-size:.7em;width:96px;overflow:hidden}.keep img{outline:3px solid #2a2}
figure{display:inline-block;margin:0 4px 4px 0;font-size:.7em;width:96px;overflow:hidden;vertical-align:top}
figure img{width:96px;height:96px;object-fit:cover}table{border-collapse:collapse;font-size:.8em}td,th{padding:2px 6px;border:1px solid #ddd}
"""


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_manifest(path: Path, rows: list[tuple[str, str | None]], labelled: bool) -> None:
    """A ``path,label`` CSV (``path`` only when unlabelled) with absolute paths, atomically."""
    header = ["path", "label"] if labelled else ["path"]
    body = [[os.path.abspath(p), label] if labelled else [os.path.abspath(p)] for p, label in rows]
    write_text_atomic(path, csv_text(header, body))


def write_run(result, source) -> None:
    """Tables (CSV, and Parquet where pyarrow is installed), contact sheets and ``report.html``."""
    run = result.run_dir
    parquet = importlib.util.find_spec("pyarrow") is not None
    for name, table in {"images": result.images, **result.tables}.items():
        write_text_atomic(run / f"{name}.csv", table.to_csv(index=False))
        if parquet:
            with atomic_path(run / f"{name}.parquet", suffix=".parquet") as tmp:
                table.to_parquet(tmp, index=False)
    reader = ImageReader(result.images["path"].tolist(), source)
    sections = [_section(name, table, result, reader) for name, table in result.tables.items()]
    _write_html(run / "report.html", result.summary, sections)


def _section(name: str, table: pd.DataFrame, result, reader: ImageReader) -> str:
    """One check's HTML (and its contact sheet): the most certain findings first."""
    sheet = result.run_dir / "sheets" / f"{name}.png"
    title = _TITLES.get(name, name)
    if name in ("exact_duplicates", "near_duplicates"):
        count = f"{table['group'].nunique() if len(table) else 0} groups, {len(table)} images"
        body, _ = _groups_html(table, reader)
        if len(table):
            _group_sheet(reader, table, f"{name}: {count} (one group a row, the kept image first)", sheet)
        shown = []
    elif name == "leakage":
        count = f"{len(table)} test/val images with a copy in train"
        body, shown = _pairs_html(table, reader)
    elif name == "unreadable":
        count = f"{len(table)} files"
        rows = "".join(f"<tr><td>{html.escape(str(p))}</td><td>{html.escape(str(r))}</td></tr>" for p, r in table.head(200).itertuples(index=False))
        body, shown = (f"<table><tr><th>path</th><th>reason</th></tr>{rows}</table>" if len(table) else ""), []
    else:
        flagged = _flagged(name, table)
        count = f"{len(flagged)} images"
        shown = flagged.head(SHOWN)
        body = "".join(_figure(reader, int(r["index"]), _caption(name, r)) for _, r in shown.iterrows())
        shown = shown["index"].astype(int).tolist()
    if len(shown):
        columns = 8 if name == "leakage" else 5  # leaks: four (test, train) pairs a row
        contact_sheet(reader, shown[: 2 * SHOWN if name == "leakage" else SHOWN], f"{name}: {count} (most certain first)", sheet, columns)
    none = "<p class='summary'>Nothing found.</p>" if not body else ""
    return f"<section id='{name}'><h2>{html.escape(title)} <small>{html.escape(count)}</small></h2>{none}{body}</section>"


def _flagged(name: str, table: pd.DataFrame) -> pd.DataFrame:
    if name == "outliers":
        return table[table["is_outlier"]]
    if name == "label_issues":
        return table[table["is_issue"]]
    return table


def _caption(name: str, r) -> str:
    if name == "leakage":
        return f"{r['path']}\n{r['split']} copy of {r['train_path']}\nsimilarity {r['similarity']:.3f}"
    if name == "outliers":
        return f"{r['path']}\nscore {r['score']:.3f}"
    if name == "label_issues":
        return f"{r['path']}\ngiven {r['given_label']}, suggested {r['suggested_label']} ({r['confidence']:.2f})"
    if name == "quality":
        return f"{r['path']}\n{r['issue']}: {r['value']:.3g} (threshold {r['threshold']:.3g})"
    return str(r.get("path", ""))


def _groups_html(table: pd.DataFrame, reader: ImageReader) -> tuple[str, list[int]]:
    """Each group on one line, the kept member first (outlined)."""
    parts, shown = [], []
    for gid, members in list(table.groupby("group", sort=True))[:SHOWN]:
        figures = "".join(
            _figure(reader, int(m["index"]), f"{m['path']}\n{'keep' if m['keep'] else 'remove'}; similarity {m['similarity']:.3f}",
                    "keep" if m["keep"] else "")
            for _, m in members.head(8).iterrows()
        )  # fmt: skip
        more = f"<small>+{len(members) - 8} more</small>" if len(members) > 8 else ""
        parts.append(f"<div class='group'><b>#{gid}</b>{figures}{more}</div>")
        shown += members["index"].astype(int).tolist()[:5]
    return "".join(parts), shown


def _group_sheet(reader: ImageReader, table: pd.DataFrame, title: str, path: Path, width: int = 6) -> None:
    """A PNG with one duplicate group per row (the kept member first), the largest groups first."""
    size, gap, top = reader.size, 4, 26
    groups = list(table.groupby("group", sort=True))[:SHOWN]
    sheet = Image.new("RGB", (max(width * (size + gap) + gap, 320), top + len(groups) * (size + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 5), title, fill="black", font=_font(14))
    for row, (_, members) in enumerate(groups):
        for col, i in enumerate(members["index"].astype(int).tolist()[:width]):
            x, y = gap + col * (size + gap), top + row * (size + gap)
            thumb = reader.thumbnail(i)
            if thumb is None:
                draw.rectangle([x, y, x + size - 1, y + size - 1], fill=(225, 225, 225))
            else:
                sheet.paste(thumb, (x, y))
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")


def _pairs_html(table: pd.DataFrame, reader: ImageReader) -> tuple[str, list[int]]:
    """Each leak as a pair: the test/val image, then its training copy."""
    parts, shown = [], []
    for _, r in table.head(2 * SHOWN).iterrows():
        test = _figure(reader, int(r["index"]), f"{r['path']}\n{r['split']}; similarity {r['similarity']:.3f}")
        train = _figure(reader, int(r["train_index"]), f"{r['train_path']}\ntrain", "keep")
        parts.append(f"<div class='group'>{test}{train}</div>")
        shown += [int(r["index"]), int(r["train_index"])]
    return "".join(parts), shown


def _figure(reader: ImageReader, i: int, caption: str, css: str = "") -> str:
    thumb = reader.thumbnail(i)
    label = html.escape(caption.split("\n", 1)[-1] if "\n" in caption else "")
    tip = html.escape(caption, quote=True)
    image = f"<img alt='' title='{tip}' src='{_data_uri(thumb)}'>" if thumb is not None else "<span class='blank'></span>"
    return f"<figure class='{css}'>{image}<figcaption>{label}</figcaption></figure>"


def _write_html(path: Path, summary: dict, sections: list[str]) -> None:
    counts = summary["counts"]
    lines = [f"{summary['n_images']:,} images", f"{summary['n_unreadable']} unreadable"]
    lines += [f"{name}: {', '.join(f'{k} {v}' for k, v in c.items())}" for name, c in counts.items() if name != "unreadable"]
    not_run = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in summary["not_run"].items())
    thresholds = ", ".join(f"{k} {v}" for k, v in summary["thresholds"].items())
    nav = "".join(f"<a href='#{name}'>{name}</a>" for name in counts)
    page = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>imagerec audit</title>",
        f"<style>{_CSS}{_EXTRA_CSS}</style></head><body><h1>imagerec audit</h1>",
        f"<p class='summary'>{html.escape(' | '.join(lines))}</p>",
        f"<p class='summary'>thresholds: {html.escape(thresholds)}; features: {html.escape(str(summary['features']))}</p>",
        f"<p class='summary'>Checks not run:</p><ul>{not_run}</ul>" if not_run else "",
        f"<nav>{nav}</nav>",
        *sections,
        "</body></html>\n",
    ]
    write_text_atomic(path, "".join(page))
