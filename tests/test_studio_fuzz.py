"""Property-based HTTP fuzz of ``imagerec studio`` (Hypothesis, derandomized, a few seconds each):
any request is answered without a 5xx or Python's error text, a POST without the project's
secret or from another Host / Origin changes nothing, typed names are escaped on every page,
no file is written outside the project and only the project's images are served, and any
sequence of actions keeps the database whole and undoes back to the first state.
``benchmarks/fuzz_studio.py`` runs the same properties at length; the strategies, the ASGI
driver and the properties are in ``tests/_studio_strategies.py``."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ._studio_strategies import (SERVER, Req, Studio, attack_targets, names, paths, prop_actions, prop_any_request, prop_escaped,
                                 prop_refused, requests)

FAST = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    s = Studio(tmp_path_factory.mktemp("studio_fuzz"))
    yield s
    s.close()


@settings(FAST, max_examples=300)
@given(data=st.data())
def test_any_request_is_answered_without_a_5xx_and_a_refused_one_changes_nothing(studio, data):
    with studio.activate():
        prop_any_request(studio, data.draw(requests(studio.context()), label="request"))


@settings(FAST, max_examples=150)
@given(data=st.data())
def test_a_post_without_the_secret_or_from_elsewhere_changes_nothing(studio, data):
    with studio.activate():
        prop_refused(studio, data.draw(requests(studio.context(), want=False), label="request"))


@settings(FAST, max_examples=40)
@given(name=names, group_index=st.integers(0, 20), new_class=st.booleans())
def test_typed_names_are_escaped_on_every_page(studio, name, group_index, new_class):
    with studio.activate():
        prop_escaped(studio, name, group_index, new_class)


@settings(FAST, max_examples=120)
@given(data=st.data())
def test_only_the_projects_images_are_served(studio, data):
    with studio.activate():
        target, label = data.draw(paths(studio.context(), templates=("/img/{i}", "/thumb/{i}", "/static/{x}", "/img/{i}/{x}")))
        prop_any_request(studio, Req("GET", target, [("host", SERVER)], b"", True, label))


def test_no_url_reaches_a_file_by_its_name_or_path(studio):
    with studio.activate():
        for target, label in attack_targets(studio.context()):
            prop_any_request(studio, Req("GET", target, [("host", SERVER)], b"", True, label))


@settings(FAST, max_examples=40)
@given(data=st.data())
def test_action_sequences_keep_the_database_whole_and_undo_to_the_start(studio, data):
    with studio.activate():
        prop_actions(studio, data)


# -- what the fuzz found, one test each (each failed before its fix) --------------------------------


@pytest.fixture
def fresh(tmp_path):
    s = Studio(tmp_path)
    with s.activate():
        yield s
    s.close()


BIG = (2**63, -2**63 - 1, 10**30)


def test_ids_beyond_what_sqlite_holds_are_refused_not_a_crash(fresh):
    for big in BIG:
        for url, body in [("/api/rename", {"group_id": big, "name": "x"}), ("/api/move", {"image_ids": [1, big], "group_id": 1}),
                          ("/api/move", {"image_ids": [1], "group_id": big}), ("/api/exclude", {"image_ids": [big]}),
                          ("/api/restore", {"image_ids": [big]}), ("/api/merge", {"sources": [big], "target": 1}),
                          ("/api/merge", {"sources": [1], "target": big}),
                          ("/api/audit/decide", {"finding": "f", "decision": "drop", "image_ids": [big]})]:
            r = fresh.post(url, body)
            assert r.status == 400 and str(big) in r.json()["error"] and "does not exist" in r.json()["error"], (url, body, r.text)
        for url in [f"/groups/{big}", f"/train/{big}", f"/train/{big}/cell?true=a&predicted=b", f"/img/{big}", f"/thumb/{big}"]:
            assert fresh.get(url).status == 404, url
    assert fresh.active() == 0


def test_booleans_are_not_ids_and_names_must_be_text(fresh):
    for url, body, words in [("/api/rename", {"group_id": True, "name": "x"}, "group_id must be a whole number"),
                             ("/api/move", {"image_ids": [True], "group_id": 2}, "image_ids must be a list"),
                             ("/api/merge", {"sources": [False], "target": 1}, "sources must be a list"),
                             ("/api/rename", {"group_id": 1, "name": None}, "name must be text"),
                             ("/api/rename", {"group_id": 1, "name": 5}, "name must be text"),
                             ("/api/move", {"image_ids": [1], "new_name": ["x"]}, "new_name must be text"),
                             ("/api/audit/decide", {"finding": None, "decision": "keep"}, "'finding'"),
                             ("/api/audit/decide", {"finding": "f", "decision": "accept", "image_ids": [1], "label": None}, "label must be text"),
                             ("/api/audit/decide", {"finding": "f", "decision": "drop", "image_ids": [True]}, "'image_ids'")]:
        r = fresh.post(url, body)
        assert r.status == 400 and words in r.json()["error"], (body, r.text)
    assert fresh.active() == 0 and "None" not in {g.name for g in fresh.project.groups()}


def test_lone_surrogates_and_deep_nesting_in_json_are_400s(fresh):
    for url, raw in [("/api/rename", b'{"group_id": 1, "name": "a\\ud800b"}'), ("/api/audit/decide", b'{"finding": "\\udfff", "decision": "keep"}'),
                     ("/api/move", b'{"image_ids": [1], "new_name": "\\ud83d"}'), ("/api/rename", b"[" * 100_000),
                     ("/api/move", b'{"a":' * 100_000)]:
        r = fresh.post(url, raw)
        assert r.status == 400 and ("Unicode" in r.json()["error"] or "nested" in r.json()["error"]), (raw[:40], r.text)
    assert fresh.active() == 0


def test_a_budget_too_big_for_a_float_is_a_400(fresh):
    r = fresh.post("/api/train", b'{"budget": 1' + b"0" * 400 + b', "backbone": "seed_cnn"}')
    assert r.status == 400 and "minutes" in r.json()["error"]


def test_moving_into_a_new_class_is_one_action_and_a_refused_one_leaves_no_class(fresh):
    groups = {g.name for g in fresh.project.groups()}
    r = fresh.post("/api/move", {"image_ids": [1, 10**6], "new_name": "fresh"})
    assert r.status == 400 and fresh.active() == 0 and {g.name for g in fresh.project.groups()} == groups
    before = fresh.state()
    r = fresh.post("/api/move", {"image_ids": [1, 2], "new_name": "fresh"})
    assert r.status == 200 and fresh.active() == 1
    assert fresh.project.group(r.json()["group_id"]).count == 2
    assert fresh.post("/api/undo", {}).json()["undone"] == "moved 2 image(s) to new class 'fresh'"
    assert fresh.state() == before


def test_names_a_class_folder_cannot_hold_are_refused(fresh):
    for name, words in [("a\x00b", "control character"), ("\x1b[31mred", "control character"), ("a\x0bb", "control character"),
                        ("\x7f", "control character"), ("😀" * 70, "bytes")]:
        r = fresh.post("/api/rename", {"group_id": 1, "name": name})
        assert r.status == 400 and words in r.json()["error"], (name, r.text)
    assert fresh.post("/api/rename", {"group_id": 1, "name": "é" * 80}).status == 200  # 160 bytes: a folder holds it
    for kind in ("copy", "link"):
        r = fresh.post("/api/export", {"kind": kind})
        assert r.status == 200, r.text


def test_exporting_a_missing_image_is_a_400_that_names_it(fresh):
    assert fresh.post("/api/export", {"kind": "copy"}).status == 200
    first = sorted((fresh.folder / "export" / "classes").rglob("*.png"))
    gone = fresh.project.image(2)["path"]
    os.unlink(gone)
    r = fresh.post("/api/export", {"kind": "copy"})
    assert r.status == 400 and gone in r.json()["error"] and "junk" in r.json()["error"], r.text
    assert not (fresh.folder / "export" / ".classes.tmp").exists()
    assert sorted((fresh.folder / "export" / "classes").rglob("*.png")) == first  # the last export stays whole


def test_the_host_must_name_this_machine_and_nothing_else(fresh):
    for host in ["localhost:[x]", "localhost:][", "localhost:8765:8765", "localhost:8o", "127.0.0.1:", "127.0.0.1:123456"]:
        assert fresh.send(Req("GET", "/", [("host", host)], b"", False, "/")).status == 403, host
    for host in ["[::1]", "[::1]:8765", "localhost", "127.0.0.1:8765"]:
        r = fresh.send(Req("GET", "/", [("host", host)], b"", True, "/"))
        assert r.status == 200, (host, r.text[:200])


def test_api_errors_are_json_even_when_a_browser_asks_for_html(fresh):
    r = fresh.post("/api/rename", {"group_id": 10**6, "name": "x"}, accept="text/html,application/xhtml+xml")
    assert r.status == 400 and r.headers["content-type"].startswith("application/json") and "does not exist" in r.json()["error"]
    r = fresh.send(Req("GET", "/groups/999", [("host", SERVER), ("accept", "text/html")], b"", True, "/groups/{g}"))
    assert r.status == 404 and r.headers["content-type"].startswith("text/html")  # a page for the browser's own navigation
