"""The studio's Review loop without a browser: the same pages, the same person, in seconds.

``benchmarks/studio_loop.py`` plays the loop in Chromium against a running studio (minutes a
set). This plays it on cached features with the studio's own functions
(:func:`imagerec.studio._review.model_labels` and :func:`~imagerec.studio._review.page`), to
compare settings (the suggester's method, how long a named class's cluster guesses count)
before a real run: k-means as the studio clusters (k = the classes), each cluster named after its
majority class (clusters with the same majority count as one group, as after a merge), then
page after page, most certain first: every wrong image costs one click when its next most likely
class is right, else two (a click, then its class's button; a class no group has: a click and
its name typed, then a click); one click accepts the page. It counts the review's clicks only (the browser run
adds the renames, merges and page links).

    PYTHONPATH=. python benchmarks/review_simulate.py --sets intel-scenes-small,weather_6class --method probe,auto

Features: ``CACHE/<set>/efficientnet_lite0@224/embeddings.npz`` (``benchmarks/suite.py``'s cache,
the studio's default backbone for photos); intel-scenes-small is the studio loop's 600 (the first
100 training photos of each class), a photo-suite set is all of its images (train and test).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from imagerec.clustering import cluster_images
from imagerec.embedding import Embeddings
from imagerec.studio import _review
from imagerec.suggest import suggest

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def load(name: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(raw features, true class) of the set's images, in the studio loop's selection."""
    emb = Embeddings.load(cache / name / "efficientnet_lite0@224" / "embeddings.npz")
    row = {str(p): n for n, p in enumerate(emb.paths)}
    intel = name == "intel-scenes-small"
    root = DATASETS / name if intel else DATASETS / "photo-suite" / name
    rows, truth = [], []
    for split in ("train",) if intel else ("train", "test"):
        for class_dir in sorted(d for d in (root / split).iterdir() if d.is_dir()):
            files = sorted(str(f) for f in class_dir.iterdir() if str(f) in row)
            for f in files[:100] if intel else files:
                rows.append(row[f])
                truth.append(class_dir.name)
    return np.asarray(emb.features)[rows], np.asarray(truth)


def play(x: np.ndarray, truth: np.ndarray, method: str) -> dict:
    """The review of one set by the careful person: clicks, pages, wrong images shown."""
    k = len(set(truth))
    emb = Embeddings(x, [str(i) for i in range(len(x))], None, None, "cached", None)
    clusters = np.asarray(cluster_images(emb, "kmeans", k, random_state=0, progress=False).labels)
    name = np.empty(len(x), object)
    for c in set(clusters.tolist()):
        name[clusters == c] = Counter(truth[clusters == c]).most_common(1)[0][0]
    after_naming = float((name == truth).mean())
    groups = {n: g for g, n in enumerate(sorted(set(truth)))}  # every class: a group made when first needed
    decided = np.zeros(len(x), bool)
    clicks = pages = wrong = one_click = 0
    s = first = None
    while not decided.all():
        state = _review.State(np.arange(len(x)), np.asarray([groups[n] for n in name]), list(name), np.ones(len(x), bool),
                              np.ones(len(x), bool), decided.copy(), {n: groups[n] for n in set(name)})
        labels = _review.model_labels(state)
        s = suggest(x, labels, method=method) if s is None else s.update({n: v for n, v in enumerate(labels) if v != s.labels[n]})
        if first is None:
            first = float((_review.suggested_names(s) == truth).mean())
        gid, entries = _review.page(s, state)
        by_id = {g: n for n, g in state.groups.items()}
        for e in entries:
            want = truth[e.image_id]
            if by_id[gid] != want:
                wrong += 1
                fixed_by_one = bool(e.choices) and by_id.get(e.choices[0]) == want
                one_click += fixed_by_one
                clicks += 1 if fixed_by_one else 2
            name[e.image_id] = want
            decided[e.image_id] = True
        clicks += 1
        pages += 1
    return {"images": len(x), "groups right after naming": round(after_naming, 3), "suggestions right after naming": round(first, 3),
            "review clicks": clicks, "pages": pages, "wrong shown": wrong, "fixed with one click": one_click}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="intel-scenes-small", help="comma-separated: intel-scenes-small or photo-suite set names")
    ap.add_argument("--method", default=_review.METHOD, help="comma-separated suggester methods (probe, auto, propagation)")
    ap.add_argument("--cache", default=os.environ.get("SUITE_CACHE", "/tmp/imagerec-suite/cache"))
    ap.add_argument("--floor", action="store_true", help="only the floor: out-of-fold accuracy with every other image's true label")
    args = ap.parse_args()
    for name in args.sets.split(","):
        x, truth = load(name, Path(args.cache))
        for method in args.method.split(","):
            if args.floor:  # a rough floor: what the model gets wrong even when it knows every other image's label
                right = float((_review.suggested_names(suggest(x, list(truth), method=method)) == truth).mean())
                print(f"{name} method={method}: out-of-fold right with all other labels {right:.3f}, "
                      f"{round((1 - right) * len(x))} of {len(x)} suggestions wrong even then", flush=True)
                continue
            t0 = time.perf_counter()
            r = play(x, truth, method)
            print(f"{name} method={method} provisional_until={_review.PROVISIONAL_UNTIL}: {r} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
