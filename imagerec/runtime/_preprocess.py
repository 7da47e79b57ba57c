"""Evaluation preprocessing in numpy: ``imagerec.data.transforms.eval_transform`` without PyTorch.

The steps and their arithmetic are torchvision's, so a model sees the same numbers here as in
training and evaluation (to about 1e-6):

1. uint8 pixels -> float32 in [0, 1];
2. resize so the shorter side is ``floor(S / crop_pct)`` (the longer side as torchvision's
   ``_compute_resized_output_size`` rounds it), in float, with PyTorch's antialiased
   interpolation: a separable filter (triangle for bilinear, Keys' cubic with a = -0.5 for
   bicubic) whose support widens by the scale factor when shrinking, with the weights of each
   output pixel normalised to sum to 1 and no clamping;
3. centre crop to S x S (torchvision's rounding of the offsets);
4. ``(x - mean) / std``, channels first.

A separable resize is two matrix products, ``rows @ image @ cols.T``; the crop only keeps some
rows of those matrices, so it costs nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
from PIL import Image

from .._decode import to_rgb
from .._preprocessing import Preprocessing
from ..errors import ImagerecError

_FILTER_SIZE = {"bilinear": 2, "bicubic": 4}  # taps of the filter at scale 1 (PyTorch's interp_size)
_CUBIC_A = -0.5  # PyTorch's antialiased bicubic uses Keys' a = -0.5 (Pillow's), not -0.75


def as_preprocessing(preprocessing) -> Preprocessing:
    """A ``Preprocessing`` from itself, a dict, or any object with ``to_dict()``.

    Raises:
        ImagerecError: anything else, or invalid values.
    """
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if isinstance(preprocessing, Mapping):
        return Preprocessing.from_dict(preprocessing)
    if callable(getattr(preprocessing, "to_dict", None)):  # e.g. imagerec.data.Preprocessing
        return Preprocessing.from_dict(preprocessing.to_dict())
    raise ImagerecError(
        f"preprocessing of type {type(preprocessing).__name__} is not a Preprocessing or a dict; "
        "pass model.preprocessing"
    )


def as_rgb_array(image) -> np.ndarray:
    """An image as a uint8 array (H, W, 3).

    Args:
        image: a PIL image (any mode; transparency is composited on white, as in training) or
            a uint8 array of shape (H, W, 3).

    Raises:
        ImagerecError: anything else.
    """
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ImagerecError(
                f"an image array of dtype {image.dtype} and shape {image.shape} is not an RGB picture; "
                "pass uint8 pixels of shape (H, W, 3), e.g. np.asarray(PIL.Image.open(f).convert('RGB'))"
            )
        return image
    raise ImagerecError(
        f"an image of type {type(image).__name__} cannot be read; pass a file path, a PIL image "
        "or a uint8 array of shape (H, W, 3)"
    )


def preprocess(image, preprocessing) -> np.ndarray:
    """Prepare one image as ``imagerec.data.transforms.eval_transform`` does, without PyTorch.

    Args:
        image: a PIL image or a uint8 array of shape (H, W, 3).
        preprocessing: the model's :class:`Preprocessing` (``OnnxClassifier.preprocessing``), a
            dict of its fields, or an ``imagerec.data.Preprocessing``.

    Returns:
        float32 array of shape (3, S, S), normalised, with S = ``preprocessing.input_size``.

    Raises:
        ImagerecError: an image that is not a PIL image or an RGB uint8 array, or invalid
            preprocessing.
    """
    return _preprocess(as_rgb_array(image), as_preprocessing(preprocessing))


def _preprocess(pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """``pixels``: trusted uint8 array (H, W, 3); returns float32 (3, S, S)."""
    height, width = pixels.shape[:2]
    new_h, new_w = resized_size(height, width, pp.resize_size)
    size = pp.input_size
    # torchvision pads an image smaller than the crop; floor(S / crop_pct) >= S rules that out
    assert new_h >= size and new_w >= size
    rows = _axis_weights(height, new_h, pp.interpolation, _crop_start(new_h, size), size)
    cols = _axis_weights(width, new_w, pp.interpolation, _crop_start(new_w, size), size)
    x = pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255)  # (3, H, W)
    # both orders give the same numbers; shrink the larger side first, as it costs less
    if height <= width:
        x = rows @ (x @ cols.T)
    else:
        x = (rows @ x) @ cols.T
    mean = np.asarray(pp.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pp.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``short`` (torchvision's rounding)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _crop_start(length: int, size: int) -> int:
    return round((length - size) / 2.0)  # torchvision's centre-crop anchor (round half to even)


@functools.lru_cache(maxsize=64)
def _axis_weights(in_size: int, out_size: int, interpolation: str, start: int, count: int) -> np.ndarray:
    """Rows ``start:start + count`` of the (out_size, in_size) float32 resampling matrix of one axis.

    Bilinear and bicubic follow PyTorch's ``interpolate(..., antialias=True)`` on float32 input
    (``_compute_indices_min_size_weights_aa`` in ``aten/src/ATen/native/cpu/UpSampleKernel.cpp``)
    step by step, float32 and float64 where it uses them: its centres are float32, which for
    a long side of a few hundred pixels moves the weights by 1e-5, so computing them exactly
    would not give PyTorch's numbers. Nearest follows ``interpolate(..., mode="nearest")``.
    An axis whose length does not change is copied, as PyTorch skips it.
    """
    f32 = np.float32
    out = np.arange(start, start + count)
    weights = np.zeros((count, in_size), dtype=f32)
    rows = np.arange(count)
    if out_size == in_size:
        weights[rows, out] = 1.0
    elif interpolation == "nearest":
        scale = f32(in_size) / f32(out_size)
        source = np.minimum(np.floor(out.astype(f32) * scale).astype(np.int64), in_size - 1)
        weights[rows, source] = 1.0
    else:
        scale = f32(in_size) / f32(out_size)  # area_pixel_compute_scale<float>
        half = _FILTER_SIZE[interpolation] * 0.5
        support = f32(half * float(scale)) if scale >= 1.0 else f32(half)
        inv_scale = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
        max_taps = math.ceil(support) * 2 + 1
        center = (float(scale) * (out + 0.5)).astype(f32)
        first = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
        last = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
        taps = np.clip(last - first, 0, max_taps)
        tap = np.arange(max_taps)
        index = first[:, None] + tap[None, :]  # (count, max_taps)
        valid = tap[None, :] < taps[:, None]
        distance = index.astype(f32) - center[:, None]  # float32, as PyTorch
        x = ((distance.astype(np.float64) + 0.5) * float(inv_scale)).astype(f32)
        w = np.where(valid, _filter(interpolation, x), f32(0))
        total = np.zeros(count, dtype=f32)
        for k in range(max_taps):  # summed in order, in float32, as PyTorch
            total += w[:, k]
        safe = np.where(total != 0, total, f32(1))
        w = np.where(total[:, None] != 0, w / safe[:, None], f32(0))
        np.add.at(weights, (np.broadcast_to(rows[:, None], index.shape)[valid], index[valid]), w[valid])
    weights.setflags(write=False)  # shared through the cache
    return weights


def _filter(interpolation: str, x: np.ndarray) -> np.ndarray:
    """PyTorch's antialiasing filters in float32: triangle, or Keys' cubic with a = -0.5."""
    f32 = np.float32
    x = np.abs(x)
    if interpolation == "bilinear":
        return np.where(x < 1, f32(1) - x, f32(0))
    a = f32(_CUBIC_A)
    near = ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)
    far = ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a
    return np.where(x < 1, near, np.where(x < 2, far, f32(0)))
