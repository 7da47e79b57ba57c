"""The studio's Review: a page accepted is one action that undo takes back, bad requests change
nothing, what the suggestions learn from, and (slow) the page itself on real features."""

from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from imagerec.studio import create_app
from imagerec.studio._review import PROVISIONAL_UNTIL, State, model_labels

from .conftest import make_colour_dataset
from .test_studio import BASE, group_ids, images_in, post


@pytest.fixture
def studio(tmp_path):
    data = make_colour_dataset(tmp_path / "colours", per_class=6)
    app = create_app(tmp_path / "project", data, backbone="efficientnet_lite0", image_size=64, progress=False)
    client = TestClient(app, base_url=BASE)
    assert client.get("/").status_code == 200
    return app, client


def state_of(project) -> tuple:
    with project.connection() as con:
        return ([tuple(r) for r in con.execute("SELECT id, group_id, excluded FROM images ORDER BY id")],
                [tuple(r) for r in con.execute("SELECT id, name, kind FROM groups WHERE hidden=0 ORDER BY id")], sorted(project.reviewed()))


def test_a_page_accepted_is_one_action_and_one_undo_takes_it_back(studio):
    app, client = studio
    project = app.state.project
    ids = group_ids(project)
    red = sorted(images_in(project, "red"))
    before = state_of(project)
    # the page of 'red' suggestions: four right, one corrected to blue, one to a new class
    groups = [ids["red"]] * 4 + [ids["blue"], None]
    r = post(app, client, "/api/review/accept", {"image_ids": red, "group_ids": groups, "new_name": "crimson"})
    assert r.status_code == 200 and r.json() == {"ok": True, "reviewed": 6}
    assert project.counts()["actions"] == 1 and project.reviewed() == set(red)
    assert images_in(project, "red") == set(red[:4]) and red[4] in images_in(project, "blue") and images_in(project, "crimson") == {red[5]}
    assert project.history(1)[0]["summary"] == "reviewed 6 image(s): 4 as 'red', 1 as 'blue', 1 as 'crimson'"
    assert post(app, client, "/api/undo", {}).json()["undone"].startswith("reviewed 6 image(s)")
    assert state_of(project)[:2] == before[:2] and project.reviewed() == set()  # the new class is hidden again, no image decided


def test_moves_and_accepted_audit_labels_count_as_decided_until_undone(studio):
    app, client = studio
    project = app.state.project
    red = sorted(images_in(project, "red"))
    post(app, client, "/api/move", {"image_ids": red[:2], "group_id": group_ids(project)["blue"]})
    post(app, client, "/api/audit/decide", {"finding": "label:1", "decision": "accept", "image_ids": [red[2]], "label": "green"})
    post(app, client, "/api/rename", {"group_id": group_ids(project)["green"], "name": "grass"})  # a group's name, no image decided
    assert project.reviewed() == set(red[:3])
    post(app, client, "/api/undo", {})
    post(app, client, "/api/undo", {})
    assert project.reviewed() == set(red[:2])


@pytest.mark.parametrize("body, words", [
    ({"image_ids": [1, 2], "group_ids": [1]}, "2 image ids but 1 group ids"),
    ({"image_ids": [1, 1], "group_ids": [1, 1]}, "sent twice"),
    ({"image_ids": [1], "group_ids": [None]}, "needs new_name"),
    ({"image_ids": [1], "group_ids": [1], "new_name": "x"}, "needs a null group id"),
    ({"image_ids": [1], "group_ids": [None], "new_name": "a/b"}, "character"),
    ({"image_ids": [1], "group_ids": [None], "new_name": "red"}, "already called"),
    ({"image_ids": [1], "group_ids": ["1"]}, "group_ids must be a list"),
    ({"image_ids": [1], "group_ids": [True]}, "group_ids must be a list"),
    ({"image_ids": [1], "group_ids": 1}, "group_ids must be a list"),
    ({"image_ids": [10**6], "group_ids": [1]}, "do not exist"),
    ({"image_ids": [1], "group_ids": [10**6]}, "does not exist"),
    ({"image_ids": [1], "group_ids": [2**63]}, "does not exist"),
    ({"image_ids": [], "group_ids": []}, "no images selected"),
    ({"image_ids": [1], "group_ids": [1], "new_name": 5}, "new_name must be text"),
])
def test_a_bad_page_is_a_400_that_names_the_fix_and_changes_nothing(studio, body, words):
    app, client = studio
    before = state_of(app.state.project)
    r = post(app, client, "/api/review/accept", body)
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert state_of(app.state.project) == before and app.state.project.counts()["actions"] == 0


