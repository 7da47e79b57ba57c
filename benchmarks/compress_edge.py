"""Size, latency and accuracy of compressed models for edge devices (issue: compress and export).

For each CIFAR-10 checkpoint given (a fine-tuned EfficientNet-Lite0 and a seed_cnn), in one run
on one machine, it builds and measures:

* ``fp32 PyTorch eager``: the checkpoint as ``imagerec.Classifier`` runs it;
* ``fp32 ONNX Runtime``: ``imagerec export``;
* ``int8 ONNX Runtime``: ``imagerec compress --quantize int8`` (static, per-channel, calibrated
  on 512 training images);
* ``pruned``: ``imagerec compress --prune AMOUNT`` (structured, then a short fine-tune on the
  training split), exported to ONNX; and ``pruned + int8``.

Figures: file size; latency per image at batch 1 on 1 thread (median of ``--repeats`` runs,
model only: preprocessing excluded, the same for every variant); throughput at batch 32 on 2
threads; CIFAR-10 test accuracy (10,000 images, preprocessing included, no TTA). Goals: int8
within 1.0 point of fp32, int8 file at most 30% of fp32, batch-1 latency at least 2x faster than
fp32 PyTorch eager.

Usage::

    nohup .venv/bin/python benchmarks/compress_edge.py --checkpoint lite0=RUN_DIR \\
        --checkpoint seed=SEED_RUN_DIR --data ../shared/datasets/cifar10-jpeg > /tmp/compress.log 2>&1 &
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import imagerec
from imagerec.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from imagerec.compress import prune, quantize
from imagerec.export import export_model

RESULTS = Path(__file__).parent / "results" / "compress_edge.json"


def latency_ms(run, batch: np.ndarray, repeats: int) -> float:
    """Median wall time of ``run(batch)`` in ms per image, after 10 warm-up calls."""
    for _ in range(10):
        run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(batch)


def torch_runner(checkpoint: Path, threads: int):
    torch.set_num_threads(threads)
    model = model_from_checkpoint(load_checkpoint(checkpoint)).to(memory_format=torch.channels_last)

    def run(batch: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))

    return run


def onnx_runner(path: Path, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"images": batch})


def test_predictions(model_path: Path, data: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class of every test image (as ``imagerec predict`` computes it), and the labels."""
    clf = imagerec.Classifier.load(model_path)
    source = imagerec.load_images(data, "test")
    assert source.classes == clf.classes_, (source.classes, clf.classes_)
    return clf.predict_proba(source, batch_size=64).argmax(1), np.asarray(source.labels)


def measure(name: str, variant: str, model_path: Path, kind: str, size: int, data: str, repeats: int) -> dict:
    file = resolve_checkpoint(model_path) if kind == "torch" else model_path
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    many = rng.standard_normal((32, 3, size, size), dtype=np.float32)
    runner = torch_runner if kind == "torch" else onnx_runner
    row = {"model": name, "variant": variant, "file": str(file), "size_mb": round(file.stat().st_size / 1e6, 3)}
    row["latency_b1_1t_ms"] = round(latency_ms(runner(file, 1), one, repeats), 3)
    row["throughput_b32_2t_img_s"] = round(1000 / latency_ms(runner(file, 2), many, max(10, repeats // 10)), 1)
    start = time.perf_counter()
    predicted, labels = test_predictions(model_path, data)
    row["accuracy"] = round(float((predicted == labels).mean()), 4)
    row["eval_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)
    row["_predicted"] = predicted
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=RUN", help="a CIFAR-10 checkpoint, repeatable")
    parser.add_argument("--data", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--work", default="/tmp/compress_edge")
    parser.add_argument("--prune", type=float, default=0.3, help="share of channels pruned (default 0.3)")
    parser.add_argument("--prune-epochs", type=float, default=0.5, help="fine-tuning epochs after pruning")
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 runs timed (median)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--reuse", action="store_true", help="reuse the compressed files of an earlier run in --work (re-measure only)")
    args = parser.parse_args(argv)

    rows = []
    for item in args.checkpoint:
        name, _, run = item.partition("=")
        work = Path(args.work) / name
        work.mkdir(parents=True, exist_ok=True)
        size = load_checkpoint(run).meta["preprocessing"]["input_size"]
        fp32, int8, pruned_ckpt = work / "fp32.onnx", work / "int8.onnx", work / "pruned.safetensors"
        pruned, pruned_int8 = work / "pruned.onnx", work / "pruned_int8.onnx"
        timing = work / "prune_s.json"
        if not (args.reuse and all(p.is_file() for p in (fp32, int8, pruned_ckpt, pruned, pruned_int8, timing))):
            export_model(run, fp32)
            quantize(run, int8, mode="int8", calib=args.data, split="train", calib_images=args.calib_images)
            start = time.perf_counter()
            prune(run, pruned_ckpt, amount=args.prune, data=args.data, epochs=args.prune_epochs, device="cpu", progress=False)
            timing.write_text(json.dumps(round(time.perf_counter() - start, 1)))
            export_model(pruned_ckpt, pruned)
            quantize(pruned_ckpt, pruned_int8, mode="int8", calib=args.data, split="train", calib_images=args.calib_images)
        prune_s = json.loads(timing.read_text())
        variants = [
            ("fp32 PyTorch eager", run, "torch"),
            ("fp32 ONNX Runtime", fp32, "onnx"),
            ("int8 ONNX Runtime", int8, "onnx"),
            (f"pruned {args.prune:.0%} (ONNX Runtime fp32)", pruned, "onnx"),
            (f"pruned {args.prune:.0%} + int8", pruned_int8, "onnx"),
        ]
        for variant, path, kind in variants:
            row = measure(name, variant, Path(path), kind, size, args.data, args.repeats)
            if "pruned" in variant:
                row["prune"] = {**load_checkpoint(pruned_ckpt).meta["compression"], "prune_and_fine_tune_s": prune_s}
            rows.append(row)

    base = {}
    for row in rows:
        base.setdefault(row["model"], row)  # the fp32 eager row comes first
        ref = base[row["model"]]
        row["size_ratio"] = round(row["size_mb"] / ref["size_mb"], 3)
        row["speedup_b1"] = round(ref["latency_b1_1t_ms"] / row["latency_b1_1t_ms"], 2)
        row["accuracy_delta_points"] = round(100 * (row["accuracy"] - ref["accuracy"]), 2)
        row["top1_agreement_with_eager"] = round(float((row["_predicted"] == ref["_predicted"]).mean()), 4)
    for row in rows:
        del row["_predicted"]
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "imagerec": imagerec.__version__},
        "rows": rows,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = [
        "| model | variant | file MB | size vs fp32 eager | batch-1 latency, 1 thread (ms) | speed-up | batch-32 throughput, 2 threads (img/s) | test accuracy | Δ points | top-1 = eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['size_mb']:.2f} | {r['size_ratio']:.2f} | {r['latency_b1_1t_ms']:.2f} | "
            f"{r['speedup_b1']:.2f}x | {r['throughput_b32_2t_img_s']:.0f} | {r['accuracy']:.2%} | {r['accuracy_delta_points']:+.2f} | "
            f"{r['top1_agreement_with_eager']:.2%} |"
        )
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
