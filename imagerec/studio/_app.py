"""The studio's web app: FastAPI routes over a :class:`~imagerec.studio._db.Project`.

Safety, in one place (:func:`_guard`): every request must name this machine in ``Host``
(127.0.0.1, localhost or [::1], with a port or none, which stops DNS rebinding); every POST must
come with the project's secret twice, in a SameSite=Strict cookie and in an ``X-CSRF-Token``
header or a ``csrf`` query parameter (the upload forms put it in their action URL), and with an
``Origin`` (when the browser sends one) equal to the page's.
Images are served by database id only; no URL carries a file path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import re
import shutil
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from ..data import manifest_csv, write_manifest
from ..errors import ImagerecError
from . import _audit, _review
from ._db import DUPLICATE, EXCLUSIONS, JUNK, Project
from ._jobs import BACKBONES, Trainer
from ._pages import Raw, esc, layout, pager, selection_toolbar, table, thumb, url_arg, when
from ._setup import import_data
from ._thumbs import small_jpeg, thumbnail

PAGE_SIZE = 200
LOCAL_HOST = re.compile(r"(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?")
MAX_UPLOAD = 20 * 1024 * 1024


def create_app(project_dir: str | os.PathLike, data: str | os.PathLike | None = None, *, k: int | str | None = None,
               backbone: str = "auto", image_size: int | None = None, progress: bool = True) -> FastAPI:
    """The studio app for a project folder, filled from ``data`` on first use.

    Args:
        project_dir: the project folder (``studio.sqlite``, thumbnails, runs, exports).
        data: the photos (folder, class folders, split root or CSV manifest); needed the first time.
        k: clusters for unlabelled photos (a number or ``"auto"``).
        backbone: the backbone that embeds unlabelled photos for clustering.
        image_size: input side of that embedding.
        progress: console progress bars while clustering.

    Returns:
        A FastAPI app; serve it with uvicorn on 127.0.0.1.

    Raises:
        ImagerecError: a new project without ``data``, or data that cannot be read.
    """
    project = Project(project_dir)
    project.recover()
    if not project.imported:
        if data is None:
            raise ImagerecError(f"{project_dir}: is a new project; give the photos to start it with (imagerec studio DATA)")
        import_data(project, os.fspath(data), k=k, backbone=backbone, image_size=image_size, progress=progress)
    app = FastAPI(title="imagerec studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.project = project
    app.state.trainer = Trainer(project)
    app.state.embed_backbone, app.state.embed_image_size = backbone, image_size  # audit and search embed alike
    app.state.reviewer = _review.Reviewer(project, backbone, image_size)
    app.state.cookie = "imagerec_studio_" + hashlib.sha256(project.secret.encode()).hexdigest()[:10]
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.middleware("http")(_guard)
    app.add_exception_handler(ImagerecError, _user_error)
    _routes(app, project)
    return app


async def _guard(request: Request, call_next):
    """Refuse foreign hosts, and POSTs without the CSRF secret or from another origin."""
    host = request.headers.get("host", "")
    if not LOCAL_HOST.fullmatch(host):
        return JSONResponse({"error": f"Host {host!r} refused: the studio answers on 127.0.0.1 or localhost only "
                                      "(a port or none, nothing else)"}, 403)
    if request.method not in ("GET", "HEAD"):
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{host}":
            return JSONResponse({"error": f"Origin {origin!r} refused: requests must come from the studio's own pages"}, 403)
        project: Project = request.app.state.project
        cookie = request.cookies.get(request.app.state.cookie)
        token = request.headers.get("x-csrf-token") or request.query_params.get("csrf")
        if cookie != project.secret or token != project.secret:
            return JSONResponse({"error": "missing or wrong CSRF token: reload the studio page and try again"}, 403)
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")  # "no-referrer" makes form POSTs send Origin: null
    return response


def _user_error(request: Request, exc: ImagerecError):
    """A GET of something that is not there: 404; a bad request: 400. A page for a browser's own
    navigation (form uploads too), JSON for the script's requests."""
    status = 404 if request.method == "GET" else 400
    if "text/html" in request.headers.get("accept", "") and not request.scope["path"].startswith("/api/"):
        body = f'<p class="error">{esc(exc)}</p><p><a href="/">back to the overview</a></p>'
        return HTMLResponse(layout("Not found" if status == 404 else "Cannot do that", body, ""), status)
    return JSONResponse({"error": str(exc)}, status)


