"""Load test of ``imagerec serve`` against LitServe and BentoML, one after another in one run.

    flock /tmp/imagerec-cpu.lock python benchmarks/serve_load.py --model RUN_OR_ONNX \\
        [--servers imagerec litserve bentoml] [--clients 1 8 32 128] [--seconds 12]

Fair by construction:

* the same model file: a run folder is exported once (``imagerec export``, checked against
  PyTorch) and every server runs that ``.onnx`` in ONNX Runtime, with one intra-op thread, the
  same numpy preprocessing (``imagerec.runtime``) and batches of up to 32 images, waiting at most
  5 ms for company (imagerec ``--max-wait-ms 5``, LitServe ``batch_timeout=0.005``); BentoML's
  adaptive batching sets its own wait (``max_latency_ms`` is only its ceiling);
* the load comes from ``wrk`` (C, one thread, keep-alive connections = clients), not from Python;
  the server is pinned to one core and wrk to another with ``taskset`` (``--server-core``,
  ``--load-core``); on a 2-core machine that is all of it, and other jobs share both cores;
* every request is one photo JPEG as a multipart file (``curl -F file=@x.jpg``), cycling through
  ``--n-images`` photos of ``--images``; each server is asked once first, and must name the same
  class for the same photo as the others (the same model answers);
* each cell: ``--warmup-seconds`` of load thrown away, then ``--seconds`` measured: req/s of
  2xx answers, p50 and p99 latency (wrk's, over every answer), and errors (non-2xx by status,
  socket errors, timeouts). Loopback only, free ports, every cell bounded in time.

``--profile N`` records the imagerec server with py-spy during the N-client cell (a collapsed-
stack file, and the functions with the most samples, in the report). ``--memory N`` instead
runs N requests at ``--memory-clients`` against one imagerec server, with ``hey``, in blocks of
1,000, and samples the server's RSS after each block.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "benchmarks" / "serve_peers"
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "intel-scenes-small" / "test"
BOUNDARY = "imagerecbenchb0undary"

WRK_SCRIPT = r"""
-- one multipart body per photo, cycled; status counts and percentiles printed as JSON at the end
local requests_, n, threads = {}, 0, {}
statuses = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  local count, folder, path, ctype = tonumber(args[1]), args[2], args[3], args[4]
  for i = 1, count do
    local f = assert(io.open(string.format("%s/body_%04d.bin", folder, i - 1), "rb"))
    requests_[i] = wrk.format("POST", path, {["Content-Type"] = ctype}, f:read("*all"))
    f:close()
  end
end
function request() n = n % #requests_ + 1; return requests_[n] end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do counts[tostring(k)] = (counts[tostring(k)] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(counts) do table.insert(parts, string.format('"%s": %d', k, v)) end
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f, "statuses": {%s}, "socket_errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d}}\n', summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, table.concat(parts, ", "), e.connect, e.read, e.write, e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{name}, {os.cpu_count()} CPUs"


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (LitServe and BentoML run several processes)."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    found = [int(p) for p in out]
    return found + [c for p in found for c in children(p)]


def write_bodies(images: list[Path], folder: Path) -> None:
    """One multipart/form-data body per photo: ``file`` = the JPEG, as ``curl -F file=@x.jpg``."""
    for i, path in enumerate(images):
        head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                "Content-Type: image/jpeg\r\n\r\n").encode()
        (folder / f"body_{i:04d}.bin").write_bytes(head + path.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode())


def pick_images(root: Path, count: int) -> list[Path]:
    paths = sorted(root.rglob("*.jpg"))
    if not paths:
        sys.exit(f"{root}: no .jpg photos; pass --images FOLDER")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


