"""The studio without a browser: the database's transactions and undo, the app's CSRF, host,
origin and path-traversal refusals, escaping, paging, export and the first import."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imagerec.data import load_images
from imagerec.errors import ImagerecError
from imagerec.studio import Project, create_app
from imagerec.studio._db import JUNK

from .conftest import make_colour_dataset, run_cli

BASE = "http://127.0.0.1:8765"


@pytest.fixture
def studio(tmp_path):
    """A project of labelled colour images (red, green, blue: 6 each) and a client that has the cookie."""
    data = make_colour_dataset(tmp_path / "colours", per_class=6)
    app = create_app(tmp_path / "project", data, progress=False)
    client = TestClient(app, base_url=BASE)
    assert client.get("/").status_code == 200  # sets the CSRF cookie
    return app, client


def post(app, client, url, body, **headers):
    return client.post(url, json=body, headers={"X-CSRF-Token": app.state.project.secret, **headers})


def group_ids(project: Project) -> dict[str, int]:
    return {g.name: g.id for g in project.groups()}


def images_in(project: Project, name: str) -> set[int]:
    return {r["id"] for r in project.images_of(group_ids(project)[name], limit=10_000)}


def test_labelled_data_brings_its_classes(studio):
    app, _ = studio
    groups = app.state.project.groups()
    assert sorted((g.name, g.kind, g.count) for g in groups) == [("blue", "class", 6), ("green", "class", 6), ("red", "class", 6)]


def test_move_junk_rename_merge_and_undo_in_order(studio):
    app, client = studio
    project = app.state.project
    ids = group_ids(project)
    red = sorted(images_in(project, "red"))
    assert post(app, client, "/api/move", {"image_ids": red[:3], "group_id": ids["blue"]}).status_code == 200
    assert images_in(project, "blue") >= set(red[:3]) and len(images_in(project, "red")) == 3
    assert post(app, client, "/api/exclude", {"image_ids": [red[3]], "reason": JUNK}).status_code == 200
    assert post(app, client, "/api/rename", {"group_id": ids["green"], "name": "grass"}).status_code == 200
    assert post(app, client, "/api/merge", {"sources": [ids["grass"] if "grass" in ids else ids["green"]], "target": ids["red"]}).status_code == 200
    assert sorted(g.name for g in project.groups()) == ["blue", "red"]
    assert len(images_in(project, "red")) == 2 + 6
    # undo walks back one action at a time, newest first
    assert post(app, client, "/api/undo", {}).json()["undone"].startswith("merged 'grass'")
    assert sorted(g.name for g in project.groups()) == ["blue", "grass", "red"]
    assert post(app, client, "/api/undo", {}).json()["undone"] == "renamed 'green' to 'grass'"
    assert post(app, client, "/api/undo", {}).json()["undone"] == "marked 1 image(s) as junk"
    assert project.counts()[JUNK] == 0
    assert post(app, client, "/api/undo", {}).json()["undone"] == "moved 3 image(s) to 'blue'"
    assert images_in(project, "red") == set(red)
    assert post(app, client, "/api/undo", {}).json()["undone"] is None
    history = client.get("/history").text
    assert history.count("undone ") == 4


def test_a_failed_action_changes_nothing(studio, monkeypatch):
    app, client = studio
    project = app.state.project
    red = sorted(images_in(project, "red"))
    before = project.labels()
    # an unknown image id: refused before anything is written
    r = post(app, client, "/api/move", {"image_ids": [red[0], 999_999], "group_id": group_ids(project)["blue"]})
    assert r.status_code == 400 and "do not exist" in r.json()["error"]
    # a failure half-way through the writes: the transaction rolls back, no action is recorded
    calls = []
    original = Project._set

    def failing(con, *args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(con, *args)

    monkeypatch.setattr(Project, "_set", staticmethod(failing))
    with pytest.raises(RuntimeError):
        project.move(red[:3], group_ids(project)["blue"])
    assert len(calls) == 3
    assert project.labels() == before
    assert project.history() == []


def test_posts_without_the_csrf_secret_or_from_elsewhere_are_refused(studio):
    app, client = studio
    project = app.state.project
    gid = group_ids(project)["red"]
    body = {"group_id": gid, "name": "evil"}
    assert client.post("/api/rename", json=body).status_code == 403  # no header
    assert post(app, client, "/api/rename", body, **{"X-CSRF-Token": "guess"}).status_code == 403
    assert post(app, client, "/api/rename", body, Origin="http://evil.example").status_code == 403
    assert post(app, client, "/api/rename", body, Host="evil.example:8765").status_code == 403
    bare = TestClient(app, base_url=BASE)  # the right header but no cookie (another site's form)
    assert post(app, bare, "/api/rename", body).status_code == 403
    assert TestClient(app, base_url="http://evil.example").get("/").status_code == 403  # DNS rebinding
    assert project.group(gid).name == "red" and project.history() == []
    assert post(app, client, "/api/rename", body, Origin=BASE).status_code == 200


def test_urls_cannot_reach_files_by_path(studio, tmp_path):
    app, client = studio
    secret = (tmp_path / "project" / "studio.sqlite").read_bytes()[:16]
    for url in ["/thumb/../studio.sqlite", "/img/..%2F..%2Fetc%2Fpasswd", "/static/../_db.py", "/static/..%2F_db.py",
                "/static/%2e%2e/_db.py", "/img/1%2F..%2F..%2Fstudio.sqlite", "/thumb/-1", "/img/999999"]:
        r = client.get(url)
        assert r.status_code in (404, 422), url
        assert b"Project" not in r.content and secret not in r.content, url
    first = app.state.project.images_of(group_ids(app.state.project)["red"], limit=1)[0]
    r = client.get(f"/img/{first['id']}")
    assert r.status_code == 200 and r.content == Path(first["path"]).read_bytes()


def test_typed_names_are_escaped_everywhere(studio):
    app, client = studio
    project = app.state.project
    evil = "<img src=x onerror=alert(1)>'&"
    assert post(app, client, "/api/rename", {"group_id": group_ids(project)["red"], "name": evil}).status_code == 200
    assert evil in group_ids(project)
    for url in ["/", "/groups", f"/groups/{group_ids(project)['blue']}", "/export", "/history"]:
        page = client.get(url).text
        assert "<img src=x" not in page, url
        assert "&lt;img src=x onerror=alert(1)&gt;&#x27;&amp;" in page, url


def test_bad_names_are_one_line_errors(studio):
    app, client = studio
    project = app.state.project
    gid = group_ids(project)["red"]
    for name, words in [("", "empty"), ("a/b", "character"), ("blue", "already called"), ("x" * 81, "characters long")]:
        r = post(app, client, "/api/rename", {"group_id": gid, "name": name})
        assert r.status_code == 400 and words in r.json()["error"] and "\n" not in r.json()["error"]
    r = post(app, client, "/api/move", {"image_ids": "all", "group_id": gid})
    assert r.status_code == 400 and "image_ids" in r.json()["error"]
    assert project.history() == []


def test_export_manifest_holds_exactly_the_labels(studio, tmp_path):
    app, client = studio
    project = app.state.project
    ids = group_ids(project)
    red = sorted(images_in(project, "red"))
    post(app, client, "/api/move", {"image_ids": red[:2], "group_id": ids["green"]})
    post(app, client, "/api/exclude", {"image_ids": [red[2]], "reason": "junk"})
    post(app, client, "/api/rename", {"group_id": ids["blue"], "name": "sky"})
    r = post(app, client, "/api/export", {"kind": "manifest"})
    assert r.status_code == 200 and r.json()["rows"] == 17
    manifest = tmp_path / "project" / "export" / "labels.csv"
    source = load_images(manifest)
    got = {p: source.classes[label] for p, label in zip(source.paths, source.labels)}
    path_of = {r["id"]: r["path"] for name in ("red", "green", "sky") for r in project.images_of(group_ids(project)[name], limit=100)}
    junk = project.image(red[2])["path"]
    assert junk not in got and len(got) == 17
    assert {got[path_of[i]] for i in red[:2]} == {"green"} and {got[path_of[i]] for i in red[3:]} == {"red"}
    assert sorted(set(got.values())) == ["green", "red", "sky"]
    assert client.get("/export/labels.csv").text == manifest.read_text()
    r = post(app, client, "/api/export", {"kind": "link"})
    folders = tmp_path / "project" / "export" / "classes"
    assert sorted(p.name for p in folders.iterdir()) == ["green", "red", "sky"]
    assert len(list((folders / "green").iterdir())) == 8 and all(p.is_symlink() for p in (folders / "red").iterdir())


def test_group_pages_show_200_thumbnails_at_most(tmp_path):
    project = Project(tmp_path / "p")
    project.import_groups("synthetic", [("a", "class"), ("b", "class")],
                          [(f"/nowhere/{i}.jpg", 0 if i < 450 else 1, float(-i)) for i in range(460)], "synthetic")
    client = TestClient(create_app(tmp_path / "p"), base_url=BASE)
    pages = [client.get(f"/groups/1?page={n}").text for n in (1, 2, 3)]
    assert [p.count("data-id=") for p in pages] == [200, 200, 50]
    assert 'data-id="449"' in pages[0]  # the most typical (lowest rank) first
    assert client.get("/thumb/1").status_code == 404  # a missing file is a 404, not a crash
    assert client.get("/groups/99").status_code == 404


def test_killed_mid_action_loses_nothing_done_and_shows_nothing_half_done(tmp_path):
    project = Project(tmp_path / "p")
    n = 300
    project.import_groups("synthetic", [("a", "class"), ("b", "class")], [(f"/x/{i}.jpg", 0, float(i)) for i in range(n)], "synthetic")
    script = textwrap.dedent(f"""
        import sys
        from imagerec.studio import Project
        p = Project({str(tmp_path / 'p')!r})
        ids = list(range(1, {n + 1}))
        k = 0
        while True:
            p.move(ids, 2 if k % 2 == 0 else 1)
            k += 1
            print(k, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    done = 0
    while done < 5:
        done = int(proc.stdout.readline())
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    con = sqlite3.connect(tmp_path / "p" / "studio.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    actions = con.execute("SELECT COUNT(*) FROM actions").fetchone()[0]
    per_group = dict(con.execute("SELECT group_id, COUNT(*) FROM images GROUP BY group_id").fetchall())
    assert actions >= done  # every move the process reported as done is there
    assert per_group == ({2: n} if actions % 2 else {1: n})  # and no move is half applied
    assert con.execute("SELECT COUNT(*) FROM changes").fetchone()[0] == actions * n


def test_training_refuses_too_few_images(studio):
    app, client = studio
    project = app.state.project
    red = sorted(images_in(project, "red"))
    post(app, client, "/api/exclude", {"image_ids": red[:4], "reason": "junk"})
    r = post(app, client, "/api/train", {"budget": 1, "backbone": "seed_cnn"})
    assert r.status_code == 400 and "'red'" in r.json()["error"] and "fewer than 3" in r.json()["error"]
    r = post(app, client, "/api/train", {"budget": "soon", "backbone": "seed_cnn"})
    assert r.status_code == 400 and "minutes" in r.json()["error"]
    assert project.runs() == []


def test_unlabelled_photos_are_clustered_into_groups(tmp_path):
    colours = make_colour_dataset(tmp_path / "colours", per_class=6)
    flat = tmp_path / "photos"
    flat.mkdir()
    truth = {}
    for path in colours.rglob("*.png"):
        target = flat / f"{path.parent.name[0]}{path.name}"
        shutil.copy(path, target)
        truth[str(target)] = path.parent.name
    app = create_app(tmp_path / "p", flat, k=3, backbone="efficientnet_lite0", image_size=64, progress=False)
    project = app.state.project
    groups = project.groups()
    assert len(groups) == 3 and all(g.kind == "cluster" and g.name.startswith("cluster ") for g in groups)
    for g in groups:
        colours_in = {truth[r["path"]] for r in project.images_of(g.id, limit=100)}
        assert len(colours_in) == 1, colours_in  # each cluster is one colour
    assert "clustered into 3 groups" in project.meta("how")


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "studio")
    assert code == 2 and err.count("\n") == 1 and "give the photos" in err
    code, _, err = run_cli(capsys, "studio", tmp_path / "missing")
    assert code == 2 and "no such file or folder" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "studio", tmp_path, "--k", "many")
    assert code == 2 and "--k 'many'" in err
    with pytest.raises(ImagerecError, match="new project"):
        create_app(tmp_path / "new")