def _page(request: Request, title: str, body: str, active: str) -> HTMLResponse:
    """An HTML page that also (re)sets the CSRF cookie."""
    app = request.app
    response = HTMLResponse(layout(title, body, app.state.project.secret, active))
    response.set_cookie(app.state.cookie, app.state.project.secret, httponly=True, samesite="strict", path="/")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"
    return response


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except RecursionError:
        raise ImagerecError("the request body is JSON nested too deep to read; the studio's pages send a flat object") from None
    except ValueError:
        raise ImagerecError("the request body is not JSON; the studio's pages send JSON") from None
    if not isinstance(body, dict):
        raise ImagerecError("the request body must be a JSON object")
    _check_unicode(body)
    return body


def _check_unicode(value) -> None:
    """Refuse text that no database or page can hold: JSON's \\ud800-style escapes can spell lone
    surrogates, which are not Unicode characters (SQLite and UTF-8 refuse them)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ImagerecError(f"the request body holds text that is not valid Unicode (a lone surrogate, {v[e.start]!r}); "
                                    "send UTF-8 text") from None
        elif isinstance(v, dict):
            todo.extend(v)
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no id


def _ids(body: dict, key: str = "image_ids") -> list[int]:
    value = body.get(key)
    if not isinstance(value, list) or not all(_whole(v) for v in value):
        raise ImagerecError(f"{key} must be a list of image ids (whole numbers), got {value!r}")
    return value


def _int(body: dict, key: str) -> int:
    value = body.get(key)
    if not _whole(value):
        raise ImagerecError(f"{key} must be a whole number, got {value!r}")
    return value


def _text(body: dict, key: str, default: str = "") -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ImagerecError(f"{key} must be text, got {value!r}")
    return value


def _routes(app: FastAPI, project: Project) -> None:  # noqa: C901 - one flat list of routes reads best
    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request):
        c = project.counts()
        groups = project.groups()
        runs = project.runs()
        audit = _audit.summary(project)
        steps = []
        if c["clusters"]:
            steps.append(f'Name the {c["clusters"]} unnamed cluster(s) on the <a href="/groups">Groups</a> page (naming one makes it a class).')
        steps.append(f'Check what the <a href="/audit">Audit</a> found: {esc(audit)}.')
        steps.append('Train a model on the current labels on the <a href="/train">Train</a> page.' if not runs else
                     f'Latest model: run {runs[0]["id"]} ({esc(runs[0]["status"])}), see <a href="/train/{runs[0]["id"]}">its evaluation</a>.')
        steps.append('Export the labels as a CSV manifest on the <a href="/export">Export</a> page.')
        body = (
            f'<p class="how">{esc(project.meta("how"))}</p>'
            + table(["images", "in use", "junk", "duplicates", "classes", "unnamed clusters", "actions"],
                    [[f'{c["images"]:,}', f'{c["in_use"]:,}', Raw(f'<a href="/excluded/junk">{c[JUNK]:,}</a>'),
                      Raw(f'<a href="/excluded/duplicate">{c[DUPLICATE]:,}</a>'), c["classes"], c["clusters"], c["actions"]]], "figures")
            + "<h2>What to do next</h2><ol>" + "".join(f"<li>{s}</li>" for s in steps) + "</ol>"
            + "<h2>Groups</h2>" + table(["group", "kind", "images"], [[Raw(f'<a href="/groups/{g.id}">{esc(g.name)}</a>'), g.kind, g.count] for g in groups])
        )
        return _page(request, "Overview", body, "/")

    @app.get("/groups", response_class=HTMLResponse)
    def groups_page(request: Request):
        groups = project.groups()
        typical = project.typical(8)
        cards = []
        for g in groups:
            thumbs = "".join(thumb(i, selectable=False, href=f"/groups/{g.id}") for i in typical.get(g.id, []))
            cards.append(f"""<section class="group" data-group="{g.id}">
