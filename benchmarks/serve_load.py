"""Load test of ``imagerec serve`` against the naive endpoint, on loopback only; stops by itself.

    flock /tmp/imagerec-bench.lock python benchmarks/serve_load.py \\
        --fp32 /tmp/serve-model --int8 /tmp/serve-model/model.int8.onnx

For each server (imagerec serve on the run folder = ONNX Runtime fp32; imagerec serve on the
int8 .onnx; the naive FastAPI + PyTorch peer of ``serve_naive_peer.py``), each image set
(CIFAR-10 test JPEGs, 32 px; Intel scenes test JPEGs, 150 px) and 1, 8 and 32 concurrent
clients: throughput, p50/p95/p99 latency and errors over ``--requests`` requests (or
``--cell-seconds``, whichever ends first). Then resident memory of a fresh imagerec server
before and after ``--mem-requests`` requests at 32 clients, and an overload run (``--overload-
clients`` clients against ``--max-queue 16``): 503s versus timeouts, and /health meanwhile.

The client is one asyncio process with httpx (one connection per client), on the same machine
as the server, so it competes with the server for the CPU; every server pays the same cost.
Each request sends one image as a multipart file, as ``curl -F file=@x.jpg`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
SETS = {"cifar 32px": DATA / "cifar10-jpeg" / "test", "photo 150px": DATA / "intel-scenes-small" / "test"}


def load_images(root: Path, count: int) -> list[tuple[str, bytes]]:
    """``count`` JPEGs spread over the classes of ``root``, as (name, bytes)."""
    paths = sorted(p for p in root.rglob("*.jpg"))
    step = max(1, len(paths) // count)
    return [(p.name, p.read_bytes()) for p in paths[::step][:count]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """A server process on a free loopback port, stopped with SIGTERM on exit."""

    def __init__(self, argv: list[str], ready_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=env, cwd=REPO)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server {argv} exited with {self.proc.returncode}"
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {argv} not ready after 300 s")

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, images, clients: int, requests: int, seconds: float, timeout: float = 30.0) -> dict:
    """``requests`` POST /predict by ``clients`` concurrent clients; latency and status of each."""
    latencies, statuses, sent = [], {}, 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def worker():
            nonlocal sent
            while sent < requests and time.monotonic() < stop_at:
                name, data = images[sent % len(images)]
                sent += 1
                start = time.perf_counter()
                try:
                    r = await client.post("/predict", files={"file": (name, data, "image/jpeg")})
                    key = str(r.status_code)
                except httpx.TimeoutException:
                    key = "timeout"
                except httpx.TransportError as e:
                    key = type(e).__name__
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
    return {
        "clients": clients, "requests": sum(statuses.values()), "ok": len(latencies), "statuses": statuses,
        "seconds": elapsed, "throughput": len(latencies) / elapsed, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
    }


async def overload(url: str, images, clients: int, requests: int) -> dict:
    """Many clients against a small queue, and /health probed while they run."""
    async def probe():
        times = []
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(10):
                await asyncio.sleep(0.3)
                start = time.perf_counter()
                r = await client.get("/health")
                times.append((r.status_code, (time.perf_counter() - start) * 1000))
        return times

    result, health = await asyncio.gather(load(url, images, clients, requests, 120, timeout=10), probe())
    result["health"] = {"ok": sum(1 for s, _ in health if s == 200), "probes": len(health), "max_ms": max(t for _, t in health)}
    return result


def markdown(report: dict) -> str:
    """The report as the tables of docs/BENCHMARKS.md."""
    lines = ["| server | images | clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in report["cells"]:
        errors = c["requests"] - c["ok"]
        lines.append(
            f"| {c['server']} | {c['images']} | {c['clients']} | {c['requests']} | {errors} | {c['throughput']:.1f} | "
            f"{c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['p99_ms']:.1f} |"
        )
    peer = {(c["images"], c["clients"]): c for c in report["cells"] if c["server"].startswith("naive")}
    lines += ["", "| server | images | clients | throughput / peer's | p50 / peer's |", "| --- | --- | ---: | ---: | ---: |"]
    for c in report["cells"]:
        p = peer.get((c["images"], c["clients"]))
        if p and c is not p:
            lines.append(f"| {c['server']} | {c['images']} | {c['clients']} | {c['throughput'] / p['throughput']:.2f}x | {c['p50_ms'] / p['p50_ms']:.2f}x |")
    return "\n".join(lines)


def imagerec_argv(model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "imagerec", "serve", model, "--log-level", "warning", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp32", required=True, help="run folder of the fine-tuned model (served via ONNX, and by the peer)")
    parser.add_argument("--int8", required=True, help="its int8 .onnx (imagerec compress --quantize int8)")
    parser.add_argument("--requests", type=int, default=400, help="requests per cell")
    parser.add_argument("--cell-seconds", type=float, default=20.0, help="time limit per cell")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--images", type=int, default=200, help="distinct images per set")
    parser.add_argument("--mem-requests", type=int, default=10_000)
    parser.add_argument("--overload-clients", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    parser.add_argument("--only", nargs="+", default=["cells", "memory", "overload"])
    parser.add_argument("--render", action="store_true", help="only print --out's results as markdown tables")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    sets = {name: load_images(root, args.images) for name, root in SETS.items()}
    servers = {
        "imagerec fp32 (onnx)": (imagerec_argv(args.fp32), "/ready"),
        "imagerec int8 (onnx)": (imagerec_argv(args.int8), "/ready"),
        "naive peer (torch)": ([sys.executable, "benchmarks/serve_naive_peer.py", args.fp32], "/health"),
    }
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "machine": platform.platform(), "args": vars(args), "cells": [], "memory": None, "overload": None}
    if "cells" in args.only:
        for name, (argv, ready) in servers.items():
            server = Server(argv, ready)
            try:
                for set_name, images in sets.items():
                    for clients in args.clients:
                        asyncio.run(load(server.url, images, clients, 2 * clients, 30))  # warm-up
                        cell = asyncio.run(load(server.url, images, clients, args.requests, args.cell_seconds))
                        cell.update(server=name, images=set_name)
                        report["cells"].append(cell)
                        print(json.dumps(cell), flush=True)
            finally:
                server.close()
    if "memory" in args.only:
        server = Server(imagerec_argv(args.fp32), "/ready")
        try:
            asyncio.run(load(server.url, sets["cifar 32px"], 32, 200, 60))
            before = server.rss()
            run = asyncio.run(load(server.url, sets["cifar 32px"], 32, args.mem_requests, 1800))
            report["memory"] = {"rss_before_mb": before, "rss_after_mb": server.rss(), **run}
            print(json.dumps(report["memory"]), flush=True)
        finally:
            server.close()
    if "overload" in args.only:
        server = Server(imagerec_argv(args.fp32, "--max-queue", "16"), "/ready")
        try:
            report["overload"] = asyncio.run(overload(server.url, sets["photo 150px"], args.overload_clients, 20 * args.overload_clients))
            print(json.dumps(report["overload"]), flush=True)
        finally:
            server.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
