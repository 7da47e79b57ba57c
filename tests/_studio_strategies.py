"""The studio's HTTP fuzz, shared: a project to fuzz, an ASGI driver, Hypothesis strategies for
requests, and the properties. ``tests/test_studio_fuzz.py`` runs the properties briefly,
``benchmarks/fuzz_studio.py`` at length.

The driver calls the ASGI app the way uvicorn does (the path percent-decoded from an ASCII
target, headers as bytes), without a socket and without httpx, which would normalise ``../``
and refuse odd headers before the app sees them.

Every property is a plain function ``prop_*(studio, ...)`` that raises AssertionError; the
strategies that feed them are ``requests(ctx)``, ``paths(ctx)``, ``names`` and ``actions(ctx)``
(``attack_targets(ctx)`` is the fixed list of file names and traversals every file route is asked for).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import html
import html.parser
import io
import json
import os
import random
import re
import sqlite3
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlencode

from hypothesis import strategies as st
from PIL import Image

from imagerec.studio import _audit
from tests._mutate import mutate
from tests.conftest import make_colour_dataset

PORT = 8765
SERVER = f"127.0.0.1:{PORT}"
GOOD_HOSTS = (SERVER, f"localhost:{PORT}", "127.0.0.1", "localhost")
BAD_HOSTS = ("evil.example", f"evil.example:{PORT}", f"127.0.0.1.evil.example:{PORT}", f"localhost.evil:{PORT}",
             "", f"127.0.0.2:{PORT}", f"0.0.0.0:{PORT}", f"127.0.0.1@evil.example:{PORT}", f"evil.example#127.0.0.1:{PORT}",
             f"localhost:{PORT}:{PORT}", "localhost:[x]", "localhost:][", f"LOCALHOST.:{PORT}", f"127.0.0.1:{PORT}/x",
             "localhost:8o", f"127.1:{PORT}", f"2130706433:{PORT}", f"[::ffff:127.0.0.1]:{PORT}")
# actions that change the database when accepted (undo takes one back)
ACTIONS = ("/api/rename", "/api/move", "/api/exclude", "/api/restore", "/api/merge", "/api/audit/decide", "/api/review/accept")
POSTS = (*ACTIONS, "/api/undo", "/api/export", "/predict", "/search", "/api/train", "/api/audit/run", "/api/review/start")
GETS = ("/", "/groups", "/groups/{g}", "/excluded/{reason}", "/history", "/thumb/{i}", "/img/{i}", "/export",
        "/export/labels.csv", "/train", "/api/train/status", "/train/{r}", "/train/{r}/cell", "/predict", "/audit",
        "/search", "/static/studio.js", "/static/{x}", "/review", "/review?group={g}", "/review/next", "/api/review/suggestions")
PAGES = ("/", "/groups", "/export", "/history", "/excluded/junk", "/excluded/duplicate", "/audit", "/train", "/train/1",
         "/train/1/cell?true=red&predicted=blue", "/predict", "/search", "/review", "/review?order=least", "/review/next")
TAGS = {"html", "head", "meta", "title", "link", "body", "header", "b", "nav", "a", "button", "main", "h1", "h2", "div", "p",
        "table", "thead", "tbody", "tr", "th", "td", "ol", "li", "section", "small", "form", "input", "label", "select",
        "option", "figure", "img", "figcaption", "span", "code", "script", "progress"}
# what a body may never hold: Python's own error text, the database file, files from outside the project
EXCEPTION_TEXT = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]*\", line \d+|\b[A-Z]\w*(?:Error|Exception)\b:"
                            r"|\bsqlite3\.|<module>|Internal Server Error")
NASTY_NAMES = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "<img src=x onerror=alert(1)>'&",
               "</title><script>x</script>", "<svg/onload=alert(1)>", "javascript:alert(1)", "a&amp;b", "&lt;", "'\"",
               "<!--", "]]>", "{{7*7}}", "${x}", "%s%n", "\x00", "a\x00b", "nul\x00<script>", "\ud800", "a\udfffb",
               "\u202egnp.exe", "名前", "👍🏽", "e\u0301", "\ufeff", "\u200b", "x" * 80, "x" * 81, "é" * 80, "𝟘" * 70, "😀" * 64,
               " ", "", "..", ".", "a/b", "a\\b", "a,b", 'a"b', "a\tb", "a\nb", "a\rb", "\x0b", "\x1b[31mred", "CON", "-rf",
               "~", "$HOME", "%2e%2e", "<b>bold</b>", "<<script>script>", "<scr<script>ipt>")
TRAVERSAL = ("..", "../", "../..", "../studio.sqlite", "../../etc/passwd", "..%2fstudio.sqlite", "..%2F..%2Fetc%2Fpasswd",
             "%2e%2e", "%2e%2e%2fstudio.sqlite", "%252e%252e%252f", "..\\studio.sqlite", "....//", "%00", "1%00",
             "1/../..", "/etc/passwd", "%2Fetc%2Fpasswd", "~", ".", "./", "studio.sqlite", "../_db.py", "..%5c_db.py",
             "%c0%ae%c0%ae/", "\u2025", "1%2F..%2F..%2Fstudio.sqlite")
SEGMENTS = ("1", "0", "-1", "+1", " 1", "1 ", "01", "1.0", "1.5", "1e3", "0x10", "1_000", "١", "𝟙", "²", "NaN", "inf",
            "true", "null", "[]", "{}", "9" * 19, "9" * 30, "9" * 400, "-" + "9" * 25, str(2**63), str(2**63 - 1),
            str(-2**63 - 1), "x" * 3000, "%20", "%ff", "%", "%zz")


# -- the project --------------------------------------------------------------------------------


class Studio:
    """A project of 18 labelled colour images (one made unreadable after the import), its app and
    an ASGI driver; ``root`` holds the data, the project and the folders that must not change."""

    def __init__(self, root: str | os.PathLike):
        from imagerec.studio import create_app  # noqa: PLC0415

        self.root = Path(root)
        for name in ("cwd", "tmp", "home", "outside"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.marker = "outside-" + hashlib.sha256(os.fspath(self.root).encode()).hexdigest()[:16]
        (self.root / "outside" / "secret.txt").write_text(self.marker)
        self.data = make_colour_dataset(self.root / "data", per_class=6)
        (self.data / "red" / "notes.txt").write_text(self.marker)  # in the data folder, not an image
        self.folder = self.root / "project"
        with self.activate():
            self.app = create_app(self.folder, self.data, progress=False)
        self.project = self.app.state.project
        self.secret = self.project.secret
        self.cookie = self.app.state.cookie
        self.image_ids = sorted(r["id"] for g in self.project.groups() for r in self.project.images_of(g.id, limit=1000))
        self.unreadable = self.image_ids[-1]
        Path(self.project.image(self.unreadable)["path"]).write_bytes(b"\x89PNG\r\n\x1a\n not an image any more")
        self.files = {Path(self.project.image(i)["path"]).read_bytes(): i for i in self.image_ids}
        # nothing slow can start: a run is "running" (so /api/train refuses a valid request), and the
        # audit, the index build and the review's features are "running" (so /api/audit/run and
        # /api/review/start refuse, /search says "building", /review says "computing")
        with self.project.tx() as con:
            con.execute("INSERT INTO runs(started_at, status, budget_min, backbone, run_dir, images) VALUES (0, 'running', 1,"
                        " 'seed_cnn', ?, 18)", (str(self.folder / "runs" / "run-0"),))
        for job in ("audit", "index_job"):
            setattr(self.app.state, job, _audit._Job())
            getattr(self.app.state, job).state = "running"
        self.app.state.reviewer.job.state = "running"
        self.counts: collections.Counter = collections.Counter()
        secret, notes, db = self.root / "outside" / "secret.txt", self.data / "red" / "notes.txt", self.folder / "studio.sqlite"
        self.targets = ("studio.sqlite", "studio.sqlite-wal", "thumbs", "export/labels.csv", "../outside/secret.txt",
                        "../data/red/notes.txt", str(secret), str(notes), str(db), os.path.relpath(secret, self.folder),
                        "/etc/passwd", f"file://{db}")
        self.driver = Driver(self.app)

    @contextlib.contextmanager
    def activate(self):
        """cwd, tempfile's folder and IMAGEREC_HOME inside ``root``, so stray writes are seen."""
        old_cwd, old_tmp, old_home = os.getcwd(), tempfile.tempdir, os.environ.get("IMAGEREC_HOME")
        os.chdir(self.root / "cwd")
        tempfile.tempdir = str(self.root / "tmp")
        os.environ["IMAGEREC_HOME"] = str(self.root / "home")
        try:
            yield self
        finally:
            os.chdir(old_cwd)
            tempfile.tempdir = old_tmp
            if old_home is None:
                os.environ.pop("IMAGEREC_HOME", None)
            else:
                os.environ["IMAGEREC_HOME"] = old_home

    def close(self) -> None:
        self.driver.close()

    # -- what the properties compare ------------------------------------------------------------

    def dump(self) -> dict:
        """Every row of the tables an action may touch."""
        con = sqlite3.connect(self.folder / "studio.sqlite")
        try:
            return {t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()  # noqa: S608 - our names
                    for t in ("images", "groups", "actions", "changes", "audit_decisions", "reviews", "runs", "meta")}
        finally:
            con.close()

    def state(self) -> tuple:
        """What undo must give back: each image's group and exclusion, the visible groups, the decisions
        (audit findings decided, images the person decided)."""
        con = sqlite3.connect(self.folder / "studio.sqlite")
        try:
            images = con.execute("SELECT id, group_id, excluded FROM images ORDER BY id").fetchall()
            groups = con.execute("SELECT id, name, kind FROM groups WHERE hidden=0 ORDER BY id").fetchall()
        finally:
            con.close()
        return images, groups, sorted(self.project.decided().items()), sorted(self.project.reviewed())

    def active(self) -> int:
        return self.project.counts()["actions"]

    def outside(self) -> dict:
        """Every file under ``root`` but the project: path -> (size, mtime). The one thing allowed
        outside is imagerec's record that a manifest written into the project may read the data
        folder (``write_manifest`` keeps it in ``IMAGEREC_HOME/manifests``): such a record is
        checked to name a manifest inside the project, and then left out."""
        out = {}
        for record in (self.root / "home" / "manifests").glob("*.json"):
            manifest = json.loads(record.read_text(encoding="utf-8"))["manifest"]
            assert Path(manifest).is_relative_to(self.folder.resolve()), f"{record}: a manifest outside the project: {manifest}"
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != "project"]
            if Path(dirpath) == self.root / "home":
                dirnames[:] = [d for d in dirnames if d != "manifests"]
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = os.path.join(dirpath, name)
                st_ = os.lstat(p)
                out[os.path.relpath(p, self.root)] = (st_.st_size, st_.st_mtime_ns)
        return out

    def integrity(self) -> None:
        con = sqlite3.connect(self.folder / "studio.sqlite")
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        finally:
            con.close()

    def reset(self, active: int) -> None:
        """Undo back to ``active`` actions in use (the state each example starts from)."""
        for _ in range(self.active() - active):
            assert self.project.undo() is not None
        assert self.active() == active

    def context(self) -> Ctx:
        groups = self.project.groups()
        with self.project.connection() as con:
            hidden = tuple(r[0] for r in con.execute("SELECT id FROM groups WHERE hidden=1"))
            in_use = tuple(r[0] for r in con.execute("SELECT id FROM images WHERE excluded IS NULL ORDER BY id"))
        return Ctx(self.secret, self.cookie, tuple(self.image_ids), tuple(g.id for g in groups), tuple(g.name for g in groups), hidden,
                   self.targets, in_use)

    # -- requests ------------------------------------------------------------------------------

    def send(self, req: Req) -> Reply:
        reply = self.driver.request(req.method, req.target, req.headers, req.body)
        self.counts[(req.label, reply.status)] += 1
        return reply

    def good_headers(self, extra: dict | None = None) -> list[tuple[str, str]]:
        h = {"host": SERVER, "origin": f"http://{SERVER}", "cookie": f"{self.cookie}={self.secret}",
             "x-csrf-token": self.secret, "content-type": "application/json"}
        h.update(extra or {})
        return list(h.items())

    def post(self, url: str, body, **extra) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.send(Req("POST", url, self.good_headers(extra), data, True, url))

    def get(self, url: str) -> Reply:
        return self.send(Req("GET", url, [("host", SERVER)], b"", True, "page " + re.sub(r"/[0-9]+", "/{n}", url.split("?")[0])))


