"""The command line: help and version, the models table, and one-line errors with status 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from imagerec import __version__, list_backbones
from imagerec.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits for --help, --version and bad arguments
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"imagerec {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["embed", "--help"], ["models", "--help"]])
def test_help(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "usage: imagerec" in out


def test_models_table_lists_every_backbone(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in list_backbones():
        assert name in out
    assert "75.1%" in out and "385 M @ 224px" in out


def test_models_recommend(capsys):
    code, out, _ = run(capsys, "models", "--recommend", "--images", "50000", "--image-side", "32")
    assert code == 0 and "backbone: efficientnet_lite0" in out and "image size: 128 px" in out


def test_recommend_needs_images(capsys):
    assert_user_error(*run(capsys, "models", "--recommend")[::2], "--images")


def test_embed_writes_the_file(capsys, class_folder, tmp_path):
    out_file = tmp_path / "e.npz"
    code, out, _ = run(capsys, "embed", str(class_folder), "--backbone", "seed_cnn", "--out", str(out_file), "--no-progress")
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
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, *fragments)


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "imagerec", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"imagerec {__version__}"
