"""Manifests that imagerec writes: read back without --allow-outside, and only within their folders."""

from __future__ import annotations

import os
import shutil

import pytest

from imagerec.data import load_images, write_manifest
from imagerec.errors import ImagerecError

from .conftest import make_class_folder, make_image


def test_a_written_manifest_reads_its_images_anywhere_and_keeps_label_edits(tmp_path):
    data = make_class_folder(tmp_path / "photos", per_class=3)
    paths = sorted(str(p) for p in data.rglob("*.png"))
    manifest = tmp_path / "runs" / "c" / "manifest.csv"
    assert write_manifest(manifest, [(p, "cluster_00") for p in paths]) == 6
    source = load_images(manifest)
    assert len(source) == 6 and not source.skipped
    # the user renames the cluster to a class: still trusted
    manifest.write_text(manifest.read_text().replace("cluster_00", "cat"))
    assert load_images(manifest).classes == ["cat"]


def test_a_row_added_in_another_folder_is_refused(tmp_path):
    data = make_class_folder(tmp_path / "photos", per_class=2)
    secret = make_image(tmp_path / "elsewhere" / "secret.png")
    manifest = tmp_path / "runs" / "manifest.csv"
    write_manifest(manifest, [(str(p), "a") for p in sorted(data.rglob("*.png"))])
    with open(manifest, "a") as f:
        f.write(f"{secret},a\n")
    source = load_images(manifest)
    assert len(source) == 4
    assert [s.path for s in source.skipped] == [str(secret)] and "--allow-outside" in source.skipped[0].reason


def test_a_copied_manifest_is_an_ordinary_one(tmp_path):
    data = make_class_folder(tmp_path / "photos", per_class=2)
    manifest = tmp_path / "runs" / "manifest.csv"
    write_manifest(manifest, [(str(p), "a") for p in sorted(data.rglob("*.png"))])
    copy = tmp_path / "mail" / "manifest.csv"
    copy.parent.mkdir()
    shutil.copy(manifest, copy)
    with pytest.raises(ImagerecError, match="outside its folder"):
        load_images(copy)
    assert len(load_images(copy, allow_outside=True)) == 4


def test_names_that_are_not_utf8_are_left_out_and_said(tmp_path, capsys):
    good = make_image(tmp_path / "photos" / "good.png")
    bad = os.fsdecode(os.fsencode(str(tmp_path / "photos")) + b"/caf\xe9.png")
    shutil.copy(good, bad)
    manifest = tmp_path / "m.csv"
    assert write_manifest(manifest, [(str(good), "a"), (bad, "a")]) == 1
    assert "caf\\xe9.png" in capsys.readouterr().err
    assert load_images(manifest).paths == [str(good)]


@pytest.mark.parametrize("command", ["embed", "cluster", "audit", "index"])
def test_every_reader_takes_allow_outside(tmp_path, command, monkeypatch):
    """A hand-written manifest naming images elsewhere: refused by default, read with --allow-outside."""
    from imagerec import cli

    data = make_class_folder(tmp_path / "photos", per_class=3)
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(data.rglob("*.png"))))
    out = tmp_path / ("e.npz" if command == "embed" else "out")
    extra = {"embed": ["--backbone", "seed_cnn", "--no-progress"], "cluster": ["--backbone", "seed_cnn", "--k", "2", "--no-progress"],
             "audit": ["--backbone", "seed_cnn", "--checks", "exact_duplicates", "--no-progress"], "index": ["--no-progress"]}[command]
    assert cli.main([command, str(manifest), "--out", str(out), *extra]) == 2
    assert not out.exists() or command in ("cluster", "audit", "index")
    code = cli.main([command, str(manifest), "--out", str(out), "--allow-outside", *extra])
    assert code == 0
