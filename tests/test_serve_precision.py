"""int8 or fp32 by measurement (``imagerec.serve._precision``): with the run's int8 file beside its
checkpoint, the server times both here and serves the faster one within the agreement the int8
file records; the figures are on ``/model``; a stale or missing int8 file means fp32."""

from __future__ import annotations

import json

import httpx
import onnx
import pytest

from imagerec import ImagerecError
from imagerec._metadata import KEY_COMPRESSION
from imagerec.compress import quantize
from imagerec.serve import ServeConfig, create_app

from .conftest import make_colour_dataset
from .test_serve import png_bytes, running, wait_ready
from .test_serve_reload import write_checkpoint


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """A seed_cnn run folder with model.int8.onnx made from its checkpoint, and the calibration data."""
    root = tmp_path_factory.mktemp("precision")
    run = root / "run"
    write_checkpoint(run / "best.safetensors", seed=0)
    data = make_colour_dataset(root / "data", per_class=4, size=(40, 34))
    quantize(run, run / "model.int8.onnx", calib=data, calib_images=12, batch_size=4)
    return run


def precision_of(app) -> dict:
    with running(app) as url:
        wait_ready(url)
        info = httpx.get(f"{url}/model").json()
        r = httpx.post(f"{url}/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return info["precision"]


def set_agreement(path, agreement: float) -> None:
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == KEY_COMPRESSION:
            prop.value = json.dumps({**json.loads(prop.value), "fp32_top1_agreement": agreement})
    onnx.save(proto, str(path))


def test_auto_serves_the_faster_of_the_two_as_timed_here(int8_run):
    got = precision_of(create_app(int8_run, config=ServeConfig(min_int8_agreement=0.0)))
    assert got["fp32_ms_per_image"] > 0 and got["int8_ms_per_image"] > 0 and got["timing_batch"] == 8
    faster = "int8" if got["int8_ms_per_image"] < got["fp32_ms_per_image"] else "fp32"
    assert got["served"] == faster, got  # whichever this CPU runs faster
    assert got["int8_file"].endswith("model.int8.onnx") and 0 <= got["fp32_top1_agreement"] <= 1


def test_int8_below_the_agreement_rule_is_not_served_however_fast(int8_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    set_agreement(run / "model.int8.onnx", 0.5)
    got = precision_of(create_app(run, config=ServeConfig(min_int8_agreement=0.9)))
    assert got["served"] == "fp32" and "50.00%" in got["reason"] and ">= 90.00%" in got["reason"], got


def test_an_int8_file_of_another_checkpoint_is_not_used(int8_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    write_checkpoint(run / "best.safetensors", seed=5)  # a new version; the int8 file is the old one's
    got = precision_of(create_app(run))
    assert got == {"served": "fp32", "reason": "model.int8.onnx beside it was made from another checkpoint"}
    with pytest.raises(ImagerecError, match="--precision int8: .*another checkpoint"):
        create_app(run, config=ServeConfig(precision="int8"))


def test_fp32_and_int8_can_be_asked_for(int8_run):
    assert precision_of(create_app(int8_run, config=ServeConfig(precision="fp32")))["served"] == "fp32"
    assert precision_of(create_app(int8_run, config=ServeConfig(precision="int8")))["served"] == "int8"
    with pytest.raises(ImagerecError, match="precision='x' must be one of auto, fp32, int8"):
        ServeConfig(precision="x").check()
    with pytest.raises(ImagerecError, match="min_int8_agreement=1.5"):
        ServeConfig(min_int8_agreement=1.5).check()
    with pytest.raises(ImagerecError, match="--precision fp32: .*int8 model"):
        create_app(int8_run / "model.int8.onnx", config=ServeConfig(precision="fp32"))


def test_batches_stop_where_larger_ones_no_longer_run_faster_per_image(int8_run):
    from imagerec.serve import load_engine
    from imagerec.serve._precision import BATCH_TOLERANCE, pick_batch_size

    chosen, report = pick_batch_size(load_engine(int8_run), 16, threads=1)
    timed = {int(b): ms for b, ms in report["ms_per_image_by_batch"].items()}
    assert set(timed) <= {1, 2, 4, 8, 16} and 1 in timed and report["chosen"] == chosen
    best = min(timed.values())
    # whatever this CPU's figures: the largest batch timed within the tolerance of the best
    assert chosen == max(b for b, ms in timed.items() if ms <= (1 + BATCH_TOLERANCE) * best)
    with running(create_app(int8_run, config=ServeConfig(max_batch_size=16))) as url:
        wait_ready(url)
        batching = httpx.get(f"{url}/model").json()["batching"]
    assert 1 <= batching["chosen"] <= 16 and "ms_per_image_by_batch" in batching
    off = create_app(int8_run, config=ServeConfig(max_batch_size=16, tune_batch=False))
    assert off.state.server.batcher.max_batch_size == 16