@dataclass(frozen=True)
class Ctx:
    """What the strategies may draw from: the secret and the ids of the project as it is now."""

    secret: str
    cookie: str
    image_ids: tuple
    group_ids: tuple
    group_names: tuple
    hidden: tuple = ()
    files: tuple = ()  # files a URL must never reach: the database, the planted secrets, by name and by path
    in_use: tuple = ()  # image ids neither junk nor duplicate


@dataclass
class Req:
    method: str
    target: str  # ASCII path and query, as on the request line
    headers: list  # (name, value) strings, latin-1
    body: bytes
    creds: bool  # True: host, origin, cookie and token right; False: one of them (or more) wrong
    label: str  # for the counts: the route it aims at


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes
    error: str | None = None  # the traceback, when the app raised

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)


class Driver:
    """Calls an ASGI app as uvicorn would, one request at a time, on one event loop."""

    def __init__(self, app):
        self.app = app
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def request(self, method: str, target: str, headers, body: bytes = b"") -> Reply:
        return self.loop.run_until_complete(self._call(method, target, headers, body))

    async def _call(self, method, target, headers, body) -> Reply:
        raw, _, query = target.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": unquote(raw), "raw_path": raw.encode("ascii"),
                 "query_string": query.encode("ascii"), "root_path": "", "client": ("127.0.0.1", 50123),
                 "server": ("127.0.0.1", PORT), "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                 "state": {}}
        done = asyncio.Event()
        given = False
        out = {"status": None, "headers": {}, "body": []}

        async def receive():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                out["status"] = message["status"]
                out["headers"] = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                out["body"].append(message.get("body", b""))
                if not message.get("more_body"):
                    done.set()

        error = None
        try:
            await self.app(scope, receive, send)
        except Exception:  # noqa: BLE001 - what uvicorn would answer with a 500
            error = traceback.format_exc()
        finally:
            done.set()
        status = out["status"] if out["status"] is not None else 500
        return Reply(500 if error and status < 500 else status, out["headers"], b"".join(out["body"]), error)


