"""``imagerec serve``: real servers on a free 127.0.0.1 port, every endpoint and error code,
batching of concurrent requests, and predictions equal to ``imagerec predict``'s."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imagerec import ImagerecError, __version__, create_backbone
from imagerec.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from imagerec.export import export_model
from imagerec.serve import ServeConfig, check_listen, create_app, load_engine
from imagerec.serve._engines import Engine

from .conftest import assert_user_error, make_colour_dataset, make_image, run_cli

CLASSES = ["blue", "green", "red"]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[1]
# uvicorn shuts down gracefully, then re-raises the signal, so the exit status says SIGTERM
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A seed_cnn run folder (random weights, logits a few units wide), its .onnx, and images."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    net = create_backbone("seed_cnn", num_classes=3)
    with torch.no_grad():
        net.fc3.weight.mul_(20)  # confident, distinct outputs, so that a wrong model shows
    meta = {"backbone": "seed_cnn", "classes": CLASSES, "preprocessing": net.preprocessing.to_dict()}
    save_checkpoint(root / "run" / "best.safetensors", Checkpoint(net.state_dict(), meta))
    onnx_path = export_model(root / "run", root / "model.onnx")
    data = make_colour_dataset(root / "data", per_class=3, size=(40, 34))
    images = sorted(data.rglob("*.png"))
    return {"run": root / "run", "onnx": onnx_path, "images": images, "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """``app`` under uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_ready(url: str, headers=None, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


def files_of(paths) -> list:
    return [("file", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def png_bytes(size=(32, 32), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def cli_predictions(capsys, model, paths, *flags) -> list[dict]:
    code, out, err = run_cli(capsys, "predict", model, *paths, "--format", "json", "--top-k", "3", *flags)
    assert code == 0, err
    return json.loads(out)


def assert_same(served: list[dict], expected: list[dict], atol: float) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert got["file"] == Path(want["path"]).name
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        np.testing.assert_allclose([t["probability"] for t in got["top"]], [t["probability"] for t in want["top"]], atol=atol)


@pytest.fixture(scope="module")
def main_server(models):
    """The run folder on the default (ONNX) engine, with a token and small limits."""
    # batches of up to 32 whatever this CPU's timing says: the batching test needs them
    config = ServeConfig(max_wait_ms=150, max_body_mb=0.2, max_pixels=100 * 100, max_images=8, tune_batch=False)
    with running(create_app(models["run"], token=TOKEN, config=config)) as url:
        wait_ready(url, AUTH)
        yield url


# -- endpoints ------------------------------------------------------------------------------


def test_predict_equals_imagerec_predict_for_the_same_files(main_server, models, capsys):
    paths = models["images"][:5]
    r = httpx.post(f"{main_server}/predict?top_k=3", files=files_of(paths), headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    served = r.json()["predictions"]
    # the server runs the checkpoint exported to ONNX; `imagerec predict RUN` runs PyTorch
    assert_same(served, cli_predictions(capsys, models["run"], paths), atol=2e-5)
    assert served[0]["class"] == served[0]["top"][0]["class"]


def test_predict_with_tta_equals_imagerec_predict_tta(main_server, models, capsys):
    paths = models["images"][3:7]
    r = httpx.post(f"{main_server}/predict?top_k=3&tta=true", files=files_of(paths), headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"], cli_predictions(capsys, models["run"], paths, "--tta"), atol=2e-5)


def test_raw_image_bytes_and_top_k(main_server, models):
    path = models["images"][0]
    r = httpx.post(f"{main_server}/predict?top_k=2", content=path.read_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    (prediction,) = r.json()["predictions"]
    assert prediction["file"] == "body" and len(prediction["top"]) == 2
    multipart = httpx.post(f"{main_server}/predict?top_k=2", files=files_of([path]), headers=AUTH).json()
    assert prediction["top"] == multipart["predictions"][0]["top"]


def test_onnx_file_predictions_equal_imagerec_predict_on_it(models, capsys):
    paths = models["images"]
    with running(create_app(models["onnx"])) as url:
        wait_ready(url)
        served = httpx.post(f"{url}/predict?top_k=3", files=files_of(paths), timeout=30).json()["predictions"]
        embed = httpx.post(f"{url}/embed", files=files_of(paths[:1]))
    assert_same(served, cli_predictions(capsys, models["onnx"], paths), atol=1e-6)
    assert embed.status_code == 501 and "serve the checkpoint" in embed.json()["error"]


def test_torch_engine_predictions_equal_imagerec_predict(models, capsys):
    paths = models["images"][:4]
    with running(create_app(models["run"], engine="torch")) as url:
        wait_ready(url)
        served = httpx.post(f"{url}/predict?top_k=3", files=files_of(paths), timeout=30).json()["predictions"]
        info = httpx.get(f"{url}/model").json()
        embedded = httpx.post(f"{url}/embed", files=files_of(paths), timeout=30).json()
    assert info["engine"] == "torch"
    assert_same(served, cli_predictions(capsys, models["run"], paths), atol=1e-6)
    got = np.asarray([e["vector"] for e in embedded["embeddings"]], dtype=np.float32)
    np.testing.assert_allclose(got, pre_logits(models["run"], paths), atol=1e-5)


def pre_logits(run, paths) -> np.ndarray:
    """The embedding ``forward_head(pre_logits=True)`` of each image, computed here in PyTorch."""
    from imagerec.data import eval_transform

    model = model_from_checkpoint(load_checkpoint(run))
    batch = torch.stack([eval_transform(model.preprocessing)(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return model.forward_head(model.forward_features(batch), pre_logits=True).numpy()


def test_embed_gives_the_backbones_pre_logits(main_server, models):
    paths = models["images"][:3]
    r = httpx.post(f"{main_server}/embed", files=files_of(paths), headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.asarray([e["vector"] for e in body["embeddings"]], dtype=np.float32)
    want = pre_logits(models["run"], paths)
    assert body["dim"] == want.shape[1] == got.shape[1]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_model_health_ready_docs(main_server, models):
    info = httpx.get(f"{main_server}/model", headers=AUTH).json()
    checkpoint = models["run"] / "best.safetensors"
    assert info["classes"] == CLASSES and info["backbone"] == "seed_cnn" and info["engine"] == "onnx"
    assert info["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert info["preprocessing"]["input_size"] == 32 and info["imagerec_version"] == __version__
    assert httpx.get(f"{main_server}/health").json() == {"status": "ok"}  # no token needed
    assert httpx.get(f"{main_server}/ready", headers=AUTH).json() == {"status": "ready"}
    assert "swagger" in httpx.get(f"{main_server}/docs", headers=AUTH).text.lower()
    paths = httpx.get(f"{main_server}/openapi.json", headers=AUTH).json()["paths"]
    assert {"/predict", "/embed", "/model", "/health", "/ready", "/metrics"} <= set(paths)


def test_concurrent_requests_share_forward_passes(main_server, models):
    n = 12

    async def burst():
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
            return await asyncio.gather(*(
                client.post(f"{main_server}/predict", files=files_of([models["images"][i % 9]])) for i in range(n)
            ))

    before = batch_histogram(main_server)
    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * n
    after = batch_histogram(main_server)
    images, passes = after["sum"] - before["sum"], after["count"] - before["count"]
    assert images == n
    assert passes < n, f"{n} concurrent requests took {passes} forward passes: no batching"


def batch_histogram(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "imagerec_batch_size")
    return {s.name.rsplit("_", 1)[1]: s.value for s in family.samples if s.name.endswith(("_sum", "_count"))}


def test_metrics_parse_and_count_requests_by_endpoint_and_status(main_server, models):
    httpx.post(f"{main_server}/predict", files=files_of(models["images"][:2]), headers=AUTH)
    httpx.post(f"{main_server}/predict", content=b"not an image", headers=AUTH)
    text = httpx.get(f"{main_server}/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["imagerec_http_requests"].samples if s.name.endswith("_total")}
    assert requests[("/predict", "200")] >= 1 and requests[("/predict", "400")] >= 1
    assert families["imagerec_images_decoded"].samples[0].value >= 2
    assert families["imagerec_images_skipped"].samples[0].value >= 1
    assert any(s.name == "imagerec_http_request_seconds_bucket" for s in families["imagerec_http_request_seconds"].samples)


# -- errors: a JSON body, the right status, never a traceback ---------------------------------


def assert_error(r: httpx.Response, status: int, *fragments) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"]
    return body


@pytest.mark.parametrize(
    ("content", "name", "fragment"),
    [(b"", "empty.png", "empty"), (b"hello, world", "note.png", "not an image"), (png_bytes()[:60], "cut.png", "corrupt")],
)
def test_bad_image_is_400_naming_file_and_problem(main_server, content, name, fragment):
    r = httpx.post(f"{main_server}/predict", files=[("file", (name, content, "image/png"))], headers=AUTH)
    assert_error(r, 400, name, fragment)


def test_pixel_limit_no_files_wrong_type_and_bad_query(main_server):
    big = [("file", ("big.png", png_bytes((120, 100)), "image/png"))]
    assert_error(httpx.post(f"{main_server}/predict", files=big, headers=AUTH), 400, "big.png", "12,000 pixels", "10,000")
    form = httpx.post(f"{main_server}/predict", data={"note": "x"}, files=[], headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"}, content=b"--b--\r\n")
    assert_error(form, 400, "no files")
    assert_error(httpx.post(f"{main_server}/predict", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}), 415, "text/plain")
    assert_error(httpx.post(f"{main_server}/predict?top_k=0", content=png_bytes(), headers=AUTH), 422, "top_k")
    nine = [("file", (f"{i}.png", png_bytes(seed=i), "image/png")) for i in range(9)]
    assert_error(httpx.post(f"{main_server}/predict", files=nine, headers=AUTH), 400, "8")


def test_token_is_required_except_for_health(main_server):
    assert_error(httpx.get(f"{main_server}/model"), 401, "missing bearer token")
    r = httpx.post(f"{main_server}/predict", content=png_bytes(), headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "wrong bearer token")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_error(httpx.get(f"{main_server}/metrics"), 401)
    assert httpx.get(f"{main_server}/health").status_code == 200


def test_body_over_the_limit_is_413_by_length_and_while_reading(main_server):
    big = os.urandom(250_000)  # the limit is 0.2 MB
    assert_error(httpx.post(f"{main_server}/predict", content=big, headers={**AUTH, "Content-Type": "image/png"}), 413, "200,000")

    def chunks():  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 16_384):
            yield big[start : start + 16_384]

    r = httpx.post(f"{main_server}/predict", content=chunks(), headers={**AUTH, "Content-Type": "image/png"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "over the limit")
    assert httpx.get(f"{main_server}/health").status_code == 200


class SlowEngine(Engine):
    """A real engine whose forward pass takes ``delay`` seconds (or fails): to fill the queue."""

    def __init__(self, inner: Engine, delay: float, fail: bool = False):
        self.__dict__.update(inner.__dict__)
        self._inner, self._delay, self._fail = inner, delay, fail
        self.name = inner.name

    def prepare(self, image):
        return self._inner.prepare(image)

    def logits(self, batch, tta=False):
        time.sleep(self._delay)
        if self._fail and batch.any():  # the warm-up batch of zeros passes
            raise RuntimeError("secret internal detail")
        return self._inner.logits(batch, tta)


def test_full_queue_is_503_with_retry_after_and_health_still_answers(models):
    engine = SlowEngine(load_engine(models["onnx"]), delay=0.4)
    app = create_app(engine, config=ServeConfig(max_queue=2, max_batch_size=1, max_wait_ms=0))

    async def overload(url):
        async with httpx.AsyncClient(timeout=30) as client:
            posts = [asyncio.create_task(client.post(f"{url}/predict", content=png_bytes(seed=i))) for i in range(6)]
            await asyncio.sleep(0.2)
            health = await client.get(f"{url}/health")
            return health, await asyncio.gather(*posts)

    with running(app) as url:
        wait_ready(url)
        health, responses = asyncio.run(overload(url))
    assert health.status_code == 200
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "server full", "--max-queue")
            assert r.headers["Retry-After"] == "1"


def test_slow_request_is_504_and_a_failing_model_is_500_without_details(models):
    slow = create_app(SlowEngine(load_engine(models["onnx"]), delay=0.5), config=ServeConfig(timeout_s=0.2))
    with running(slow) as url:
        wait_ready(url)
        assert_error(httpx.post(f"{url}/predict", content=png_bytes()), 504, "0.2 s", "--timeout")
    broken = create_app(SlowEngine(load_engine(models["onnx"]), delay=0, fail=True))
    with running(broken) as url:
        wait_ready(url)
        body = assert_error(httpx.post(f"{url}/predict", content=png_bytes()), 500, "internal server error")
        assert "secret" not in body["error"]
        assert httpx.get(f"{url}/health").status_code == 200


# -- the command line -----------------------------------------------------------------------


def serve_process(*argv, env=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "imagerec", "serve", *map(str, argv)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # a fresh process: the CLI imports PyTorch (20+ s on a busy 2-core machine)
def test_cli_serves_a_model_like_curl_expects(models, tmp_path):
    port = free_port()
    proc = serve_process(models["onnx"], "--port", port, "--log-level", "warning", env={"IMAGEREC_SERVE_TOKEN": TOKEN})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, AUTH, seconds=60)
        cat = make_image(tmp_path / "cat.jpg", (50, 40), seed=1)  # `curl -F file=@cat.jpg`
        r = httpx.post(f"{url}/predict", files={"file": ("cat.jpg", cat.read_bytes(), "image/jpeg")}, headers=AUTH)
        assert r.status_code == 200 and r.json()["predictions"][0]["class"] in CLASSES
        assert httpx.get(f"{url}/model").status_code == 401  # the token came from the environment
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in STOPPED_BY_SIGTERM


SLOW_SERVER = """
import sys, time, uvicorn
from imagerec.serve import create_app, load_engine
inner = load_engine(sys.argv[1])
class Slow(type(inner)):
    def logits(self, batch, tta=False):
        if batch.any():
            time.sleep(1.5)
        return super().logits(batch, tta)
inner.__class__ = Slow
uvicorn.run(create_app(inner), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def test_sigterm_finishes_the_request_in_flight(models):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(models["onnx"]), str(port)], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, seconds=60)
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}/predict", content=png_bytes(), timeout=30)))
        thread.start()
        time.sleep(0.5)  # the request is in its 1.5 s forward pass
        proc.send_signal(signal.SIGTERM)
        thread.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["predictions"][0]["class"] in CLASSES
        assert proc.wait(30) in STOPPED_BY_SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def test_listening_beyond_localhost_needs_a_token(models, capsys):
    check_listen("127.0.0.1", 8000, None, False)
    check_listen("0.0.0.0", 8000, "t", False)
    check_listen("0.0.0.0", 8000, None, True)
    with pytest.raises(ImagerecError, match="0.0.0.0.*--token"):
        check_listen("0.0.0.0", 8000, None, False)
    cases = [
        (["--host", "0.0.0.0"], "IMAGEREC_SERVE_TOKEN"),
        (["--engine", "torch"], "--engine onnx"),
        (["--engine", "onnx", "--device", "cuda"], "--engine torch"),
        (["--max-wait-ms", "-1"], "max_wait_ms=-1.0"),
    ]
    for flags, fragment in cases:
        code, _, err = run_cli(capsys, "serve", models["onnx"], *flags)
        assert_user_error(code, err, fragment)
    code, _, err = run_cli(capsys, "serve", models["root"] / "nothing.onnx")
    assert_user_error(code, err, "nothing.onnx", "no such file")
    with pytest.raises(ImagerecError, match="max_wait_ms=-1"):
        ServeConfig(max_wait_ms=-1).check()


def test_a_lone_request_does_not_wait_for_company(models):
    # a long max wait only applies while other requests are on their way
    with running(create_app(models["onnx"], config=ServeConfig(max_wait_ms=3000))) as url:
        wait_ready(url, seconds=10)
        start = time.perf_counter()
        r = httpx.post(f"{url}/predict", content=png_bytes(), timeout=30)
        elapsed = time.perf_counter() - start
    assert r.status_code == 200 and elapsed < 1.5, elapsed


def test_blas_is_single_threaded_while_the_app_runs_and_restored_after(models):
    from threadpoolctl import threadpool_info

    def blas_threads():  # numpy's own BLAS, the one imagerec.runtime.preprocess runs on
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]

    before = blas_threads()
    with running(create_app(models["onnx"])) as url:
        wait_ready(url, seconds=10)
        during = blas_threads()
    assert during and set(during) == {1}
    assert blas_threads() == before
