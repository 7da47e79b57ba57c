"""What a stage-2 training step costs on this CPU, by input size and number of frozen layer groups.

The default recipe's step (EfficientNet-Lite0, batch 64, SGD with Nesterov momentum,
channels_last, fp32, the default augmentation of 32 px images) with the first N layer groups of
the backbone frozen as ``TrainConfig.freeze_groups`` freezes them (``imagerec.backbones.early_parameters``:
no gradients, batch norm still in train mode). Median of ``--steps`` steps after 2 warm-up
steps, each configuration in turn in the same process, so the ratios compare like with like.

Usage::

    .venv/bin/python benchmarks/train_step_cost.py --sizes 96 128 160 --freeze 0 3 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import imagerec
from imagerec.backbones import early_parameters
from imagerec.data import BatchAugment

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(size: int, freeze: int, steps: int, batch_size: int) -> float:
    torch.manual_seed(0)
    model = imagerec.create_backbone("efficientnet_lite0", num_classes=10).train().to(memory_format=torch.channels_last)
    for p in early_parameters(model, freeze):
        p.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
    augment = BatchAugment(model.preprocessing.resolve(size, crop_pct=1.0), "default")
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch_size,))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        x = augment(images).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160])
    parser.add_argument("--freeze", type=int, nargs="+", default=[0, 3, 4], help="frozen layer groups to compare")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_cost.json"))
    args = parser.parse_args()

    rows = []
    print(f"EfficientNet-Lite0, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for size in args.sizes:
        base = None
        for freeze in args.freeze:
            seconds = step_seconds(size, freeze, args.steps, args.batch_size)
            base = base or seconds
            rows.append({"size": size, "freeze_groups": freeze, "step_s": seconds, "images_per_s": args.batch_size / seconds, "speedup": base / seconds})
            print(f"{size:4d} px  {freeze} groups frozen: {seconds:.3f} s/step  {args.batch_size / seconds:6.1f} img/s  {base / seconds:.2f}x", flush=True)
    record = {
        "benchmark": "train_step_cost",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/train_step_cost.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
