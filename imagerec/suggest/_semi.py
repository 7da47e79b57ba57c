"""Semi-supervised training: the labelled images, plus the unlabelled ones whose suggestion is surest.

One round of self-training with pseudo-labels. The suggestions (:func:`suggest`: a linear probe
and label propagation over the kNN graph of the labelled and unlabelled images together) name a
class for every unlabelled image; of the images suggested for each class, the most confident
``share`` join the training split with that class. A share per class rather than a confidence
threshold: with a few labels a class the suggester fits no temperature (fewer than
:data:`MIN_CALIBRATION_LABELS`), so the same confidence means different things from one collection
to the next, while a rank does not; per class, so a class the suggestions favour does not crowd
out the others (measured: docs/BENCHMARKS.md, "Semi-supervised training"). The run then trains as ``imagerec train`` does, within
what is left of the same time budget, and validates on labelled images only, so its keep-rule and
its calibration never see a pseudo-label.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from ..data import DEFAULT_MAX_PIXELS, ImageSource, load_images, write_manifest
from ..errors import ImagerecError
from ..features import compute_features
from ..training import TrainConfig, TrainResult, load_splits, train
from ._model import MIN_CALIBRATION_LABELS
from ._suggest import suggest

PSEUDO_SHARE = 0.25  # of the unlabelled images suggested for a class, the most confident share is taken
PSEUDO_DIR = "pseudo"  # in the run folder: the embeddings cache and pseudo_labels.csv


def check_share(share) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < float(share) <= 1:
        raise ImagerecError(f"pseudo-label share {share!r} must be in (0, 1]; try {PSEUDO_SHARE}")
    return float(share)


def train_semi_supervised(
    data,
    unlabeled,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    share: float = PSEUDO_SHARE,
    progress: bool = True,
) -> tuple[TrainResult, dict]:
    """Train on the labelled ``data`` and the surest pseudo-labelled images of ``unlabeled``.

    Args:
        data: labelled images, as for :func:`~imagerec.training.train` (its training split is
            carved the same way; the validation split stays labelled images only).
        unlabeled: a folder (or manifest) of images without labels; labels it holds are ignored.
        out: the run folder; ``out/pseudo/pseudo_labels.csv`` lists the images taken and their class.
        config: the training settings; a ``time_budget`` covers the pseudo-labelling too.
        share: of the unlabelled images suggested for each class, the most confident share
            taken (at least one a class that has any), in (0, 1].
        progress: show progress bars.

    Returns:
        (the training result, what the pseudo-labelling did: images, taken, share, seconds).

    Raises:
        ImagerecError: bad arguments or data (checked before any embedding), no unlabelled image,
            or a budget spent before training could start.
    """
    started = time.perf_counter()
    share = check_share(share)
    config = config or TrainConfig()
    cfg = config.resolved()
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ImagerecError(f"{out}: is not empty; semi-supervised training starts a new run: pick another --out")
    max_pixels = cfg.max_pixels or DEFAULT_MAX_PIXELS
    extra = load_images(unlabeled, max_pixels=max_pixels, allow_outside=cfg.allow_outside)
    labelled, val, _ = load_splits(data, cfg, progress)  # carved as train carves them; checked for labels and classes
    taken = {os.path.abspath(p) for p in labelled.paths + (val.paths if val else [])}
    extra_paths = [p for p in extra.paths if os.path.abspath(p) not in taken]
    if not extra_paths:
        raise ImagerecError(f"{unlabeled}: holds no image that is not already labelled; give a folder of unlabelled images")
    if any("#" in p and not os.path.isfile(p) for p in labelled.paths[:1] + extra_paths[:1]):
        raise ImagerecError("semi-supervised training needs image files, not images held in arrays (e.g. cifar10-jpeg, not 'cifar10')")

    # 1. the suggestions, on the features of the pretrained backbone (cached in the run folder)
    both = ImageSource(list(labelled.paths) + extra_paths, None, None, f"{labelled.root} + {extra.root}", max_pixels=max_pixels)
    emb = compute_features(both, backbone=cfg.backbone, cache_dir=Path(out) / PSEUDO_DIR, pca_dim=None, progress=progress).embeddings
    name_of = dict(zip(labelled.paths, (labelled.classes[i] for i in labelled.labels)))
    s = suggest(emb, [name_of.get(p) for p in emb.paths])
    conf, suggested = s.suggester.confidence_, s.suggester.suggested_
    pool = np.asarray([n for n, p in enumerate(emb.paths) if p not in name_of], np.int64)
    rows = []
    for c in range(len(s.classes)):
        mine = pool[suggested[pool] == c]
        rows += mine[np.argsort(-conf[mine], kind="stable")][: max(1, int(share * len(mine)))].tolist() if len(mine) else []
    rows.sort()
    index = {c: i for i, c in enumerate(labelled.classes)}
    pseudo_paths = [emb.paths[n] for n in rows]
    pseudo_labels = np.asarray([index[s.classes[suggested[n]]] for n in rows], np.int64)
    write_manifest(Path(out) / PSEUDO_DIR / "pseudo_labels.csv", zip(pseudo_paths, (labelled.classes[i] for i in pseudo_labels)))
    info = {
        "unlabelled_images": len(extra_paths), "pseudo_labelled": len(rows), "share": share,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip

    # 2. train on both, in what is left of the budget
    if cfg.time_budget is not None:
        left = cfg.time_budget - (time.perf_counter() - started) / 60
        if left <= 0:
            raise ImagerecError(f"--time-budget {cfg.time_budget:g} min was spent on pseudo-labelling {len(extra_paths):,} images; raise the budget")
        config = dataclasses.replace(config, time_budget=left)
    train_src = ImageSource(
        list(labelled.paths) + pseudo_paths, np.concatenate([np.asarray(labelled.labels, np.int64), pseudo_labels]), list(labelled.classes),
        f"{labelled.root} + {len(rows)} pseudo-labelled of {extra.root}", max_pixels=max_pixels,
    )  # fmt: skip
    return train((train_src, val), out, config, progress=progress), info
