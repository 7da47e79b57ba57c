"""Run-folder and output-file locks: a second process is refused at once, naming the holder."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from imagerec import embed
from imagerec._lock import output_lock, run_lock
from imagerec.errors import ImagerecError

from .conftest import make_class_folder

HOLD = """
import sys, time
from imagerec._lock import {kind}
with {kind}(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(kind: str, path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(kind=kind), str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    holder = _holder("run_lock", tmp_path / "run")
    try:
        with pytest.raises(ImagerecError, match=rf"another imagerec run is writing this folder \(process {holder.pid}\)"):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path / "run"):  # kill -9 released it: no stale lock
        with run_lock(tmp_path / "run"):  # and the same process may take it again
            pass


def test_two_embeds_never_write_one_output(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "e.npz"
    holder = _holder("output_lock", out)
    try:
        start = time.monotonic()
        with pytest.raises(ImagerecError, match=rf"another imagerec embed run is writing this file \(process {holder.pid}\)"):
            embed(data, "seed_cnn", out=out, progress=False)
        assert time.monotonic() - start < 30 and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert len(embed(data, "seed_cnn", out=out, progress=False)) == 4
    with output_lock(out):
        pass