# -- strategies -----------------------------------------------------------------------------------

printable_latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
header_text = st.text(printable_latin1, max_size=40)
any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates and NUL too
huge_ints = st.sampled_from([2**63, 2**63 - 1, -2**63, -2**63 - 1, 2**64, 10**30, -10**30, 10**400])
weird_ints = st.one_of(st.integers(-3, 60), st.integers(-2**80, 2**80), huge_ints)
scalars = st.one_of(st.none(), st.booleans(), weird_ints, st.floats(allow_nan=True, allow_infinity=True), any_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)
names = st.one_of(st.sampled_from(NASTY_NAMES), any_text, st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]), max_size=90))


def id_value(pool) -> st.SearchStrategy:
    """An id as the pages send it (one of ``pool``) or in a wrong type or range."""
    valid = st.sampled_from(pool) if pool else st.integers(1, 30)
    return st.one_of(valid, valid, weird_ints, valid.map(str), valid.map(float), valid.map(lambda v: [v]), st.booleans(),
                     st.none(), st.floats(), any_text)


def id_list(pool) -> st.SearchStrategy:
    valid = st.sampled_from(pool) if pool else st.integers(1, 30)
    return st.one_of(st.lists(valid, min_size=1, max_size=6), st.lists(id_value(pool), max_size=5), json_values,
                     st.just([]), st.lists(valid, min_size=1, max_size=3).map(lambda v: [v]))


