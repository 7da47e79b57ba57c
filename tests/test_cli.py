"""The command line: help and version, the models table, and one-line errors with status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

from imagerec import __version__, list_backbones

from .conftest import assert_user_error, run_cli


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"imagerec {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["embed", "--help"], ["models", "--help"]])
def test_help(capsys, argv):
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "usage: imagerec" in out


def test_every_command_has_a_help_page(capsys):
    """argparse formats help texts with %: a help text with a bare % (as "70% of steps") crashed
    ``imagerec train --help`` with a traceback."""
    from imagerec.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "quickstart", "cluster"} <= set(commands)
    for command in commands:
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and f"usage: imagerec {command}" in out, command


def test_models_table_lists_every_backbone(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for name in list_backbones():
        assert name in out
    assert "75.1%" in out and "385 M @ 224px" in out


def test_models_recommend(capsys):
    code, out, _ = run_cli(capsys, "models", "--recommend", "--images", "50000", "--image-side", "32")
    assert code == 0 and "backbone: efficientnet_lite0" in out and "image size: 96 px" in out


def test_recommend_needs_images(capsys):
    assert_user_error(*run_cli(capsys, "models", "--recommend")[::2], "--images")


def test_embed_writes_the_file(capsys, class_folder, tmp_path):
    out_file = tmp_path / "e.npz"
    code, out, _ = run_cli(capsys, "embed", str(class_folder), "--backbone", "seed_cnn", "--out", str(out_file), "--no-progress")
    assert code == 0 and "12 x 84" in out
    assert np.load(out_file)["features"].shape == (12, 84)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["embed", "/no/such/folder", "--out", "x.npz"], ["/no/such/folder", "no such file or folder"]),
        (["embed", "{data}", "--backbone", "resnet9000", "--out", "x.npz"], ["unknown backbone", "efficientnet_lite0"]),
        (["embed", "{data}", "--batch-size", "0", "--out", "x.npz"], ["--batch-size", "at least 1"]),
        (["embed", "{data}", "--image-size", "8", "--out", "x.npz"], ["8 px", "[16, 1024]"]),
        (["embed", "{data}", "--backbone", "seed_cnn", "--image-size", "64", "--out", "x.npz"], ["only 32 px"]),
        (["embed", "{data}", "--split", "test", "--out", "x.npz"], ["no test split"]),
        (["embed", "{data}"], ["--out"]),
        (["frobnicate"], ["invalid choice"]),
        (["models", "--recommend", "--images", "0"], ["--images 0"]),
    ],
)
def test_user_errors_are_one_line_with_status_2(capsys, class_folder, argv, fragments):
    argv = [a.replace("{data}", str(class_folder)) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, *fragments)


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "imagerec", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"imagerec {__version__}"


def test_train_evaluate_predict_from_the_command_line(capsys, colour_folder, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", str(colour_folder), "--out", str(run_dir), "--backbone", "seed_cnn", "--epochs", "1",
                         "--batch-size", "8", "--val-fraction", "0.25", "--device", "cpu", "--no-progress")
    assert code == 0 and "best checkpoint: epoch 1, val accuracy" in out
    code, out, _ = run_cli(capsys, "evaluate", str(run_dir), str(colour_folder), "--out", str(tmp_path / "eval"))
    assert code == 0 and "accuracy" in out and (tmp_path / "eval" / "confusion.png").is_file()
    code, out, _ = run_cli(capsys, "predict", str(run_dir), str(colour_folder / "red" / "000.png"), "--format", "csv", "--top-k", "2")
    assert code == 0 and out.splitlines()[0] == "path,class1,p1,class2,p2,error"


def test_quickstart_on_a_local_split_root(capsys, tmp_path):
    from .conftest import make_colour_dataset

    make_colour_dataset(tmp_path / "data" / "train", per_class=30)
    make_colour_dataset(tmp_path / "data" / "test", per_class=4)
    code, out, err = run_cli(capsys, "quickstart", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "qs"), "--time-budget", "1", "--no-progress")
    assert code == 0, err
    assert "imagerec quickstart: test accuracy" in out
    assert (tmp_path / "qs" / "evaluation" / "summary.json").is_file()


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train", "{data}"], ["needs DATA and --out"]),
        (["train", "{data}", "--out", "{tmp}/r", "--lr", "-1"], ["lr=-1.0"]),
        (["train", "{data}", "--out", "{tmp}/r", "--recipe", "magic"], ["recipe='magic'"]),
        (["train", "{data}", "--out", "{tmp}/r", "--config", "{tmp}/missing.toml"], ["no such configuration file"]),
        (["train", "--resume", "{tmp}/nothing"], ["no such checkpoint file or run folder"]),
        (["evaluate", "{tmp}/nothing", "{data}", "--out", "{tmp}/e"], ["no such checkpoint"]),
        (["predict", "{tmp}/nothing", "x.jpg"], ["no such checkpoint"]),
    ],
)
def test_train_family_user_errors(capsys, class_folder, tmp_path, argv, fragments):
    argv = [a.replace("{data}", str(class_folder)).replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, *fragments)
