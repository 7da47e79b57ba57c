"""Data layer: sources of images, robust decoding, the decode cache, transforms and batches."""

from ._cache import SMALL_IMAGE_MAX_SIDE, decode_small_images
from ._cifar10 import load_cifar10
from .._decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, DecodeError, Skipped, is_image_file, load_rgb, to_rgb
from ._loader import Batch, iter_batches
from ._manifest import manifest_csv, write_manifest
from ._sources import SPLITS, ImageSource, has_val_split, load_images, report_skipped, stratified_split
from .transforms import AUGMENTS, BatchAugment, Preprocessing, eval_transform, train_transform

__all__ = [
    "AUGMENTS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SMALL_IMAGE_MAX_SIDE",
    "SPLITS",
    "Batch",
    "BatchAugment",
    "DecodeError",
    "ImageSource",
    "Preprocessing",
    "Skipped",
    "decode_small_images",
    "eval_transform",
    "has_val_split",
    "is_image_file",
    "iter_batches",
    "load_cifar10",
    "load_images",
    "load_rgb",
    "report_skipped",
    "stratified_split",
    "to_rgb",
    "train_transform",
    "manifest_csv",
    "write_manifest",
]
