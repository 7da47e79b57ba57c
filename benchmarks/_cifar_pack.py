"""The CIFAR-10 test JPEGs as one file, to carry to a lent GPU machine (which cannot see ../shared).

``python benchmarks/_cifar_pack.py`` writes ``.gpudata/cifar_test.npz`` (git-ignored): every
JPEG's bytes end to end, their offsets and their paths relative to the split folder (9.2 MB).
:func:`unpack` writes them back as ``ROOT/<class>/<name>.jpg`` on the other machine.
"""

from __future__ import annotations

import os
import sys

import numpy as np

PACKED = ".gpudata/cifar_test.npz"


def pack(split_dir: str = "../shared/datasets/cifar10-jpeg/test", out: str = PACKED) -> None:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(split_dir) for f in files if f.lower().endswith((".jpg", ".jpeg", ".png")))
    blobs = [open(p, "rb").read() for p in paths]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez(
        out,
        data=np.frombuffer(b"".join(blobs), np.uint8),
        offsets=np.cumsum([0] + [len(b) for b in blobs]),
        rel=np.array([os.path.relpath(p, split_dir) for p in paths]),
    )


def unpack(root: str = "/tmp/cifar/test", packed: str = PACKED) -> str:
    """Write the packed images under ``root``; returns ``root``."""
    d = np.load(packed)
    data, offsets = d["data"], d["offsets"]
    for i, rel in enumerate(d["rel"]):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data[offsets[i] : offsets[i + 1]].tobytes())
    return root


if __name__ == "__main__":
    pack(*sys.argv[1:])