def test_junk_is_not_labelled_until_it_is_back_in_use(studio):
    app, client = studio
    project = app.state.project
    red = sorted(images_in(project, "red"))
    post(app, client, "/api/exclude", {"image_ids": [red[0]], "reason": "junk"})
    r = post(app, client, "/api/review/accept", {"image_ids": [red[0]], "group_ids": [group_ids(project)["red"]]})
    assert r.status_code == 400 and "marked junk" in r.json()["error"] and project.counts()["actions"] == 1


def state(names, named, decided, in_use=None) -> State:
    n = len(names)
    return State(np.arange(n), np.zeros(n, np.int64), list(names), np.asarray(named), np.ones(n, bool) if in_use is None else np.asarray(in_use),
                 np.asarray(decided), {})


def test_the_model_learns_from_decisions_and_from_named_classes_until_enough_are_decided():
    k = PROVISIONAL_UNTIL
    names = ["a"] * (k + 2) + ["b"] * 3 + ["cluster 01"] * 2
    named = [True] * (k + 5) + [False] * 2
    decided = [True] * k + [False] * 2 + [True, False, False] + [False, True]
    labels = model_labels(state(names, named, decided))
    assert labels[k:k + 2] == [None, None]  # 'a' has k decided images: its undecided ones are unlabelled
    assert labels[:k] == ["a"] * k
    assert labels[k + 2:k + 5] == ["b"] * 3  # 'b' has one: its cluster's images still count
    assert labels[-2:] == [None, "cluster 01"]  # an unnamed cluster teaches only what was decided in it
    junk = model_labels(state(["b", "b"], [True, True], [True, False], in_use=[False, False]))
    assert junk == [None, None]


@pytest.mark.slow
def test_the_review_page_on_real_features_refreshes_after_each_page(tmp_path):
    """Unlabelled colour photos, clustered: the review reuses the clustering's cached features,
    shows pictures grouped by suggested class, and a page accepted leaves the next page."""
    colours = make_colour_dataset(tmp_path / "colours", per_class=6)
    flat = tmp_path / "photos"
    flat.mkdir()
    for path in colours.rglob("*.png"):
        shutil.copy(path, flat / f"{path.parent.name}_{path.name}")
    app = create_app(tmp_path / "p", flat, k=3, backbone="efficientnet_lite0", image_size=64, progress=False)
    project = app.state.project
    assert (tmp_path / "p" / "features" / "embeddings.npz").is_file()
    client = TestClient(app, base_url=BASE)
    assert 'data-state="idle"' in client.get("/review").text  # the page's script starts the features
    for g, name in zip(project.groups(), ("one", "two", "three")):
        post(app, client, "/api/rename", {"group_id": g.id, "name": name})
    assert post(app, client, "/api/review/start", {}).status_code == 200
    deadline = time.time() + 120
    while not app.state.reviewer.ready and app.state.reviewer.job.state != "failed" and time.time() < deadline:
        time.sleep(0.1)
    assert app.state.reviewer.ready, app.state.reviewer.job.message
    seen = set()
    for _ in range(10):
        text = client.get("/review?order=least").text
        cards = re.findall(r'data-id="(\d+)" data-group="(\d+)" data-choices="([\d,]*)"', text)
        if not cards:
            assert "Every image in use is decided." in text
            break
        assert len({g for _, g, _ in cards}) == 1 and 'id="accept"' in text  # one suggested class a page
        ids = [int(i) for i, _, _ in cards]
        assert not seen & set(ids)  # a decided image is not asked again
        seen |= set(ids)
        assert all(len(c.split(",")) == 2 for _, _, c in cards)  # the two other classes, most likely first
        r = post(app, client, "/api/review/accept", {"image_ids": ids, "group_ids": [int(g) for _, g, _ in cards]})
        assert r.status_code == 200
        got = client.get("/api/review/suggestions").json()
        assert {i["id"] for i in got["images"] if i["decided"]} == seen
    assert len(seen) == 18 and project.reviewed() == seen
    assert "label next" in client.get("/review/next").text