def action_body(ctx: Ctx, route: str) -> st.SearchStrategy:
    """A JSON object for ``route`` whose fields are right or wrong in type and value."""
    gid, ids, gids = id_value(ctx.group_ids + ctx.hidden), id_list(ctx.image_ids), id_list(ctx.group_ids)
    reason = st.one_of(st.sampled_from(["junk", "duplicate"]), st.sampled_from(["JUNK", " junk", "", "in use", "excluded"]), scalars)
    fields = {
        "/api/rename": {"group_id": gid, "name": st.one_of(names, scalars)},
        "/api/move": {"image_ids": ids, "group_id": gid, "new_name": st.one_of(names, names, scalars)},
        "/api/exclude": {"image_ids": ids, "reason": reason},
        "/api/restore": {"image_ids": ids},
        "/api/merge": {"sources": gids, "target": gid},
        "/api/audit/decide": {"finding": st.one_of(names, scalars), "image_ids": ids,
                              "decision": st.one_of(st.sampled_from(["drop", "junk", "accept", "keep"]), scalars),
                              "label": st.one_of(names, st.sampled_from(ctx.group_names or ("x",)), scalars)},
        "/api/review/accept": {"image_ids": ids, "group_ids": st.one_of(gids, st.lists(st.one_of(st.none(), id_value(ctx.group_ids)), max_size=6)),
                               "new_name": st.one_of(names, scalars)},
        "/api/export": {"kind": st.one_of(st.sampled_from(["manifest", "copy", "link"]), st.sampled_from(["manifest", "copy", "link"]),
                                          st.sampled_from(["MANIFEST", "zip", "../x", ""]), scalars)},
        "/api/train": {"budget": st.one_of(st.floats(), weird_ints, any_text, st.sampled_from(["5", "1e400", "-1", "nan"])),
                       "backbone": st.one_of(st.sampled_from(["seed_cnn", "efficientnet_lite0", "SEED_CNN", "../x", ""]), scalars)},
    }.get(route, {})
    if not fields:
        return st.one_of(st.just({}), st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    required = {k: fields.pop(k) for k in ("kind",) if k in fields}  # export has one field: send it mostly
    return st.fixed_dictionaries(required, optional=fields).flatmap(
        lambda d: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(lambda extra: {**extra, **d}))


def _png(size=(8, 6), seed=0, fmt="PNG") -> bytes:
    rnd = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rnd.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@st.composite
def upload_body(draw, valid_images: bool = True) -> tuple[bytes, str]:
    """(body, content type) of a multipart upload: files good, mutated or random, and the
    multipart itself well formed or broken (truncated, wrong boundary, no boundary, random)."""
    boundary = draw(st.sampled_from(["xyzzy", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "a" * 70, "b;c"]))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["png", "jpeg", "mutated", "random", "empty", "text"] if valid_images else
                                    ["mutated", "random", "empty", "text"]))
        if kind in ("png", "jpeg"):
            data = _png(seed=draw(st.integers(0, 3)), fmt=kind.upper())
        elif kind == "mutated":
            data = mutate(_png(seed=1), random.Random(draw(st.integers(0, 2**32))))
            if not valid_images and _decodes(data):
                data = data[:20]
        elif kind == "random":
            data = draw(st.binary(max_size=200))
        else:
            data = b"" if kind == "empty" else b"hello"
        field_name = draw(st.sampled_from(["files", "files", "file", "", 'files"; x="']))
        filename = draw(st.one_of(st.sampled_from(["a.png", "../../etc/passwd", "<script>.png", "", "a\\b.jpg", "名前.png"]),
                                  st.text(printable_latin1.filter(lambda c: c not in '"\\'), max_size=20), st.none()))
        disp = f'form-data; name="{field_name}"' + (f'; filename="{filename}"' if filename is not None else "")
        ctype = draw(st.sampled_from(["image/png", "application/octet-stream", "", "text/html"]))
        head = f"Content-Disposition: {disp}\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "")
        parts.append(f"--{boundary}\r\n{head}\r\n".encode("utf-8", "surrogatepass") + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    broken = draw(st.sampled_from(["none", "none", "truncate", "no end", "garbage", "random", "other boundary"]))
    if broken == "truncate":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif broken == "no end":
        body = body[: -len(f"--{boundary}--\r\n")]
    elif broken == "garbage":
        body = draw(st.binary(max_size=64)) + body
    elif broken == "random":
        body = draw(st.binary(max_size=300))
    elif broken == "other boundary":
        boundary = "not-" + boundary
    ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", f'multipart/form-data; boundary="{boundary}"',
                                  "multipart/form-data", "multipart/form-data; boundary=", "multipart/mixed; boundary=x",
                                  f"multipart/form-data; boundary={boundary}; charset=utf-8"]))
    return body, ctype


def _decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001
        return False
    return True


@st.composite
def body_for(draw, ctx: Ctx, route: str) -> tuple[bytes, str]:
    """(body, content type) aimed at ``route``: JSON of right and wrong types, forms, uploads, bytes."""
    if route in ("/predict", "/search"):
        kind = draw(st.sampled_from(["upload", "upload", "upload", "form", "json", "bytes"]))
        if kind == "upload":
            return draw(upload_body())
    else:
        kind = draw(st.sampled_from(["json", "json", "json", "json", "other json", "form", "bytes", "upload", "deep"]))
    if kind == "json":
        body = draw(action_body(ctx, route))
        data = json.dumps(body).encode()
        if draw(st.booleans()) and len(data) > 2:  # sometimes a byte too few or too many
            data = draw(st.sampled_from([data[:-1], data + b",", data.replace(b'"', b"'", 1), data.decode().encode("utf-16")]))
        return data, draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "", "application/x-www-form-urlencoded"]))
    if kind == "other json":
        return json.dumps(draw(json_values)).encode(), "application/json"
    if kind == "form":
        pairs = draw(st.lists(st.tuples(st.sampled_from(["name", "group_id", "image_ids", "csrf", "files", "kind"]), header_text), max_size=4))
        return urlencode(pairs).encode(), "application/x-www-form-urlencoded"
    if kind == "upload":
        return draw(upload_body(valid_images=False))
    if kind == "deep":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        return (b"[" * depth + b"]" * depth) if draw(st.booleans()) else (b'{"a":' * depth + b"1" + b"}" * depth), "application/json"
    return draw(st.binary(max_size=200)), draw(st.sampled_from(["application/json", "application/octet-stream", ""]))


