"""The studio's project database: images, groups, every labelling action (the undo history),
audit decisions and training runs, in one SQLite file.

Durability: WAL journal with ``synchronous=FULL``. WAL alone already survives ``kill -9`` of the
server (a commit is in the log before ``COMMIT`` returns); FULL adds an fsync of the log at every
commit so that a power cut cannot take back an action the page already showed as done. Actions
come at a person's pace (a few a second at most), so the extra fsync costs nothing noticeable.

Every action is one transaction (:meth:`Project.tx`): the rows it changes and the undo record of
each change are written together, or not at all. An action that decides images (a move, an
accepted audit label, a review) also records them in ``reviews``: what the person decided,
as opposed to what a cluster guessed; an undone action's reviews no longer count.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ImagerecError

DB_NAME = "studio.sqlite"
JUNK = "junk"
DUPLICATE = "duplicate"
EXCLUSIONS = (JUNK, DUPLICATE)
MAX_NAME = 80
MAX_NAME_BYTES = 255  # a class folder's name on ext4, APFS, NTFS (export writes one per class)
ID_RANGE = range(-2**63, 2**63)  # what an SQLite INTEGER holds; any other number is no row's id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('cluster', 'class')),
    hidden INTEGER NOT NULL DEFAULT 0            -- 1 once merged into another group
);
CREATE UNIQUE INDEX IF NOT EXISTS groups_name ON groups(name) WHERE hidden = 0;
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    group_id INTEGER NOT NULL REFERENCES groups(id),
    rank REAL NOT NULL DEFAULT 0,                -- typicality: distance to the group's centre, lower first
    excluded TEXT CHECK (excluded IS NULL OR excluded IN ('junk', 'duplicate'))
);
CREATE INDEX IF NOT EXISTS images_group ON images(group_id, excluded, rank, id);
CREATE INDEX IF NOT EXISTS images_excluded ON images(excluded);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,                            -- Unix time
    kind TEXT NOT NULL,
    summary TEXT NOT NULL,
    undone_at REAL
);
CREATE TABLE IF NOT EXISTS changes (
    action_id INTEGER NOT NULL REFERENCES actions(id),
    seq INTEGER NOT NULL,
    tbl TEXT NOT NULL CHECK (tbl IN ('images', 'groups')),
    row_id INTEGER NOT NULL,
    col TEXT NOT NULL CHECK (col IN ('group_id', 'excluded', 'name', 'kind', 'hidden')),
    old, new,
    PRIMARY KEY (action_id, seq)
);
CREATE TABLE IF NOT EXISTS audit_decisions (
    finding TEXT NOT NULL,                       -- e.g. 'duplicates:12'
    decision TEXT NOT NULL,
    action_id INTEGER NOT NULL REFERENCES actions(id),
    PRIMARY KEY (finding, action_id)
);
CREATE TABLE IF NOT EXISTS reviews (               -- the person said: this image is in its group (a label, not a guess)
    image_id INTEGER NOT NULL REFERENCES images(id),
    action_id INTEGER NOT NULL REFERENCES actions(id),
    PRIMARY KEY (image_id, action_id)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    budget_min REAL NOT NULL,
    backbone TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    images INTEGER NOT NULL,
    accuracy REAL,
    message TEXT
);
CREATE TABLE IF NOT EXISTS run_predictions (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    image_id INTEGER NOT NULL REFERENCES images(id),
    true_label TEXT NOT NULL,
    predicted TEXT NOT NULL,
    confidence REAL NOT NULL,
    PRIMARY KEY (run_id, image_id)
);
CREATE INDEX IF NOT EXISTS run_predictions_cell ON run_predictions(run_id, true_label, predicted);
"""


