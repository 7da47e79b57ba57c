"""The ``imagerec`` command: a thin shell over the library.

Each sub-command parses its arguments and calls one library function. A user error
(:class:`~imagerec.errors.ImagerecError`, or a bad argument) prints one line on stderr and exits
with status 2, with no traceback; so does an error of the system around the data (``OSError``:
a full disk, a permission, a vanished file) and text that cannot be decoded or encoded
(``UnicodeError``). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
from typing import Sequence

from ._version import __version__
from .errors import ImagerecError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _trained_run(text: str) -> str:
    """``--features RUN``: a run folder of 'imagerec train' or a checkpoint, as the backbone spec ``run:PATH``."""
    from .checkpoint import RUN_PREFIX, resolve_checkpoint

    try:
        resolve_checkpoint(text)
    except ImagerecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return RUN_PREFIX + os.path.abspath(text)


def _add_backbone(p: argparse.ArgumentParser, default: str, help: str) -> None:
    """``--backbone NAME`` or ``--features RUN`` (a trained run's network instead of a generic one), not both."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--backbone", default=default, help=help)
    group.add_argument(
        "--features", dest="backbone", type=_trained_run, metavar="RUN",
        help="embed with a trained run's network (a run folder of 'imagerec train' or its .safetensors) instead of --backbone",
    )  # fmt: skip


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="a folder of images, DIR/<class>/*, a split root, a CSV manifest, or 'cifar10'")
    p.add_argument("--split", choices=["train", "val", "test"], help="one split of the data (default: all images)")
    p.add_argument(
        "--max-pixels", type=_positive_int, default=None, help="skip images with more pixels (decompression-bomb guard)"
    )
    _add_allow_outside(p)


