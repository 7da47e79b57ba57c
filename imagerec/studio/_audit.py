"""The Audit and Search pages: the studio's side of ``imagerec.audit`` and ``imagerec.index``.

Both layers may be missing from an older imagerec; the pages then say so plainly. The audit runs
in a background thread on the current labels (a manifest written into the project), and each
finding is decided in the page: a decision is an ordinary action (one transaction, undoable).
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ..errors import ImagerecError
from ._db import DUPLICATE, JUNK, Project
from ._jobs import manifest_text
from ._pages import Raw, esc, table, thumb

SHOWN = 50  # findings shown per check


def available(layer: str) -> bool:
    """True when ``imagerec.<layer>`` exists in this installation."""
    return importlib.util.find_spec(f"imagerec.{layer}") is not None


class _Job:
    """One background job (audit run or index build) with a status line."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state = "idle"
        self.message = ""
        self.result = None

    def run(self, name: str, work) -> None:
        with self.lock:
            if self.state == "running":
                raise ImagerecError(f"the {name} is already running; wait for it (reload the page)")
            self.state, self.message = "running", f"{name} started {time.strftime('%H:%M:%S')}"

        def target():
            try:
                result = work()
                with self.lock:
                    self.state, self.result, self.message = "done", result, f"{name} finished {time.strftime('%H:%M:%S')}"
            except ImagerecError as e:
                with self.lock:
                    self.state, self.message = "failed", str(e)
            except Exception as e:  # a bug: one line in the page, the traceback on the console
                traceback.print_exc()
                with self.lock:
                    self.state, self.message = "failed", f"{type(e).__name__}: {e}"

        threading.Thread(target=target, daemon=True, name=f"studio-{name}").start()


def _job(state, name: str) -> _Job:
    if not hasattr(state, name):
        setattr(state, name, _Job())
    return getattr(state, name)


def summary(project: Project) -> str:
    """One line for the overview."""
    if not available("audit"):
        return "the audit is not available in this imagerec yet"
    decided = project.decided()
    return f"{len(decided)} finding(s) decided so far; open the page to run it" if decided else "not run yet"


# -- audit ----------------------------------------------------------------------------------------


def start(project: Project, state) -> None:
    """Run the audit on the images in use, with their current labels, in the background."""
    if not available("audit"):
        raise ImagerecError("the audit is not available in this imagerec yet (no imagerec.audit layer)")
    rows = project.labels()
    if len(rows) < 4:
        raise ImagerecError(f"{len(rows)} image(s) in use are too few to audit; the audit needs at least 4")
    folder = project.folder / "audit"
    folder.mkdir(exist_ok=True)
    manifest = folder / "input.csv"
    from .._io import write_text_atomic  # noqa: PLC0415

    write_text_atomic(manifest, manifest_text(rows))
    backbone = getattr(state, "embed_backbone", "auto")
    audit = importlib.import_module("imagerec.audit").audit

    def work():
        out = folder / f"run-{int(time.time() * 1000)}"
        return audit(str(manifest), out=out, backbone=backbone)

    _job(state, "audit").run("audit", work)


def decide(project: Project, body: dict) -> None:
    """Apply one decision on one finding: drop duplicates, accept a label, junk, or keep."""
    finding, decision = str(body.get("finding", "")), body.get("decision")
    ids = body.get("image_ids") or []
    if not finding or not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ImagerecError("a decision needs 'finding' (its id) and 'image_ids' (a list of image ids)")
    if decision == "drop":
        project.exclude(ids, DUPLICATE, finding=finding, decision="drop")
    elif decision == "junk":
        project.exclude(ids, JUNK, finding=finding, decision="junk")
    elif decision == "accept":
        project.relabel(ids, str(body.get("label", "")), finding=finding)
    elif decision == "keep":
        project.decide(finding, "keep")
    else:
        raise ImagerecError(f"decision {decision!r} must be one of 'drop', 'junk', 'accept', 'keep'")


def page(project: Project, state) -> str:
    if not available("audit"):
        return ('<p class="error">The audit is not available yet: this imagerec has no <code>imagerec.audit</code> layer. '
                "Duplicates, wrong labels and junk can still be handled by hand on the Groups pages.</p>")
    job = _job(state, "audit")
    head = (f'<div class="toolbar"><button id="auditrun">Run the audit on the current labels</button>'
            f'<span id="auditstate" data-state="{esc(job.state)}">{esc(job.state)}: {esc(job.message)}</span></div>')
    if job.result is None:
        return head + "<p>The audit looks for duplicate groups, likely wrong labels, outliers and bad-quality images.</p>"
    return head + findings_html(project, job.result)


def _frame(result, *names):
    for name in names:
        value = getattr(result, name, None)
        if value is None and isinstance(getattr(result, "frames", None), dict):
            value = result.frames.get(name)
        if value is not None:
            return value
    return None


