"""``imagerec train DATA --unlabeled MORE``: the surest share of the unlabelled images suggested for
each class join the training split; validation stays labelled; the budget covers the pseudo-labelling."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from imagerec import ImagerecError
from imagerec.checkpoint import load_checkpoint
from imagerec.suggest import train_semi_supervised
from imagerec.training import TrainConfig

from .conftest import assert_user_error, make_colour_dataset, run_cli

FAST = dict(backbone="seed_cnn", batch_size=8, save_every=0, precision="fp32", device="cpu", epochs=1, val_fraction=0.25)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """8 labelled images a colour, and 12 more a colour in one flat folder without labels."""
    labelled = make_colour_dataset(tmp_path / "labelled", per_class=8)
    more = make_colour_dataset(tmp_path / "more_src", per_class=20)
    flat = tmp_path / "unlabelled"
    flat.mkdir()
    for path in sorted(more.rglob("*.png")):
        if int(path.stem) >= 8:  # not the labelled ones' twins
            shutil.copy(path, flat / f"{path.parent.name}_{path.name}")
    return labelled, flat


def test_the_surest_share_of_each_class_joins_the_training_split_and_validation_stays_labelled(folders, tmp_path):
    labelled, flat = folders
    result, info = train_semi_supervised(labelled, flat, tmp_path / "run", TrainConfig(**FAST), share=0.25, progress=False)
    assert info["unlabelled_images"] == 36
    with open(tmp_path / "run" / "pseudo" / "pseudo_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == info["pseudo_labelled"]
    assert all(Path(r["path"]).parent == flat.resolve() and r["label"] in ("red", "green", "blue") for r in rows)
    assert 3 <= len(rows) <= 9 + 3  # a quarter of 36, at least one of each suggested class
    meta = load_checkpoint(tmp_path / "run").meta
    assert meta["train_images"] == 18 + len(rows)  # 6 of each colour's 8 labelled images, plus the pseudo-labelled
    assert "pseudo-labelled" in meta["data"]
    assert result.best_val_accuracy is not None


def test_the_whole_share_takes_every_unlabelled_image(folders, tmp_path):
    labelled, flat = folders
    _, info = train_semi_supervised(labelled, flat, tmp_path / "run", TrainConfig(**FAST), share=1.0, progress=False)
    assert info["pseudo_labelled"] == 36
    assert load_checkpoint(tmp_path / "run").meta["train_images"] == 18 + 36


def test_the_budget_covers_the_pseudo_labelling(folders, tmp_path):
    labelled, flat = folders
    config = TrainConfig(**FAST, time_budget=3.0)  # ample on a loaded machine; one epoch ends the run
    train_semi_supervised(labelled, flat, tmp_path / "run", config, progress=False)
    left = json.loads((tmp_path / "run" / "config.json").read_text())["config"]["time_budget"]
    assert 0 < left < 3.0


def test_cli_semi_supervised_run_and_its_bad_input(folders, tmp_path, capsys):
    labelled, flat = folders
    flags = ["--backbone", "seed_cnn", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    code, out, err = run_cli(capsys, "train", labelled, "--unlabeled", flat, "--out", tmp_path / "run", "--pseudo-share", "0.5", *flags)
    assert code == 0, err
    assert "pseudo-labelled" in out and "run folder" in out
    code, _, err = run_cli(capsys, "train", labelled, "--unlabeled", tmp_path / "nowhere", "--out", tmp_path / "r2", *flags)
    assert_user_error(code, err, "nowhere")
    code, _, err = run_cli(capsys, "train", labelled, "--unlabeled", flat, "--out", tmp_path / "r3", "--pseudo-share", "1.5", *flags)
    assert_user_error(code, err, "1.5", "(0, 1]")
    code, _, err = run_cli(capsys, "train", labelled, "--out", tmp_path / "r4", "--pseudo-share", "0.5", *flags)
    assert_user_error(code, err, "--unlabeled")
    code, _, err = run_cli(capsys, "train", labelled, "--unlabeled", labelled, "--out", tmp_path / "r5", *flags)
    assert_user_error(code, err, "not already labelled")
    assert not any((tmp_path / r).exists() for r in ("r2", "r3", "r4", "r5"))


def test_a_folder_in_use_is_refused_before_any_work(folders, tmp_path):
    labelled, flat = folders
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ImagerecError, match="not empty"):
        train_semi_supervised(labelled, flat, tmp_path / "run", TrainConfig(**FAST), progress=False)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
