"""torch.compile on the default recipe's training step, measured: compile time and step time.

The stage-2 step of ``imagerec train``'s default recipe (EfficientNet-Lite0 with ImageNet
weights, 96 px, batch 64, the first 4 layer groups frozen, SGD Nesterov, channels_last, fp32),
through ``imagerec.training._stage.Stage`` as training runs it: first eager, then with the model
wrapped in ``torch.compile`` (inductor). Reports the median of ``--steps`` timed steps after
warm-up for each, the seconds the first compiled steps took (the compilation, which a time
budget would have to pay), and the break-even: how many steps a run needs before the compiled
step has paid for its compilation.

Usage::

    .venv/bin/python benchmarks/compile_step.py --steps 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import imagerec
from imagerec.training import TrainConfig
from imagerec.training._distributed import World
from imagerec.training._stage import Stage

ROOT = Path(__file__).resolve().parents[1]


def timed_steps(stage: Stage, batch, criterion, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        stage.step(batch, criterion, bf16=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_step.json"))
    args = parser.parse_args()

    cfg = TrainConfig()
    world = World(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    batch = SimpleNamespace(
        images=torch.randn(cfg.batch_size, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last),
        labels=torch.randint(0, 10, (cfg.batch_size,)),
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    results = {}
    for name in ("eager", "compiled"):
        model = imagerec.create_backbone(cfg.backbone, num_classes=10).to(memory_format=torch.channels_last)
        stage = Stage(2, model, cfg, world, head_steps=0, freeze=cfg.freeze_groups)
        for group in stage.optimizer.param_groups:
            group["lr"] = 1e-4  # small, so the weights stay sane over the timed steps
        if name == "compiled":
            stage.net = torch.compile(model)
        first = timed_steps(stage, batch, criterion, 3)  # eager: warm-up; compiled: compilation (and recompiles)
        steps = timed_steps(stage, batch, criterion, args.steps)
        results[name] = {"first_3_steps_s": first, "median_step_s": statistics.median(steps), "steps_s": steps}
        print(f"{name}: first 3 steps {sum(first):.1f} s, then median {results[name]['median_step_s']:.3f} s per step", flush=True)
    eager, compiled = results["eager"]["median_step_s"], results["compiled"]["median_step_s"]
    compile_s = sum(results["compiled"]["first_3_steps_s"]) - 3 * compiled
    saved = eager - compiled
    record = {
        "benchmark": "compile_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__},
        "image_size": args.image_size,
        "speedup": eager / compiled,
        "compile_s": compile_s,
        "break_even_steps": compile_s / saved if saved > 0 else None,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "results"}, indent=1))


if __name__ == "__main__":
    main()