def _encode_segment(draw, seg: str) -> str:
    how = draw(st.sampled_from(["plain", "plain", "quote", "quote all", "double"]))
    if how == "quote":
        return quote(seg, safe="/%")
    if how == "quote all":
        return quote(seg, safe="")
    if how == "double":
        return quote(quote(seg, safe=""), safe="")
    return quote(seg, safe="/%?=&;:@!$'()*+,~")  # still ASCII on the request line


@st.composite
def paths(draw, ctx: Ctx, templates=GETS) -> tuple[str, str]:
    """(target, label): a route with right or odd segments and queries, or a random path."""
    kind = draw(st.sampled_from(["route", "route", "route", "route", "traversal", "random"]))
    if kind == "random":
        text = draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=60))
        return "/" + _encode_segment(draw, text), "random"
    template = draw(st.sampled_from(templates))
    files = st.sampled_from(ctx.files or ("studio.sqlite",))
    values = {
        "g": st.one_of(st.sampled_from(ctx.group_ids + ctx.hidden).map(str), st.sampled_from(SEGMENTS), st.sampled_from(TRAVERSAL)),
        "i": st.one_of(st.sampled_from(ctx.image_ids).map(str), st.sampled_from(SEGMENTS), st.sampled_from(TRAVERSAL),
                       files, files),
        "r": st.one_of(st.sampled_from(["1", "0"]), st.sampled_from(SEGMENTS), st.sampled_from(TRAVERSAL)),
        "reason": st.one_of(st.sampled_from(["junk", "duplicate", "JUNK", "in use", "", "%00"]), st.sampled_from(TRAVERSAL), st.text(max_size=10)),
        "x": st.one_of(st.sampled_from(TRAVERSAL), files, st.sampled_from(["studio.js", "studio.css", "", "studio.js/", ".", "STUDIO.JS"]), st.text(max_size=10)),
    }
    path = template
    for key, strategy in values.items():
        if "{" + key + "}" in path:
            path = path.replace("{" + key + "}", _encode_segment(draw, draw(strategy)))
    if kind == "traversal":
        path = path.rstrip("/") + "/" + _encode_segment(draw, draw(st.sampled_from(TRAVERSAL)))
    query = draw(st.lists(st.tuples(st.sampled_from(["page", "page", "true", "predicted", "csrf", "reason", "x"]),
                                    st.one_of(st.sampled_from(["-1", "0", "1", "2", "9" * 30, "1.5", "abc", "", "%00", "１"]),
                                              st.text(max_size=12))), max_size=3))
    target = path + ("?" + urlencode(query) if query else "")
    return target, template


def attack_targets(ctx: Ctx) -> list[tuple[str, str]]:
    """(target, label): every file the project must not serve, and every traversal, under each
    route that serves files, spelled plain, percent-encoded and double-encoded."""
    out = []
    for template in ("/img/{}", "/thumb/{}", "/static/{}", "/{}"):
        for name in (*ctx.files, *TRAVERSAL):
            for spelled in dict.fromkeys([quote(name, safe="/%:"), quote(name, safe=""), quote(quote(name, safe=""), safe="")]):
                out.append((template.format(spelled), template.replace("{}", "{x}")))
    return out


