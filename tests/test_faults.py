"""Fault injection: ``kill -9`` at random points of ``imagerec train``, ``embed`` and ``cluster``,
then resume (train) or run again (embed, cluster): the result equals an uninterrupted run's and no
temporary file is left behind.

Each command runs as a real subprocess on tiny generated images. The kill points are drawn from
a seeded generator as a share (0 to 0.95) of the uninterrupted run's own duration, so they land
anywhere: during imports, decoding, embedding, clustering, a file write; for train, inside the
training itself (once a random step is saved, within the next 0.3 s): a step, a validation, a
checkpoint write. What "equal" means:

- train: in-memory data (small images) resumes exactly where the uninterrupted run would be
  (every random draw comes from (seed, epoch, step)), so the final weights are compared
  bitwise, and the last epoch's validation figures exactly;
- embed: the .npz features and paths, bitwise;
- cluster: assignments.csv, byte for byte.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imagerec import load_checkpoint

from .conftest import make_colour_dataset

pytestmark = pytest.mark.slow
SEEDS = (1, 2)
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TIMEOUT = 180  # seconds, for any one process


def _imagerec(*args) -> list[str]:
    return [sys.executable, "-m", "imagerec", *map(str, args)]


def _run(*args, watch: Path | None = None) -> tuple[float, float]:
    """Run ``imagerec ARGS`` to the end: (its duration, seconds until ``watch`` appeared) in seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(_imagerec(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = 0.0
    while watch is not None and not seen and proc.poll() is None and time.perf_counter() - start < TIMEOUT:
        seen = time.perf_counter() - start if watch.exists() else 0.0
        time.sleep(0.01)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-2000:]
    return time.perf_counter() - start, seen


def _killed(args, delay: float, after_step: tuple[Path, int] | None = None) -> int | None:
    """Start ``imagerec ARGS`` and SIGKILL it ``delay`` seconds after its start, or after the
    checkpoint ``after_step[0]`` records step ``after_step[1]``; its exit status (None: killed).

    Each outcome is printed (``pytest -s`` shows them; docs/BENCHMARKS.md quotes a run)."""
    proc = subprocess.Popen(_imagerec(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    while after_step is not None and proc.poll() is None and time.perf_counter() - start < TIMEOUT:
        path, step = after_step
        if path.exists() and load_checkpoint(path).meta["step"] >= step:
            break
        time.sleep(0.005)
    try:
        proc.wait(timeout=delay)
        return proc.returncode  # it finished first: a legal outcome, the rerun must cope
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"\nfault: {args[0]} killed with SIGKILL {delay:.2f} s after " + ("its start" if after_step is None else f"step {after_step[1]}"))
        return None


def _delay(seed: int, window: float) -> float:
    """A seeded random point in the first 95% of ``window`` seconds."""
    return float(np.random.default_rng(seed).uniform(0.0, 0.95) * window)


def _temporaries(folder: Path) -> list[str]:
    """Files an atomic write or a resumable run leaves while in progress."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name or p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("faults") / "colours", per_class=24)


# -- train -----------------------------------------------------------------------------------

TRAIN = ["--backbone", "seed_cnn", "--batch-size", "4", "--epochs", "3", "--val-fraction", "0.25", "--save-every", "2",
         "--augment", "default", "--precision", "fp32", "--device", "cpu", "--workers", "0", "--no-progress"]


def test_train_killed_at_random_points_then_resumed_equals_the_uninterrupted_run(data, tmp_path):
    whole = tmp_path / "whole"
    _run("train", data, "--out", whole, *TRAIN)
    expected = load_checkpoint(whole / "last.safetensors")
    total = expected.meta["step"]
    for seed in SEEDS:
        run = tmp_path / f"killed{seed}"
        # a random point of the training itself: once a random step is saved, within the next steps
        # (a step, a validation, a checkpoint write); start-up is the other tests' case
        rng = np.random.default_rng(seed)
        after = (run / "last.safetensors", int(rng.integers(2, total - 4)))
        status = _killed(["train", data, "--out", run, *TRAIN], float(rng.uniform(0.0, 0.3)), after_step=after)
        assert status in (None, 0)
        left = _temporaries(run)
        if (run / "last.safetensors").exists():
            print(f"fault: train left step {load_checkpoint(run / 'last.safetensors').meta['step']} of {expected.meta['step']}, temporaries {left}")
            _run("train", "--resume", run, "--no-progress")  # a finished run says so and exits 0
        else:  # killed before the first checkpoint: the folder may exist, and a new run starts there
            print(f"fault: train left no checkpoint, temporaries {left}")
            _run("train", data, "--out", run, *TRAIN)
        got = load_checkpoint(run / "last.safetensors")
        assert got.meta["step"] == expected.meta["step"]
        for name, tensor in expected.model.items():
            assert torch.equal(got.model[name], tensor), (seed, name)
        assert [r["val_acc"] for r in got.meta["history"]] == [r["val_acc"] for r in expected.meta["history"]]
        assert got.meta["history"][-1]["val_loss"] == expected.meta["history"][-1]["val_loss"]
        assert _temporaries(run) == []


# -- embed -----------------------------------------------------------------------------------


def test_embed_killed_at_random_points_then_run_again_equals_the_uninterrupted_run(data, tmp_path):
    # a pretrained backbone: seed_cnn's random initial weights are not seeded in embed (issue 10, item 17)
    args = ["--backbone", "efficientnet_lite0", "--image-size", "32", "--engine", "torch", "--batch-size", "8", "--workers", "0", "--no-progress"]
    baseline, _ = _run("embed", data, "--out", tmp_path / "whole.npz", *args)
    expected = np.load(tmp_path / "whole.npz")
    for seed in SEEDS:
        out = tmp_path / f"killed{seed}" / "features.npz"
        out.parent.mkdir()
        assert _killed(["embed", data, "--out", out, *args], _delay(seed, baseline)) in (None, 0)
        _run("embed", data, "--out", out, *args)
        got = np.load(out)
        assert np.array_equal(got["features"], expected["features"]), seed
        assert list(got["paths"]) == list(expected["paths"])
        assert _temporaries(out.parent) == []


# -- cluster ---------------------------------------------------------------------------------


def test_cluster_killed_at_random_points_then_run_again_equals_the_uninterrupted_run(data, tmp_path):
    args = ["--method", "kmeans", "--k", "3", "--backbone", "efficientnet_lite0", "--image-size", "32", "--map", "pca", "--seed", "0",
            "--no-progress"]
    baseline, _ = _run("cluster", data, "--out", tmp_path / "whole", *args)
    expected = _rows(tmp_path / "whole" / "assignments.csv")
    for seed in SEEDS:
        run = tmp_path / f"killed{seed}"
        assert _killed(["cluster", data, "--out", run, *args], _delay(seed, baseline)) in (None, 0)
        _run("cluster", data, "--out", run, *args)
        assert _rows(run / "assignments.csv") == expected, seed
        assert _temporaries(run) == []


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
