"""``Preprocessing``: how images must be prepared for a model, the facts that travel with its weights.

Torch-free, so that ``imagerec.data`` (training, evaluation) and ``imagerec.runtime`` (ONNX
Runtime on a device without PyTorch) read one definition from checkpoints and exported models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from .errors import ImagerecError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a model: what timm calls its pretrained data config.

    Attributes:
        input_size: side of the square input in pixels.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after that.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        crop_pct: share of the resized image kept by the centre crop at evaluation.
        fixed_input_size: True when the model accepts only ``input_size`` (e.g. ``seed_cnn``).
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    fixed_input_size: bool = False

    @property
    def resize_size(self) -> int:
        """The shorter side after resizing, before the centre crop."""
        return math.floor(self.input_size / self.crop_pct)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Preprocessing:
        """A validated ``Preprocessing`` from a dict such as ``imagerec.data.Preprocessing.to_dict()``.

        Raises:
            ImagerecError: a missing or unknown key, or a value out of range.
        """
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ImagerecError(
                f"preprocessing keys {unknown} are unknown to this imagerec (it knows {sorted(fields)}); "
                "it was written by a newer imagerec: upgrade imagerec"
            )
        missing = [k for k in ("input_size", "mean", "std") if k not in data]
        if missing:
            raise ImagerecError(f"preprocessing lacks {missing}; write it again with this imagerec (imagerec export, or train)")
        pp = cls(
            input_size=int(data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data.get("interpolation", "bicubic")),
            crop_pct=float(data.get("crop_pct", 0.875)),
            fixed_input_size=bool(data.get("fixed_input_size", False)),
        )
        pp._validate()
        return pp

    def _validate(self) -> None:
        if self.input_size < 1:
            raise ImagerecError(f"input_size={self.input_size} must be a positive number of pixels")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ImagerecError(f"mean={self.mean} and std={self.std} must have 3 values each (R, G, B)")
        if not all(s > 0 for s in self.std):
            raise ImagerecError(f"std={self.std} must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ImagerecError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ImagerecError(f"crop_pct={self.crop_pct} must be in (0, 1]; 1 keeps the whole image")

    def resolve(self, image_size: int | None = None, crop_pct: float | None = None) -> Preprocessing:
        """A copy at another input size or crop share, validated.

        Raises:
            ImagerecError: the size is outside [16, 1024], differs from a fixed input size, or
                the crop share is outside (0, 1].
        """
        size = self.input_size if image_size is None else int(image_size)
        if self.fixed_input_size and size != self.input_size:
            raise ImagerecError(
                f"image size {size} px: this model takes only {self.input_size} px input; "
                f"drop --image-size or set it to {self.input_size}"
            )
        if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise ImagerecError(
                f"image size {size} px is outside [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]; pick e.g. 128"
            )
        crop = self.crop_pct if crop_pct is None else float(crop_pct)
        if not 0.0 < crop <= 1.0:
            raise ImagerecError(f"crop_pct={crop} must be in (0, 1]; 1 keeps the whole image")
        return replace(self, input_size=size, crop_pct=crop)