@st.composite
def credentials(draw, ctx: Ctx, want: bool | None = None) -> tuple[dict, bool, dict]:
    """(headers, creds, query) for a POST: all four proofs right (creds True) or at least one
    wrong (False); ``want`` None: either, half and half. GETs are asked for the Host only."""
    wrong = set()
    if want is False or (want is None and draw(st.booleans())):
        wrong = set(draw(st.lists(st.sampled_from(["host", "origin", "cookie", "token"]), min_size=1, max_size=4, unique=True)))
    h, query = {}, {}
    host = draw(st.sampled_from(GOOD_HOSTS))
    if "host" in wrong:
        bad = draw(st.sampled_from(BAD_HOSTS + ("absent",)))
        if bad != "absent":
            h["host"] = bad
    else:
        h["host"] = host
    same = f"http://{h.get('host', '')}"
    if "origin" in wrong:
        h["origin"] = draw(st.sampled_from(["null", "http://evil.example", f"https://{host}", f"{same}/", f"{same}.evil.example",
                                            f"http://{SERVER}:1", "http://127.0.0.1:1", f"http://evil.example:{PORT}", "",
                                            f"HTTP://{host}", f"http://{host}:{PORT}"]))
        if h["origin"] == f"http://{h.get('host')}":
            h["origin"] = "null"
    elif draw(st.booleans()):
        h["origin"] = same
    if "cookie" in wrong:
        c = draw(st.sampled_from(["absent", "wrong", "name", "short", "garbage"]))
        if c != "absent":
            h["cookie"] = {"wrong": f"{ctx.cookie}=nope", "name": f"imagerec_studio_0000000000={ctx.secret}",
                           "short": f"{ctx.cookie}={ctx.secret[:-1]}", "garbage": draw(header_text.filter(lambda v: ctx.secret not in v))}[c]
    else:
        h["cookie"] = draw(st.sampled_from([f"{ctx.cookie}={ctx.secret}", f"a=b; {ctx.cookie}={ctx.secret}; c=d"]))
    if "token" in wrong:
        t = draw(st.sampled_from(["absent", "wrong header", "wrong query", "header wins", "padded", "cookie name"]))
        if t == "wrong header":
            h["x-csrf-token"] = "guess"
        elif t == "wrong query":
            query["csrf"] = ctx.secret[:10]
        elif t == "header wins":
            h["x-csrf-token"], query["csrf"] = "guess", ctx.secret
        elif t == "padded":
            h["x-csrf-token"] = ctx.secret + "x"
        elif t == "cookie name":
            h["x-csrf-token"] = ctx.cookie
    elif draw(st.booleans()):
        h["x-csrf-token"] = ctx.secret
    else:
        query["csrf"] = ctx.secret
    for name in draw(st.lists(st.sampled_from(["accept", "range", "if-range", "x-forwarded-host", "referer", "content-length"]),
                              max_size=3, unique=True)):
        h[name] = draw(st.one_of(st.sampled_from({"accept": ["text/html", "application/json", "*/*", "text/html;q=0.1"],
                                                  "range": ["bytes=0-3", "bytes=-1", "bytes=5-1", "bytes=abc", "bytes=0-0,2-3", "lines=1"],
                                                  "if-range": ['"x"', "Mon, 01 Jan 2001 00:00:00 GMT"],
                                                  "x-forwarded-host": ["evil.example"], "referer": ["http://evil.example/"],
                                                  "content-length": ["0", "-1", "abc"]}[name]), header_text))
    return h, not wrong, query


@st.composite
def requests(draw, ctx: Ctx, want: bool | None = None) -> Req:
    """Any request: a GET of a page or file, or a POST of an action, with right or wrong proofs
    (``want``: True all right, False one or more wrong, None random)."""
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "POST", "POST", "POST", "POST", "HEAD", "PUT", "DELETE", "OPTIONS",
                                   "PATCH"] if want is None else ["POST"]))
    if method == "POST" and draw(st.integers(0, 5)):
        route = draw(st.sampled_from(POSTS))
        target, label = route, route
        if draw(st.integers(0, 9)) == 0:
            target += draw(st.sampled_from(["/", "/x", "/../undo", "%2F", "?x=1"]))
    else:
        target, label = draw(paths(ctx))
    headers, creds, query = draw(credentials(ctx, want))
    body, ctype = b"", None
    if method in ("POST", "PUT", "PATCH") or draw(st.integers(0, 9)) == 0:
        body, ctype = draw(body_for(ctx, label if label in POSTS else "/api/rename"))
    if ctype:
        headers["content-type"] = ctype
    if query:
        target += ("&" if "?" in target else "?") + urlencode(query)
    return Req(method, target, list(headers.items()), body, creds, label)


def _some(pool, draw, k_max=4):
    return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=k_max, unique=True))


@st.composite
def actions(draw, ctx: Ctx) -> tuple[str, dict, bool | None]:
    """(route, JSON body, expect) of an action on the project as it is now; expect: True it must be
    accepted, False refused, None either. One in five is made wrong on purpose (an id that is not
    there, a bad name, reason or decision)."""
    kind = draw(st.sampled_from(["rename", "move", "move new", "junk", "duplicate", "restore", "merge", "keep", "drop", "accept", "undo",
                                 "export", "review", "review new"]))
    if kind == "undo":
        return "/api/undo", {}, True
    if kind == "export":  # not an action: files in the project, nothing in the database
        return "/api/export", {"kind": draw(st.sampled_from(["manifest", "copy", "link"]))}, True
    ids, gids = _some(ctx.image_ids, draw), ctx.group_ids
    new = draw(st.text(st.characters(categories=["L", "N", "Zs"], include_characters="<>&'-_ "), min_size=1, max_size=20).filter(str.strip))
    while new.strip() in ctx.group_names:
        new += "+"
    expect = True
    if draw(st.integers(0, 3)) == 0 and kind in ("rename", "move new", "review new"):
        new = draw(st.sampled_from([n for n in NASTY_NAMES if n.strip() not in ctx.group_names]))
        expect = None  # accepted or refused by the name rules; if accepted, later exports must work with it
    if kind == "rename":
        gid, name = draw(st.sampled_from(gids)), draw(st.sampled_from([new, new, *ctx.group_names]))
        body, route = {"group_id": gid, "name": name}, "/api/rename"
        if name in ctx.group_names and ctx.group_names.index(name) != gids.index(gid):
            expect = False  # another group's name
        elif name in ctx.group_names:
            expect = True
    elif kind == "move":
        body, route = {"image_ids": ids, "group_id": draw(st.sampled_from(gids))}, "/api/move"
    elif kind == "move new":
        body, route = {"image_ids": ids, "new_name": new}, "/api/move"
    elif kind in ("review", "review new"):  # a review page accepted: each image with its class, maybe one new class
        if ctx.in_use:
            ids = _some(ctx.in_use, draw, 6)
        else:
            expect = False  # every image is junk or a duplicate
        body, route = {"image_ids": ids, "group_ids": [draw(st.sampled_from(gids)) for _ in ids]}, "/api/review/accept"
        if kind == "review new":
            body["group_ids"][draw(st.integers(0, len(ids) - 1))] = None
            body["new_name"] = new
    elif kind in ("junk", "duplicate"):
        body, route = {"image_ids": ids, "reason": kind}, "/api/exclude"
    elif kind == "restore":
        body, route = {"image_ids": ids}, "/api/restore"
    elif kind == "merge":
        body, route = {"sources": _some(gids, draw, 2), "target": draw(st.sampled_from(gids))}, "/api/merge"
        expect = not set(body["sources"]) <= {body["target"]}
    else:
        finding = draw(st.sampled_from(["duplicates:1", "label:3", f"outlier:{ids[0]}", "quality:2:dark"]))
        body, route = {"finding": finding, "decision": kind, "image_ids": ids}, "/api/audit/decide"
        if kind == "accept":
            body["label"] = draw(st.sampled_from([new, *ctx.group_names]))
    if draw(st.integers(0, 4)) == 0:
        key, value = draw(st.sampled_from([("image_ids", [max(ctx.image_ids) + 1000]), ("image_ids", []), ("image_ids", [2**64]),
                                           ("group_ids", [10**6]), ("group_ids", [True]), ("group_ids", "1"), ("group_ids", []),
                                           ("image_ids", [True]), ("group_id", 10**6), ("group_id", True), ("group_id", "1"),
                                           ("target", 10**6), ("sources", [2**63]), ("name", "a/b"), ("name", None), ("new_name", "a\x00b"),
                                           ("reason", "gone"), ("decision", "maybe"), ("label", "x" * 81), ("finding", None)]))
        if key in body:
            body[key] = value
            expect = None if (kind == "keep" and key == "image_ids") else False  # 'keep' changes no image
    return route, body, expect