<h2><a href="/groups/{g.id}">{esc(g.name)}</a> <small>{esc(g.kind)}, {g.count:,} images</small></h2>
<form class="rename" data-group="{g.id}"><input name="name" value="{esc(g.name)}" maxlength="80" aria-label="name of {esc(g.name)}">
<button>Rename</button></form>
<label class="mergebox"><input type="checkbox" class="merge" value="{g.id}"> merge</label>
<div class="strip">{thumbs}</div></section>""")
        options = "".join(f'<option value="{g.id}">{esc(g.name)}</option>' for g in groups)
        body = (f'<p>Each group shows its most typical images. Rename a group to make it a class; tick groups and merge them into one.</p>'
                f'<div class="toolbar"><label>merge ticked into <select id="mergetarget">{options}</select></label>'
                f'<button id="mergebtn">Merge</button></div>' + "".join(cards))
        return _page(request, "Groups", body, "/groups")

    @app.get("/groups/{group_id}", response_class=HTMLResponse)
    def group_page(request: Request, group_id: int, page: int = 1):
        g = project.group(group_id)
        pages = max(1, math.ceil(g.count / PAGE_SIZE))
        page = min(max(page, 1), pages)
        rows = project.images_of(g.id, (page - 1) * PAGE_SIZE, PAGE_SIZE)
        grid = "".join(thumb(r["id"]) for r in rows)
        body = (f'<p>{g.count:,} images, the most typical first. <a href="/groups">all groups</a></p>'
                + selection_toolbar(project.groups(), g.id) + pager(f"/groups/{g.id}", page, pages)
                + f'<div class="grid" id="grid">{grid}</div>' + pager(f"/groups/{g.id}", page, pages))
        return _page(request, f"{g.name}", body, "/groups")

    @app.get("/excluded/{reason}", response_class=HTMLResponse)
    def excluded_page(request: Request, reason: str, page: int = 1):
        if reason not in EXCLUSIONS:
            raise ImagerecError(f"{reason!r} is not one of {EXCLUSIONS}")
        total = project.counts()[reason]
        pages = max(1, math.ceil(total / PAGE_SIZE))
        page = min(max(page, 1), pages)
        grid = "".join(thumb(r["id"]) for r in project.images_of(None, (page - 1) * PAGE_SIZE, PAGE_SIZE, excluded=reason))
        body = (f'<p>{total:,} image(s) marked {esc(reason)}: left out of the manifest and of training.</p>'
                f'<div class="toolbar"><span id="selected">0 selected</span> <button id="restore">Put back into use</button></div>'
                + pager(f"/excluded/{reason}", page, pages) + f'<div class="grid" id="grid">{grid}</div>')
        return _page(request, f"Marked {reason}", body, "/")

    @app.get("/history", response_class=HTMLResponse)
    def history_page(request: Request):
        rows = [[a["id"], when(a["at"]), a["kind"], a["summary"], "undone " + when(a["undone_at"]) if a["undone_at"] else ""]
                for a in project.history(200)]
        body = "<p>Every action, newest first. Undo takes back the newest one not yet undone.</p>" + table(["#", "time", "kind", "what", ""], rows)
        return _page(request, "History", body, "/history")

    # -- images, by database id only ---------------------------------------------------------------

    @app.get("/thumb/{image_id}")
    def thumb_file(image_id: int):
        row = project.image(image_id)
        if row is None:
            return PlainTextResponse("no such image", 404)
        path = thumbnail(project.folder, image_id, row["path"])
        if path is None:
            return PlainTextResponse("unreadable image", 404)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/img/{image_id}")
    def image_file(image_id: int):
        row = project.image(image_id)
        if row is None or not os.path.isfile(row["path"]):
            return PlainTextResponse("no such image", 404)
        return FileResponse(row["path"])

    # -- actions: POST, JSON in and out ------------------------------------------------------------

    @app.post("/api/rename")
    async def rename(request: Request):
        body = await _json(request)
        project.rename(_int(body, "group_id"), _text(body, "name"))
        return {"ok": True, "name": project.group(_int(body, "group_id")).name}

    @app.post("/api/move")
    async def move(request: Request):
        body = await _json(request)
        ids = _ids(body)
        if body.get("new_name"):
            target = project.move_to_new(ids, _text(body, "new_name"))
        else:
            target = _int(body, "group_id")
            project.move(ids, target)
        return {"ok": True, "group_id": target}

    @app.post("/api/exclude")
    async def exclude(request: Request):
        body = await _json(request)
        reason = body.get("reason", JUNK)
        project.exclude(_ids(body), reason)
        return {"ok": True}

    @app.post("/api/restore")
    async def restore(request: Request):
        project.restore(_ids(await _json(request)))
        return {"ok": True}

    @app.post("/api/merge")
    async def merge(request: Request):
        body = await _json(request)
        project.merge(_ids(body, "sources"), _int(body, "target"))
        return {"ok": True}

    @app.post("/api/undo")
    def undo():
        summary = project.undo()
        return {"ok": True, "undone": summary}

    # -- export ------------------------------------------------------------------------------------

    @app.get("/export", response_class=HTMLResponse)
    def export_page(request: Request):
        rows = project.labels()
        counts: dict[str, int] = {}
        for _, label in rows:
            counts[label] = counts.get(label, 0) + 1
        body = (f'<p>{len(rows):,} images in use in {len(counts)} groups (junk and duplicates are left out).</p>'
                + table(["label", "images"], sorted(counts.items()))
                + '<div class="toolbar"><a class="button" id="download" href="/export/labels.csv">Download labels.csv</a>'
                  '<button class="export" data-kind="manifest">Write manifest into the project</button>'
                  '<button class="export" data-kind="copy">Copy into class folders</button>'
                  '<button class="export" data-kind="link">Link into class folders</button></div>'
                  f'<p>Files go to <code>{esc(project.folder / "export")}</code>. Train on the manifest with '
                  f'<code>imagerec train {esc(project.folder / "export" / "labels.csv")} --out RUN</code>.</p>')
        return _page(request, "Export", body, "/export")

    @app.get("/export/labels.csv")
    def labels_csv():
        return Response(manifest_csv(project.labels()), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="labels.csv"'})

    @app.post("/api/export")
    async def export(request: Request):
        kind = (await _json(request)).get("kind")
        return _export(project, kind)

    # -- train and evaluate ------------------------------------------------------------------------

    @app.get("/train", response_class=HTMLResponse)
    def train_page(request: Request):
        options = "".join(f"<option>{esc(b)}</option>" for b in BACKBONES)
        runs = [[Raw(f'<a href="/train/{r["id"]}">run {r["id"]}</a>'), when(r["started_at"]), r["status"], r["backbone"],
                 f'{r["budget_min"]:g} min', f'{r["images"]:,}', "" if r["accuracy"] is None else f'{r["accuracy"]:.1%}', r["message"] or ""]
                for r in project.runs()]
        body = (f'<form id="trainform" class="toolbar"><label>time budget (minutes) <input name="budget" type="number" step="any" min="0.05" value="5"></label>'
                f'<label>backbone <select name="backbone">{options}</select></label><button>Train on the current labels</button></form>'
                '<p>80% of each group trains (10% of that validates), 20% is held out for the evaluation.</p>'
                '<div id="trainstatus"></div><progress id="trainprogress" max="1" value="0" hidden></progress>'
                + table(["run", "started", "status", "backbone", "budget", "images", "test accuracy", "message"], runs))
        return _page(request, "Train and evaluate", body, "/train")

    @app.post("/api/train")
    async def train(request: Request):
        body = await _json(request)
        try:
            budget = float(body.get("budget"))
        except (TypeError, ValueError, OverflowError):
            raise ImagerecError(f"budget {body.get('budget')!r} must be a number of minutes, e.g. 5") from None
        run_id = app.state.trainer.start(budget, str(body.get("backbone", "efficientnet_lite0")))
        return {"ok": True, "run_id": run_id}

    @app.get("/api/train/status")
    def train_status():
        return app.state.trainer.status()

    @app.get("/train/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: int):
        return _page(request, f"Run {run_id}", _run_body(project, run_id), "/train")

    @app.get("/train/{run_id}/cell", response_class=HTMLResponse)
    def cell_page(request: Request, run_id: int, true: str, predicted: str):
        project.run(run_id)
        rows = project.cell(run_id, true, predicted)
        grid = "".join(thumb(r["image_id"], f'{r["confidence"]:.0%}') for r in rows)
        body = (f'<p>Held-out images of class <b>{esc(true)}</b> predicted as <b>{esc(predicted)}</b> ({len(rows)}).'
                f' <a href="/train/{run_id}">back to the evaluation</a></p>' + selection_toolbar(project.groups(), None)
                + f'<div class="grid" id="grid">{grid}</div>')
        return _page(request, f"Run {run_id}: {true} as {predicted}", body, "/train")

    # -- predict -----------------------------------------------------------------------------------

    @app.get("/predict", response_class=HTMLResponse)
    def predict_page(request: Request):
        return _page(request, "Predict", _upload_form("/predict", "Predict", project.secret), "/predict")

    @app.post("/predict", response_class=HTMLResponse)
    async def predict(request: Request):
        images = await _uploads(request)
        run = next((r for r in project.runs() if r["status"] == "done"), None)
        if run is None:
            raise ImagerecError("no trained model yet; train one on the Train page first")
        from ..classifier import Classifier  # noqa: PLC0415 - torch only when predicting

        clf = Classifier.load(Path(run["run_dir"]) / "model")
        proba = clf.predict_proba([img for _, img in images])
        rows = []
        for (name, img), p in zip(images, proba):
            top = sorted(range(len(p)), key=lambda i: -p[i])[:3]
            rows.append([Raw(_data_img(img)), name, ", ".join(f"{clf.classes_[i]} {p[i]:.0%}" for i in top)])
        body = (f'<p>Model: run {run["id"]} ({run["accuracy"]:.1%} on held-out images).</p>'
                + table(["image", "file", "classes (top 3)"], rows, "predictions") + _upload_form("/predict", "Predict", project.secret))
        return _page(request, "Predict", body, "/predict")

    # -- audit and search (from the audit and index layers, where present) -------------------------

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request):
        return _page(request, "Audit", _audit.page(project, app.state), "/audit")

    @app.post("/api/audit/run")
    def audit_run():
        _audit.start(project, app.state)
        return {"ok": True}

    @app.post("/api/audit/decide")
    async def audit_decide(request: Request):
        body = await _json(request)
        _audit.decide(project, body)
        return {"ok": True}

    # -- review: suggestions from every decision -----------------------------------------------------

    @app.get("/review", response_class=HTMLResponse)
    def review_page(request: Request, order: str = "most", group: int | None = None):
        return _page(request, "Review", _review.body(app.state.reviewer, order, group), "/review")

    @app.get("/review/next", response_class=HTMLResponse)
    def review_next(request: Request):
        return _page(request, "Review: label next", _review.body(app.state.reviewer, "most", None, queue=True), "/review")

    @app.post("/api/review/start")
    def review_start():
        app.state.reviewer.start()
        return {"ok": True, "ready": app.state.reviewer.ready}

    @app.post("/api/review/accept")
    async def review_accept(request: Request):
        body = await _json(request)
        ids = _ids(body)
        groups = body.get("group_ids")
        if not isinstance(groups, list) or not all(g is None or _whole(g) for g in groups):
            raise ImagerecError(f"group_ids must be a list of group ids (whole numbers, or null for the new class), got {groups!r}")
        new_name = _text(body, "new_name") if body.get("new_name") is not None else None
        project.confirm(ids, groups, new_name)
        return {"ok": True, "reviewed": len(ids)}

    @app.get("/api/review/suggestions")
    def review_suggestions():
        reviewer = app.state.reviewer
        if not reviewer.ready:
            return {"ready": False, "state": reviewer.job.state, "message": reviewer.job.message}
        s, state = reviewer.current()
        names = _review.suggested_names(s)
        return {"ready": True, "images": [{"id": int(i), "suggested": str(n), "confidence": round(float(c), 4), "decided": bool(d)}
                                          for i, n, c, d in zip(state.ids, names, s.suggester.confidence_, state.decided)]}

    @app.get("/search", response_class=HTMLResponse)
    def search_page(request: Request):
        return _page(request, "Search", _search_intro() + _upload_form("/search", "Search", project.secret, multiple=False), "/search")

    @app.post("/search", response_class=HTMLResponse)
    async def search(request: Request):
        images = await _uploads(request)
        body = _audit.search(project, app.state, images[0]) + _upload_form("/search", "Search", project.secret, multiple=False)
        return _page(request, "Search", body, "/search")


def _search_intro() -> str:
    if importlib.util.find_spec("imagerec.index") is None:
        return '<p class="error">Search is not available yet: this imagerec has no <code>imagerec.index</code> layer.</p>'
    return "<p>Choose or drop an image: its nearest neighbours in the collection. The first search builds the index (once).</p>"


def _upload_form(action: str, label: str, token: str, multiple: bool = True) -> str:
    many = " multiple" if multiple else ""
    return (f'<form class="upload" method="post" action="{action}?csrf={esc(url_arg(token))}" enctype="multipart/form-data">'
            f'<input type="file" name="files" accept="image/*"{many} required><button>{esc(label)}</button></form>')


async def _uploads(request: Request) -> list[tuple[str, Image.Image]]:
    """The uploaded images, decoded; an unreadable one is an error naming it."""
    form = await request.form()
    files = [f for f in form.getlist("files") if hasattr(f, "read")]
    if not files:
        raise ImagerecError("no image uploaded; choose one or more image files")
    out = []
    for f in files:
        data = await f.read()
        if len(data) > MAX_UPLOAD:
            raise ImagerecError(f"{f.filename}: {len(data) / 1e6:.1f} MB is over the {MAX_UPLOAD / 1e6:.0f} MB limit; upload a smaller image")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:  # noqa: BLE001 - Pillow raises many kinds for a bad file
            raise ImagerecError(f"{f.filename}: is not an image Pillow can read; upload a JPEG or PNG") from None
        out.append((f.filename or "upload", img.convert("RGB")))
    return out


def _data_img(img: Image.Image) -> str:
    import base64  # noqa: PLC0415

    return f'<img class="upload-thumb" src="data:image/jpeg;base64,{base64.b64encode(small_jpeg(img)).decode()}" alt="uploaded image">'


def _export(project: Project, kind) -> dict:
    """Write the manifest, or copy / link the images into ``export/classes/<label>/``."""
    if kind not in ("manifest", "copy", "link"):
        raise ImagerecError(f"export kind {kind!r} must be 'manifest', 'copy' or 'link'")
    rows = project.labels()
    out = project.folder / "export"
    if kind == "manifest":
        write_manifest(out / "labels.csv", rows)  # reads back without --allow-outside
        return {"ok": True, "path": str(out / "labels.csv"), "rows": len(rows)}
    final = out / "classes"
    tmp = out / ".classes.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for n, (path, label) in enumerate(rows):
        target = tmp / label / f"{n:06d}_{Path(path).name}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if kind == "copy":
                shutil.copy2(path, target)
            else:
                target.symlink_to(path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ImagerecError(f"export stopped at {path} ({e.strerror}); {final} is as it was: put the file back or mark "
                                "the image junk, then export again") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the folder appears complete, or the old one stays
    return {"ok": True, "path": str(final), "rows": len(rows)}


def _run_body(project: Project, run_id: int) -> str:
    import json  # noqa: PLC0415

    run = project.run(run_id)
    head = (f'<p>{esc(run["backbone"])}, {run["budget_min"]:g} min budget, {run["images"]:,} labelled images, '
            f'status <b id="runstatus">{esc(run["status"])}</b>. {esc(run["message"] or "")}</p>')
    path = Path(run["run_dir"]) / "evaluation.json"
    if run["status"] != "done" or not path.is_file():
        return head + '<div id="trainstatus"></div><progress id="trainprogress" max="1" value="0" hidden></progress>'
    ev = json.loads(path.read_text(encoding="utf-8"))
    classes = ev["classes"]
    s = ev["summary"]
    figures = table(["held-out images", "accuracy", "macro F1", "ECE"],
                    [[s["images"], f'{s["accuracy"]:.1%}', f'{s["macro_f1"]:.3f}', f'{s["ece"]:.3f}']], "figures")
    per_class = table(["class", "precision", "recall", "F1", "images"],
                      [[r["class"], f'{r["precision"]:.2f}', f'{r["recall"]:.2f}', f'{r["f1"]:.2f}', r["support"]] for r in ev["per_class"]])
    matrix = []
    for t, row in zip(classes, ev["confusion"]):
        cells = [Raw(f'<a class="{"zero" if not n else "diag" if t == p else "off"}" href="/train/{run_id}/cell?true={esc(url_arg(t))}'
                     f'&amp;predicted={esc(url_arg(p))}">{n}</a>') for p, n in zip(classes, row)]
        matrix.append([t, *cells])
    confusion = table(["true \\ predicted", *classes], matrix, "confusion")
    wrong = "".join(thumb(r["image_id"], f'{r["true_label"]} as {r["predicted"]} {r["confidence"]:.0%}') for r in project.wrong(run_id))
    return (head + figures + "<h2>Per class</h2>" + per_class + "<h2>Confusion matrix</h2><p>Rows: true class; click a cell for its images.</p>"
            + confusion + "<h2>Confidently wrong</h2>" + (f'<div class="grid" id="grid">{wrong}</div>' if wrong else "<p>none</p>"))
