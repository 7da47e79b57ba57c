"""Soak: minutes of scripted random use of ``imagerec studio`` or ``imagerec serve``, with
``kill -9`` of the server at random moments and a restart; then the checks. Loopback only,
bounded in requests and time; every process it starts is stopped before it returns.

    python benchmarks/soak.py --target studio --minutes 30 --seed 1 > benchmarks/results/soak_studio.json
    python benchmarks/soak.py --target serve --minutes 30 --seed 1 > benchmarks/results/soak_serve.json

Both targets run the real CLI (``imagerec studio DATA --project DIR --port P`` or ``imagerec
serve MODEL --port P``) as a child process on a free 127.0.0.1 port; a chaos thread sends it
SIGKILL every 20-120 s (``--kill-every``), starts it again on the same port and waits until it
answers. The summary is one JSON object on stdout; progress goes to stderr.

**studio**: a project of generated class-folder photos (labelled, so the import needs no
model). One browser-like client (a cookie jar, the CSRF token read from the page's meta tag,
``Origin`` on every POST, as the studio's own script sends them) does a seeded random mix, one
request at a time: rename, move, move to a new class, junk / duplicate, restore, merge, undo
(also in bursts), invalid variants of these (expected 400), page GETs, /img, /thumb, the
labels.csv download and the manifest export; a second thread fetches /img and /thumb meanwhile.
The client keeps its own copy of the images and groups tables (the *shadow*), changed only by
answers it got: a 200 applies the action's effect (image X now in group G, group G now named
N, ...), an undo takes back the newest action not yet undone. A request whose answer was lost
to a kill is resolved after the restart from the actions table (one more row: it was done).
After every restart and at the end:

- lost effects: every cell some recorded action set must hold what the latest such action set
  (cells no action touched must still hold the import's values: "unexpected changes");
- the history: the actions table holds exactly the client's actions, kinds, undone flags, and
  the changes each one recorded are the cells it changed (old and new);
- the pages show it: the group pages' thumbnails (order included), the excluded pages,
  /groups, labels.csv (and the exported manifest) equal what the shadow says;
- ``PRAGMA integrity_check`` and ``foreign_key_check``.

At the end, with the server stopped: replaying the recorded changes of every action not undone,
in order, from the state right after the import gives exactly the images and groups tables
(every change's old value must be the value the replay holds at that point); and undoing
everything, on a copy of the database, gives back the import state (groups made since are
left hidden: their rows are never deleted).

**serve**: a seed_cnn run folder with fixed random weights (or ``--model``), served with
``--max-queue 12 --max-pixels 250000``. The reference answers (probabilities with and without
TTA, embedding) are computed once at the start, one image per request. Four client threads
send a bounded mix: /predict multipart (1-4 files) and raw bytes, /embed, /model, /health,
/ready, /metrics, bad images (empty, text, truncated, too many pixels: 400), a wrong content
type (415), a bad query (422), and every 30-60 s a burst of 24 concurrent requests that
overflows the queue (503 + Retry-After, intended). Checks: after each restart /ready comes
back (seconds reported) and /model equals the reference; every 200 answer equals the reference
for its images (probabilities within 1e-4, embeddings within 1e-4 + 1e-4 relative); no 5xx but
the intended 503 and 504; connection errors while the server is down are counted apart from
those while it is up; the server's RSS is sampled every 2 s.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import datetime
import hashlib
import html
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DB_NAME = "studio.sqlite"
EXCLUSIONS = ("junk", "duplicate")
MAX_NAME = 80
MAX_NAME_BYTES = 255
BAD_NAME_CHARS = "/\\\n\r\t,\""
PAGE = 200
FAIL_KEEP = 30  # failures kept in the summary, the first ones


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def imagerec_argv(*args) -> list[str]:
    """The installed ``imagerec`` script beside this Python (a real process, the one SIGKILL hits)."""
    script = Path(sys.executable).with_name("imagerec")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "imagerec"]
    return head + [str(a) for a in args]


def code_snapshot(work: Path) -> tuple[Path, dict]:
    """A copy of imagerec as it is now: every server life runs it (the working tree may change
    during a 30-minute soak; a restart would pick the change up). Returns (PYTHONPATH, facts)."""
    dest = work / "code"
    shutil.copytree(ROOT / "imagerec", dest / "imagerec", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for path in sorted((dest / "imagerec").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())

    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "imagerec").splitlines()]
    return dest, {"git_head": git("rev-parse", "HEAD").strip(), "uncommitted_in_imagerec": dirty, "sha256": digest.hexdigest()}


def code_env(work: Path, code: Path) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "IMAGEREC_HOME": str(work / "home"), "PYTHONPATH": str(code)}


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- the server process and the chaos around it ----------------------------------------------------



MODEL_VOLATILE = ("version", "batching", "reload", "precision_timing")  # when it began serving, start-up timings: they differ per start


def stable_model(answer: dict) -> dict:
    """What /model must answer the same after every restart: the model, not when or how fast it started."""
    return {k: v for k, v in answer.items() if k not in MODEL_VOLATILE} if isinstance(answer, dict) else answer

class Server:
    """One CLI server on a fixed 127.0.0.1 port: started, killed with SIGKILL, started again."""

    def __init__(self, argv: list[str], port: int, logs: Path, env: dict):
        self.argv, self.port, self.logs, self.env = argv, port, logs, env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.lives = 0
        logs.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.lives += 1
        with open(self.logs / f"life{self.lives:03d}.log", "w") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.logs)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def stop(self) -> int | None:
        """SIGTERM (graceful), then SIGKILL after 60 s; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)
        return self.proc.returncode

    def log_tail(self, chars: int = 1500) -> str:
        path = self.logs / f"life{self.lives:03d}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


class Life:
    """Whether the server is up, and which life it is in (one per start)."""

    def __init__(self):
        self.up = threading.Event()
        self.generation = 0


@dataclass
class ChaosStats:
    kills: int = 0
    restarts: int = 0
    unexpected_exits: int = 0
    restart_failures: int = 0
    aimed: int = 0  # kills that waited for a POST in flight
    restart_seconds: list = field(default_factory=list)
    kill_at_s: list = field(default_factory=list)  # seconds after the load started
    exits: list = field(default_factory=list)


class Chaos(threading.Thread):
    """Kills the server at random moments and starts it again; restarts it if it dies by itself."""

    def __init__(self, server: Server, life: Life, ready, rng: random.Random, kill_every: tuple[float, float],
                 soft_deadline: float, hard_deadline: float, min_kills: int, max_kills: int | None, after_restart=None,
                 aim: threading.Event | None = None, aim_share: float = 0.5):
        super().__init__(daemon=True, name="chaos")
        self.aim, self.aim_share = aim, aim_share  # half the kills wait for a request in flight (the client sets aim)
        self.server, self.life, self.ready, self.rng = server, life, ready, rng
        self.kill_every, self.soft, self.hard = kill_every, soft_deadline, hard_deadline
        self.min_kills, self.max_kills = min_kills, max_kills
        self.after_restart = after_restart
        self.stop = threading.Event()
        self.failed = threading.Event()
        self.stats = ChaosStats()
        self.t0 = time.monotonic()

    def wanted(self, now: float) -> bool:
        s = self.stats
        if self.max_kills is not None and s.kills >= self.max_kills:
            return False
        return now < self.soft or (s.kills < self.min_kills and now < self.hard)

    def done(self) -> bool:
        """The chaos has nothing left to do (used by the load loops to end early when min kills are met)."""
        return self.stats.kills >= self.min_kills

    def restart(self) -> bool:
        start = time.monotonic()
        self.server.start()
        self.stats.restarts += 1
        ok = self.ready(self.server, 240)
        if not ok:
            self.stats.restart_failures += 1
            log("restart failed:", self.server.log_tail())
            self.failed.set()
            return False
        self.stats.restart_seconds.append(round(time.monotonic() - start, 2))
        if self.after_restart is not None:
            self.after_restart()
        self.life.generation += 1
        self.life.up.set()
        return True

    def run(self) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*self.kill_every)
        while not self.stop.is_set():
            now = time.monotonic()
            if not self.server.alive():
                self.life.up.clear()
                self.stats.unexpected_exits += 1
                self.stats.exits.append({"rc": self.server.proc.returncode, "log": self.server.log_tail(800)})
                log("the server exited by itself, rc", self.server.proc.returncode)
                if not self.restart():
                    return
                next_kill = time.monotonic() + self.rng.uniform(*self.kill_every)
                continue
            if now >= next_kill and self.wanted(now):
                aimed = self.aim is not None and self.rng.random() < self.aim_share and self.aim.wait(5)
                if aimed:
                    time.sleep(self.rng.uniform(0, 0.02))  # somewhere in the request: before, during or after its commit
                self.life.up.clear()  # from here on, connection errors are downtime
                self.server.kill9()
                self.stats.kills += 1
                self.stats.aimed += aimed
                self.stats.kill_at_s.append(round(now - self.t0, 1))
                log(f"kill -9 #{self.stats.kills} at {now - self.t0:.0f} s")
                if not self.restart():
                    return
                next_kill = time.monotonic() + self.rng.uniform(*self.kill_every)
            self.stop.wait(0.1)


