"""The Audit and Search pages: the studio's side of ``imagerec.audit`` and ``imagerec.index``.

Both layers may be missing from an older imagerec; the pages then say so plainly. The audit runs
in a background thread on the current labels (a manifest written into the project), and each
finding is decided in the page: a decision is an ordinary action (one transaction, undoable).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import multiprocessing
import tempfile
import threading
import time
import traceback
from pathlib import Path

from .._io import write_text_atomic
from ..data import write_manifest
from ..errors import ImagerecError
from ._db import DUPLICATE, JUNK, Project
from ._setup import RUN_PREFIX, features_backbone
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
    saved = project.folder / "audit" / "findings.json"
    if not saved.is_file():
        return "not run yet"
    findings = json.loads(saved.read_text(encoding="utf-8"))
    total = sum(len(findings[k]) for k in ("duplicates", "labels", "outliers", "quality"))
    return (f'{len(findings["duplicates"])} duplicate group(s), {len(findings["labels"])} likely wrong label(s), '
            f'{len(findings["outliers"])} outlier(s), {len(findings["quality"])} quality issue(s); '
            f"{len(project.decided())} of {total} decided")


# -- audit ----------------------------------------------------------------------------------------


def start(project: Project, state) -> None:
    """Run the audit on the images in use, with their current labels, in the background.

    The findings are saved as ``audit/findings.json`` (image ids, not paths), so that they outlive
    a restart; the run folder ``audit/run`` keeps the embeddings for the next audit.
    """
    if not available("audit"):
        raise ImagerecError("the audit is not available in this imagerec yet (no imagerec.audit layer)")
    rows = project.labels()
    if len(rows) < 4:
        raise ImagerecError(f"{len(rows)} image(s) in use are too few to audit; the audit needs at least 4")
    folder = project.folder / "audit"
    manifest = folder / "input.csv"
    write_manifest(manifest, rows)  # trusted: it names the collection's own folders
    backbone, image_size = features_backbone(project, getattr(state, "embed_backbone", "auto"), getattr(state, "embed_image_size", None))
    _job(state, "audit").run("audit", lambda: _in_child(project.folder, backbone, image_size))


def _in_child(folder: Path, backbone, image_size) -> dict:
    """Run the audit in a fresh (spawned) process and read its findings back.

    Not in a thread of the server: cleanlab forks a process pool, and a fork taken while the
    server's other threads hold locks can hang for good (seen: the pool's join never returned).
    """
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_audit_child, args=(str(folder), backbone, image_size), name="studio-audit")
    child.start()
    child.join()
    error = folder / "audit" / "error.txt"
    if child.exitcode != 0:
        message = error.read_text(encoding="utf-8").strip() if error.is_file() else f"the audit process ended with status {child.exitcode}"
        raise ImagerecError(message)
    return json.loads((folder / "audit" / "findings.json").read_text(encoding="utf-8"))


def _audit_child(folder: str, backbone, image_size) -> None:
    """The audit process: audit ``audit/input.csv``, write ``audit/findings.json`` (or ``error.txt``)."""
    # a spawned child inherits "spawn" as its start method; cleanlab's pool needs "fork" (its workers
    # read globals set before the fork), as in a plain 'imagerec audit' process
    multiprocessing.set_start_method("fork", force=True)
    project = Project(folder)
    audit_dir = project.folder / "audit"
    (audit_dir / "error.txt").unlink(missing_ok=True)
    try:
        audit = importlib.import_module("imagerec.audit").audit
        result = audit(str(audit_dir / "input.csv"), out=audit_dir / "run", backbone=backbone, image_size=image_size, progress=False)
        write_text_atomic(audit_dir / "findings.json", json.dumps(_findings(project, result)))
    except ImagerecError as e:
        write_text_atomic(audit_dir / "error.txt", str(e))
        raise SystemExit(2) from None
    except Exception as e:
        traceback.print_exc()
        write_text_atomic(audit_dir / "error.txt", f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


def _findings(project: Project, result) -> dict:
    """The tables as lists of findings keyed by image id, most certain first, ``SHOWN`` per kind."""
    tables = result.tables
    paths = set()
    for t in tables.values():
        if "path" in t:
            paths.update(str(Path(p).resolve()) for p in t["path"])
    ids = project.ids_of_paths(sorted(paths))

    def id_of(path):
        return ids.get(str(Path(path).resolve()))

    out = {"duplicates": [], "labels": [], "outliers": [], "quality": [], "summary": {k: v for k, v in result.summary.items() if k == "counts"}}
    for check in ("exact_duplicates", "near_duplicates"):
        t = tables.get(check)
        if t is None or not len(t):
            continue
        for group, members in t.groupby("group", sort=True):
            found = [(id_of(r.path), bool(r.keep)) for r in members.itertuples() if id_of(r.path) is not None]
            if len(found) > 1 and len(out["duplicates"]) < SHOWN:
                out["duplicates"].append({"key": f"{check}:{min(i for i, _ in found)}", "check": check, "members": found})
    t = tables.get("label_issues")
    if t is not None and len(t):
        for r in t[t["is_issue"]].head(SHOWN).itertuples():
            if id_of(r.path) is not None:
                out["labels"].append({"key": f"label:{id_of(r.path)}", "id": id_of(r.path), "given": str(r.given_label),
                                      "suggested": str(r.suggested_label), "confidence": float(r.confidence)})
    t = tables.get("outliers")
    if t is not None and len(t):
        for r in t[t["is_outlier"]].head(SHOWN).itertuples():
            if id_of(r.path) is not None:
                out["outliers"].append({"key": f"outlier:{id_of(r.path)}", "id": id_of(r.path), "why": f"outlier score {r.score:.2f}"})
    t = tables.get("quality")
    if t is not None and len(t):
        for r in t.head(SHOWN).itertuples():
            if id_of(r.path) is not None:
                out["quality"].append({"key": f"quality:{id_of(r.path)}:{r.issue}", "id": id_of(r.path), "why": f"{r.issue} ({r.value:.3g})"})
    return out


def decide(project: Project, body: dict) -> None:
    """Apply one decision on one finding: drop duplicates, accept a label, junk, or keep."""
    finding, decision = body.get("finding"), body.get("decision")
    ids = body.get("image_ids") or []
    if not finding or not isinstance(finding, str) or not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ImagerecError(f"a decision needs 'finding' (its id as text) and 'image_ids' (a list of image ids), got {finding!r} "
                            f"and {ids!r}")
    if decision == "drop":
        project.exclude(ids, DUPLICATE, finding=finding, decision="drop")
    elif decision == "junk":
        project.exclude(ids, JUNK, finding=finding, decision="junk")
    elif decision == "accept":
        label = body.get("label", "")
        if not isinstance(label, str):
            raise ImagerecError(f"label must be text (the class to move the image to), got {label!r}")
        project.relabel(ids, label, finding=finding)
    elif decision == "keep":
        project.decide(finding, "keep")
    else:
        raise ImagerecError(f"decision {decision!r} must be one of 'drop', 'junk', 'accept', 'keep'")


def page(project: Project, state) -> str:
    if not available("audit"):
        return ('<p class="error">The audit is not available yet: this imagerec has no <code>imagerec.audit</code> layer. '
                "Duplicates, wrong labels and junk can still be handled by hand on the Groups pages.</p>")
    job = _job(state, "audit")
    saved = project.folder / "audit" / "findings.json"
    label = {"idle": "not run in this session" if not saved.is_file() else "findings of the last audit", "running": "running",
             "done": "done", "failed": "failed"}[job.state]
    head = (f'<div class="toolbar"><button id="auditrun">Run the audit on the current labels</button>'
            f'<span id="auditstate" data-state="{esc(job.state)}">{esc(label)}{": " + esc(job.message) if job.message else ""}</span></div>')
    if job.state == "running" or not saved.is_file():
        return head + ("<p>The audit looks for duplicate groups, likely wrong labels (given the current groups), "
                       "outliers and bad-quality images. It embeds every image once; later audits reuse that.</p>")
    return head + findings_html(project, json.loads(saved.read_text(encoding="utf-8")))


def findings_html(project: Project, findings: dict) -> str:
    """Duplicate groups side by side, label issues with their suggestion, outliers and quality."""
    decided = project.decided()
    parts = []
    rows = []
    for f in findings["duplicates"]:
        drop = [i for i, keep in f["members"] if not keep]
        pics = "".join(thumb(i, "keep" if keep else "drop", selectable=False) for i, keep in f["members"])
        rows.append([Raw(f'<div class="strip">{pics}</div>'), f["check"].replace("_", " "),
                     Raw(_buttons(f["key"], decided, [("drop", "Keep one, drop the rest", drop, ""), ("keep", "Keep all", drop, "")]))])
    if rows:
        parts.append("<h2>Duplicate groups</h2>" + table(["images", "kind", "decision"], rows, "findings"))
    rows = [[Raw(thumb(f["id"], selectable=False)), f["given"], f'{f["suggested"]} ({f["confidence"]:.0%})',
             Raw(_buttons(f["key"], decided, [("accept", "Accept", [f["id"]], f["suggested"]), ("keep", "Keep", [f["id"]], "")]))]
            for f in findings["labels"]]
    if rows:
        parts.append("<h2>Likely wrong labels</h2>" + table(["image", "group", "suggested", "decision"], rows, "findings"))
    for kind, title in (("outliers", "Outliers"), ("quality", "Bad quality")):
        rows = [[Raw(thumb(f["id"], selectable=False)), f["why"],
                 Raw(_buttons(f["key"], decided, [("junk", "Junk", [f["id"]], ""), ("keep", "Keep", [f["id"]], "")]))]
                for f in findings[kind]]
        if rows:
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
    backbone, size = features_backbone(project, getattr(state, "embed_backbone", "auto"), getattr(state, "embed_image_size", None))
    trained = backbone.startswith(RUN_PREFIX)
    folder = project.folder / "index" / (f"run-{Path(backbone[len(RUN_PREFIX):]).name}" if trained else "generic")  # a new model: a new index
    job = _job(state, "index_job")
    if not (folder / "meta.json").is_file():
        if job.state == "failed":
            raise ImagerecError(f"the search index could not be built: {job.message}")
        if job.state != "running":
            rows = project.labels()
            paths = [p for p, _ in rows]
            from ..data import ImageSource  # noqa: PLC0415

            source = ImageSource(paths, None, None, str(project.folder))
            job.run("index build", lambda: index_mod.build_index(source, folder, backbone=backbone, image_size=size, progress=False))
        return f'<p id="indexstate">Building the search index of the collection ({esc(job.message)}); search again in a moment.</p>'
    name, img = upload
    with tempfile.TemporaryDirectory() as tmp:
        query = Path(tmp) / "query.png"
        img.save(query)
        found = index_mod.load_index(folder).search(str(query), top_k=12)
    ids = project.ids_of_paths([str(Path(p).resolve()) for p in found["path"]])
    pics = "".join(thumb(ids[str(Path(p).resolve())], f"{s:.2f}", selectable=False, href=None)
                   for p, s in zip(found["path"], found["score"]) if str(Path(p).resolve()) in ids)
    return f'<p>Nearest neighbours of <b>{esc(name)}</b> (cosine similarity):</p><div class="grid" id="results">{pics}</div>'