# -- the properties --------------------------------------------------------------------------------


class TagParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))


def check_reply(studio: Studio, req: Req, reply: Reply) -> None:
    """What holds for every answer: no 5xx, no Python error text, JSON errors under /api/, and
    images and files only from the project."""
    where = f"{req.method} {req.target!r} -> {reply.status}"
    assert reply.error is None, f"{where}: the app raised\n{reply.error}"
    assert reply.status < 500, f"{where}: {reply.text[:300]}"
    path = unquote(req.target.split("?")[0])
    ctype = reply.headers.get("content-type", "")
    binary = ctype.startswith("image/") or path.startswith("/static/")
    if not binary:
        found = EXCEPTION_TEXT.search(reply.text)
        assert found is None, f"{where}: Python's error text {found.group(0)!r} in the body: {reply.text[:300]!r}"
    if reply.status >= 400 and path.startswith("/api/") and req.method != "HEAD":
        assert ctype.startswith("application/json"), f"{where}: an /api/ error that is not JSON ({ctype}): {reply.text[:200]!r}"
        reply.json()
    for leak in (b"SQLite format 3\x00", studio.marker.encode(), b"root:x:0:0", b"CREATE TABLE IF NOT EXISTS"):
        assert leak not in reply.body, f"{where}: the body holds {leak!r}"
    if reply.status == 200 and path.startswith("/img/") and req.method == "GET":
        assert reply.body in studio.files, f"{where}: /img/ served bytes that are no image of the project"
    if reply.status == 200 and path.startswith("/thumb/") and req.method == "GET":
        thumbs = {p.read_bytes() for p in (studio.folder / "thumbs").rglob("*.jpg")}
        assert reply.body in thumbs, f"{where}: /thumb/ served bytes that are no thumbnail in the project"


def prop_any_request(studio: Studio, req: Req) -> None:
    """Any request: no 5xx (see check_reply); a refused one or a GET changes nothing; one without
    all four proofs is refused; an accepted action records exactly one action."""
    before, active, outside = studio.dump(), studio.active(), studio.outside()
    try:
        reply = studio.send(req)
        check_reply(studio, req, reply)
        after = studio.dump()
        shown = f"{len(reply.body)} bytes of {reply.headers.get('content-type')}" if reply.headers.get("content-type", "").startswith(
            "image/") else repr(reply.text[:200])
        where = f"{req.method} {req.target!r} -> {reply.status}: {shown}"
        if req.creds is False and req.method not in ("GET", "HEAD"):
            assert reply.status == 403, f"{where}: a POST without the right proofs was not refused"
        if dict(req.headers).get("host") not in GOOD_HOSTS:
            assert reply.status == 403, f"{where}: a request for another host was answered"
        if reply.status >= 400 or req.method in ("GET", "HEAD"):
            assert after == before, f"{where}: the database changed: {diff(before, after)}"
        elif req.label in ACTIONS and reply.status == 200:
            assert studio.active() == active + 1, f"{where}: {studio.active() - active} actions recorded, not one"
        assert studio.outside() == outside, f"{where}: files changed outside the project: {diff(outside, studio.outside())}"
    finally:
        studio.reset(active)


def prop_refused(studio: Studio, req: Req) -> None:
    """A POST with a wrong Host, Origin, cookie or token is a 403 and changes nothing at all."""
    before, files, outside = studio.dump(), project_files(studio), studio.outside()
    reply = studio.send(req)
    check_reply(studio, req, reply)
    where = f"{req.method} {req.target!r} {dict(req.headers)!r} -> {reply.status}: {reply.text[:200]!r}"
    assert reply.status == 403, f"{where}: not refused"
    assert studio.dump() == before, f"{where}: the database changed: {diff(before, studio.dump())}"
    assert project_files(studio) == files and studio.outside() == outside, f"{where}: files changed"