def _add_allow_outside(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside", action="store_true", help="read manifest rows that point outside the manifest's folder")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imagerec", description="Image recognition with transfer learning, and image clustering.")
    parser.add_argument("--version", action="version", version=f"imagerec {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    p = commands.add_parser("models", help="list the backbones, or recommend one for a data set")
    p.add_argument("--recommend", action="store_true", help="recommend a backbone instead of listing them")
    p.add_argument("--images", type=int, help="number of labelled training images (with --recommend)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="compute to train on (default: cpu)")
    p.add_argument("--image-side", type=int, help="longer side of the images in pixels, if known")
    p.set_defaults(run=_run_models)

    p = commands.add_parser("embed", help="turn images into feature vectors (.npz)")
    _add_data_arguments(p)
    _add_backbone(p, "efficientnet_lite0", "registry name (see 'imagerec models')")
    p.add_argument("--out", required=True, help="output .npz file (resumable: run again to continue)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--workers", type=int, help="decoding processes for large images (default: CPUs)")
    p.add_argument(
        "--engine", choices=["auto", "torch", "onnx"], default="auto",
        help="onnx: ONNX Runtime (faster on a CPU); torch: PyTorch; auto: onnx on a CPU (default)",
    )
    p.add_argument(
        "--shard", metavar="I/N",
        help="embed only shard I of N (I from 0; every N-th image by sorted path), or auto (Slurm array, torchrun); "
        "{shard} in --out becomes I",
    )
    p.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS",
        help="embed on a Ray cluster into content-keyed parts in the folder --out (a rerun embeds only missing parts): "
        "no ADDRESS starts a local one, auto joins this machine's cluster, or ray://HOST:10001",
    )
    p.add_argument("--actors", type=_positive_int, help="with --ray: embedding actors (default: the cluster's CPUs / --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=_positive_float, default=1, help="with --ray: CPUs each actor reserves (default: 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0, help="with --ray: GPUs each actor reserves (default: 0, CPU actors)")
    p.add_argument("--part-size", type=_positive_int, default=None, help="with --ray: images per part file (default: 4,096)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_embed)

    p = commands.add_parser("index", help="a searchable FAISS index of a collection (search it with 'imagerec search')")
    p.add_argument("data", nargs="?", help="images as for 'embed', or an embeddings .npz (omit with --parts)")
    p.add_argument("--out", required=True, help="index folder (with --add: the index to extend)")
    p.add_argument("--add", action="store_true", help="append DATA's new images to the index in --out, embedding only them")
    p.add_argument("--parts", nargs="+", metavar="PART", help="merge the .npz parts of 'imagerec embed --shard I/N' instead of DATA")
    p.add_argument("--split", choices=["train", "val", "test"], help="one split of the data (default: all images)")
    _add_backbone(p, "auto", "registry name, or auto: Lite2 at 160 px for small images, Lite0 for photos")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    p.add_argument(
        "--exact-max", type=_positive_int, default=None,
        help="largest count searched exactly in RAM; above it IVF-PQ with the lists and vectors on disk (default: 1,000,000)",
    )
    p.add_argument("--transform", choices=["auto", "pca", "opq", "none"], default="auto",
                   help="IVF-PQ only: before the codes, PCA to 256 dims (auto: when wider), OPQ, or none")  # fmt: skip
    p.add_argument("--pq-bytes", type=_positive_int, help="IVF-PQ only: bytes per code (default: one per 8 dims)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--engine", choices=["auto", "torch", "onnx"], default="auto", help="embedding engine, as for 'embed'")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="skip images with more pixels (decompression-bomb guard)")
    _add_allow_outside(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_index)

    p = commands.add_parser("search", help="the images of an index most like query images (search by example)")
    p.add_argument("index", help="an index folder from 'imagerec index'")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="image files, folders of images, or an embeddings .npz")
    p.add_argument("--top-k", type=_positive_int, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default: table)")
    p.add_argument("--out", help="write the results to this file instead of the screen")
    p.add_argument("--sheet", metavar="DIR", help="also write a contact sheet PNG per query (query, neighbours, scores) here")
    p.add_argument("--nprobe", type=_positive_int, help="IVF lists visited per query (default: the index's)")
    p.add_argument("--rerank", type=_positive_int, help="on-disk IVF-PQ index: candidates re-ranked by exact cosine (default: 200)")
    p.add_argument("--device", default="cpu", help="device for embedding the queries (default: cpu)")
    p.set_defaults(run=_run_search)

    p = commands.add_parser("train", help="fine-tune a backbone on labelled images (or --recipe seed)")
    p.add_argument("data", nargs="?", help="labelled images: DIR/<class>/*, a split root, a CSV manifest, or 'cifar10'")
    p.add_argument("--out", help="run folder for checkpoints, metrics.csv and config.json")
    p.add_argument("--resume", help="continue the run in this folder from its last checkpoint")
    p.add_argument("--config", help="TOML or JSON file of training settings (flags override it)")
    p.add_argument("--unlabeled", metavar="MORE", help="a folder of unlabelled images: the surest of those suggested for each class join the training split")
    p.add_argument("--pseudo-share", type=float, default=None, help="with --unlabeled: the share of each class's suggested images taken, most confident first (default: 0.25)")
    _add_config_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)

    p = commands.add_parser("evaluate", help="accuracy, per-class metrics, confusion matrix and calibration")
    p.add_argument("checkpoint", help="a .safetensors checkpoint, a run folder (its best checkpoint), or an exported .onnx")
    _add_data_arguments(p)
    p.add_argument("--out", required=True, help="folder for summary.json, per_class.csv, confusion.png...")
    p.add_argument("--tta", action="store_true", help="average each prediction with the mirrored image's")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.set_defaults(run=_run_evaluate, split="auto")

    p = commands.add_parser("predict", help="top-k classes of new images")
    p.add_argument("checkpoint", help="a .safetensors checkpoint, a run folder (its best checkpoint), or an exported .onnx")
    p.add_argument("paths", nargs="+", help="image files, folders or glob patterns (quote them)")
    p.add_argument("--top-k", type=_positive_int, default=3, help="classes shown per image (default: 3)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--out", help="write the result to this file instead of the console")
    p.add_argument("--tta", action="store_true", help="average each prediction with the mirrored image's")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.set_defaults(run=_run_predict)

    p = commands.add_parser("export", help="a trained classifier as ONNX (runs without PyTorch) or TorchScript")
    p.add_argument("checkpoint", help="a .safetensors checkpoint, or a run folder (its best checkpoint)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="file format (default: onnx)")
    p.add_argument("--out", help="file to write (default: model.onnx / model.pt beside the checkpoint)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the training size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.set_defaults(run=_run_export)

    p = commands.add_parser("compress", help="int8 quantization (ONNX) and structured pruning for edge devices")
    p.add_argument("checkpoint", help="a checkpoint or run folder (or, for --quantize alone, an exported .onnx)")
    p.add_argument("--quantize", choices=["int8", "dynamic"], help="int8: static, per-channel, calibrated on --calib; dynamic: linear layers only")
    p.add_argument("--calib", help="images to calibrate int8 on (a folder, split root or CSV manifest; e.g. the training data)")
    p.add_argument("--calib-split", choices=["train", "val", "test"], help="split of --calib (default: all its images)")
    p.add_argument("--calib-images", type=_positive_int, default=512, help="calibration images drawn from --calib (default: 512)")
    p.add_argument("--calib-method", choices=["minmax", "percentile", "entropy"], default="minmax", help="activation range estimate (default: minmax)")
    p.add_argument("--prune", type=float, metavar="AMOUNT", help="share of channels removed (0-1), then a short fine-tune on --data")
    p.add_argument("--data", help="labelled images to fine-tune the pruned model on (with --prune)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="with --prune: share of --data held out of the fine-tune to fit the temperature on, when it has no val folder (default: the checkpoint's own)")
    p.add_argument("--epochs", type=_positive_float, default=1.0, help="fine-tuning epochs after pruning (default: 1)")
    _add_allow_outside(p)
    p.add_argument("--out", help="output file: .onnx for --quantize, .safetensors for --prune alone (default: beside the checkpoint)")
    p.add_argument("--device", default="auto", help="device for the pruning fine-tune (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_compress)

    p = commands.add_parser("cluster", help="group images by what they show: k-means, DBSCAN, HDBSCAN, hierarchical, deep")
    p.add_argument("data", help="images (a folder, DIR/<class>/*, a split root, a CSV manifest, 'cifar10') or a .npz from 'imagerec embed'")
    p.add_argument("--split", choices=["train", "val", "test"], help="one split of the data (default: all images)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="skip images with more pixels (decompression-bomb guard)")
    _add_allow_outside(p)
    p.add_argument("--method", default="kmeans", choices=["kmeans", "minibatch-kmeans", "dbscan", "hdbscan", "agglomerative", "deep"], help="clustering method (default: kmeans)")
    p.add_argument("--k", help="number of clusters, or 'auto' (the default for the methods that take k; dbscan and hdbscan find it)")
    p.add_argument("--k-range", type=int, nargs=2, default=[2, 15], metavar=("LOW", "HIGH"), help="candidates for --k auto (default: 2 15)")
    p.add_argument("--out", required=True, help="run folder: assignments.csv, summary.json, clusters/*.png, map.png, gallery.html")
    _add_backbone(p, "auto", "registry name, when DATA holds images; auto: efficientnet_lite2 at 160 px for small images, else efficientnet_lite0 (default: auto)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto, for embedding and the deep head (default: cpu)")
    p.add_argument("--tta", action="store_true", help="embed each image as the mean of it and its mirror image")
    p.add_argument("--pca-dim", default="auto", help="principal components kept: a number, 'auto' (32 for dbscan/hdbscan; otherwise 32 below 5,000 images, 128 from 5,000) or 'none'")
    p.add_argument("--whiten", action="store_true", help="PCA whitening")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the features")
    p.add_argument("--eps", help="dbscan: neighbourhood radius, or 'auto' from the k-distance curve (default)")
    p.add_argument("--min-samples", type=_positive_int, help="dbscan, hdbscan: neighbours that make an image a dense (core) point")
    p.add_argument("--min-cluster-size", type=_positive_int, help="hdbscan: the smallest cluster (default: 5)")
    p.add_argument("--linkage", choices=["ward", "average", "complete"], help="agglomerative: linkage (default: ward)")
    p.add_argument("--epochs", type=_positive_int, help="deep: epochs of the SCAN step (default: 40)")
    p.add_argument("--adapt", choices=["simclr"], help="first fine-tune the backbone on the images without labels (contrastive; slow on a CPU)")
    p.add_argument("--adapt-epochs", type=float, help="epochs of --adapt (default: 8)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any other parameter of the method, repeatable (e.g. --param n_neighbors=30)")
    p.add_argument("--map", dest="map_method", choices=["tsne", "pca"], default="tsne", help="2-D map of the embeddings (default: tsne, on 2,000 images at most)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--export-manifest", action="store_true", help="also write manifest.csv (path, cluster name) that 'imagerec train' reads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_cluster)

    p = commands.add_parser("serve", help="serve a model over HTTP: batched predictions, embeddings, metrics")
    p.add_argument("model", help="a run folder, a .safetensors checkpoint, or an exported .onnx (int8 included)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--token", help="bearer token required by every endpoint but /health (default: $IMAGEREC_SERVE_TOKEN)")
    p.add_argument("--insecure-no-token", action="store_true", help="allow a --host beyond this machine without a token")
    p.add_argument("--engine", choices=["auto", "onnx", "torch"], default="auto", help="onnx: ONNX Runtime; torch: PyTorch; auto: onnx on a CPU (default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU needs --engine torch or auto; default: cpu)")
    p.add_argument("--threads", type=_positive_int, help="ONNX Runtime CPU threads (default: all cores)")
    p.add_argument("--max-batch-size", type=_positive_int, default=32, help="images per forward pass at most (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to share its forward pass (default: 5)")
    p.add_argument("--max-queue", type=_positive_int, default=256, help="requests in the server at once; beyond, 503 + Retry-After (default: 256)")
    p.add_argument("--max-images", type=_positive_int, default=64, help="images per request at most (default: 64)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="larger request bodies get a 413 (default: 20)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request, else 504 (default: 30)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="refuse images with more pixels (decompression-bomb guard)")
    p.add_argument("--watch", action="store_true", help="serve each new best checkpoint of the run folder: exported, checked against PyTorch, warmed up, swapped in without downtime")
    p.add_argument("--watch-interval", type=float, default=2.0, help="seconds between looks at the watched checkpoint (default: 2)")
    p.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto", help="auto: with the run's int8 file (imagerec compress) beside its checkpoint, time both here and serve the faster within --min-int8-agreement (default: auto)")
    p.add_argument("--no-tune-batch", action="store_true", help="batch up to --max-batch-size whatever the timing (by default, start-up times batch sizes and stops where larger batches no longer run faster per image)")
    p.add_argument("--min-int8-agreement", type=float, default=0.99, help="int8 is chosen only if it keeps fp32's top class on this share of its calibration images (default: 0.99)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    p.set_defaults(run=_run_serve)

    p = commands.add_parser("studio", help="a local web app: name clusters, fix what the audit found, train, export")
    p.add_argument("data", nargs="?", help="the photos: a folder, DIR/<class>/*, a split root or a CSV manifest (omit to reopen --project)")
    p.add_argument("--project", help="project folder (default: DATA.studio beside the data)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default: 8765; 0: any free port)")
    p.add_argument("--open", action="store_true", help="open the studio in the default browser")
    p.add_argument("--k", help="clusters for unlabelled photos: a number or 'auto' (default: auto)")
    p.add_argument("--backbone", default="auto", help="backbone that embeds the photos for clustering and search (default: auto)")
    p.add_argument("--image-size", type=int, help="input side in pixels of that embedding (default: the backbone's)")
    p.set_defaults(run=_run_studio)
    p = commands.add_parser("audit", help="find duplicates, train/test leaks, outliers, wrong labels and bad images in a collection")
    p.add_argument("data", help="images (a folder, DIR/<class>/*, a split root, a CSV manifest, 'cifar10'), a .npz from 'imagerec embed', "
                   "or an index folder from 'imagerec index' (near-duplicates and leakage of its vectors, in blocks)")  # fmt: skip
    p.add_argument("--out", required=True, help="run folder: summary.json, one CSV/Parquet per check, sheets/*.png, report.html")
    p.add_argument("--checks", help="comma-separated, from: exact_duplicates, near_duplicates, leakage, outliers, label_issues, quality (default: all that apply)")
    p.add_argument("--split", choices=["train", "val", "test"], help="audit one split only (default: all; leakage needs them all)")
    _add_backbone(p, "auto", "registry name; auto: efficientnet_lite2 at 160 px for small images, else efficientnet_lite0 (default: auto)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--no-tta", action="store_true", help="embed each image once, not also mirrored (twice as fast; flipped copies are then missed more often)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, help="skip images with more pixels (decompression-bomb guard)")
    _add_allow_outside(p)
    p.add_argument("--neighbours", type=_positive_int, default=10, help="neighbours searched per image (default: 10)")
    for name, default in (("near-duplicates", "0.90 for small images, 0.96 for photos: a cosine similarity; leakage too"), ("pixel-correlation", "0.93 small, 0.99 photos: of 16 px colour thumbnails confirming a weaker candidate"), ("outliers", "robust z-score"), ("label-issues", "cleanlab's own rule"),
                          ("blurry", "0.10"), ("dark", "0.10"), ("bright", "0.92"), ("low-information", "2.0 bits"), ("odd-aspect", "3.0"),
                          ("odd-size", "16x the median area"), ("grayscale", "2.0")):  # fmt: skip
        p.add_argument(f"--{name}-threshold", type=float, help=f"threshold of the {name} check (default: {default})")
    p.add_argument("--export-manifest", metavar="CSV", help="write the collection without the flagged images (path,label) for 'imagerec train' and 'cluster'")
    p.add_argument("--relabel", action="store_true", help="in --export-manifest, keep label issues with their suggested labels")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_audit)

    p = commands.add_parser("label", help="suggest a class for every image from a few labels, and which images to label next")
    _add_data_arguments(p)
    p.add_argument("--labels", help="path,label CSV of the images decided so far (default: the labels DATA holds)")
    p.add_argument("--out", required=True, help="CSV to write: path, label, suggested, confidence, disagrees, next")
    p.add_argument("--next", type=int, default=20, dest="next_count", help="how many images to rank for labelling next (default: 20)")
    _add_backbone(p, "auto", "registry name, or auto: Lite2 at 160 px for small images, Lite0 for photos")
    p.add_argument("--cache", help="folder whose embeddings.npz the next run reuses (default: OUT.features)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_label)

    p = commands.add_parser("quickstart", help="the main job: download CIFAR-10, fine-tune, evaluate")
    p.add_argument("--data", default="cifar10", help="a local copy instead of the download (a split root or the CIFAR batches)")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    p.add_argument("--time-budget", type=_positive_float, default=20.0, help="minutes for training and evaluation (default: 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_quickstart)
    return parser


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, help text and all; defaults stay in the dataclass."""
    from dataclasses import fields  # noqa: PLC0415

    from .training import TrainConfig  # noqa: PLC0415

    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)})".replace("%", "%%")  # argparse formats help with %
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            convert = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(flag, type=convert, default=None, help=help_text)


def _run_models(args) -> None:
    from .backbones import model_cards, recommend_backbone  # noqa: PLC0415 - fast --help

    if args.recommend:
        if args.images is None:
            raise ImagerecError("--recommend needs --images N, the number of labelled training images")
        rec = recommend_backbone(args.images, num_classes=args.classes, device=args.device, image_side=args.image_side)
        print(f"backbone: {rec.backbone}\nstrategy: {rec.strategy}\nimage size: {rec.image_size} px")
        for reason in rec.reasons:
            print(f"  - {reason}")
        return
    rows = [("backbone", "params", "MACs", "features", "ImageNet top-1", "input", "mean / std", "weights")]
    for c in model_cards():
        pp = c.preprocessing
        rows.append(
            (
                c.name,
                f"{c.params / 1e6:.2f} M",
                f"{c.macs / 1e6:,.{1 if c.macs < 1e7 else 0}f} M @ {pp.input_size}px",
                str(c.num_features),
                f"{c.imagenet_top1:.1f}%" if c.imagenet_top1 else "-",
                f"{pp.input_size} px {pp.interpolation}",
                f"{_fmt(pp.mean)} / {_fmt(pp.std)}",
                "ImageNet" if c.weights else "none (from scratch)",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _run_embed(args) -> None:
    from .data import DEFAULT_MAX_PIXELS  # noqa: PLC0415
    from .embedding import embed  # noqa: PLC0415

    if args.ray is not None:
        return _run_embed_ray(args)
    if args.actors or args.part_size or args.gpus_per_actor or args.cpus_per_actor != 1:
        raise ImagerecError("--actors, --cpus-per-actor, --gpus-per-actor and --part-size apply to --ray only; add --ray or drop them")
    if args.shard:
        from .index import embed_shard, parse_shard, shard_path  # noqa: PLC0415

        shard = parse_shard(args.shard)
        args.out = str(shard_path(args.out, shard))
        embed, sharded = embed_shard, {"shard": shard}
    else:
        sharded = {}
    result = embed(
        args.data,
        args.backbone,
        out=args.out,
        split=args.split,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        engine=args.engine,
        progress=not args.no_progress,
        allow_outside=args.allow_outside,
        **sharded,
    )
    print(f"wrote {args.out}: {len(result):,} x {result.features.shape[1]} float32 features ({result.backbone})")


def _run_embed_ray(args) -> None:
    from .data import DEFAULT_MAX_PIXELS  # noqa: PLC0415
    from .distributed import embed_on_ray  # noqa: PLC0415
    from .distributed._ray import PART_SIZE  # noqa: PLC0415

    if args.shard:
        raise ImagerecError("--ray splits the work itself; drop --shard (it is for Slurm arrays and torchrun)")
    done = embed_on_ray(
        args.data, args.out, args.backbone, address=args.ray, split=args.split, image_size=args.image_size,
        batch_size=args.batch_size, device=None if args.device == "cpu" and args.gpus_per_actor else args.device,
        engine=args.engine, actors=args.actors, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        part_size=args.part_size or PART_SIZE, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        allow_outside=args.allow_outside, progress=not args.no_progress,
    )  # fmt: skip
    print(f"wrote {len(done.parts):,} part(s) to {args.out}: {done.embedded:,} image(s) embedded now, {done.reused:,} part(s) "
          f"reused from an earlier run" + (f", {done.skipped:,} unreadable skipped" if done.skipped else "")
          + (f", {done.removed:,} stale part(s) removed" if done.removed else "") + f" in {done.seconds:.1f} s; "
          f"index them with: imagerec index --parts {os.path.join(args.out, 'part-*.npz')} --out INDEX_DIR")  # fmt: skip


def _run_index(args) -> None:
    from .data import DEFAULT_MAX_PIXELS  # noqa: PLC0415
    from .index import EXACT_MAX, add_to_index, build_index  # noqa: PLC0415

    if args.parts and (args.data or args.add):
        raise ImagerecError("--parts merges finished part files: give either DATA or --parts, and no --add")
    if not args.parts and not args.data:
        raise ImagerecError("nothing to index: give DATA (images or an embeddings .npz) or --parts PART.npz ...")
    embedding = {"batch_size": args.batch_size, "device": args.device, "engine": args.engine, "progress": not args.no_progress}
    embedding["max_pixels"] = args.max_pixels or DEFAULT_MAX_PIXELS
    embedding["allow_outside"] = args.allow_outside
    if args.add:
        if args.backbone != "auto" or args.image_size or args.exact_max or args.transform != "auto" or args.pq_bytes:
            raise ImagerecError(
                "--add embeds with the index's own backbone and size and keeps its kind; "
                "drop --backbone, --image-size, --exact-max, --transform and --pq-bytes"
            )
        done = add_to_index(args.out, args.data, split=args.split, **embedding)
        index = done.index
        print(f"added {done.added:,} image(s); {done.already:,} already indexed and unchanged, not embedded again"
              + (f"; {done.skipped:,} unreadable, skipped" if done.skipped else ""))
    else:
        index = build_index(args.parts or args.data, args.out, backbone=args.backbone, image_size=args.image_size,
                            split=args.split, exact_max=args.exact_max or EXACT_MAX, transform=args.transform,
                            pq_bytes=args.pq_bytes, **embedding)
        if index.skipped:
            print(f"{index.skipped:,} unreadable image(s) skipped")
    print(f"{args.out}: {index.describe()}")


def _run_search(args) -> None:
    import json  # noqa: PLC0415

    from ._io import write_text_atomic  # noqa: PLC0415
    from .index import load_index, write_sheets  # noqa: PLC0415

    _check_result_file(args.out, args.format, "hits", inside=args.index)
    if args.sheet is not None and os.path.exists(args.sheet) and not os.path.isdir(args.sheet):
        raise ImagerecError(f"--sheet {args.sheet!r} is a file; give a folder for the contact sheets, e.g. --sheet sheets")
    if args.sheet is not None and _is_inside(args.index, args.sheet):
        raise ImagerecError(f"--sheet {args.sheet!r} is inside the index {args.index}; give a folder elsewhere, e.g. --sheet sheets")
    index = load_index(args.index)
    table = index.search(args.queries, top_k=args.top_k, nprobe=args.nprobe, rerank=args.rerank, device=args.device)
    text = {
        "table": lambda: table.to_string(index=False, float_format=lambda v: f"{v:.4f}") + "\n",
        "csv": lambda: table.to_csv(index=False),
        "json": lambda: json.dumps(table.to_dict("records"), indent=1) + "\n",  # pandas' to_json writes "\/"
    }[args.format]()
    if args.out:
        write_text_atomic(args.out, text)
        print(f"wrote {table['query'].nunique()} query result(s) to {args.out}")
    else:
        print(text, end="")
    print(f"searched with {index.describe()}", file=sys.stderr)
    if args.sheet:
        sheets = write_sheets(table, args.sheet)
        print(f"wrote {len(sheets)} contact sheet(s) to {args.sheet}", file=sys.stderr)


def _run_train(args) -> None:
    from dataclasses import fields  # noqa: PLC0415

    from .training import TrainConfig, load_config, train  # noqa: PLC0415

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = None if args.resume and not args.config and not any(v is not None for v in overrides.values()) else load_config(args.config, **overrides)
    if args.resume and config is not None:
        raise ImagerecError("--resume continues a run with its own settings; drop the other flags (or start a new run with --out)")
    if args.pseudo_share is not None and not args.unlabeled:
        raise ImagerecError("--pseudo-share applies to --unlabeled; give the unlabelled images with --unlabeled MORE")
    if args.unlabeled:
        from .suggest import PSEUDO_SHARE, train_semi_supervised  # noqa: PLC0415

        if args.resume or not (args.data and args.out):
            raise ImagerecError("--unlabeled starts a new run: give DATA and --out (a semi-supervised run is not resumed)")
        share = PSEUDO_SHARE if args.pseudo_share is None else args.pseudo_share
        result, info = train_semi_supervised(args.data, args.unlabeled, args.out, config, share=share, progress=not args.no_progress)
        print(f"pseudo-labelled {info['pseudo_labelled']:,} of {info['unlabelled_images']:,} unlabelled images "
              f"(the surest {info['share']:.0%} of each class's) in {info['seconds']:.0f} s")  # fmt: skip
    else:
        result = train(args.data, args.out, config, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    print(f"run folder: {result.run_dir}" + _best_text(result))


def _best_text(result) -> str:
    """Which epoch the best checkpoint holds, and its validation accuracy."""
    rows = {row["epoch"]: row for row in result.history}
    kept, highest = rows.get(result.best_epoch, {}).get("val_acc"), result.best_val_accuracy
    if kept is None:
        return ""
    text = f"  best checkpoint: epoch {result.best_epoch}, val accuracy {kept:.4f}"
    return text + (f" (the highest was {highest:.4f}; this later epoch is within one standard error of it)" if kept < highest else "")


def _run_evaluate(args) -> None:
    from .classifier import Classifier  # noqa: PLC0415

    clf = Classifier.load(args.checkpoint, device=args.device)
    report = clf.evaluate(
        args.data, split=args.split, out=args.out, tta=args.tta, batch_size=args.batch_size, max_pixels=args.max_pixels,
        allow_outside=args.allow_outside, progress=True,
    )
    s = report.summary
    calibration = f" (before calibration {s['ece_uncalibrated']:.4f}, T={s['temperature']:.2f})" if "ece_uncalibrated" in s else ""
    print(f"accuracy {s['accuracy']:.4f}  macro F1 {s['macro_f1']:.4f}  ECE {s['ece']:.4f}{calibration}  on {s['images']:,} images  -> {args.out}")


def _check_result_file(out: str | None, fmt: str, stem: str, inside: str | None = None) -> None:
    """``--out`` of a command that writes one result file, checked before the work: a file name,
    in a folder (and, with ``inside``, not in that folder: an index is not a place for results)."""
    if out is None:
        return
    if os.path.isdir(out) or not os.path.basename(out):
        raise ImagerecError(f"--out {out!r} is a folder; give a file name for the {fmt} result, e.g. --out {stem}.{fmt}")
    if inside is not None and _is_inside(inside, out):
        raise ImagerecError(f"--out {out!r} is inside the index {inside}; write the {fmt} result elsewhere, e.g. --out {stem}.{fmt}")


def _is_inside(folder: str, path: str) -> bool:
    folder = os.path.abspath(folder)
    return os.path.commonpath([folder, os.path.abspath(path)]) == folder


def _run_predict(args) -> None:
    from .prediction import format_predictions, predict_top_k  # noqa: PLC0415

    _check_result_file(args.out, args.format, "predictions")
    rows = predict_top_k(args.checkpoint, args.paths, top_k=args.top_k, tta=args.tta, device=args.device)
    text = format_predictions(rows, args.format)
    if args.out:
        from ._io import write_text_atomic  # noqa: PLC0415

        write_text_atomic(args.out, text)
        print(f"wrote {len(rows)} prediction(s) to {args.out}")
    else:
        print(text, end="")


def _run_export(args) -> None:
    from .export import export_model  # noqa: PLC0415

    path = export_model(args.checkpoint, args.out, format=args.format, image_size=args.image_size, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); outputs match PyTorch's")


def _run_compress(args) -> None:
    from pathlib import Path  # noqa: PLC0415

    from .checkpoint import resolve_checkpoint  # noqa: PLC0415
    from .compress import prune, quantize  # noqa: PLC0415

    if args.quantize is None and args.prune is None:
        raise ImagerecError("nothing to do: give --quantize int8|dynamic, --prune AMOUNT, or both")
    if args.prune is not None and not args.data:
        raise ImagerecError("--prune needs --data: labelled images to fine-tune the pruned model on")
    model = args.checkpoint
    folder = Path(model).parent if Path(model).is_file() else Path(model)
    if args.prune is not None:
        pruned_out = args.out if args.out and args.quantize is None else folder / f"pruned{round(args.prune * 100)}.safetensors"
        model = prune(
            resolve_checkpoint(model), pruned_out, amount=args.prune, data=args.data, epochs=args.epochs, device=args.device,
            val_fraction=args.val_fraction, progress=not args.no_progress, allow_outside=args.allow_outside,
        )
        print(f"wrote {model}")
    if args.quantize is not None:
        stem = Path(model).stem if Path(model).is_file() else "model"
        out = args.out or folder / f"{stem}.{args.quantize}.onnx"
        path = quantize(
            model, out, mode=args.quantize, calib=args.calib, split=args.calib_split, calib_images=args.calib_images,
            method=args.calib_method, allow_outside=args.allow_outside,
        )
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _run_cluster(args) -> None:
    from .clustering import cluster_images  # noqa: PLC0415 - fast --help
    from .data import DEFAULT_MAX_PIXELS  # noqa: PLC0415

    result = cluster_images(
        args.data,
        args.method,
        args.k,
        out=args.out,
        params=_cluster_params(args),
        k_range=tuple(args.k_range),
        backbone=args.backbone,
        split=args.split,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        tta=args.tta,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        normalize=not args.no_normalize,
        pca_dim=None if args.pca_dim.lower() == "none" else args.pca_dim if args.pca_dim == "auto" else _parse_value(args.pca_dim),
        whiten=args.whiten,
        random_state=args.seed,
        export_manifest=args.export_manifest,
        map_method=args.map_method,
        adapt=args.adapt,
        adapt_params={"epochs": args.adapt_epochs} if args.adapt_epochs else None,
        progress=not args.no_progress,
        allow_outside=args.allow_outside,
    )
    if result.k_selection is not None:
        print(f"k=auto, scored with {result.k_selection.scored_with}: {result.k_selection.rule}")
        print(result.k_selection.table())
    s = result.summary
    figures = [f"{s['n_clusters']} clusters of {s['n_images']:,} images", f"noise {s['noise_fraction']:.1%}"]
    figures += [f"silhouette {s['silhouette']:.3f}"] if s["silhouette"] is not None else []
    figures += [f"{key.upper()} {s[key]:.4f}" for key in ("acc", "nmi", "ari", "purity") if key in s]
    print("  ".join(figures))
    print(f"run folder: {args.out}  (open {os.path.join(args.out, 'gallery.html')} in a browser)")


def _run_audit(args) -> None:
    from .audit import THRESHOLD_NAMES, audit  # noqa: PLC0415 - fast --help
    from .data import DEFAULT_MAX_PIXELS  # noqa: PLC0415

    thresholds = {name: getattr(args, f"{name}_threshold") for name in THRESHOLD_NAMES}
    if os.path.isfile(os.path.join(args.data, "meta.json")):  # an index folder: its vectors, in blocks
        return _run_audit_index(args, thresholds)
    result = audit(
        args.data,
        out=args.out,
        checks=args.checks,
        backbone=args.backbone,
        split=args.split,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        tta=not args.no_tta,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        allow_outside=args.allow_outside,
        thresholds={name: value for name, value in thresholds.items() if value is not None},
        k=args.neighbours,
        export_manifest=args.export_manifest,
        relabel=args.relabel,
        random_state=args.seed,
        progress=not args.no_progress,
    )
    s = result.summary
    print(f"{s['n_images']:,} images audited, {s['n_unreadable']} unreadable")
    for name, counts in s["counts"].items():
        if name != "unreadable":
            print(f"  {name}: " + ", ".join(f"{value} {key}" for key, value in counts.items()))
    for name, why in s["not_run"].items():
        print(f"  {name}: not run ({why})")
    print(f"run folder: {args.out}  (open {os.path.join(args.out, 'report.html')} in a browser)")


def _run_audit_index(args, thresholds: dict) -> None:
    from .audit import NEAR_DUPLICATE_THRESHOLD, audit_index  # noqa: PLC0415

    others = [f"--{name.replace('_', '-')}-threshold" for name, v in thresholds.items() if v is not None and name != "near_duplicates"]
    if args.checks or others or args.export_manifest:
        raise ImagerecError(
            f"{args.data} is an index: its audit checks near-duplicates and leakage of the vectors only; "
            "drop --checks, --export-manifest and the other checks' thresholds (audit the images for the rest)"
        )
    done = audit_index(args.data, out=args.out, threshold=thresholds["near_duplicates"] or NEAR_DUPLICATE_THRESHOLD,
                       k=args.neighbours, progress=not args.no_progress)  # fmt: skip
    s = done.summary
    print(f"{s['n_vectors']:,} vectors of the index audited in blocks ({s['search']})")
    for name, counts in s["counts"].items():
        print(f"  {name}: " + ", ".join(f"{value} {key}" for key, value in counts.items()))
    print(f"run folder: {args.out}  (near_duplicates.csv, leakage.csv, summary.json)")


def _cluster_params(args) -> dict:
    """The method's own parameters: the named flags, then any --param KEY=VALUE."""
    named = {"eps": args.eps, "min_samples": args.min_samples, "min_cluster_size": args.min_cluster_size, "linkage": args.linkage, "epochs": args.epochs}
    params = {key: value for key, value in named.items() if value is not None}
    if "eps" in params and params["eps"] != "auto":
        params["eps"] = _parse_value(params["eps"])
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ImagerecError(f"--param {item!r} must look like KEY=VALUE, e.g. --param n_neighbors=30")
        params[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return params


def _parse_value(text: str):
    """A command-line value as int, float, bool or None where it reads as one, else the text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _run_serve(args) -> None:
    from ._decode import DEFAULT_MAX_PIXELS  # noqa: PLC0415
    from .serve import ServeConfig, serve  # noqa: PLC0415

    config = ServeConfig(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_images=args.max_images, max_body_mb=args.max_body_mb, timeout_s=args.timeout,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, watch=args.watch, watch_interval_s=args.watch_interval,
        precision=args.precision, min_int8_agreement=args.min_int8_agreement, tune_batch=not args.no_tune_batch,
    )
    serve(
        args.model, host=args.host, port=args.port, token=args.token, insecure_no_token=args.insecure_no_token,
        engine=args.engine, device=args.device, threads=args.threads, config=config, log_level=args.log_level,
    )


def _run_studio(args) -> None:
    from .studio import serve  # noqa: PLC0415 - fast --help

    k = None if args.k in (None, "auto") else _parse_value(args.k)
    if k is not None and not isinstance(k, int):
        raise ImagerecError(f"--k {args.k!r} must be a whole number of clusters or 'auto'")
    serve(args.data, args.project, port=args.port, open_browser=args.open, k=k, backbone=args.backbone, image_size=args.image_size)


def _run_label(args) -> None:
    from .data import DEFAULT_MAX_PIXELS  # noqa: PLC0415
    from .suggest import label_collection  # noqa: PLC0415

    s, picks = label_collection(
        args.data, args.labels, args.out, split=args.split, next_count=args.next_count, backbone=args.backbone, cache_dir=args.cache,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, allow_outside=args.allow_outside, progress=not args.no_progress,
    )  # fmt: skip
    labelled = sum(v is not None for v in s.labels)
    disagree = int(s.suggester.disagrees_.sum())
    print(f"imagerec label: {len(s.labels)} images, {labelled} labelled, {len(s.classes)} classes; "
          f"{disagree} label(s) disagree with the others; {len(picks)} ranked to label next -> {args.out}")


def _run_quickstart(args) -> None:
    from ._quickstart import quickstart  # noqa: PLC0415

    quickstart(args.data, args.out, time_budget=args.time_budget, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ImagerecError as e:
        print(f"imagerec {args.command}: error: {_printable(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the system around the data: a full disk, a permission, a vanished file
        print(f"imagerec {args.command}: error: {_printable(_os_error(e))}", file=sys.stderr)
        return 2
    except UnicodeError as e:
        print(f"imagerec {args.command}: error: {_printable(_one_line(e))}; a file name or text file is not in the expected encoding: rename it or save it as UTF-8", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagerec: interrupted", file=sys.stderr)
        return 130
    return 0


_OS_FIXES = {
    errno.ENOSPC: "free some disk space or write elsewhere (--out), then run again",
    errno.EDQUOT: "free some space in your quota or write elsewhere (--out), then run again",
    errno.EACCES: "check the permissions, or write elsewhere (--out)",
    errno.EPERM: "check the permissions, or write elsewhere (--out)",
    errno.EROFS: "the file system is read-only: write elsewhere (--out)",
    errno.ENOENT: "check the path",
}


def _os_error(e: OSError) -> str:
    """An OSError as one line: the file, what the system said, and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or _one_line(e) or type(e).__name__
    return f"{where}{what}; {_OS_FIXES.get(e.errno, 'check the path, the disk and the permissions, then run again')}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\t``, ``\\x1b``): a file name
    holding a newline or a terminal escape stays on the error's one line and cannot rewrite the screen."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


if __name__ == "__main__":
    sys.exit(main())
