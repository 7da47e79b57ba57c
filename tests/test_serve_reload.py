"""New model versions without downtime (``imagerec.serve._reload``): ``POST /admin/reload`` and
``--watch`` swap a checked, warmed-up version in under load with no failed request; requests in
flight finish on the old one; a bad checkpoint is refused and the old version keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from imagerec import ImagerecError, create_backbone
from imagerec.checkpoint import Checkpoint, save_checkpoint
from imagerec.export import export_model
from imagerec.serve import ServeConfig, create_app
from imagerec.serve._app import VERSION_HEADER

from .conftest import assert_user_error, run_cli
from .test_serve import AUTH, CLASSES, TOKEN, SlowEngine, assert_error, png_bytes, running, wait_ready

IMAGE = png_bytes((40, 34), seed=3)


def write_checkpoint(path: Path, seed: int, scale: float = 20.0) -> str:
    """A seed_cnn checkpoint with weights from ``seed`` at ``path`` (atomically); its SHA-256."""
    torch.manual_seed(seed)
    net = create_backbone("seed_cnn", num_classes=len(CLASSES))
    with torch.no_grad():
        net.fc3.weight.mul_(scale)  # confident, distinct outputs: a different version shows
    meta = {"backbone": "seed_cnn", "classes": CLASSES, "preprocessing": net.preprocessing.to_dict()}
    save_checkpoint(path, Checkpoint(net.state_dict(), meta))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def run(tmp_path):
    """A run folder of its own (the tests overwrite its best checkpoint) and its SHA-256."""
    folder = tmp_path / "run"
    return folder, write_checkpoint(folder / "best.safetensors", seed=0)


def predict(url: str) -> httpx.Response:
    r = httpx.post(f"{url}/predict?top_k=3", content=IMAGE, headers={**AUTH, "Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def probabilities(r: httpx.Response) -> list[float]:
    return [t["probability"] for t in r.json()["predictions"][0]["top"]]


def reload(url: str) -> httpx.Response:
    return httpx.post(f"{url}/admin/reload", headers=AUTH, timeout=120)


async def load(url: str, clients: int, stop: asyncio.Event) -> list[tuple[float, float, httpx.Response | str]]:
    """``clients`` clients posting the image until ``stop``: (start, end, response or error) of each."""
    done = []
    async with httpx.AsyncClient(headers={**AUTH, "Content-Type": "image/png"}, timeout=30) as client:

        async def worker():
            while not stop.is_set():
                start = time.monotonic()
                try:
                    r = await client.post(f"{url}/predict?top_k=3", content=IMAGE)
                except httpx.HTTPError as e:
                    r = f"{type(e).__name__}: {e}"
                done.append((start, time.monotonic(), r))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return done


@pytest.mark.slow  # two exports and a few hundred requests: several seconds on a busy 2-core machine
def test_reload_under_load_swaps_with_no_failed_request(run):
    folder, old_sha = run
    with running(create_app(folder, token=TOKEN)) as url:
        wait_ready(url, AUTH)
        old = probabilities(predict(url))

        async def scenario():
            stop = asyncio.Event()
            clients = asyncio.create_task(load(url, 8, stop))
            await asyncio.sleep(0.5)
            new_sha = write_checkpoint(folder / "best.safetensors", seed=1)
            asked = time.monotonic()
            async with httpx.AsyncClient(headers=AUTH, timeout=120) as admin:
                answer = await admin.post(f"{url}/admin/reload")
            swapped = time.monotonic()
            await asyncio.sleep(0.5)
            stop.set()
            return new_sha, answer, asked, swapped, await clients

        new_sha, answer, asked, swapped, done = asyncio.run(scenario())
        new = probabilities(predict(url))
        info = httpx.get(f"{url}/model", headers=AUTH).json()
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "swapped"
    assert answer.json()["previous"]["sha256"] == old_sha and answer.json()["version"]["sha256"] == new_sha
    assert not np.allclose(old, new, atol=1e-3), "the two versions must answer differently for this test to mean anything"
    failed = [r if isinstance(r, str) else f"{r.status_code} {r.text[:200]}" for _, _, r in done if isinstance(r, str) or r.status_code != 200]
    assert not failed, f"{len(failed)} of {len(done)} requests failed across the swap: {failed[:3]}"
    by_version = {old_sha: old, new_sha: new}
    seen = {old_sha: 0, new_sha: 0}
    for start, end, r in done:
        sha = r.headers[VERSION_HEADER]
        seen[sha] += 1
        np.testing.assert_allclose(probabilities(r), by_version[sha], atol=1e-5)  # answered whole by the version it names
        if end < asked:
            assert sha == old_sha, "a request answered before the reload was asked came from the new version"
        if start > swapped:
            assert sha == new_sha, "a request sent after the swap came from the old version"
    assert seen[old_sha] and seen[new_sha], seen
    assert info["sha256"] == info["version"]["sha256"] == new_sha
    assert info["reload"]["last"]["status"] == "swapped"


class SlowForward(SlowEngine):
    """The same version, whose logits take ``delay`` seconds (but the warm-up's blank batch)."""

    def logits(self, batch, tta=False):
        if batch.any():
            time.sleep(self._delay)
        return self._inner.logits(batch, tta)

    def features(self, batch):
        return self._inner.features(batch)


def test_a_request_in_flight_finishes_on_the_old_version(run):
    folder, old_sha = run
    app = create_app(folder, token=TOKEN, config=ServeConfig(max_wait_ms=0))
    server = app.state.server
    server.engine = SlowForward(server.engine, delay=1.5)  # the same version, with a slow forward pass
    with running(app) as url:
        wait_ready(url, AUTH)
        old = probabilities(predict(url))

        async def scenario():
            async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
                slow = asyncio.create_task(client.post(f"{url}/predict?top_k=3", content=IMAGE))
                await asyncio.sleep(0.7)  # in its forward pass on the old engine
                write_checkpoint(folder / "best.safetensors", seed=1)
                answer = await client.post(f"{url}/admin/reload")
                return await slow, answer, await client.post(f"{url}/predict?top_k=3", content=IMAGE)

        slow, answer, after = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.json()["status"] == "swapped", answer.text
    assert slow.status_code == 200 and slow.headers[VERSION_HEADER] == old_sha and probabilities(slow) == old
    assert after.status_code == 200 and after.headers[VERSION_HEADER] == answer.json()["version"]["sha256"] != old_sha


def test_a_bad_checkpoint_is_refused_and_the_old_version_keeps_serving(run):
    folder, old_sha = run
    checkpoint = folder / "best.safetensors"
    with running(create_app(folder, token=TOKEN)) as url:
        wait_ready(url, AUTH)
        before = probabilities(predict(url))
        # 1. a damaged file (its checksum fails)
        good = checkpoint.read_bytes()
        checkpoint.write_bytes(good[: len(good) // 2])
        assert_error(reload(url), 409, "refused", f"still serving sha256 {old_sha}")
        # 2. a checkpoint whose weights are NaN (a diverged run): refused by the check against PyTorch
        write_checkpoint(checkpoint, seed=2, scale=float("nan"))
        body = assert_error(reload(url), 409, "refused", "not finite", old_sha)
        info = httpx.get(f"{url}/model", headers=AUTH).json()
        assert info["version"]["sha256"] == info["sha256"] == old_sha
        assert info["reload"]["last"]["status"] == "refused" and "not finite" in info["reload"]["last"]["reason"]
        assert info["reload"]["last"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        r = predict(url)
        assert r.headers[VERSION_HEADER] == old_sha and probabilities(r) == before
        # the same bad bytes are refused again for the reason kept, not rebuilt; a good checkpoint after them is served
        assert_error(reload(url), 409, "not finite", "not tried again until the file changes")
        new_sha = write_checkpoint(checkpoint, seed=1)
        assert reload(url).json()["version"]["sha256"] == new_sha
        assert predict(url).headers[VERSION_HEADER] == new_sha
    assert "NaN" in body["error"]


def test_watch_serves_a_new_best_checkpoint(run):
    folder, old_sha = run
    with running(create_app(folder, config=ServeConfig(watch=True, watch_interval_s=0.1))) as url:
        wait_ready(url)
        assert httpx.get(f"{url}/model").json()["reload"] == {"source": str(folder), "last": None, "watch": True}
        new_sha = write_checkpoint(folder / "best.safetensors", seed=1)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/model").json()["version"]["sha256"] != new_sha:
            assert time.monotonic() < deadline, "the watched checkpoint was not served within 60 s"
            time.sleep(0.1)
        r = httpx.post(f"{url}/predict", content=IMAGE, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers[VERSION_HEADER] == new_sha


def test_model_names_the_version_serving(run):
    folder, sha = run
    checkpoint = folder / "best.safetensors"
    with running(create_app(folder, token=TOKEN)) as url:
        wait_ready(url, AUTH)
        info = httpx.get(f"{url}/model", headers=AUTH).json()
        r = predict(url)
    version = info["version"]
    assert version["sha256"] == sha and version["file"] == str(checkpoint)
    modified = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(int(checkpoint.stat().st_mtime)))
    assert version["modified"] == modified and version["serving_since"] >= modified
    assert r.headers[VERSION_HEADER] == sha and info["reload"]["last"] is None


def test_reload_needs_a_token_and_a_reloadable_model(run, tmp_path):
    folder, _ = run
    with running(create_app(folder)) as url:  # no token: the admin endpoint is closed
        wait_ready(url)
        assert_error(httpx.post(f"{url}/admin/reload"), 403, "--token")
        assert_error(httpx.post(f"{url}/admin/reload", headers=AUTH), 403, "--token")
    with running(create_app(folder, token=TOKEN)) as url:
        wait_ready(url, AUTH)
        assert_error(httpx.post(f"{url}/admin/reload"), 401, "bearer token")
        assert reload(url).json()["status"] == "unchanged"
    single = export_model(folder, tmp_path / "model.onnx")  # the run exported: served alone
    with running(create_app(single, token=TOKEN)) as url:
        wait_ready(url, AUTH)
        assert_error(reload(url), 409, "cannot be reloaded", "run folder")
    with pytest.raises(ImagerecError, match="--watch needs a run folder"):
        create_app(single, config=ServeConfig(watch=True))
    with pytest.raises(ImagerecError, match="watch_interval_s=0"):
        ServeConfig(watch_interval_s=0).check()


def test_cli_refuses_watch_on_an_onnx(run, tmp_path, capsys):
    folder, _ = run
    single = export_model(folder, tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "serve", single, "--watch")
    assert_user_error(code, err, "--watch needs a run folder", "m.onnx")
    code, _, err = run_cli(capsys, "serve", folder, "--watch-interval", "0")
    assert_user_error(code, err, "watch_interval_s=0")