def prop_escaped(studio: Studio, name, group_index: int, new_class: bool) -> None:
    """A name sent to rename (or to move into a new class) is shown escaped on every page."""
    active = studio.active()
    ctx = studio.context()
    gid = ctx.group_ids[group_index % len(ctx.group_ids)]
    try:
        if new_class:
            reply = studio.post("/api/move", {"image_ids": [ctx.image_ids[group_index % 5]], "new_name": name})
        else:
            reply = studio.post("/api/rename", {"group_id": gid, "name": name})
        check_reply(studio, Req("POST", "/api/rename", [], b"", True, "/api/rename"), reply)
        if reply.status != 200:
            assert studio.active() == active, f"{name!r} refused ({reply.text}) but an action was recorded"
            return
        shown = {g.id: g.name for g in studio.project.groups()}
        before = studio.dump()
        target = reply.json().get("group_id", gid)
        typed = shown[target]
        summary = studio.project.history(1)[0]["summary"]
        urls = [*PAGES, *(f"/groups/{g}" for g in shown)]
        for url in urls:
            page = studio.get(url)
            check_reply(studio, Req("GET", url, [], b"", True, url), page)
            assert page.status == 200, f"{url}: {page.status}"
            text = page.text
            assert text.count("<script") == 1, f"{url}: a raw <script after naming a group {name!r}"
            parser = TagParser()
            parser.feed(text)
            for tag, attrs in parser.tags:
                assert tag in TAGS, f"{url}: tag <{tag}> after naming a group {name!r}"
                for attr, value in attrs:
                    assert not attr.startswith("on"), f"{url}: <{tag} {attr}=...> after naming a group {name!r}"
                    if attr in ("href", "src", "action"):
                        assert not (value or "").strip().lower().startswith("javascript:"), f"{url}: {attr}={value!r}"
            if url in ("/", "/groups", f"/groups/{target}"):
                assert html.escape(typed) in text, f"{url}: the name {typed!r} is not shown escaped"
            if url == "/history":
                assert html.escape(summary) in text, f"{url}: the action {summary!r} is not shown escaped"
        assert studio.dump() == before, f"showing the pages changed the database: {diff(before, studio.dump())}"
    finally:
        studio.reset(active)


def prop_actions(studio: Studio, data) -> None:
    """A sequence of actions: each accepted one is one action and one undo step, each refused
    one changes nothing; the database stays intact; the labels can be exported (whatever names
    were accepted); undoing them all gives the first state back; no file changes outside."""
    active, outside = studio.active(), studio.outside()
    states = [studio.state()]
    try:
        for _ in range(data.draw(st.integers(1, 8), label="steps")):
            route, body, expect = data.draw(actions(studio.context()), label="action")
            before, n = studio.dump(), studio.active()
            if route == "/api/undo" and len(states) == 1 and n > 0:
                continue  # it would undo an action from before this example
            reply = studio.post(route, body)
            check_reply(studio, Req("POST", route, [], b"", True, route), reply)
            where = f"POST {route} {body!r} -> {reply.status}: {reply.text[:200]!r}"
            if route == "/api/undo":
                assert reply.status == 200, where
                if len(states) == 1:
                    assert reply.json()["undone"] is None, where
                    continue
                states.pop()
                assert reply.json()["undone"] is not None and studio.state() == states[-1], f"{where}: undo did not give back the state"
                assert studio.active() == n - 1, where
                continue
            if route == "/api/export":
                assert reply.status == 200 and studio.dump() == before, f"{where}: an export failed or changed the database"
                continue
            if expect is True:
                assert reply.status == 200, f"{where}: a valid action was refused"
            if expect is False:
                assert 400 <= reply.status < 500, f"{where}: a wrong action was accepted"
            if reply.status == 200:
                assert studio.active() == n + 1, f"{where}: {studio.active() - n} actions recorded, not one"
                states.append(studio.state())
            else:
                assert studio.dump() == before, f"{where}: refused, but the database changed: {diff(studio.dump(), before)}"
        studio.integrity()
        for kind in ("manifest", "copy", "link"):  # whatever names were accepted, the labels can be exported
            reply = studio.post("/api/export", {"kind": kind})
            check_reply(studio, Req("POST", "/api/export", [], b"", True, "/api/export"), reply)
            assert reply.status == 200, f"export {kind} after {[g.name for g in studio.project.groups()]!r}: {reply.text[:300]}"
        while len(states) > 1:
            states.pop()
            reply = studio.post("/api/undo", {})
            assert reply.status == 200 and reply.json()["undone"] is not None, reply.text
            assert studio.state() == states[-1], f"undo did not give back the state before {studio.project.history(1)[0]['summary']!r}"
        studio.integrity()
        assert studio.outside() == outside, f"files changed outside the project: {diff(outside, studio.outside())}"
    finally:
        studio.reset(active)


def project_files(studio: Studio) -> dict:
    out = {}
    for p in studio.folder.rglob("*"):
        if not p.name.startswith("studio.sqlite"):
            out[str(p.relative_to(studio.folder))] = p.lstat().st_size
    return out


def diff(before: dict, after: dict) -> str:
    """The keys that differ; for tables, the rows gone and the rows new."""
    out = []
    for k in sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))[:5]:
        b, a = before.get(k), after.get(k)
        if isinstance(b, list) and isinstance(a, list):
            out.append(f"{k}: gone {[r for r in b if r not in a][:3]!r:.300}, new {[r for r in a if r not in b][:3]!r:.300}")
        else:
            out.append(f"{k}: {b!r:.200} -> {a!r:.200}")
    return "; ".join(out)
