"""``benchmarks/soak.py`` in brief: the studio and the server under a random mix with two
``kill -9`` and restarts (about 30 s of load each, plus the starts), and its checks shown able
to fail: an effect the client recorded but the database lacks, a change made behind the
history's back."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path

import pytest

from imagerec.studio import Project

ROOT = Path(__file__).resolve().parents[1]


def _soak():
    spec = importlib.util.spec_from_file_location("imagerec_soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = _soak()
BRIEF = {"minutes": 0.5, "kill_every": (6.0, 9.0), "min_kills": 2, "max_kills": 2}


def _failures(summary: dict) -> str:
    return str(summary.get("failures"))[:3000]


@pytest.mark.slow
def test_studio_soak_brief_loses_nothing(tmp_path):
    s = soak.run("studio", seed=1, work=tmp_path, **BRIEF)
    assert s["kills"] == 2 and s["restarts"] == 2 and s["restart_failures"] == 0, s
    assert s["actions_200"] > 20 and s["effects_verified"] > 0
    assert s["lost_effects"] == 0, s["failures"]
    assert s["integrity"] == "ok" and s["integrity_failures_after_restarts"] == 0
    assert s["replay"]["ok"], s["replay"]
    assert s["undo_all"]["ok"], s["undo_all"]
    assert s["five_xx"] == 0 and s["connection_errors"]["while_up"] == 0
    assert s["unexpected_changes"] == 0 and s["page_mismatches"] == 0 and s["history_problems"] == 0
    assert s["ok"], _failures(s)


@pytest.mark.slow
def test_serve_soak_brief_answers_the_reference(tmp_path):
    s = soak.run("serve", seed=1, work=tmp_path, **BRIEF)
    assert s["kills"] == 2 and s["restarts"] == 2 and s["ready_after_restart"] == 2, s
    assert s["answers_verified"] > 100 and s["wrong_answers"] == 0
    assert s["five_xx"] == 0 and s["connection_errors"]["while_up"] == 0
    assert s["rss"]["max_mb"]
    assert s["ok"], _failures(s)


def _project(tmp_path: Path):
    """A project of 12 images in 3 classes, its import state, and the client's shadow of it."""
    project = Project(tmp_path / "p")
    project.import_groups("synthetic", [("a", "class"), ("b", "class"), ("c", "class")],
                          [(f"/x/{i}.jpg", i % 3, float(i)) for i in range(12)], "synthetic")
    con = soak.read_db(project.path)
    state = soak.snapshot(con)
    con.close()
    return project, state, soak.Shadow(state)


def test_the_checks_pass_when_client_and_database_agree(tmp_path):
    project, state, shadow = _project(tmp_path)
    project.move([1, 2], 3)
    shadow.move([1, 2], 3)
    project.exclude([4], "junk")
    shadow.exclude([4], "junk")
    project.rename(1, "sky")
    shadow.rename(1, "sky")
    gid = project.move_to_new([5, 6], "new one")
    shadow.move_to_new([5, 6], gid, "new one")
    project.merge([2], 3)
    shadow.merge([2], 3)
    project.undo()
    shadow.undo()
    con = soak.read_db(project.path)
    effects = soak.check_effects(con, shadow)
    assert effects["verified"] > 0 and effects["lost"] == [] and effects["unexpected"] == []
    assert soak.check_history(con, shadow) == []
    assert soak.check_replay(con, state)["ok"]
    assert soak.db_checks(con) == "ok"
    con.close()
    assert soak.check_undo_all(project.path, state)["ok"]


def test_the_checks_catch_a_lost_effect_and_a_change_outside_the_history(tmp_path):
    project, state, shadow = _project(tmp_path)
    project.move([1, 2], 3)
    shadow.move([1, 2], 3)
    shadow.move([5], 3)  # the client believes image 5 moved; the database never did it
    con = soak.read_db(project.path)
    effects = soak.check_effects(con, shadow)
    assert [e["cell"] for e in effects["lost"]] == [["images", 5, "group_id"]]
    assert soak.check_history(con, shadow)  # one action too many on the client's side
    con.close()

    project, state, shadow = _project(tmp_path / "second")
    project.move([1], 2)
    shadow.move([1], 2)
    raw = sqlite3.connect(project.path)
    raw.execute("UPDATE images SET group_id=3 WHERE id=7")  # a change no action recorded
    raw.commit()
    raw.close()
    con = soak.read_db(project.path)
    assert soak.check_effects(con, shadow)["unexpected"]
    replay = soak.check_replay(con, state)
    assert not replay["ok"] and replay["differences"] == 1
    con.close()
    assert not soak.check_undo_all(project.path, state)["ok"]
