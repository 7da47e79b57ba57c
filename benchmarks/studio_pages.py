"""Studio page render times (p50, p95) for projects of 1,000 and 60,000 images.

A synthetic project: N rows of the CIFAR-10 JPEG copy (``../shared/datasets/cifar10-jpeg``), 10 groups by
folder, ranks at random. Times the server side of each page (FastAPI TestClient, HTML only; thumbnails are
timed separately: a first view makes and caches them, later views read the cache). Then, in headless
Chromium against the studio served by uvicorn on 127.0.0.1, the time from navigation until a group page
of 200 thumbnails has every image decoded (viewport tall enough that lazy loading fetches all 200),
first view and later views (p50 of 5).

    flock /tmp/imagerec-bench.lock python benchmarks/studio_pages.py
"""

from __future__ import annotations

import os
import random
import socket
import sys
import threading
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from imagerec.studio import Project, create_app

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"


def project_of(n: int, folder: Path) -> Project:
    paths = sorted(str(p) for split in ("train", "test") for p in (CIFAR / split).glob("*/*.jpg"))[:60_000]
    random.Random(0).shuffle(paths)
    paths = paths[:n]
    classes = sorted({Path(p).parent.name for p in paths})
    project = Project(folder)
    project.import_groups("cifar10-jpeg", [(c, "class") for c in classes],
                          [(p, classes.index(Path(p).parent.name), random.random()) for p in paths], "benchmark")
    return project


def timed(client: TestClient, url: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        r = client.get(url)
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, (url, r.status_code)
    return out


def main() -> None:
    print(f"{'images':>7} {'page':<28} {'p50 ms':>8} {'p95 ms':>8}")
    for n in (1_000, 60_000):
        with tempfile.TemporaryDirectory() as tmp:
            project_of(n, Path(tmp) / "p")
            client = TestClient(create_app(Path(tmp) / "p"), base_url="http://127.0.0.1:8765")
            gid = 1
            pages = {"/": 20, "/groups": 20, f"/groups/{gid}?page=1": 20, f"/groups/{gid}?page=20": 20, "/export": 10}
            for url, repeats in pages.items():
                if n == 1_000 and "page=20" in url:
                    continue
                t = np.asarray(timed(client, url, repeats)) * 1000
                print(f"{n:>7} {url:<28} {np.percentile(t, 50):>8.1f} {np.percentile(t, 95):>8.1f}", flush=True)
            ids = [r["id"] for r in Project(Path(tmp) / "p").images_of(gid, 0, 200)]
            start = time.perf_counter()
            for i in ids:
                client.get(f"/thumb/{i}")
            first = time.perf_counter() - start
            start = time.perf_counter()
            for i in ids:
                client.get(f"/thumb/{i}")
            again = time.perf_counter() - start
            print(f"{n:>7} 200 thumbnails, first view {first * 1000:.0f} ms, cached {again * 1000:.0f} ms", flush=True)
            browser_times(Path(tmp) / "p", n, gid=2)


def browser_times(project: Path, n: int, gid: int) -> None:
    """Navigation to all 200 thumbnails decoded, in Chromium: the first view, then later views."""
    import uvicorn  # noqa: PLC0415
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(project), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    all_loaded = ("() => { const imgs = Array.from(document.querySelectorAll('#grid img')); "
                  "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 4000})
            times = []
            for _ in range(6):
                start = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/groups/{gid}?page=1")
                page.wait_for_function(all_loaded, timeout=60_000)
                times.append(time.perf_counter() - start)
            shown = page.locator("#grid img").count()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    later = np.asarray(times[1:]) * 1000
    print(f"{n:>7} browser: group page, {shown} thumbnails decoded: first view {times[0] * 1000:.0f} ms, "
          f"later views p50 {np.percentile(later, 50):.0f} ms, max {later.max():.0f} ms", flush=True)


if __name__ == "__main__":
    sys.exit(main())
