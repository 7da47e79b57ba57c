"""Train-test resolution (FixRes, Touvron et al. 2019): a trained run evaluated at larger test sizes.

Loads RUN's best checkpoint and measures test accuracy with the run's own preprocessing at each
``--sizes`` input size (same crop rule, same normalisation), on the test split of DATA.

    flock /tmp/imagerec-bench.lock python benchmarks/test_resolution.py --run RUN --data ../shared/datasets/cifar10-jpeg --sizes 96 112 128
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from imagerec.checkpoint import load_checkpoint, model_from_checkpoint
from imagerec.data import Preprocessing, decode_small_images, load_images
from imagerec.inference import predict_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.run)
    model = model_from_checkpoint(ckpt).eval()
    trained = Preprocessing.from_dict(ckpt.meta["preprocessing"])
    source = load_images(args.data, "test")
    source = decode_small_images(source) or source
    labels = np.asarray([ckpt.meta["classes"].index(c) for c in source.classes])[source.labels]
    rows = []
    for size in args.sizes:
        pp = Preprocessing.from_dict({**trained.to_dict(), "input_size": size})
        started = time.perf_counter()
        with torch.inference_mode():
            out = predict_source(model, source, pp, batch_size=256)
        acc = float((out.proba.argmax(1) == labels[out.indices]).mean())
        rows.append({"size": size, "trained_at": trained.input_size, "accuracy": acc, "seconds": time.perf_counter() - started})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