def percentile(values, q) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


# =================================================================================================
# studio
# =================================================================================================

COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 200), (220, 200, 40), (160, 60, 180), (40, 190, 190),
           (120, 120, 120), (240, 140, 30)]
CLASS_NAMES = ["red", "green", "blue", "yellow", "purple", "teal", "grey", "orange"]
NAMES = ["beach", "forest", "street", "glacier", "mountain", "sea", "cat 2", "Ünïcødé", "<b>bold</b>", "it's",
         "a&b", "  padded  ", "x" * MAX_NAME, "日本", "semi;colon", "dots.in.name", "tab-less"]
BAD_NAMES = ["", "   ", "a/b", "back\\slash", "x" * (MAX_NAME + 1), "a,b", 'quo"te', ".", "..", "new\nline", "bell\x07",
             "日本語" * 27]


def make_photos(root: Path, per_class: int, seed: int) -> Path:
    """``root/<class>/<i>.png``: noisy images of one colour per class, sizes varying."""
    rng = np.random.default_rng(seed)
    for name, colour in zip(CLASS_NAMES, COLOURS):
        for i in range(per_class):
            w, h = int(rng.integers(24, 72)), int(rng.integers(24, 72))
            pixels = np.clip(rng.normal(colour, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


def read_db(path: Path, readonly: bool = True) -> sqlite3.Connection:
    if readonly:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    else:
        con = sqlite3.connect(path, timeout=30)
    con.row_factory = sqlite3.Row
    return con


def snapshot(con: sqlite3.Connection) -> dict:
    """The images and groups tables, whole: {"images": {id: {...}}, "groups": {id: {...}}}."""
    images = {r["id"]: {"path": r["path"], "group_id": r["group_id"], "rank": r["rank"], "excluded": r["excluded"]}
              for r in con.execute("SELECT id, path, group_id, rank, excluded FROM images")}
    groups = {r["id"]: {"name": r["name"], "kind": r["kind"], "hidden": r["hidden"]}
              for r in con.execute("SELECT id, name, kind, hidden FROM groups")}
    return {"images": images, "groups": groups}


def db_checks(con: sqlite3.Connection) -> str:
    """'ok', or what PRAGMA integrity_check / foreign_key_check said."""
    integrity = [r[0] for r in con.execute("PRAGMA integrity_check")]
    foreign = con.execute("PRAGMA foreign_key_check").fetchall()
    if integrity == ["ok"] and not foreign:
        return "ok"
    return f"integrity_check: {integrity[:5]}; foreign_key_check: {[tuple(r) for r in foreign[:5]]}"


def check_name(name: str) -> str | None:
    """The trimmed name when the studio must accept it (its rules, from its error messages), else None:
    not empty, at most 80 characters and 255 UTF-8 bytes (a folder's name), none of / \\ , " tab or
    new line, no control character, not . or .."""
    text = (name or "").strip()
    if not text or len(text) > MAX_NAME or any(c in text for c in BAD_NAME_CHARS) or text in (".", ".."):
        return None
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in text) or len(text.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        return None
    return text


@dataclass
class Entry:
    """One action the server holds in its actions table (id = position, 1-based)."""

    n: int
    kind: str
    what: str
    changes: list  # [(cell, old, new)] for the cells whose value changed
    undone: bool = False


class Shadow:
    """The client's copy of the images and groups tables, changed only by answers it got.

    ``cell[(tbl, row, col)]`` is what the database must hold; ``owner[cell]`` names the last
    recorded action that set it (the effect it must show). ``entries`` mirrors the actions table;
    ``stack`` holds the entries not undone, newest last (what undo takes back).
    """

    def __init__(self, state: dict):
        self.cell: dict = {}
        self.path, self.rank = {}, {}
        for i, r in state["images"].items():
            self.cell[("images", i, "group_id")] = r["group_id"]
            self.cell[("images", i, "excluded")] = r["excluded"]
            self.path[i], self.rank[i] = r["path"], r["rank"]
        for g, r in state["groups"].items():
            for col in ("name", "kind", "hidden"):
                self.cell[("groups", g, col)] = r[col]
        self.owner: dict = {}
        self.entries: list[Entry] = []
        self.stack: list[Entry] = []
        self.undos = 0

    # -- reading -------------------------------------------------------------------------------
    @property
    def image_ids(self) -> list[int]:
        return sorted(self.path)

    @property
    def group_ids(self) -> list[int]:
        return sorted({c[1] for c in self.cell if c[0] == "groups"})

    def visible(self) -> list[int]:
        return [g for g in self.group_ids if self.cell[("groups", g, "hidden")] == 0]

    def name(self, g: int) -> str:
        return self.cell[("groups", g, "name")]

    def group_of(self, i: int) -> int:
        return self.cell[("images", i, "group_id")]

    def excluded(self, i: int):
        return self.cell[("images", i, "excluded")]

    def name_taken(self, name: str, except_id: int | None = None) -> bool:
        return any(self.name(g) == name and g != except_id for g in self.visible())

    def in_use(self, g: int) -> list[int]:
        """The group page's order: rank, then id."""
        ids = [i for i in self.path if self.group_of(i) == g and self.excluded(i) is None]
        return sorted(ids, key=lambda i: (self.rank[i], i))

    def excluded_ids(self, reason: str) -> list[int]:
        return sorted(i for i in self.path if self.excluded(i) == reason)

    def labels(self) -> dict[str, str]:
        return {self.path[i]: self.name(self.group_of(i)) for i in self.path if self.excluded(i) is None}

    # -- predicting: would the studio accept it? -----------------------------------------------
    def valid_ids(self, ids) -> bool:
        return bool(ids) and all(i in self.path for i in ids)

    def is_visible(self, g) -> bool:
        return ("groups", g, "hidden") in self.cell and self.cell[("groups", g, "hidden")] == 0

    def rename_ok(self, g, name) -> bool:
        text = check_name(name)
        return text is not None and self.is_visible(g) and not self.name_taken(text, g)

    def merge_ok(self, sources, target) -> bool:
        rest = {s for s in sources if s != target}
        return self.is_visible(target) and bool(rest) and all(self.is_visible(s) for s in rest)

    # -- applying the effect of an action that got a 200 ---------------------------------------
    def record(self, kind: str, what: str, sets: list) -> Entry:
        """An action the server recorded: ``sets`` are (cell, value) in the server's order."""
        changes = []
        for cell, value in sets:
            old = self.cell.get(cell)
            if old != value:
                changes.append((cell, old, value))
                self.cell[cell] = value
        entry = Entry(len(self.entries) + 1, kind, what, changes)
        for cell, _ in sets:
            self.owner[cell] = f"#{entry.n} {kind}: {what}"
        self.entries.append(entry)
        self.stack.append(entry)
        return entry

    def rename(self, g, name) -> Entry:
        text = check_name(name)
        return self.record("rename", f"group {g} named {text!r}",
                           [(("groups", g, "name"), text), (("groups", g, "kind"), "class")])

    def move_to_new(self, ids, g: int, name: str) -> Entry:
        """One action: a class made (its row inserted hidden, unrecorded; showing it is the first
        change) and the images moved into it."""
        text = check_name(name)
        self.cell[("groups", g, "name")] = text
        self.cell[("groups", g, "kind")] = "class"
        self.cell[("groups", g, "hidden")] = 1
        sets = [(("groups", g, "hidden"), 0)]
        for i in sorted(set(ids)):
            sets += [(("images", i, "group_id"), g), (("images", i, "excluded"), None)]
        return self.record("move", f"{len(set(ids))} image(s) moved to new class {text!r} (group {g})", sets)

    def move(self, ids, g) -> Entry:
        sets = []
        for i in sorted(set(ids)):
            sets += [(("images", i, "group_id"), g), (("images", i, "excluded"), None)]
        return self.record("move", f"{len(set(ids))} image(s) moved to group {g}", sets)

    def exclude(self, ids, reason) -> Entry:
        return self.record(reason, f"{len(set(ids))} image(s) marked {reason}",
                           [(("images", i, "excluded"), reason) for i in sorted(set(ids))])

    def restore(self, ids) -> Entry:
        return self.record("restore", f"{len(set(ids))} image(s) back into use",
                           [(("images", i, "excluded"), None) for i in sorted(set(ids))])

    def merge(self, sources, target) -> Entry:
        sets = []
        for s in sorted({s for s in sources if s != target}):
            sets += [(("images", i, "group_id"), target) for i in sorted(self.path) if self.group_of(i) == s]
            sets.append((("groups", s, "hidden"), 1))
        return self.record("merge", f"groups {sorted(set(sources) - {target})} merged into {target}", sets)

    def undo(self) -> Entry | None:
        if not self.stack:
            return None
        entry = self.stack.pop()
        for cell, old, _new in reversed(entry.changes):
            self.cell[cell] = old
            self.owner[cell] = f"undo of #{entry.n} {entry.kind}: {entry.what}"
        entry.undone = True
        self.undos += 1
        return entry


def check_effects(con: sqlite3.Connection, shadow: Shadow) -> dict:
    """Every cell against the shadow: cells an action set (effects) and cells none touched."""
    now = snapshot(con)
    verified, lost, unexpected = 0, [], []
    for cell, want in shadow.cell.items():
        tbl, row, col = cell
        got = now[tbl].get(row, {}).get(col, "<missing row>")
        if cell in shadow.owner:
            if got == want:
                verified += 1
            else:
                lost.append({"cell": list(cell), "want": want, "got": got, "set_by": shadow.owner[cell]})
        elif got != want:
            unexpected.append({"cell": list(cell), "want": want, "got": got})
    extra = [("images", i) for i in now["images"] if i not in shadow.path]
    extra += [("groups", g) for g in now["groups"] if ("groups", g, "name") not in shadow.cell]
    for tbl, row in extra:
        unexpected.append({"cell": [tbl, row, "*"], "want": "<no row>", "got": now[tbl][row]})
    for i, p in shadow.path.items():
        if i in now["images"] and (now["images"][i]["path"], now["images"][i]["rank"]) != (p, shadow.rank[i]):
            unexpected.append({"cell": ["images", i, "path/rank"], "want": [p, shadow.rank[i]],
                               "got": [now["images"][i]["path"], now["images"][i]["rank"]]})
    return {"verified": verified, "lost": lost, "unexpected": unexpected}


def check_history(con: sqlite3.Connection, shadow: Shadow, changes_from: int = 1) -> list[str]:
    """The actions table against the client's entries (kinds, undone flags, recorded changes)."""
    problems = []
    rows = con.execute("SELECT id, kind, undone_at FROM actions ORDER BY id").fetchall()
    if len(rows) != len(shadow.entries):
        problems.append(f"the actions table holds {len(rows)} actions, the client recorded {len(shadow.entries)}")
    for r, e in zip(rows, shadow.entries):
        if r["id"] != e.n or r["kind"] != e.kind or (r["undone_at"] is not None) != e.undone:
            problems.append(f"action {r['id']}: {r['kind']!r} undone={r['undone_at'] is not None}, the client has "
                            f"#{e.n} {e.kind!r} undone={e.undone}")
    got: dict[int, set] = collections.defaultdict(set)
    for c in con.execute("SELECT action_id, tbl, row_id, col, old, new FROM changes WHERE action_id >= ?", (changes_from,)):
        got[c["action_id"]].add(((c["tbl"], c["row_id"], c["col"]), c["old"], c["new"]))
    for e in shadow.entries[changes_from - 1:]:
        want = set(e.changes)
        if got.get(e.n, set()) != want:
            problems.append(f"action #{e.n} {e.kind} ({e.what}): recorded changes {sorted(got.get(e.n, set()), key=str)[:6]}"
                            f" but it changed {sorted(want, key=str)[:6]}")
    return problems[:FAIL_KEEP]


def initial_of_new_rows(con: sqlite3.Connection, state: dict) -> dict:
    """Rows made after the import (new classes): each cell's value before its first recorded change,
    else its value now (a row is inserted with its first values; only later changes are recorded)."""
    now = snapshot(con)
    first_old: dict = {}
    for c in con.execute("SELECT tbl, row_id, col, old FROM changes ORDER BY action_id, seq"):
        first_old.setdefault((c["tbl"], c["row_id"], c["col"]), c["old"])
    out = {"images": {}, "groups": {}}
    for tbl in ("images", "groups"):
        for row, values in now[tbl].items():
            if row not in state[tbl]:
                out[tbl][row] = {col: first_old.get((tbl, row, col), v) for col, v in values.items()}
    return out


def check_replay(con: sqlite3.Connection, state: dict) -> dict:
    """From the import state, the recorded changes of every action not undone, in order, give the tables."""
    new_rows = initial_of_new_rows(con, state)
    replay = {tbl: {row: dict(v) for row, v in state[tbl].items()} for tbl in ("images", "groups")}
    for tbl in replay:
        replay[tbl].update({row: dict(v) for row, v in new_rows[tbl].items()})
    applied, breaks = 0, []
    for c in con.execute("SELECT c.tbl, c.row_id, c.col, c.old, c.new, c.action_id FROM changes c JOIN actions a"
                         " ON a.id = c.action_id WHERE a.undone_at IS NULL ORDER BY c.action_id, c.seq"):
        row = replay[c["tbl"]].get(c["row_id"])
        if row is None:
            breaks.append(f"action {c['action_id']}: {c['tbl']} row {c['row_id']} does not exist")
            continue
        if row[c["col"]] != c["old"]:
            breaks.append(f"action {c['action_id']}: {c['tbl']}.{c['col']} of {c['row_id']} was {row[c['col']]!r}, "
                          f"the change says {c['old']!r}")
        row[c["col"]] = c["new"]
        applied += 1
    now = snapshot(con)
    diffs = [f"{tbl} {row}: replay {replay[tbl].get(row)} != table {now[tbl].get(row)}"
             for tbl in ("images", "groups") for row in sorted(set(replay[tbl]) | set(now[tbl]))
             if replay[tbl].get(row) != now[tbl].get(row)]
    return {"ok": not diffs and not breaks, "changes_applied": applied, "new_rows": sum(map(len, new_rows.values())),
            "differences": len(diffs), "chain_breaks": len(breaks), "details": (breaks + diffs)[:FAIL_KEEP]}


UNDO_ALL = """
import sys
from imagerec.studio._db import Project
project, todo, undone = Project(sys.argv[1]), int(sys.argv[2]), 0
while undone <= todo and project.undo() is not None:
    undone += 1
print(undone)
"""


def check_undo_all(db: Path, state: dict, env: dict | None = None) -> dict:
    """On a copy of the database (in memory-backed /dev/shm where there is one): undo until nothing
    is left, with imagerec's own undo (in a process running ``env``'s imagerec); the tables must be
    the import state again."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="soak-undo-", dir=base))
    try:
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        dst = sqlite3.connect(folder / DB_NAME)
        src.backup(dst)
        src.close()
        dst.close()
        con = read_db(folder / DB_NAME, readonly=False)
        todo = con.execute("SELECT COUNT(*) FROM actions WHERE undone_at IS NULL").fetchone()[0]
        con.close()
        proc = subprocess.run([sys.executable, "-c", UNDO_ALL, str(folder), str(todo)], capture_output=True, text=True,
                              env=env or {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=3600)
        undone = int(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip().isdigit() else -1
        error = None if proc.returncode == 0 else proc.stderr.strip()[-500:]
        con = read_db(folder / DB_NAME, readonly=False)
        try:
            now = snapshot(con)
        finally:
            con.close()
        diffs = []
        for tbl in ("images", "groups"):
            for row, want in state[tbl].items():
                if now[tbl].get(row) != want:
                    diffs.append(f"{tbl} {row}: {now[tbl].get(row)} after undoing all, {want} after the import")
        for row, got in now["images"].items():
            if row not in state["images"]:
                diffs.append(f"images {row}: a row the import did not make: {got}")
        shown = [g for g, got in now["groups"].items() if g not in state["groups"] and got["hidden"] != 1]
        diffs += [f"groups {g}: made after the import and still shown after undoing all" for g in shown]
        return {"ok": error is None and undone == todo and not diffs, "to_undo": todo, "undone": undone, "error": error,
                "differences": len(diffs), "details": diffs[:FAIL_KEEP]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Browser:
    """What a browser does: a cookie jar, the CSRF token from the page's meta tag, Origin on POSTs."""

    TOKEN = re.compile(r'<meta name="csrf-token" content="([^"]*)">')

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
        self.token: str | None = None

    def get(self, path: str, page: bool = False) -> httpx.Response:
        accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8" if page else "*/*"
        r = self.http.get(path, headers={"Accept": accept})
        if page and r.status_code == 200:
            m = self.TOKEN.search(r.text)
            if m:
                self.token = html.unescape(m.group(1))
        return r

    def post(self, path: str, body: dict) -> httpx.Response:
        headers = {"Content-Type": "application/json", "X-CSRF-Token": self.token or "", "Origin": self.url, "Accept": "*/*"}
        return self.http.post(path, content=json.dumps(body), headers=headers)

    def close(self) -> None:
        self.http.close()


@dataclass
class Pending:
    """A POST sent whose answer did not come back: done or not, the actions table says."""

    kind: str  # rename, new+move, move, exclude, restore, merge, undo, export
    args: dict
    valid: bool
    n_before: int


class StudioClient:
    """The scripted user: one request at a time, each answer checked against the shadow."""

    WEIGHTS = {"move": 20, "exclude": 9, "restore": 7, "rename": 9, "merge": 4, "move_new": 3, "undo": 8,
               "invalid": 5, "page": 18, "labels": 5, "img": 4, "thumb": 4, "export": 1}

    def __init__(self, url: str, db: Path, project: Path, shadow: Shadow, life: Life, rng: random.Random):
        self.browser = Browser(url)
        self.db, self.project, self.shadow, self.life, self.rng = db, project, shadow, life, rng
        self.stats = collections.Counter()
        self.status = collections.Counter()
        self.failures: list = []
        self.lost: list = []
        self.unexpected: list = []
        self.pending: Pending | None = None
        self.in_flight = threading.Event()  # set while a POST is on its way: what an aimed kill waits for
        self.seen_generation = life.generation
        self.checked_changes_from = 1
        self.manifest_ok: list[dict] = []  # what labels.csv may hold: the last exported, and one in flight
        self.reader_stats = collections.Counter()
        self.restart_checks: list = []

    def fail(self, what: str, **detail) -> None:
        self.stats["failures"] += 1
        if len(self.failures) < FAIL_KEEP:
            self.failures.append({"what": what, **detail})

    # -- one request ---------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict | None = None, page: bool = False) -> httpx.Response | None:
        self.stats["requests"] += 1
        up = self.life.up.is_set()
        try:
            if method == "GET":
                r = self.browser.get(path, page)
            else:
                self.in_flight.set()
                try:
                    r = self.browser.post(path, body)
                finally:
                    self.in_flight.clear()
        except httpx.TimeoutException:
            self.stats["client_timeouts"] += 1
            return None
        except httpx.TransportError:
            self.stats["connection_errors_up" if up and self.life.up.is_set() else "connection_errors_down"] += 1
            return None
        self.status[r.status_code] += 1
        if r.status_code >= 500:
            self.stats["five_xx"] += 1
            self.fail("5xx", method=method, path=path, status=r.status_code, body=r.text[:300])
        return r

    def action(self, kind: str, path: str, body: dict, valid: bool, args: dict) -> httpx.Response | None:
        """A POST that changes something: 200 applies its effect, 400 must have been expected."""
        self.stats["actions_sent"] += 1
        self.stats[f"sent_{kind}"] += 1
        self.pending = Pending(kind, args, valid, len(self.shadow.entries))
        r = self.call("POST", path, body)
        if r is None:
            return None  # resolved after the restart
        self.pending = None
        if r.status_code == 200:
            self.stats["actions_200"] += 1
            if not valid:
                self.fail("200 for an action the client expected to be refused", kind=kind, body=body, answer=r.text[:300])
                return r
            self.apply(kind, args, r.json())
        elif r.status_code == 400:
            self.stats["refused_400"] += 1
            if valid:
                self.fail("400 for an action the client expected to be done", kind=kind, body=body, answer=r.text[:300])
        elif r.status_code < 500:
            self.fail("unexpected status", kind=kind, body=body, status=r.status_code, answer=r.text[:300])
        else:  # a 5xx (counted): its outcome is unknown until the actions table says
            self.pending = Pending(kind, args, valid, len(self.shadow.entries))
            self.resolve()
        return r

    def apply(self, kind: str, a: dict, answer: dict) -> None:
        s = self.shadow
        if kind == "rename":
            s.rename(a["group_id"], a["name"])
            if answer.get("name") != check_name(a["name"]):
                self.fail("rename answered another name", want=check_name(a["name"]), got=answer.get("name"))
        elif kind == "move":
            s.move(a["image_ids"], a["group_id"])
        elif kind == "move_new":
            if answer.get("group_id") != a["new_id"]:
                self.fail("move to a new class made another group id", want=a["new_id"], got=answer.get("group_id"))
                a = {**a, "new_id": answer.get("group_id")}
            s.move_to_new(a["image_ids"], a["new_id"], a["new_name"])
        elif kind == "exclude":
            s.exclude(a["image_ids"], a["reason"])
        elif kind == "restore":
            s.restore(a["image_ids"])
        elif kind == "merge":
            s.merge(a["sources"], a["target"])
        elif kind == "undo":
            entry = s.undo()
            if (entry is None) != (answer.get("undone") is None):
                self.fail("undo answered otherwise than the client's history", client=None if entry is None else entry.what,
                          server=answer.get("undone"))
        elif kind == "export":
            labels = a["labels"]
            self.manifest_ok = [labels]
            if answer.get("rows") != len(labels):
                self.fail("export wrote another number of rows", want=len(labels), got=answer.get("rows"))
            self.check_manifest_file()

    # -- a request lost to a kill: done or not? --------------------------------------------------
    def resolve(self) -> None:
        p, self.pending = self.pending, None
        if p is None:
            return
        if p.kind == "export":
            self.manifest_ok.append(p.args["labels"])  # either file may be there
            self.stats["resolved_unknown_export"] += 1
            return
        con = read_db(self.db)
        try:
            rows = con.execute("SELECT id, kind, undone_at FROM actions WHERE id > ? ORDER BY id", (p.n_before,)).fetchall()
            if p.kind == "undo":
                top = self.shadow.stack[-1] if self.shadow.stack else None
                done = top is not None and con.execute("SELECT undone_at FROM actions WHERE id=?", (top.n,)).fetchone()[0] is not None
                if rows:
                    self.fail("actions appeared during an undo", rows=[tuple(r) for r in rows])
                if done:
                    self.shadow.undo()
                self.stats["resolved_done" if done else "resolved_not_done"] += 1
                return
            kind = {"exclude": p.args.get("reason"), "move_new": "move"}.get(p.kind, p.kind)
            if len(rows) == 1 and rows[0]["kind"] == kind and p.valid:
                if p.kind == "move_new":
                    gid = con.execute("SELECT row_id FROM changes WHERE action_id=? AND tbl='groups' AND col='hidden'",
                                      (rows[0]["id"],)).fetchone()
                    if gid is None or gid[0] != p.args["new_id"]:
                        self.fail("the new class of a lost request has another id", want=p.args["new_id"], got=gid and gid[0])
                self.apply(p.kind, p.args, {"undone": None, "name": check_name(p.args.get("name", "")),
                                            "group_id": p.args.get("new_id")})
                self.stats["resolved_done"] += 1
            elif not rows:
                self.stats["resolved_not_done"] += 1
            else:
                self.fail("a lost request left actions the client cannot explain", kind=p.kind, rows=[tuple(r) for r in rows])
        finally:
            con.close()

    def wait_up(self, until: float) -> bool:
        while not self.life.up.wait(0.25):
            if time.monotonic() > until:
                return False
        return True

    # -- the checks -----------------------------------------------------------------------------
    def check_db(self, reason: str) -> None:
        con = read_db(self.db)
        try:
            integrity = db_checks(con)
            if integrity != "ok":
                self.stats["integrity_failures"] += 1
                self.fail("integrity", when=reason, result=integrity)
            effects = check_effects(con, self.shadow)
            history = check_history(con, self.shadow, self.checked_changes_from)
        finally:
            con.close()
        self.checked_changes_from = len(self.shadow.entries) + 1
        self.stats["effects_verified"] += effects["verified"]
        self.stats["effect_checks"] += 1
        if effects["lost"]:
            self.stats["lost_effects"] += len(effects["lost"])
            self.lost += effects["lost"][: FAIL_KEEP - len(self.lost)]
            self.fail("lost effects", when=reason, count=len(effects["lost"]), first=effects["lost"][:3])
        if effects["unexpected"]:
            self.stats["unexpected_changes"] += len(effects["unexpected"])
            self.unexpected += effects["unexpected"][: FAIL_KEEP - len(self.unexpected)]
            self.fail("unexpected changes", when=reason, count=len(effects["unexpected"]), first=effects["unexpected"][:3])
        if history:
            self.stats["history_problems"] += len(history)
            self.fail("history", when=reason, problems=history[:5])

    def after_restart(self) -> None:
        """The server came back: settle the lost request, then the database and the pages."""
        self.seen_generation = self.life.generation
        self.resolve()
        self.check_db("after restart")
        self.page("/", check=True)  # a reload, as a browser would
        self.check_pages()
        self.check_manifest_file()
        self.restart_checks.append({"generation": self.seen_generation, "actions": len(self.shadow.entries),
                                    "lost_effects": self.stats["lost_effects"], "failures": self.stats["failures"]})

    def check_pages(self) -> None:
        for g in self.shadow.visible():
            self.group_page(g, 1)
        for reason in EXCLUSIONS:
            self.excluded_page(reason)
        self.groups_page()
        self.labels_csv()

    def page_result(self, ok: bool, what: str, **detail) -> None:
        self.stats["page_checks"] += 1
        if not ok:
            self.stats["page_mismatches"] += 1
            self.fail("page mismatch", page=what, **detail)

    def page(self, path: str, check: bool = False) -> httpx.Response | None:
        r = self.call("GET", path, page=True)
        if r is not None and check:
            self.page_result(r.status_code == 200 and "csrf-token" in r.text, path, status=r.status_code)
        return r

    def group_page(self, g: int, page: int = 1) -> None:
        r = self.page(f"/groups/{g}?page={page}")
        if r is None:
            return
        if not self.shadow.is_visible(g):
            self.page_result(r.status_code == 404, f"/groups/{g}", status=r.status_code, want=404)
            return
        ids = self.shadow.in_use(g)
        pages = max(1, -(-len(ids) // PAGE))
        page = min(max(page, 1), pages)
        want = ids[(page - 1) * PAGE: page * PAGE]
        got = [int(x) for x in re.findall(r'data-id="(\d+)"', r.text)] if r.status_code == 200 else None
        self.page_result(got == want, f"/groups/{g}?page={page}", status=r.status_code, want=want[:10], got=(got or [])[:10])

    def excluded_page(self, reason: str) -> None:
        r = self.page(f"/excluded/{reason}")
        if r is None:
            return
        want = self.shadow.excluded_ids(reason)[:PAGE]
        got = [int(x) for x in re.findall(r'data-id="(\d+)"', r.text)] if r.status_code == 200 else None
        self.page_result(got == want, f"/excluded/{reason}", status=r.status_code, want=want[:10], got=(got or [])[:10])

    def groups_page(self) -> None:
        r = self.page("/groups")
        if r is None:
            return
        got = {int(x) for x in re.findall(r'data-group="(\d+)"', r.text)} if r.status_code == 200 else None
        names_ok = r.status_code == 200 and all(f">{html.escape(self.shadow.name(g))}</a>" in r.text for g in self.shadow.visible())
        self.page_result(got == set(self.shadow.visible()) and names_ok, "/groups", status=r.status_code)

    def labels_csv(self) -> None:
        r = self.call("GET", "/export/labels.csv")
        if r is None:
            return
        got = dict(tuple(row) for row in list(csv.reader(io.StringIO(r.text)))[1:]) if r.status_code == 200 else None
        want = self.shadow.labels()
        detail = {} if got == want else {"missing_or_wrong": [(p, l, (got or {}).get(p)) for p, l in want.items() if (got or {}).get(p) != l][:5]}
        self.page_result(got == want, "/export/labels.csv", status=r.status_code, **detail)

    def check_manifest_file(self) -> None:
        path = self.project / "export" / "labels.csv"
        if not self.manifest_ok:
            return
        got = dict(tuple(row) for row in list(csv.reader(io.StringIO(path.read_text())))[1:]) if path.is_file() else None
        self.page_result(got in self.manifest_ok, "export/labels.csv (file)", rows=None if got is None else len(got))
        if got in self.manifest_ok:
            self.manifest_ok = [got]

    # -- the random mix -------------------------------------------------------------------------
    def some_images(self, k_max: int = 20, pool: list[int] | None = None) -> list[int]:
        pool = pool or self.shadow.image_ids
        return self.rng.sample(pool, min(len(pool), self.rng.randint(1, k_max)))

    def a_name(self) -> str:
        r = self.rng.random()
        visible = self.shadow.visible()
        if r < 0.15 and visible:
            return self.shadow.name(self.rng.choice(visible))  # taken (or its own): 400 or 200
        base = self.rng.choice(NAMES)
        return base if self.rng.random() < 0.3 else f"{base} {self.rng.randint(1, 999)}"[-MAX_NAME:]

    def step(self) -> None:
        s, rng = self.shadow, self.rng
        kind = rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]
        visible = s.visible()
        if kind == "merge" and len(visible) < 4:
            kind = "move_new"
        if kind == "move_new" and len(visible) > 12:
            kind = "merge"
        if kind == "move":
            ids, g = self.some_images(), rng.choice(visible)
            self.action("move", "/api/move", {"image_ids": ids, "group_id": g}, s.valid_ids(ids) and s.is_visible(g),
                        {"image_ids": ids, "group_id": g})
        elif kind == "move_new":
            name = f"{rng.choice(NAMES)} {rng.randint(1000, 99999)}"[-MAX_NAME:]
            ids = self.some_images()
            new_id = max(s.group_ids) + 1  # rows are never deleted: the next id
            valid = check_name(name) is not None and not s.name_taken(check_name(name))
            self.action("move_new", "/api/move", {"image_ids": ids, "new_name": name}, valid,
                        {"image_ids": ids, "new_name": name, "new_id": new_id})
        elif kind == "exclude":
            ids, reason = self.some_images(10), rng.choice(EXCLUSIONS)
            self.action("exclude", "/api/exclude", {"image_ids": ids, "reason": reason}, s.valid_ids(ids),
                        {"image_ids": ids, "reason": reason})
        elif kind == "restore":
            out = [i for i in s.image_ids if s.excluded(i) is not None]
            ids = self.some_images(10, out if out and rng.random() < 0.9 else None)
            self.action("restore", "/api/restore", {"image_ids": ids}, s.valid_ids(ids), {"image_ids": ids})
        elif kind == "rename":
            g, name = rng.choice(visible), self.a_name()
            self.action("rename", "/api/rename", {"group_id": g, "name": name}, s.rename_ok(g, name), {"group_id": g, "name": name})
        elif kind == "merge":
            target = rng.choice(visible)
            sources = rng.sample([g for g in visible if g != target], rng.randint(1, 2))
            self.action("merge", "/api/merge", {"sources": sources, "target": target}, s.merge_ok(sources, target),
                        {"sources": sources, "target": target})
        elif kind == "undo":
            for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 6)):
                if self.action("undo", "/api/undo", {}, True, {}) is None:
                    break
        elif kind == "invalid":
            self.invalid()
        elif kind == "page":
            what = rng.choice(["/", "/groups", "group", "group", "group", "excluded", "/history", "/export", "hidden"])
            if what == "group":
                g = rng.choice(visible)
                self.group_page(g, rng.choice([1, 1, 1, 2]))
            elif what == "hidden":
                hidden = [g for g in s.group_ids if g not in visible]
                self.group_page(rng.choice(hidden) if hidden else 10_000)
            elif what == "excluded":
                self.excluded_page(rng.choice(EXCLUSIONS))
            elif what == "/groups":
                self.groups_page()
            else:
                self.page(what, check=True)
        elif kind == "labels":
            self.labels_csv()
        elif kind == "img":
            i = rng.choice(s.image_ids)
            r = self.call("GET", f"/img/{i}")
            if r is not None:
                self.page_result(r.status_code == 200 and r.content == Path(s.path[i]).read_bytes(), f"/img/{i}", status=r.status_code)
        elif kind == "thumb":
            i = rng.choice(s.image_ids)
            r = self.call("GET", f"/thumb/{i}")
            if r is not None:
                self.page_result(r.status_code == 200 and r.content[:2] == b"\xff\xd8", f"/thumb/{i}", status=r.status_code)
        elif kind == "export":
            self.action("export", "/api/export", {"kind": "manifest"}, True, {"labels": s.labels()})

    def invalid(self) -> None:
        """An action the studio must refuse (400) and leave without effect."""
        s, rng = self.shadow, self.rng
        visible = s.visible()
        hidden = [g for g in s.group_ids if g not in visible] or [10_000]
        case = rng.randrange(6)
        if case == 0:
            g, name = rng.choice(visible), rng.choice(BAD_NAMES)
            self.action("rename", "/api/rename", {"group_id": g, "name": name}, False, {"group_id": g, "name": name})
        elif case == 1:
            ids, g = [*self.some_images(5), 1_000_000], rng.choice(visible)
            self.action("move", "/api/move", {"image_ids": ids, "group_id": g}, False, {"image_ids": ids, "group_id": g})
        elif case == 2:
            ids, g = self.some_images(5), rng.choice(hidden)
            self.action("move", "/api/move", {"image_ids": ids, "group_id": g}, False, {"image_ids": ids, "group_id": g})
        elif case == 3:
            g = rng.choice(visible)
            self.action("merge", "/api/merge", {"sources": [g], "target": g}, False, {"sources": [g], "target": g})
        elif case == 4:
            ids = self.some_images(5)
            self.action("exclude", "/api/exclude", {"image_ids": ids, "reason": "blurry"}, False, {"image_ids": ids, "reason": "blurry"})
        else:
            taken = [g for g in visible]
            if len(taken) >= 2:
                a, b = rng.sample(taken, 2)
                self.action("rename", "/api/rename", {"group_id": a, "name": s.name(b)}, False, {"group_id": a, "name": s.name(b)})

    def run(self, until_soft: float, until_hard: float, chaos: Chaos, max_requests: int) -> None:
        self.page("/", check=True)
        while True:
            now = time.monotonic()
            if self.stats["requests"] >= max_requests or now >= until_hard or chaos.failed.is_set():
                break
            if now >= until_soft and chaos.done():
                break
            if self.pending is not None or not self.life.up.is_set():
                if not self.wait_up(until_hard):
                    break
            if self.life.generation != self.seen_generation:
                self.after_restart()
                continue
            if self.pending is not None:  # lost without a kill (a timeout): settle it once the server is done with it
                time.sleep(5)
                self.resolve()
                self.check_db("after a lost answer")
            self.step()
            time.sleep(self.rng.uniform(0, 0.03))


def studio_reader(url: str, shadow_ids: list[int], life: Life, stop: threading.Event, stats: collections.Counter,
                  status: collections.Counter, paths: dict, rng: random.Random, failures: list) -> None:
    """Another tab: /img and /thumb (and a few ids that do not exist) while the client acts."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            i = rng.choice(shadow_ids) if rng.random() < 0.95 else rng.choice([0, 10**6])
            path = f"/{rng.choice(['img', 'thumb'])}/{i}"
            up = life.up.is_set()
            stats["requests"] += 1
            try:
                r = http.get(path)
            except httpx.TimeoutException:
                stats["client_timeouts"] += 1
                continue
            except httpx.TransportError:
                stats["connection_errors_up" if up and life.up.is_set() else "connection_errors_down"] += 1
                stop.wait(0.25)
                continue
            status[r.status_code] += 1
            want = 200 if i in paths else 404
            if r.status_code >= 500:
                stats["five_xx"] += 1
            if r.status_code != want or (want == 200 and path.startswith("/img") and r.content != paths[i]):
                stats["failures"] += 1
                if len(failures) < 10:
                    failures.append({"what": "reader", "path": path, "status": r.status_code})
            stop.wait(rng.uniform(0.02, 0.15))


def studio_ready(server: Server, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not server.alive():
            return False
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/", timeout=5).status_code == 200:
                return True
        time.sleep(0.1)
    return False


def soak_studio(minutes: float, seed: int, work: Path, kill_every=(20.0, 120.0), min_kills: int = 0,
                max_kills: int | None = None, per_class: int = 30, max_requests: int | None = None) -> dict:
    rng = random.Random(seed)
    data = make_photos(work / "photos", per_class, seed)
    project = work / "project"
    db = project / DB_NAME
    port = free_port()
    code, code_facts = code_snapshot(work)
    env = code_env(work, code)
    server = Server(imagerec_argv("studio", data, "--project", project, "--port", port), port, work / "logs", env)
    life = Life()
    t_start = time.monotonic()
    server.start()
    try:
        if not studio_ready(server, 300):
            raise RuntimeError(f"the studio did not start:\n{server.log_tail()}")
        log(f"studio up on {server.url} in {time.monotonic() - t_start:.1f} s")
        con = read_db(db)
        try:
            state = snapshot(con)  # right after the import, before any action
            if con.execute("SELECT COUNT(*) FROM actions").fetchone()[0]:
                raise RuntimeError("the new project already holds actions")
        finally:
            con.close()
        life.up.set()
        shadow = Shadow(state)
        client = StudioClient(server.url, db, project, shadow, life, random.Random(rng.random()))
        t0 = time.monotonic()
        soft, hard = t0 + minutes * 60, t0 + minutes * 60 + 300
        chaos = Chaos(server, life, studio_ready, random.Random(rng.random()), kill_every, soft, hard, min_kills, max_kills,
                      aim=client.in_flight)
        chaos.t0 = t0
        stop_reader = threading.Event()
        reader_stats, reader_status, reader_failures = collections.Counter(), collections.Counter(), []
        paths = {i: Path(p).read_bytes() for i, p in shadow.path.items()}
        reader = threading.Thread(target=studio_reader, daemon=True, args=(
            server.url, shadow.image_ids, life, stop_reader, reader_stats, reader_status, paths, random.Random(rng.random()),
            reader_failures))
        chaos.start()
        reader.start()
        try:
            client.run(soft, hard, chaos, max_requests or int(minutes * 60 * 60) + 500)
        finally:
            chaos.stop.set()
            chaos.join(300)
            stop_reader.set()
            reader.join(60)
        load_s = time.monotonic() - t0
        # the end: settle, then the checks with the server up, then stopped
        if client.wait_up(time.monotonic() + 300):
            if client.life.generation != client.seen_generation:
                client.after_restart()
            client.resolve()
            client.check_db("at the end")
            client.check_pages()
            client.check_manifest_file()
        stop_rc = server.stop()
        with open(work / "client_history.jsonl", "w") as f:  # for a look afterwards (--keep)
            for e in shadow.entries:
                f.write(json.dumps({"n": e.n, "kind": e.kind, "what": e.what, "undone": e.undone,
                                    "changes": [[list(c), o, n] for c, o, n in e.changes]}) + "\n")
        con = read_db(db, readonly=False)
        try:
            integrity = db_checks(con)
            replay = check_replay(con, state)
            final = check_effects(con, shadow)
            history = check_history(con, shadow, 1)
            actions, undone = con.execute("SELECT COUNT(*), COUNT(undone_at) FROM actions").fetchone()
            changes = con.execute("SELECT COUNT(*) FROM changes").fetchone()[0]
        finally:
            con.close()
        undo_all = check_undo_all(db, state, env)
        leftovers = [str(p.relative_to(project)) for p in project.rglob("*.tmp*")]
    finally:
        server.stop()
    st = client.stats
    five_xx = st["five_xx"] + reader_stats["five_xx"]
    lost = len(final["lost"]) + st["lost_effects"]
    summary = {
        "target": "studio",
        "ok": False,
        "code": code_facts,
        "seed": seed,
        "minutes": minutes,
        "load_seconds": round(load_s, 1),
        "images": len(shadow.path),
        "groups_at_import": len(state["groups"]),
        "requests_sent": st["requests"] + reader_stats["requests"],
        "actions_sent": st["actions_sent"],
        "actions_by_kind": {k[5:]: v for k, v in sorted(st.items()) if k.startswith("sent_")},
        "answers_200": client.status[200] + reader_status[200],
        "actions_200": st["actions_200"],
        "refused_400": st["refused_400"],
        "status_counts": {str(k): v for k, v in sorted((client.status + reader_status).items())},
        "effects_verified": st["effects_verified"] + final["verified"],
        "effect_checks": st["effect_checks"] + 1,
        "effects_at_end": final["verified"],
        "lost_effects": lost,
        "unexpected_changes": st["unexpected_changes"] + len(final["unexpected"]),
        "page_checks": st["page_checks"],
        "page_mismatches": st["page_mismatches"],
        "history_problems": st["history_problems"] + len(history),
        "lost_answers_resolved": {"done": st["resolved_done"], "not_done": st["resolved_not_done"],
                                  "export": st["resolved_unknown_export"]},
        "kills": chaos.stats.kills,
        "kills_aimed_at_a_post": chaos.stats.aimed,
        "kill_at_s": chaos.stats.kill_at_s,
        "restarts": chaos.stats.restarts,
        "restart_seconds": {"median": percentile(chaos.stats.restart_seconds, 50), "max": max(chaos.stats.restart_seconds, default=None)},
        "unexpected_exits": chaos.stats.unexpected_exits,
        "restart_failures": chaos.stats.restart_failures,
        "integrity": integrity,
        "integrity_failures_after_restarts": st["integrity_failures"],
        "replay": replay,
        "undo_all": undo_all,
        "five_xx": five_xx,
        "connection_errors": {"while_down": st["connection_errors_down"] + reader_stats["connection_errors_down"],
                              "while_up": st["connection_errors_up"] + reader_stats["connection_errors_up"]},
        "client_timeouts": st["client_timeouts"] + reader_stats["client_timeouts"],
        "db": {"actions": actions, "undone": undone, "changes": changes, "bytes": db.stat().st_size if db.exists() else None},
        "temp_files_left": leftovers[:20],
        "final_stop_rc": stop_rc,
        "failures": (client.failures + reader_failures)[:FAIL_KEEP],
        "reader_failures": reader_stats["failures"],
    }
    summary["ok"] = (lost == 0 and integrity == "ok" and not st["integrity_failures"] and replay["ok"] and undo_all["ok"]
                     and five_xx == 0 and summary["unexpected_changes"] == 0 and summary["page_mismatches"] == 0
                     and summary["history_problems"] == 0 and st["failures"] == 0 and reader_stats["failures"] == 0
                     and chaos.stats.restart_failures == 0 and chaos.stats.unexpected_exits == 0
                     and summary["connection_errors"]["while_up"] == 0)
    return summary


# =================================================================================================
# serve
# =================================================================================================

BUILD_MODEL = """
import sys, torch
from pathlib import Path
from imagerec import create_backbone
from imagerec.checkpoint import Checkpoint, save_checkpoint
torch.manual_seed(int(sys.argv[2]))
net = create_backbone("seed_cnn", num_classes=3)
with torch.no_grad():
    net.fc3.weight.mul_(20)  # confident, distinct outputs, so that a wrong answer shows
meta = {"backbone": "seed_cnn", "classes": ["blue", "green", "red"], "preprocessing": net.preprocessing.to_dict()}
save_checkpoint(Path(sys.argv[1]) / "best.safetensors", Checkpoint(net.state_dict(), meta))
"""
MAX_QUEUE = 12
MAX_PIXELS = 250_000
PROB_TOL = 1e-4
CLIENTS = 4
BURST = 24


def serve_images(seed: int, count: int = 12) -> dict[str, bytes]:
    """Distinct PNG and JPEG images of several sizes, by file name."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in range(count):
        w, h = int(rng.integers(16, 160)), int(rng.integers(16, 160))
        colour = COLOURS[n % len(COLOURS)]
        pixels = np.clip(rng.normal(colour, 50, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        fmt = "PNG" if n % 2 == 0 else "JPEG"
        Image.fromarray(pixels).save(buf, fmt)
        out[f"img{n:02d}.{fmt.lower().replace('jpeg', 'jpg')}"] = buf.getvalue()
    return out


def bad_images(seed: int) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a word the 400 must say): what a server meets in the wild."""
    rng = np.random.default_rng(seed + 1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    big = io.BytesIO()
    Image.fromarray(np.zeros((520, 520, 3), dtype=np.uint8)).save(big, "PNG")
    return {"empty.png": (b"", "empty"), "note.png": (b"hello, world", "not an image"),
            "cut.png": (buf.getvalue()[:60], ""), "huge.png": (big.getvalue(), "pixels")}


def serve_ready(server: Server, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not server.alive():
            return False
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
                return True
        time.sleep(0.1)
    return False


class ServeLoad:
    """The clients' shared counters and the checks of every answer against the reference."""

    def __init__(self, url: str, images: dict, bad: dict, life: Life, seed: int):
        self.url, self.images, self.bad, self.life = url, images, bad, life
        self.names = sorted(images)
        self.ref: dict = {}
        self.model_ref: dict | None = None
        self.lock = threading.Lock()
        self.stats = collections.Counter()
        self.status = collections.Counter()
        self.by_kind = collections.Counter()
        self.failures: list = []
        self.max_prob_dev = 0.0
        self.max_embed_dev = 0.0
        self.seed = seed

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def fail(self, what: str, **detail) -> None:
        with self.lock:
            self.stats["failures"] += 1
            if len(self.failures) < FAIL_KEEP:
                self.failures.append({"what": what, **detail})

    def reference(self) -> None:
        """One image per request, before any load: the answers every later 200 must give."""
        with httpx.Client(base_url=self.url, timeout=60) as http:
            self.model_ref = stable_model(http.get("/model").json())
            for name in self.names:
                entry = {}
                for tta in (False, True):
                    r = http.post(f"/predict?top_k=3&tta={str(tta).lower()}", files=[("file", (name, self.images[name]))])
                    r.raise_for_status()
                    (p,) = r.json()["predictions"]
                    entry[tta] = {t["class"]: t["probability"] for t in p["top"]}
                r = http.post("/embed", files=[("file", (name, self.images[name]))])
                r.raise_for_status()
                entry["embed"] = np.asarray(r.json()["embeddings"][0]["vector"], dtype=np.float64)
                self.ref[name] = entry

    def check_predictions(self, body: dict, names: list[str], sent_as: list[str], tta: bool) -> None:
        preds = body.get("predictions", [])
        if len(preds) != len(names):
            self.fail("predictions count", want=len(names), got=len(preds))
            return
        for p, name, label in zip(preds, names, sent_as):
            want = self.ref[name][tta]
            got = {t["class"]: t["probability"] for t in p["top"]}
            dev = max(abs(got.get(c, -1.0) - v) for c, v in want.items()) if set(got) == set(want) else float("inf")
            best = sorted(want.items(), key=lambda kv: -kv[1])
            top_ok = p["class"] == p["top"][0]["class"] and (p["class"] == best[0][0] or best[0][1] - best[1][1] < PROB_TOL)
            with self.lock:
                self.max_prob_dev = max(self.max_prob_dev, dev)
            if p.get("file") != label or dev > PROB_TOL or not top_ok:
                self.count("wrong_answers")
                self.fail("answer differs from the reference", image=name, tta=tta, file=p.get("file"), want=want, got=got)
            else:
                self.count("answers_verified")

    def check_embeddings(self, body: dict, names: list[str]) -> None:
        embs = body.get("embeddings", [])
        if len(embs) != len(names) or body.get("dim") != len(self.ref[names[0]]["embed"]):
            self.fail("embeddings shape", want=len(names), got=len(embs), dim=body.get("dim"))
            return
        for e, name in zip(embs, names):
            got, want = np.asarray(e["vector"], dtype=np.float64), self.ref[name]["embed"]
            dev = float(np.max(np.abs(got - want) / (1e-4 + 1e-4 * np.abs(want)))) if got.shape == want.shape else float("inf")
            with self.lock:
                self.max_embed_dev = max(self.max_embed_dev, float(np.max(np.abs(got - want))) if got.shape == want.shape else dev)
            if e.get("file") != name or dev > 1:
                self.count("wrong_answers")
                self.fail("embedding differs from the reference", image=name)
            else:
                self.count("answers_verified")

    def send(self, http: httpx.Client, kind: str, method: str, path: str, expect: tuple, **kw) -> httpx.Response | None:
        """One request; counts its status; a 5xx other than 503/504 is a failure."""
        with self.lock:
            self.stats["requests"] += 1
            self.by_kind[kind] += 1
        up = self.life.up.is_set()
        try:
            r = http.request(method, path, **kw)
        except httpx.TimeoutException:
            self.count("client_timeouts")
            return None
        except httpx.TransportError:
            self.count("connection_errors_up" if up and self.life.up.is_set() else "connection_errors_down")
            time.sleep(0.25)
            return None
        with self.lock:
            self.status[r.status_code] += 1
        if r.status_code >= 500 and r.status_code not in (503, 504):
            self.count("five_xx")
            self.fail("5xx", kind=kind, path=path, status=r.status_code, body=r.text[:300])
        elif r.status_code in (503, 504):
            self.count(f"intended_{r.status_code}")
            if r.status_code == 503 and "Retry-After" not in r.headers:
                self.fail("503 without Retry-After", kind=kind)
        elif r.status_code not in expect:
            self.fail("unexpected status", kind=kind, path=path, status=r.status_code, want=list(expect), body=r.text[:300])
        if r.status_code >= 400 and not self.error_json(r):
            self.fail("an error without a JSON body", kind=kind, status=r.status_code, body=r.text[:200])
        return r

    @staticmethod
    def error_json(r: httpx.Response) -> bool:
        try:
            body = r.json()
        except ValueError:
            return False
        return isinstance(body, dict) and "error" in body and "Traceback" not in str(body["error"])

    def one(self, http: httpx.Client, rng: random.Random) -> None:
        kind = rng.choices(["multipart", "raw", "embed", "model", "health", "ready", "metrics", "bad", "type", "query"],
                           weights=[34, 20, 12, 5, 5, 3, 2, 11, 4, 4])[0]
        if kind == "multipart":
            names = [rng.choice(self.names) for _ in range(rng.randint(1, 4))]
            tta = rng.random() < 0.2
            r = self.send(http, kind, "POST", f"/predict?top_k=3&tta={str(tta).lower()}", (200,),
                          files=[("file", (n, self.images[n])) for n in names])
            if r is not None and r.status_code == 200:
                self.check_predictions(r.json(), names, names, tta)
        elif kind == "raw":
            name = rng.choice(self.names)
            ctype = "image/png" if name.endswith(".png") else rng.choice(["image/jpeg", "application/octet-stream"])
            r = self.send(http, kind, "POST", "/predict?top_k=3", (200,), content=self.images[name], headers={"Content-Type": ctype})
            if r is not None and r.status_code == 200:
                self.check_predictions(r.json(), [name], ["body"], False)
        elif kind == "embed":
            names = [rng.choice(self.names) for _ in range(rng.randint(1, 3))]
            r = self.send(http, kind, "POST", "/embed", (200,), files=[("file", (n, self.images[n])) for n in names])
            if r is not None and r.status_code == 200:
                self.check_embeddings(r.json(), names)
        elif kind == "model":
            r = self.send(http, kind, "GET", "/model", (200,))
            if r is not None and r.status_code == 200 and stable_model(r.json()) != self.model_ref:
                self.fail("/model differs from the reference", got=r.text[:300])
        elif kind == "health":
            r = self.send(http, kind, "GET", "/health", (200,))
            if r is not None and r.status_code == 200 and r.json() != {"status": "ok"}:
                self.fail("/health body", got=r.text[:200])
        elif kind == "ready":
            self.send(http, kind, "GET", "/ready", (200,))  # 503 while warming up: intended
        elif kind == "metrics":
            r = self.send(http, kind, "GET", "/metrics", (200,))
            if r is not None and r.status_code == 200 and "imagerec_http_requests" not in r.text:
                self.fail("/metrics without the request counter")
        elif kind == "bad":
            name = rng.choice(sorted(self.bad))
            data, word = self.bad[name]
            files = [("file", (n, self.images[n])) for n in rng.sample(self.names, rng.randint(0, 2))]
            files.insert(rng.randint(0, len(files)), ("file", (name, data)))
            r = self.send(http, kind, "POST", "/predict", (400,), files=files)
            if r is not None and r.status_code == 400 and self.error_json(r):
                error = r.json()["error"]
                if name not in error or word not in error:
                    self.fail("a bad image's 400 does not name the file and the problem", image=name, error=error[:200])
        elif kind == "type":
            self.send(http, kind, "POST", "/predict", (415,), content=b"x", headers={"Content-Type": "text/plain"})
        elif kind == "query":
            name = rng.choice(self.names)
            self.send(http, kind, "POST", "/predict?top_k=0", (422,), content=self.images[name], headers={"Content-Type": "image/png"})

    def client(self, rng: random.Random, soft: float, hard: float, chaos: Chaos, budget: list) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while True:
                now = time.monotonic()
                with self.lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                if now >= hard or chaos.failed.is_set() or (now >= soft and chaos.done()):
                    return
                self.one(http, rng)
                time.sleep(rng.uniform(0, 0.02))

    def burster(self, rng: random.Random, soft: float, hard: float, chaos: Chaos, stop: threading.Event,
                every: tuple[float, float]) -> None:
        """Every 30-60 s (``every``), 24 concurrent raw predicts against --max-queue 12: some get 503."""
        clients = [httpx.Client(base_url=self.url, timeout=60) for _ in range(BURST)]
        try:
            with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
                while not stop.wait(rng.uniform(*every)):
                    now = time.monotonic()
                    if now >= hard or (now >= soft and chaos.done()):
                        return
                    if not self.life.up.is_set():
                        continue
                    picks = [rng.choice(self.names) for _ in range(BURST)]
                    self.count("bursts")
                    futures = [pool.submit(self.send, c, "burst", "POST", "/predict?top_k=3", (200,), content=self.images[n],
                                           headers={"Content-Type": "application/octet-stream"}) for c, n in zip(clients, picks)]
                    for f, n in zip(futures, picks):
                        r = f.result()
                        if r is not None and r.status_code == 200:
                            self.check_predictions(r.json(), [n], ["body"], False)
        finally:
            for c in clients:
                c.close()

    def after_restart(self) -> None:
        """Called by the chaos thread once /ready answers again: /model must be the reference's."""
        self.count("ready_after_restart")
        with contextlib.suppress(httpx.TransportError):
            r = httpx.get(f"{self.url}/model", timeout=30)
            if r.status_code != 200 or stable_model(r.json()) != self.model_ref:
                self.fail("/model after a restart differs from the reference", status=r.status_code)


def rss_sampler(server: Server, life: Life, stop: threading.Event, samples: list, t0: float) -> None:
    """The server's resident memory every 2 s while it is up (ready), by life."""
    while not stop.wait(2.0):
        proc = server.proc
        if life.up.is_set() and proc is not None and proc.poll() is None:
            mb = rss_mb(proc.pid)
            if mb is not None:
                samples.append((server.lives, round(time.monotonic() - t0, 1), round(mb, 1)))


def rss_summary(samples: list) -> dict:
    lives: dict[int, list] = collections.defaultdict(list)
    for life, t, mb in samples:
        lives[life].append((t, mb))
    per_life = []
    for life, points in sorted(lives.items()):
        mbs = [mb for _, mb in points]
        per_life.append({"life": life, "seconds": round(points[-1][0] - points[0][0], 1), "samples": len(points),
                         "first_mb": mbs[0], "last_mb": mbs[-1], "max_mb": max(mbs)})
    longest = max(per_life, key=lambda p: p["seconds"], default=None)
    return {"max_mb": max((mb for *_, mb in samples), default=None), "samples": len(samples),
            "longest_life": longest, "per_life": per_life}


def soak_serve(minutes: float, seed: int, work: Path, kill_every=(20.0, 120.0), min_kills: int = 0,
               max_kills: int | None = None, model: str | None = None, max_requests: int | None = None) -> dict:
    rng = random.Random(seed)
    code, code_facts = code_snapshot(work)
    env = code_env(work, code)
    if model is None:
        run = work / "run"
        subprocess.run([sys.executable, "-c", BUILD_MODEL, str(run), str(seed)], check=True, env=env, cwd=work)
        model = str(run)
    images, bad = serve_images(seed), bad_images(seed)
    port = free_port()
    server = Server(imagerec_argv("serve", model, "--port", port, "--max-queue", MAX_QUEUE, "--max-pixels", MAX_PIXELS,
                                  "--log-level", "warning"), port, work / "logs", env)
    life = Life()
    load = ServeLoad(server.url, images, bad, life, seed)
    t_start = time.monotonic()
    server.start()
    samples: list = []
    stop = threading.Event()
    try:
        if not serve_ready(server, 300):
            raise RuntimeError(f"the server did not become ready:\n{server.log_tail()}")
        first_ready = time.monotonic() - t_start
        log(f"serve ready on {server.url} in {first_ready:.1f} s")
        load.reference()
        life.up.set()
        t0 = time.monotonic()
        soft, hard = t0 + minutes * 60, t0 + minutes * 60 + 300
        chaos = Chaos(server, life, serve_ready, random.Random(rng.random()), kill_every, soft, hard, min_kills, max_kills,
                      after_restart=load.after_restart)
        chaos.t0 = t0
        sampler = threading.Thread(target=rss_sampler, args=(server, life, stop, samples, t0), daemon=True)
        budget = [max_requests or int(minutes * 60 * 150) + 500]
        clients = [threading.Thread(target=load.client, args=(random.Random(rng.random()), soft, hard, chaos, budget), daemon=True)
                   for _ in range(CLIENTS)]
        every = (30.0, 60.0) if minutes >= 3 else (5.0, 10.0)
        burster = threading.Thread(target=load.burster, args=(random.Random(rng.random()), soft, hard, chaos, stop, every),
                                   daemon=True)
        for t in (chaos, sampler, *clients, burster):
            t.start()
        for t in clients:
            t.join(minutes * 60 + 900)
        load_s = time.monotonic() - t0
        stop.set()
        chaos.stop.set()
        for t in (chaos, sampler, burster):
            t.join(300)
        final_ready = serve_ready(server, 120)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text if final_ready else ""
        stop_rc = server.stop()
    finally:
        stop.set()
        server.stop()
    st = load.stats
    summary = {
        "target": "serve",
        "ok": False,
        "code": code_facts,
        "seed": seed,
        "minutes": minutes,
        "load_seconds": round(load_s, 1),
        "model": model,
        "first_ready_seconds": round(first_ready, 1),
        "requests_sent": st["requests"],
        "requests_by_kind": dict(sorted(load.by_kind.items())),
        "answers_200": load.status[200],
        "answers_verified": st["answers_verified"],
        "wrong_answers": st["wrong_answers"],
        "max_probability_deviation": load.max_prob_dev,
        "max_embedding_deviation": load.max_embed_dev,
        "status_counts": {str(k): v for k, v in sorted(load.status.items())},
        "five_xx": st["five_xx"],
        "intended_503": st["intended_503"],
        "intended_504": st["intended_504"],
        "bursts": st["bursts"],
        "kills": chaos.stats.kills,
        "kill_at_s": chaos.stats.kill_at_s,
        "restarts": chaos.stats.restarts,
        "ready_after_restart": st["ready_after_restart"],
        "restart_to_ready_seconds": {"median": percentile(chaos.stats.restart_seconds, 50),
                                     "max": max(chaos.stats.restart_seconds, default=None)},
        "unexpected_exits": chaos.stats.unexpected_exits,
        "restart_failures": chaos.stats.restart_failures,
        "connection_errors": {"while_down": st["connection_errors_down"], "while_up": st["connection_errors_up"]},
        "client_timeouts": st["client_timeouts"],
        "rss": rss_summary(samples),
        "final_ready": final_ready,
        "final_metrics_lines": len(metrics.splitlines()),
        "final_stop_rc": stop_rc,
        "failures_count": st["failures"],
        "failures": load.failures[:FAIL_KEEP],
    }
    summary["ok"] = (st["failures"] == 0 and st["five_xx"] == 0 and chaos.stats.restart_failures == 0
                     and chaos.stats.unexpected_exits == 0 and st["ready_after_restart"] == chaos.stats.restarts
                     and final_ready and st["connection_errors_up"] == 0)
    return summary


# =================================================================================================


def run(target: str, minutes: float, seed: int, work: Path | None = None, keep: bool = False, **kw) -> dict:
    """Run one soak; the working folder (photos, project, model, logs) is removed unless ``keep``."""
    owned = work is None
    work = Path(tempfile.mkdtemp(prefix=f"soak-{target}-")) if owned else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        fn = soak_studio if target == "studio" else soak_serve
        summary = fn(minutes, seed, work, **kw)
    finally:
        if owned and not keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["started"] = started.isoformat(timespec="seconds")
    summary["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": _cpu_model()}
    summary["args"] = {"kill_every": list(kw.get("kill_every", (20.0, 120.0))), "min_kills": kw.get("min_kills", 0),
                       "max_kills": kw.get("max_kills"), "workdir": str(work) if keep or not owned else None}
    return summary


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["studio", "serve"], required=True)
    ap.add_argument("--minutes", type=float, default=30.0, help="minutes of load (default 30)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 120.0), metavar=("MIN_S", "MAX_S"),
                    help="seconds between kills, drawn uniformly (default 20 120)")
    ap.add_argument("--min-kills", type=int, default=0, help="run on past --minutes (at most 5 minutes) until this many kills")
    ap.add_argument("--max-kills", type=int, default=None)
    ap.add_argument("--model", help="serve: the model to serve (default: a seed_cnn run folder made here)")
    ap.add_argument("--workdir", type=Path, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    args = ap.parse_args(argv)
    kw = {"kill_every": tuple(args.kill_every), "min_kills": args.min_kills, "max_kills": args.max_kills}
    if args.target == "serve" and args.model:
        kw["model"] = args.model
    summary = run(args.target, args.minutes, args.seed, args.workdir, args.keep, **kw)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
