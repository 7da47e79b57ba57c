"""Image quality: blurry, too dark, too bright, low information, odd size or aspect ratio, grey
images in a colour set, from the figures of :func:`~imagerec.audit._scan.scan_images`.

Default thresholds (``QUALITY_THRESHOLDS``; each can be changed):

* ``blurry``: ``sharpness < 0.10``. Gaussian-blurred photos of intel-scenes-small (radius 1/32 of
  the side) score at most 0.055 (99th percentile), the clean ones at least 0.28 (1st percentile);
  CIFAR's 32-pixel images are soft already (clean 1st percentile 0.46), so only heavy blur shows;
* ``dark``: ``brightness < 0.10``; ``bright``: ``brightness > 0.92`` (mean luminance in [0, 1]);
* ``low_information``: ``entropy < 2.0`` bits (fewer than about 4 grey levels in use: blank,
  near-constant frames; natural images have 6 to 7.5);
* ``odd_aspect``: longer side over shorter side ``> 3.0``;
* ``odd_size``: area ``> 16x`` or ``< 1/16`` of the collection's median area;
* ``grayscale``: ``colourfulness < 2.0`` grey levels, flagged only when most of the collection is
  in colour (a grey set is not flagged image by image).

A low-information image is not also called blurry (it has no edges to be sharp). The ``score`` of
a finding is how far past its threshold it is, so the most certain findings sort first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

QUALITY_THRESHOLDS = {
    "blurry": 0.10,
    "dark": 0.10,
    "bright": 0.92,
    "low_information": 2.0,
    "odd_aspect": 3.0,
    "odd_size": 16.0,
    "grayscale": 2.0,
}
QUALITY_ISSUES = tuple(QUALITY_THRESHOLDS)


def quality_issues(figures: pd.DataFrame, thresholds: dict | None = None) -> pd.DataFrame:
    """One row per image and issue found.

    Args:
        figures: the scan's DataFrame (``sharpness``, ``brightness``, ``entropy``,
            ``colourfulness``, ``width``, ``height``), NaN rows for unreadable images.
        thresholds: overrides of ``QUALITY_THRESHOLDS``.

    Returns:
        DataFrame with columns ``index``, ``issue``, ``value`` (the figure), ``threshold``,
        ``score`` (how far past the threshold, relative), most certain first within each issue.
    """
    t = {**QUALITY_THRESHOLDS, **(thresholds or {})}
    f = figures
    readable = f["width"] > 0
    area = (f["width"] * f["height"]).astype(float)
    median_area = float(np.median(area[readable])) if readable.any() else 1.0
    aspect = np.maximum(f["width"], f["height"]) / np.maximum(np.minimum(f["width"], f["height"]), 1)
    size_ratio = area / max(median_area, 1.0)
    size_factor = np.maximum(size_ratio, 1 / np.maximum(size_ratio, 1e-12))
    low_info = f["entropy"] < t["low_information"]
    colour_set = float((f["colourfulness"][readable] >= t["grayscale"]).mean()) > 0.5 if readable.any() else False
    tests = {
        "blurry": (f["sharpness"], (f["sharpness"] < t["blurry"]) & ~low_info),
        "dark": (f["brightness"], f["brightness"] < t["dark"]),
        "bright": (f["brightness"], f["brightness"] > t["bright"]),
        "low_information": (f["entropy"], low_info),
        "odd_aspect": (aspect, aspect > t["odd_aspect"]),
        "odd_size": (size_ratio, size_factor > t["odd_size"]),
        "grayscale": (f["colourfulness"], (f["colourfulness"] < t["grayscale"]) & colour_set),
    }
    parts = []
    for issue, (value, flagged) in tests.items():
        idx = np.flatnonzero(np.asarray(flagged & readable, dtype=bool))
        if not len(idx):
            continue
        v = np.asarray(value, dtype=float)[idx]
        limit = t[issue]
        if issue in ("bright", "odd_aspect"):
            score = (v - limit) / limit
        elif issue == "odd_size":
            score = np.asarray(size_factor)[idx] / limit - 1
        else:
            score = (limit - v) / limit
        parts.append(pd.DataFrame({"index": idx, "issue": issue, "value": v, "threshold": limit, "score": score}))
    columns = ["index", "issue", "value", "threshold", "score"]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in zip(columns, ["int64", "str", "float", "float", "float"])})
    out = pd.concat(parts, ignore_index=True)
    order = {name: i for i, name in enumerate(QUALITY_ISSUES)}
    out = out.assign(_o=out["issue"].map(order)).sort_values(["_o", "score"], ascending=[True, False], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)