class Server:
    """A server on a free 127.0.0.1 port, pinned with taskset, in a process group of its own."""

    def __init__(self, name: str, argv: list[str], ready: str, core: str, env: dict | None = None, cwd: Path = REPO):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(["taskset", "-c", core, *argv], env=full_env, cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        started, deadline = time.monotonic(), time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + ready, timeout=2).status_code == 200:
                    self.start_s = time.monotonic() - started
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.close()
        raise RuntimeError(f"{name} not ready after 240 s")

    def close(self) -> None:
        with_group = lambda sig: os.killpg(self.proc.pid, sig)  # noqa: E731 - the group this script started
        try:
            with_group(signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with_group(signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


def servers(onnx: Path, names: list[str], core: str, batch: int, wait_ms: float) -> dict:
    py = sys.executable
    return {name: spec for name, spec in {
        "imagerec": (["imagerec", [py, "-m", "imagerec", "serve", str(onnx), "--port", "{port}", "--threads", "1",
                                   "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms), "--log-level", "warning"],
                      "/ready", None, REPO]),
        "litserve": (["litserve", [py, str(PEERS / "litserve_peer.py"), str(onnx), "--port", "{port}", "--threads", "1",
                                   "--max-batch-size", str(batch), "--batch-timeout-ms", str(wait_ms)],
                      "/health", None, REPO]),
        "bentoml": (["bentoml", [py, "-m", "bentoml", "serve", "bentoml_peer:Classifier", "--working-dir", str(PEERS),
                                 "--host", "127.0.0.1", "--port", "{port}"],
                     "/readyz", {"PEER_MODEL": str(onnx), "PEER_THREADS": "1", "PEER_MAX_BATCH": str(batch),
                                 "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-home-")}, PEERS]),
    }.items() if name in names}


def top_class(name: str, body) -> str:
    """The class a server names, whatever its answer's shape."""
    if name == "imagerec":
        return body["predictions"][0]["class"]
    if name == "bentoml":
        return body[0]["class"]
    return body["class"]


def wrk(url: str, bodies: Path, count: int, clients: int, seconds: float, core: str) -> dict:
    script = bodies / "cycle.lua"
    cmd = ["taskset", "-c", core, "wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script),
           f"{url}/predict", "--", str(count), str(bodies), "/predict", f"multipart/form-data; boundary={BOUNDARY}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((line for line in out.stdout.splitlines() if line.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    raw = json.loads(line[len("WRK_JSON "):])
    ok = sum(v for k, v in raw["statuses"].items() if k.startswith("2"))
    seconds_run = raw["duration_us"] / 1e6
    errors = raw["requests"] - ok + sum(raw["socket_errors"].values())
    return {"clients": clients, "requests": raw["requests"], "ok": ok, "errors": errors, "statuses": raw["statuses"],
            "socket_errors": raw["socket_errors"], "seconds": seconds_run, "rps": ok / seconds_run,
            "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "max_ms": raw["max_us"] / 1000}


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy sampling the server (all threads, native frames off) for ``seconds``, collapsed stacks to ``out``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--threads", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def summarize_profile(path: Path, top: int = 25) -> dict:
    """Samples (active threads only) by part of the server, and the functions with the most
    samples on their own (self) and in total (self and callees)."""
    self_count, total, parts, samples = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")[1:]  # the first is the thread's id
        samples += n
        joined = ";".join(frames)
        if "_chunked" in joined:
            part = "model forward thread (ONNX Runtime)"
        elif "_prepare" in joined:
            part = "decoding threads (JPEG decode, resize, normalise)"
        elif frames and frames[0].startswith(("<module>", "_run_module_as_main")):  # the main thread
            part = "main thread: event loop (HTTP, multipart, batching, JSON)"
        else:
            part = "other threads"
        parts[part] += n
        if frames:
            self_count[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    return {"samples": samples, "parts": parts.most_common(), "self": self_count.most_common(top), "total": total.most_common(top)}


def run_cells(args, onnx: Path, bodies: Path, count: int, photos: list[Path], report: dict) -> None:
    batch = {name: args.max_batch_size for name in args.servers}
    report["peer_batch"] = args.peer_batch
    for name in args.servers:  # imagerec first: with --peer-batch imagerec, the peers take its batch size
        label, argv, ready, env, cwd = servers(onnx, [name], args.server_core, batch[name], args.max_wait_ms)[name]
        server = Server(label, argv, ready, args.server_core, env, cwd)
        try:
            answers = []
            for photo in photos[:: max(1, len(photos) // 5)][:5]:  # one per class folder or so: the same model names the same class
                r = httpx.post(f"{server.url}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=60)
                r.raise_for_status()
                answers.append(top_class(name, r.json()))
            report["answers"][name] = answers
            if name == "imagerec":  # what start-up measured and chose (batch size, precision)
                info = httpx.get(f"{server.url}/model", timeout=30).json()
                report["imagerec_startup"] = {"batching": info.get("batching"), "precision": info.get("precision")}
                print(f"imagerec start-up: {json.dumps(report['imagerec_startup'])}", flush=True)
                if args.peer_batch == "imagerec" and info.get("batching"):
                    batch.update({peer: int(info["batching"]["chosen"]) for peer in batch if peer != "imagerec"})
            print(f"{name}: ready in {server.start_s:.1f} s, answers {answers}, RSS {rss_mb(server.proc.pid):.0f} MB", flush=True)
            for clients in args.clients:
                wrk(server.url, bodies, count, clients, args.warmup_seconds, args.load_core)
                spy = None
                if args.profile == clients and name == "imagerec":
                    # taskset execs the server, so its pid is the Python process
                    spy = profile(server.proc.pid, args.seconds, Path(args.out).with_suffix(f".{name}.c{clients}.pyspy.txt"))
                cell = wrk(server.url, bodies, count, clients, args.seconds, args.load_core)
                cell.update(server=name, max_batch=batch[name], rss_mb=rss_mb(server.proc.pid), load=load_average())
                if spy is not None:
                    _, err = spy.communicate(timeout=60)
                    out = Path(args.out).with_suffix(f".{name}.c{clients}.pyspy.txt")
                    cell["profile"] = summarize_profile(out) if out.exists() else {"error": err[-500:]}
                report["cells"].append(cell)
                print(json.dumps({k: v for k, v in cell.items() if k != "profile"}), flush=True)
        finally:
            server.close()


def run_memory(args, onnx: Path, photos: list[Path], bodies: Path, report: dict) -> None:
    """RSS of one imagerec server every 1,000 requests (hey -n 1000, the photo changing each block)."""
    label, argv, ready, env, cwd = servers(onnx, ["imagerec"], args.server_core, args.max_batch_size, args.max_wait_ms)["imagerec"]
    server = Server(label, argv, ready, args.server_core, env, cwd)
    samples = [{"requests": 0, "rss_mb": rss_mb(server.proc.pid)}]
    answered = 0
    hey = shutil.which("hey") or "/usr/bin/hey"
    held = None
    try:
        for block in range(args.memory // 1000):
            if args.lock and block % args.lock_blocks == 0:  # the CPU lock, a few blocks at a time
                if held is not None:
                    held.close()
                held = open(args.lock, "a")  # noqa: SIM115 - held across iterations
                fcntl.flock(held, fcntl.LOCK_EX)
            body = bodies / f"body_{block % len(photos):04d}.bin"
            out = subprocess.run(["taskset", "-c", args.load_core, hey, "-n", "1000", "-c", str(args.memory_clients), "-m", "POST",
                                  "-T", f"multipart/form-data; boundary={BOUNDARY}", "-D", str(body), "-t", "30",
                                  f"{server.url}/predict"], capture_output=True, text=True, timeout=600)
            codes = {line.split("]")[0].strip("[ "): int(line.split()[1]) for line in out.stdout.splitlines()
                     if line.strip().startswith("[") and "responses" in line}
            answered += sum(codes.values())  # hey splits -n among -c workers: 1000 at 32 clients is 992
            sample = {"requests": answered, "rss_mb": rss_mb(server.proc.pid), "statuses": codes,
                      "batches": batch_sizes(server.url),
                      "time": time.strftime("%H:%M:%S", time.gmtime()), "load": load_average()}
            samples.append(sample)
            print(json.dumps(sample), flush=True)
            report["memory"] = {"clients": args.memory_clients, "samples": samples, "partial": True}
            Path(args.out).write_text(json.dumps(report, indent=2))  # kept if the run is cut short
    finally:
        server.close()
        if held is not None:
            held.close()
    tail = [s for s in samples if s["requests"] >= args.memory - 20_000]
    report["memory"] = {"clients": args.memory_clients, "samples": samples,
                        "growth_last_20000_mb": tail[-1]["rss_mb"] - tail[0]["rss_mb"] if len(tail) > 1 else None}


def batch_sizes(url: str) -> dict[str, float]:
    """imagerec's batch-size histogram so far: {bucket upper bound: forward passes in it}."""
    cumulative = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("imagerec_batch_size_bucket"):
            cumulative[line.split('le="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    counts, previous = {}, 0.0
    for bound, count in cumulative.items():
        if count > previous:
            counts[bound] = count - previous
        previous = count
    return counts


def markdown(report: dict) -> str:
    lines = ["| server | max batch | clients | requests | errors | req/s | p50 ms | p99 ms | RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in report["cells"]:
        lines.append(f"| {c['server']} | {c.get('max_batch', '')} | {c['clients']} | {c['requests']} | {c['errors']} | {c['rps']:.1f} | "
                     f"{c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['rss_mb']:.0f} |")
    mine = {c["clients"]: c for c in report["cells"] if c["server"] == "imagerec"}
    peers = [c for c in report["cells"] if c["server"] != "imagerec"]
    if mine and peers:
        lines += ["", "| clients | peer | imagerec req/s / peer's | imagerec p50 / peer's | imagerec p99 / peer's |",
                  "| ---: | --- | ---: | ---: | ---: |"]
        for p in peers:
            m = mine.get(p["clients"])
            if m and p["rps"] and p["p50_ms"] and p["p99_ms"]:
                lines.append(f"| {p['clients']} | {p['server']} | {m['rps'] / p['rps']:.2f}x | {m['p50_ms'] / p['p50_ms']:.2f}x | "
                             f"{m['p99_ms'] / p['p99_ms']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a run folder (exported once) or an imagerec .onnx")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photo JPEGs (default: Intel scenes test)")
    parser.add_argument("--n-images", type=int, default=200, help="distinct photos cycled")
    parser.add_argument("--servers", nargs="+", default=["imagerec", "litserve", "bentoml"], choices=["imagerec", "litserve", "bentoml"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds per cell")
    parser.add_argument("--warmup-seconds", type=float, default=3.0, help="unmeasured load before each cell")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--peer-batch", choices=["same", "imagerec"], default="same",
                        help="the peers' max batch size: --max-batch-size (same), or the one imagerec's start-up chose")
    parser.add_argument("--server-core", default="0")
    parser.add_argument("--load-core", default="1")
    parser.add_argument("--profile", type=int, default=None, metavar="CLIENTS", help="py-spy the imagerec server in this cell")
    parser.add_argument("--memory", type=int, default=0, metavar="N", help="instead of the cells: N requests, RSS every 1,000")
    parser.add_argument("--memory-clients", type=int, default=32)
    parser.add_argument("--lock", help="with --memory: hold this flock file while load runs, --lock-blocks blocks at a time")
    parser.add_argument("--lock-blocks", type=int, default=10, help="blocks of 1,000 requests per hold of --lock")
    parser.add_argument("--out", default="benchmarks/results/serve_peers.json")
    parser.add_argument("--render", action="store_true", help="only print --out's results as markdown")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # so that the servers are stopped too
    if args.render:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    for tool in ("wrk", "taskset") + (("hey",) if args.memory else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install {tool if tool != 'taskset' else 'util-linux'})")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "load_at_start": load_average(), "argv": sys.argv[1:], "args": {k: str(v) for k, v in vars(args).items()},
              "pinning": f"server on core {args.server_core}, wrk on core {args.load_core} (taskset)",
              "answers": {}, "cells": [], "memory": None}
    print(f"{report['date']} {report['machine']} load {report['load_at_start']}; {report['pinning']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        onnx = Path(args.model)
        if onnx.suffix != ".onnx":
            from imagerec.export import export_model  # noqa: PLC0415 - torch only for a run folder

            onnx = export_model(args.model, tmp / "model.onnx")
        report["model"] = {"file": str(args.model), "onnx_bytes": onnx.stat().st_size}
        photos = pick_images(args.images, args.n_images)
        bodies = tmp / "bodies"
        bodies.mkdir()
        write_bodies(photos, bodies)
        (bodies / "cycle.lua").write_text(WRK_SCRIPT)
        if args.memory:
            run_memory(args, onnx, photos, bodies, report)
        else:
            run_cells(args, onnx, bodies, len(photos), photos, report)
    report["load_at_end"] = load_average()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if report["cells"]:
        print(markdown(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
