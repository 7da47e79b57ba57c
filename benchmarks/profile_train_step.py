"""Where the time of one training step goes: the default recipe's step, profiled on this CPU.

One step of ``imagerec train``'s default recipe (EfficientNet-Lite0, 96 px, batch 64, SGD,
channels_last, fp32): the augmentation of a batch of 32 px images, the forward pass, the
backward pass and the optimizer, timed separately over ``--steps`` steps after warm-up; then
torch.profiler's breakdown by operator (self CPU time), so the share of depthwise convolutions,
pointwise convolutions, batch norm and activations is visible.

Usage::

    .venv/bin/python benchmarks/profile_train_step.py --steps 10 > benchmarks/results/profile_train_step.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import imagerec
from imagerec.data import BatchAugment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    model = imagerec.create_backbone("efficientnet_lite0", num_classes=10).train().to(memory_format=torch.channels_last)
    pp = model.preprocessing.resolve(args.image_size, crop_pct=1.0)
    augment = BatchAugment(pp, "default")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.batch_size,))
    phases = {"augment": [], "forward": [], "backward": [], "optimizer": []}

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        x = augment(images).contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), labels, label_smoothing=0.1)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if record:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name].append(seconds)

    for _ in range(3):
        step(False)
    for _ in range(args.steps):
        step(True)
    total = sum(statistics.median(v) for v in phases.values())
    print(f"EfficientNet-Lite0, {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"median step {total:.3f} s = {args.batch_size / total:.0f} img/s")
    for name, values in phases.items():
        median = statistics.median(values)
        print(f"  {name:<10} {median:.3f} s  {median / total:6.1%}")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(False)
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