def findings_html(project: Project, result) -> str:
    """Duplicate groups side by side, label issues with their suggestion, outliers and quality."""
    paths = list(getattr(result, "paths", []) or [])
    ids = project.ids_of_paths([str(Path(p).resolve()) for p in paths]) if paths else {}

    def image_id(index):
        return ids.get(str(Path(paths[int(index)]).resolve())) if 0 <= int(index) < len(paths) else None

    decided = project.decided()
    parts = []
    dups = _frame(result, "duplicates")
    if dups is not None and len(dups):
        rows = []
        for group, members in list(dups.groupby("group", sort=True))[:SHOWN]:
            key = f"duplicates:{group}"
            member_ids = [(image_id(r["index"]), bool(r["keep"])) for _, r in members.iterrows()]
            member_ids = [(i, k) for i, k in member_ids if i is not None]
            drop = [i for i, k in member_ids if not k]
            pics = "".join(thumb(i, "keep" if k else "drop", selectable=False) for i, k in member_ids)
            rows.append([Raw(f'<div class="strip">{pics}</div>'), Raw(_buttons(key, decided, [("drop", "Keep one, drop the rest", drop, "")]))])
        parts.append("<h2>Duplicate groups</h2>" + table(["images", "decision"], rows, "findings"))
    labels = _frame(result, "label_issues", "labels")
    if labels is not None and len(labels):
        issues = labels[labels["is_issue"]] if "is_issue" in labels else labels
        rows = []
        for _, r in issues.head(SHOWN).iterrows():
            i = image_id(r["index"])
            if i is None:
                continue
            key = f"label:{i}"
            rows.append([Raw(thumb(i, selectable=False)), r["given_label"], f'{r["suggested_label"]} ({r["confidence"]:.0%})',
                         Raw(_buttons(key, decided, [("accept", "Accept", [i], str(r["suggested_label"])), ("keep", "Keep", [i], "")]))])
        parts.append("<h2>Likely wrong labels</h2>" + table(["image", "label", "suggested", "decision"], rows, "findings"))
    for name, title in (("outliers", "Outliers"), ("quality", "Bad quality")):
        frame = _frame(result, name)
        if frame is None or not len(frame):
            continue
        if "is_outlier" in frame:
            frame = frame[frame["is_outlier"]]
        rows = []
        for _, r in frame.head(SHOWN).iterrows():
            i = image_id(r["index"])
            if i is None:
                continue
            key = f"{name}:{i}"
            what = r["issue"] if "issue" in frame else f'score {r["score"]:.2f}'
            rows.append([Raw(thumb(i, selectable=False)), what,
                         Raw(_buttons(key, decided, [("junk", "Junk", [i], ""), ("keep", "Keep", [i], "")]))])
        parts.append(f"<h2>{title}</h2>" + table(["image", "why", "decision"], rows, "findings"))
    return "".join(parts) or "<p>The audit found nothing to decide.</p>"


def _buttons(key: str, decided: dict, choices) -> str:
    if key in decided:
        return f'<span class="decided">{esc(decided[key])}</span>'
    out = []
    for decision, label, ids, value in choices:
        out.append(f'<button class="decide" data-finding="{esc(key)}" data-decision="{esc(decision)}" '
                   f'data-ids="{esc(",".join(map(str, ids)))}" data-label="{esc(value)}">{esc(label)}</button>')
    return "".join(out)


# -- search ---------------------------------------------------------------------------------------


def search(project: Project, state, upload) -> str:
    """Nearest neighbours of an uploaded image; the first call builds the index in the background."""
    if not available("index"):
        raise ImagerecError("search is not available yet: this imagerec has no imagerec.index layer")
    index_mod = importlib.import_module("imagerec.index")
    folder = project.folder / "index"
    job = _job(state, "index_job")
    if not (folder / "meta.json").is_file() and job.state != "done":
        if job.state != "running":
            rows = project.labels()
            paths = [p for p, _ in rows]
            from ..data import ImageSource  # noqa: PLC0415

            source = ImageSource(paths, None, None, str(project.folder))
            backbone = getattr(state, "embed_backbone", "auto")
            job.run("index build", lambda: index_mod.build_index(source, folder, backbone=backbone, progress=False))
        return f'<p id="indexstate">Building the search index of the collection ({esc(job.message)}); search again in a moment.</p>'
    if job.state == "failed":
        raise ImagerecError(f"the search index could not be built: {job.message}")
    name, img = upload
    with tempfile.TemporaryDirectory() as tmp:
        query = Path(tmp) / "query.png"
        img.save(query)
        found = index_mod.load_index(folder).search(str(query), top_k=12)
    ids = project.ids_of_paths([str(Path(p).resolve()) for p in found["path"]])
    pics = "".join(thumb(ids[str(Path(p).resolve())], f"{s:.2f}", selectable=False, href=None)
                   for p, s in zip(found["path"], found["score"]) if str(Path(p).resolve()) in ids)
    return f'<p>Nearest neighbours of <b>{esc(name)}</b> (cosine similarity):</p><div class="grid" id="results">{pics}</div>'