@dataclass
class Group:
    """One cluster or class: ``count`` images in use (not junk, not duplicate)."""

    id: int
    name: str
    kind: str
    count: int


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on."""
    con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA foreign_keys=ON")
    return con


def check_name(name: str) -> str:
    """A group name as typed, trimmed; raises ImagerecError when it cannot be a class name."""
    text = (name or "").strip()
    if not text:
        raise ImagerecError("the name is empty; type a class name, e.g. 'beach'")
    if len(text) > MAX_NAME:
        raise ImagerecError(f"the name is {len(text)} characters long; keep it under {MAX_NAME + 1}")
    if any(c in text for c in "/\\\n\r\t,\"") or text in (".", ".."):
        raise ImagerecError(f"name {text!r} holds a character a class folder or CSV cannot ('/', '\\\\', ',', '\"', a tab or a new line); pick another")
    control = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs")), None)
    if control is not None:
        raise ImagerecError(f"name {text!r} holds a control character ({control!r}) a class folder cannot; type the name without it")
    if len(text.encode("utf-8")) > MAX_NAME_BYTES:
        raise ImagerecError(f"the name takes {len(text.encode('utf-8'))} bytes in UTF-8, more than the {MAX_NAME_BYTES} a class folder's "
                            "name can; pick a shorter one")
    return text


def in_range(row_id: int) -> bool:
    """True when ``row_id`` can be an SQLite row id (larger numbers would not even reach the query)."""
    return row_id in ID_RANGE


class Project:
    """A studio project folder: ``studio.sqlite`` and the thumbnail cache.

    Args:
        folder: the project folder (created if missing).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DB_NAME
        with self.connection() as con:
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_urlsafe(32),))

    def recover(self) -> None:
        """At server start: a run the last server was running when it died is not running any more."""
        with self.tx() as con:
            con.execute("UPDATE runs SET status='interrupted', finished_at=?, message='the server stopped during the run'"
                        " WHERE status='running'", (time.time(),))

    # -- connections and transactions ------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        con = connect(self.path)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE: writers queue up instead of failing midway)."""
        with self.connection() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def meta(self, key: str, default: str | None = None) -> str | None:
        with self.connection() as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    @property
    def secret(self) -> str:
        return self.meta("secret")

    @property
    def imported(self) -> bool:
        return self.meta("imported") is not None

    # -- the first import --------------------------------------------------------------------------

    def import_groups(self, data: str, groups: list[tuple[str, str]], images: Sequence[tuple[str, int, float]], how: str) -> None:
        """Fill an empty project in one transaction: a crash leaves it empty, never half-full.

        Args:
            data: the data spec the images came from.
            groups: (name, kind) per group; an image's group index points into it.
            images: (path, group index, rank) per image.
            how: a line saying how the groups were made, for the overview.
        """
        with self.tx() as con:
            if con.execute("SELECT value FROM meta WHERE key='imported'").fetchone():
                return
            ids = [con.execute("INSERT INTO groups(name, kind) VALUES (?, ?)", g).lastrowid for g in groups]
            con.executemany(
                "INSERT INTO images(path, group_id, rank) VALUES (?, ?, ?)", ((p, ids[g], float(r)) for p, g, r in images)
            )
            con.executemany("INSERT INTO meta VALUES (?, ?)", [("data", data), ("how", how), ("imported", str(time.time()))])

    # -- reading -----------------------------------------------------------------------------------

    def groups(self) -> list[Group]:
        """The visible groups, largest first."""
        with self.connection() as con:
            rows = con.execute(
                "SELECT g.id, g.name, g.kind, COUNT(i.id) AS n FROM groups g LEFT JOIN images i"
                " ON i.group_id = g.id AND i.excluded IS NULL WHERE g.hidden = 0"
                " GROUP BY g.id ORDER BY n DESC, g.name"
            ).fetchall()
        return [Group(r["id"], r["name"], r["kind"], r["n"]) for r in rows]

    def group(self, group_id: int) -> Group:
        with self.connection() as con:
            row = con.execute("SELECT id, name, kind, hidden FROM groups WHERE id=?", (group_id,)).fetchone() if in_range(group_id) else None
            if row is None or row["hidden"]:
                raise ImagerecError(f"group {group_id} does not exist (merged or never made); open the Groups page for the current ones")
            n = con.execute("SELECT COUNT(*) FROM images WHERE group_id=? AND excluded IS NULL", (group_id,)).fetchone()[0]
        return Group(row["id"], row["name"], row["kind"], n)

    def images_of(self, group_id: int | None, offset: int = 0, limit: int = 200, excluded: str | None = None) -> list[sqlite3.Row]:
        """One page of a group's images (or of the excluded ones), the most typical first."""
        with self.connection() as con:
            if excluded is not None:
                return con.execute(
                    "SELECT id, path, group_id, excluded FROM images WHERE excluded=? ORDER BY id LIMIT ? OFFSET ?",
                    (excluded, limit, offset),
                ).fetchall()
            return con.execute(
                "SELECT id, path, group_id, excluded FROM images WHERE group_id=? AND excluded IS NULL"
                " ORDER BY rank, id LIMIT ? OFFSET ?",
                (group_id, limit, offset),
            ).fetchall()

    def typical(self, per_group: int = 8) -> dict[int, list[int]]:
        """The ``per_group`` most typical image ids of each visible group (one indexed query each)."""
        out = {}
        with self.connection() as con:
            for (gid,) in con.execute("SELECT id FROM groups WHERE hidden=0").fetchall():
                out[gid] = [r[0] for r in con.execute(
                    "SELECT id FROM images WHERE group_id=? AND excluded IS NULL ORDER BY rank, id LIMIT ?", (gid, per_group)
                )]
        return out

    def image(self, image_id: int) -> sqlite3.Row | None:
        if not in_range(image_id):
            return None
        with self.connection() as con:
            return con.execute("SELECT id, path, group_id, excluded FROM images WHERE id=?", (image_id,)).fetchone()

    def counts(self) -> dict:
        with self.connection() as con:
            total = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            by = dict(con.execute("SELECT COALESCE(excluded, 'in use'), COUNT(*) FROM images GROUP BY excluded").fetchall())
            kinds = dict(con.execute("SELECT kind, COUNT(*) FROM groups WHERE hidden=0 GROUP BY kind").fetchall())
            actions = con.execute("SELECT COUNT(*) FROM actions WHERE undone_at IS NULL").fetchone()[0]
        return {"images": total, "in_use": by.get("in use", 0), JUNK: by.get(JUNK, 0), DUPLICATE: by.get(DUPLICATE, 0),
                "clusters": kinds.get("cluster", 0), "classes": kinds.get("class", 0), "actions": actions}

    def history(self, limit: int = 50) -> list[sqlite3.Row]:
        with self.connection() as con:
            return con.execute("SELECT id, at, kind, summary, undone_at FROM actions ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    def labels(self) -> list[tuple[str, str]]:
        """(path, group name) of every image in use, for the manifest."""
        with self.connection() as con:
            return [tuple(r) for r in con.execute(
                "SELECT i.path, g.name FROM images i JOIN groups g ON g.id = i.group_id WHERE i.excluded IS NULL ORDER BY g.name, i.id"
            )]

    def decided(self) -> dict[str, str]:
        """finding -> decision, for the audit findings decided and not undone."""
        with self.connection() as con:
            rows = con.execute(
                "SELECT d.finding, d.decision FROM audit_decisions d JOIN actions a ON a.id = d.action_id"
                " WHERE a.undone_at IS NULL ORDER BY a.id"
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def reviewed(self) -> set[int]:
        """Ids of the images whose group the person decided (by an action not undone)."""
        with self.connection() as con:
            rows = con.execute("SELECT DISTINCT r.image_id FROM reviews r JOIN actions a ON a.id = r.action_id WHERE a.undone_at IS NULL")
            return {r[0] for r in rows}

    # -- actions (each one transaction, recorded for undo) ---------------------------------------

    def _action(self, con: sqlite3.Connection, kind: str, summary: str) -> int:
        return con.execute("INSERT INTO actions(at, kind, summary) VALUES (?, ?, ?)", (time.time(), kind, summary)).lastrowid

    @staticmethod
    def _set(con, action_id: int, seq: int, tbl: str, row_id: int, col: str, new) -> int:
        """Change one cell and record the change; returns the next sequence number."""
        old = con.execute(f"SELECT {col} FROM {tbl} WHERE id=?", (row_id,)).fetchone()[0]  # noqa: S608 - tbl/col are ours
        if old == new:
            return seq
        con.execute(f"UPDATE {tbl} SET {col}=? WHERE id=?", (new, row_id))  # noqa: S608
        con.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?)", (action_id, seq, tbl, row_id, col, old, new))
        return seq + 1

    def _check_images(self, con, image_ids: Sequence[int]) -> list[int]:
        ids = sorted({int(i) for i in image_ids})
        if not ids:
            raise ImagerecError("no images selected; click an image (shift-click or drag for more), then act")
        outside = [i for i in ids if not in_range(i)]
        if outside:
            raise ImagerecError(f"image id {outside[0]} does not exist (ids are whole numbers below 2**63); reload the page")
        found = con.execute(f"SELECT COUNT(*) FROM images WHERE id IN ({','.join('?' * len(ids))})", ids).fetchone()[0]  # noqa: S608
        if found != len(ids):
            raise ImagerecError(f"{len(ids) - found} of the {len(ids)} selected image ids do not exist; reload the page")
        return ids

    def _visible_group(self, con, group_id: int) -> sqlite3.Row:
        group_id = int(group_id)
        row = con.execute("SELECT id, name, kind, hidden FROM groups WHERE id=?", (group_id,)).fetchone() if in_range(group_id) else None
        if row is None or row["hidden"]:
            raise ImagerecError(f"group {group_id} does not exist (merged or never made); reload the page")
        return row

    def _name_free(self, con, name: str, except_id: int | None = None) -> None:
        row = con.execute("SELECT id FROM groups WHERE name=? AND hidden=0", (name,)).fetchone()
        if row is not None and row[0] != except_id:
            raise ImagerecError(f"a group is already called {name!r}; pick another name, or merge the two groups")

    def rename(self, group_id: int, name: str) -> int:
        """Rename a group; a named cluster becomes a class. Returns the action id."""
        name = check_name(name)
        with self.tx() as con:
            old = self._visible_group(con, group_id)
            self._name_free(con, name, except_id=old["id"])
            aid = self._action(con, "rename", f"renamed {old['name']!r} to {name!r}")
            seq = self._set(con, aid, 0, "groups", old["id"], "name", name)
            self._set(con, aid, seq, "groups", old["id"], "kind", "class")
        return aid

    def new_group(self, name: str) -> int:
        """Make an empty class (recorded, so undo removes it again by hiding it). Returns its id."""
        name = check_name(name)
        with self.tx() as con:
            self._name_free(con, name)
            gid = con.execute("INSERT INTO groups(name, kind, hidden) VALUES (?, 'class', 1)", (name,)).lastrowid
            aid = self._action(con, "new group", f"made class {name!r}")
            self._set(con, aid, 0, "groups", gid, "hidden", 0)
        return gid

    def move(self, image_ids: Sequence[int], group_id: int) -> int:
        """Move images into a group (and back into use if they were junk). Returns the action id."""
        with self.tx() as con:
            ids = self._check_images(con, image_ids)
            target = self._visible_group(con, group_id)
            aid = self._action(con, "move", f"moved {len(ids)} image(s) to {target['name']!r}")
            self._move(con, aid, 0, ids, target["id"])
        return aid

    def move_to_new(self, image_ids: Sequence[int], name: str) -> int:
        """Make a class called ``name`` and move images into it: one action (one undo takes back
        both), and a refused move makes no class. Returns the new group's id."""
        name = check_name(name)
        with self.tx() as con:
            ids = self._check_images(con, image_ids)
            self._name_free(con, name)
            gid = con.execute("INSERT INTO groups(name, kind, hidden) VALUES (?, 'class', 1)", (name,)).lastrowid
            aid = self._action(con, "move", f"moved {len(ids)} image(s) to new class {name!r}")
            self._move(con, aid, self._set(con, aid, 0, "groups", gid, "hidden", 0), ids, gid)
        return gid

    def _move(self, con, aid: int, seq: int, ids: Sequence[int], group_id: int) -> int:
        for i in ids:
            seq = self._set(con, aid, seq, "images", i, "group_id", group_id)
            seq = self._set(con, aid, seq, "images", i, "excluded", None)
        self._reviewed(con, aid, ids)
        return seq

    @staticmethod
    def _reviewed(con, aid: int, ids: Sequence[int]) -> None:
        con.executemany("INSERT INTO reviews VALUES (?, ?)", ((i, aid) for i in ids))

    def exclude(self, image_ids: Sequence[int], reason: str = JUNK, finding: str | None = None, decision: str | None = None) -> int:
        """Mark images as junk (or duplicate): left out of the manifest and of training."""
        if reason not in EXCLUSIONS:
            raise ImagerecError(f"reason={reason!r} must be one of {EXCLUSIONS}")
        with self.tx() as con:
            ids = self._check_images(con, image_ids)
            aid = self._action(con, reason, f"marked {len(ids)} image(s) as {reason}")
            seq = 0
            for i in ids:
                seq = self._set(con, aid, seq, "images", i, "excluded", reason)
            if finding:
                con.execute("INSERT INTO audit_decisions VALUES (?, ?, ?)", (finding, decision or reason, aid))
        return aid

    def restore(self, image_ids: Sequence[int]) -> int:
        """Put junk or duplicate images back into use."""
        with self.tx() as con:
            ids = self._check_images(con, image_ids)
            aid = self._action(con, "restore", f"put {len(ids)} image(s) back into use")
            seq = 0
            for i in ids:
                seq = self._set(con, aid, seq, "images", i, "excluded", None)
        return aid

    def merge(self, source_ids: Sequence[int], target_id: int) -> int:
        """Move every image of the source groups into the target; the sources disappear."""
        with self.tx() as con:
            target = self._visible_group(con, target_id)
            sources = [self._visible_group(con, s) for s in sorted({int(s) for s in source_ids}) if s != target["id"]]
            if not sources:
                raise ImagerecError("merge needs at least one group other than the target; tick the groups to merge into it")
            names = ", ".join(repr(s["name"]) for s in sources)
            aid = self._action(con, "merge", f"merged {names} into {target['name']!r}")
            seq = 0
            for s in sources:
                for (i,) in con.execute("SELECT id FROM images WHERE group_id=?", (s["id"],)).fetchall():
                    seq = self._set(con, aid, seq, "images", i, "group_id", target["id"])
                seq = self._set(con, aid, seq, "groups", s["id"], "hidden", 1)
        return aid

    def decide(self, finding: str, decision: str) -> int:
        """Record an audit decision that changes nothing (e.g. 'keep'), undoable like the rest."""
        with self.tx() as con:
            aid = self._action(con, "audit", f"{finding}: {decision}")
            con.execute("INSERT INTO audit_decisions VALUES (?, ?, ?)", (finding, decision, aid))
        return aid

    def relabel(self, image_ids: Sequence[int], name: str, finding: str | None = None) -> int:
        """Move images to the group called ``name`` (made as a class if missing): accept a suggestion."""
        name = check_name(name)
        with self.tx() as con:
            ids = self._check_images(con, image_ids)
            aid = self._action(con, "relabel", f"relabelled {len(ids)} image(s) as {name!r}")
            row = con.execute("SELECT id FROM groups WHERE name=? AND hidden=0", (name,)).fetchone()
            seq = 0
            if row is None:
                gid = con.execute("INSERT INTO groups(name, kind, hidden) VALUES (?, 'class', 1)", (name,)).lastrowid
                seq = self._set(con, aid, seq, "groups", gid, "hidden", 0)
            else:
                gid = row[0]
            for i in ids:
                seq = self._set(con, aid, seq, "images", i, "group_id", gid)
            self._reviewed(con, aid, ids)
            if finding:
                con.execute("INSERT INTO audit_decisions VALUES (?, ?, ?)", (finding, "accept", aid))
        return aid

    def confirm(self, image_ids: Sequence[int], group_ids: Sequence[int | None], new_name: str | None = None) -> int:
        """Accept a page of the review: each image goes to its group (None: a new class called
        ``new_name``, made here) and counts as decided. One action: one undo takes back the page.

        Raises:
            ImagerecError: lengths that differ, an image twice, an image that is not there or not in
                use, a group that is not there, a None without ``new_name`` (or the reverse).
        """
        if len(image_ids) != len(group_ids):
            raise ImagerecError(f"{len(image_ids)} image ids but {len(group_ids)} group ids; send one group id per image")
        if len(set(image_ids)) != len(image_ids):
            raise ImagerecError("an image id is sent twice; send each image of the page once, with its class")
        wants_new = any(g is None for g in group_ids)
        if wants_new != (new_name is not None):
            raise ImagerecError("a group id null (a new class) needs new_name, and new_name needs a null group id; send both or neither")
        name = check_name(new_name) if wants_new else None
        with self.tx() as con:
            ids = self._check_images(con, image_ids)
            excluded = con.execute(f"SELECT id, excluded FROM images WHERE id IN ({','.join('?' * len(ids))}) AND excluded IS NOT NULL",  # noqa: S608
                                   ids).fetchone()
            if excluded is not None:
                raise ImagerecError(f"image {excluded[0]} is marked {excluded[1]}; put it back into use before labelling it, or leave it out")
            targets = {g: self._visible_group(con, g)["name"] for g in set(group_ids) if g is not None}
            if name is not None:
                self._name_free(con, name)
                targets[None] = name
            counts = Counter(targets[g] for g in group_ids)
            aid = self._action(con, "review", f"reviewed {len(ids)} image(s): " + ", ".join(f"{n} as {c!r}" for c, n in counts.most_common()))
            seq, new_id = 0, None
            if name is not None:
                new_id = con.execute("INSERT INTO groups(name, kind, hidden) VALUES (?, 'class', 1)", (name,)).lastrowid
                seq = self._set(con, aid, seq, "groups", new_id, "hidden", 0)
            for i, g in zip(image_ids, group_ids):
                seq = self._set(con, aid, seq, "images", int(i), "group_id", new_id if g is None else int(g))
            self._reviewed(con, aid, ids)
        return aid

    def undo(self) -> str | None:
        """Undo the latest action not yet undone; returns its summary, or None when there is none."""
        with self.tx() as con:
            row = con.execute("SELECT id, summary FROM actions WHERE undone_at IS NULL ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                return None
            changes = con.execute("SELECT tbl, row_id, col, old FROM changes WHERE action_id=? ORDER BY seq DESC", (row["id"],)).fetchall()
            for c in changes:
                if c["tbl"] == "groups" and c["col"] == "hidden" and c["old"] == 0:
                    self._name_free(con, con.execute("SELECT name FROM groups WHERE id=?", (c["row_id"],)).fetchone()[0], c["row_id"])
                con.execute(f"UPDATE {c['tbl']} SET {c['col']}=? WHERE id=?", (c["old"], c["row_id"]))  # noqa: S608
            con.execute("UPDATE actions SET undone_at=? WHERE id=?", (time.time(), row["id"]))
        return row["summary"]

    # -- training runs -----------------------------------------------------------------------------

    def start_run(self, budget_min: float, backbone: str, run_dir: str, images: int) -> int:
        with self.tx() as con:
            if con.execute("SELECT 1 FROM runs WHERE status='running'").fetchone():
                raise ImagerecError("a training run is already running; wait for it to finish (see the Train page)")
            return con.execute(
                "INSERT INTO runs(started_at, status, budget_min, backbone, run_dir, images) VALUES (?, 'running', ?, ?, ?, ?)",
                (time.time(), budget_min, backbone, run_dir, images),
            ).lastrowid

    def finish_run(self, run_id: int, status: str, accuracy: float | None = None, message: str | None = None,
                   predictions: Sequence[tuple[int, str, str, float]] = ()) -> None:
        """Close a run, with its test-set predictions (image id, true, predicted, confidence), in one transaction."""
        with self.tx() as con:
            con.executemany("INSERT INTO run_predictions VALUES (?, ?, ?, ?, ?)", ((run_id, *p) for p in predictions))
            con.execute("UPDATE runs SET status=?, finished_at=?, accuracy=?, message=? WHERE id=?",
                        (status, time.time(), accuracy, message, run_id))

    def runs(self) -> list[sqlite3.Row]:
        with self.connection() as con:
            return con.execute("SELECT * FROM runs ORDER BY id DESC").fetchall()

    def run(self, run_id: int) -> sqlite3.Row:
        with self.connection() as con:
            row = con.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone() if in_range(run_id) else None
        if row is None:
            raise ImagerecError(f"training run {run_id} does not exist; see the Train page for the runs")
        return row

    def cell(self, run_id: int, true_label: str, predicted: str, limit: int = 200) -> list[sqlite3.Row]:
        with self.connection() as con:
            return con.execute(
                "SELECT image_id, confidence FROM run_predictions WHERE run_id=? AND true_label=? AND predicted=?"
                " ORDER BY confidence DESC LIMIT ?", (run_id, true_label, predicted, limit),
            ).fetchall()

    def wrong(self, run_id: int, limit: int = 24) -> list[sqlite3.Row]:
        with self.connection() as con:
            return con.execute(
                "SELECT image_id, true_label, predicted, confidence FROM run_predictions WHERE run_id=? AND true_label != predicted"
                " ORDER BY confidence DESC LIMIT ?", (run_id, limit),
            ).fetchall()

    def ids_of_paths(self, paths: Sequence[str]) -> dict[str, int]:
        with self.connection() as con:
            out = {}
            for start in range(0, len(paths), 500):
                chunk = list(paths[start:start + 500])
                out.update(con.execute(f"SELECT path, id FROM images WHERE path IN ({','.join('?' * len(chunk))})", chunk).fetchall())  # noqa: S608
        return out


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))
