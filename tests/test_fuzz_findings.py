"""What the 5-minute file fuzz (``benchmarks/fuzz_files.py --seconds 300 --seed 7000``) found, each
kept as a plain test: a shard record that is not a record, a file name holding a newline, and a
refused run that left its ``--out`` folder behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .conftest import assert_user_error, run_cli

PP = {"input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 1.0}


def write_part(path: Path, paths: list[str], shard) -> Path:
    meta = {"backbone": "efficientnet_lite0", "preprocessing": PP, "shard": shard}
    features = np.random.default_rng(0).normal(size=(len(paths), 8)).astype(np.float32)
    np.savez(path, features=features, paths=np.asarray(paths), meta=np.asarray(json.dumps(meta)))
    return path


def test_parts_whose_shard_record_is_not_a_record_are_refused_in_one_line(tmp_path, capsys):
    good = write_part(tmp_path / "p1.npz", ["/x/1_0.png", "/x/1_1.png"], {"index": 1, "count": 2, "images": 4})
    for n, record in enumerate(([[None, False]], "C%", {"\udcff": 1})):
        bad = write_part(tmp_path / f"bad{n}.npz", ["/x/0_0.png", "/x/0_1.png"], record)
        code, _, err = run_cli(capsys, "index", "--parts", bad, good, "--out", tmp_path / f"out{n}")
        assert_user_error(code, err, "shard record", "embed that shard again")
        assert not (tmp_path / f"out{n}").exists()


def test_an_error_naming_a_file_with_a_newline_stays_on_one_line(tmp_path, capsys):
    odd = tmp_path / "tab\tnew\nline.npz"
    code, _, err = run_cli(capsys, "index", odd, "--out", tmp_path / "idx")
    assert_user_error(code, err, "tab\\tnew\\nline.npz")


def test_a_refused_index_or_audit_leaves_no_out_folder(tmp_path, capsys):
    npz = write_part(tmp_path / "odd.npz", ["caf\udce9.png", "/x/b.png"], None)  # a name that cannot be written as UTF-8
    for command in ("index", "audit"):
        code, _, err = run_cli(capsys, command, npz, "--out", tmp_path / command)
        assert_user_error(code, err, "not in the expected encoding")
        assert not (tmp_path / command).exists()
