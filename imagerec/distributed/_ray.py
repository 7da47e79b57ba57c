"""``imagerec embed DATA --ray [ADDRESS]``: the parts of a collection embedded by a pool of Ray actors."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .._identity import file_identity
from ..checkpoint import feature_model
from ..data import DEFAULT_MAX_PIXELS, ImageSource, Preprocessing, load_images
from ..data._cache import _common_small_size
from ..embedding import Embeddings, _weights_digest, embed
from ..errors import ImagerecError

PART_SIZE = 4096  # images per part: the unit of work of one actor call, and of resuming
LOCAL_OBJECT_STORE = 256 * 1024**2  # bytes: a local cluster's object store (rows carry paths, not pixels)
PART_GLOB = "part-*.npz"


@dataclass
class PartPlan:
    """One part of the collection: which images, and the file that holds their embeddings.

    Attributes:
        index: the part's number (0..count-1), in the collection's order.
        rows: positions of its images in the source.
        key: digest of the model, the part's paths and their files' identities.
        file: ``OUT/part-NNNNN-<key>.npz``.
    """

    index: int
    rows: np.ndarray
    key: str
    file: Path

    @property
    def done(self) -> bool:
        return self.file.is_file()


@dataclass
class EmbedOnRay:
    """What :func:`embed_on_ray` did.

    Attributes:
        parts: every part file of the collection, in order (pass them to ``imagerec index --parts``).
        embedded: images embedded by this run (the images of the parts that were missing).
        reused: parts found complete from an earlier run, not embedded again.
        skipped: unreadable images left out by this run's parts.
        removed: stale part files removed (from another model, or files that changed since).
        seconds: wall time of the run; ``workers``: the actors' own seconds per part.
        nodes: the Ray nodes whose actors embedded this run's parts.
    """

    parts: list[Path]
    embedded: int
    reused: int
    skipped: int
    removed: int
    seconds: float
    workers: list[float] = field(default_factory=list)
    nodes: set[str] = field(default_factory=set)


def plan_parts(source: ImageSource, weights: str, out: str | os.PathLike, part_size: int = PART_SIZE) -> list[PartPlan]:
    """Split ``source`` into parts of ``part_size`` images, each named by what it is made from.

    Args:
        source: the images, in the order the parts follow.
        weights: digest of the model's weights and preprocessing (``imagerec.embedding._weights_digest``).
        out: the parts' folder.
        part_size: images per part.

    Returns:
        The plan, one :class:`PartPlan` per part; a part whose file exists is done.
    """
    count = max(1, -(-len(source) // part_size))
    width = max(5, len(str(count - 1)))
    plans = []
    for index in range(count):
        rows = np.arange(index * part_size, min((index + 1) * part_size, len(source)), dtype=np.int64)
        digest = hashlib.sha256(f"{weights}|{index}/{count}|{len(source)}".encode())
        for i in rows:
            path = source.paths[i]
            digest.update(b"\n" + os.fsencode(os.path.abspath(path)) + b"|" + file_identity(path).encode())
        key = digest.hexdigest()[:16]
        plans.append(PartPlan(index, rows, key, Path(out) / f"part-{index:0{width}d}-{key}.npz"))
    return plans


def embed_on_ray(
    data,
    out: str | os.PathLike,
    backbone: str | nn.Module = "efficientnet_lite0",
    *,
    address: str | None = None,
    split: str | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int = 64,
    device: str | None = None,
    engine: str = "auto",
    actors: int | None = None,
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    part_size: int = PART_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
    progress: bool = True,
    init_args: dict | None = None,
) -> EmbedOnRay:
    """Embed a collection on a Ray cluster into content-keyed part files in the folder ``out``.

    On a cluster, ``out`` must be a folder every node can write (a shared file system), as the
    actors write the parts themselves. Run again after a kill, it embeds only the parts not yet
    written; parts of other runs (another model, files changed since) are removed at the end.

    Args:
        data: image files: a folder, a split root or a CSV manifest (see :func:`~imagerec.load_images`).
            Images held in arrays (``cifar10``) cannot be sent to other machines by path.
        out: the parts' folder (created).
        backbone: registry name or model (the model itself is sent to the actors, so every part
            is made by the same weights).
        address: the Ray cluster: None starts a local one on this machine (or uses the one this
            process already joined); ``"auto"`` joins the cluster this machine belongs to;
            ``"ray://HOST:10001"`` or ``"HOST:6379"`` a remote one.
        split: one split of the data, or None.
        image_size: input side in pixels (default: the backbone's).
        crop_pct: centre-crop share (default: the backbone's, 1.0 for images smaller than the input,
            the rule of :func:`~imagerec.embed`, decided once for every part).
        batch_size: images per forward pass in each actor.
        device: each actor's device; default ``"cuda"`` when ``gpus_per_actor`` > 0, else ``"cpu"``.
        engine: ``"auto"``, ``"torch"`` or ``"onnx"`` (see :func:`~imagerec.embed`).
        actors: size of the actor pool (default: the cluster's CPUs / ``cpus_per_actor``, or its
            GPUs / ``gpus_per_actor``).
        cpus_per_actor: CPUs each actor reserves (its ONNX Runtime or PyTorch threads).
        gpus_per_actor: GPUs each actor reserves (0: CPU actors).
        part_size: images per part file.
        max_pixels: decompression-bomb limit per image.
        allow_outside: read CSV manifest rows whose paths lead outside the manifest's folder.
        progress: a progress bar over the images.
        init_args: more arguments for ``ray.init`` (e.g. ``{"num_cpus": 2}``).

    Returns:
        An :class:`EmbedOnRay`.

    Raises:
        ImagerecError: ray not installed, bad arguments, images held in arrays, or an ``out``
            that is a file (all before any work).
    """
    # 1. validate before any work
    if importlib.util.find_spec("ray") is None:
        raise ImagerecError("--ray needs Ray: pip install 'imagerec[ray]' (or leave out --ray to embed on this machine)")
    for name, value, least in (("part_size", part_size, 1), ("batch_size", batch_size, 1), ("actors", actors or 1, 1)):
        if value < least:
            raise ImagerecError(f"{name}={value} must be at least {least}")
    if not cpus_per_actor > 0 or gpus_per_actor < 0:
        raise ImagerecError(
            f"cpus_per_actor={cpus_per_actor} must be > 0 and gpus_per_actor={gpus_per_actor} >= 0; e.g. 1 CPU, or 1 GPU per actor"
        )
    device = device or ("cuda" if gpus_per_actor > 0 else "cpu")
    if gpus_per_actor > 0 and device == "cpu":
        raise ImagerecError(f"gpus_per_actor={gpus_per_actor} with device 'cpu': give --device cuda, or no GPUs per actor")
    out = Path(out)
    if out.is_file() or out.suffix.lower() == ".npz":
        raise ImagerecError(f"{out}: with --ray, --out is a folder for the part files (e.g. --out {out.with_suffix('')}_parts)")
    source = data if isinstance(data, ImageSource) else load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)
    if source.pixels is not None:
        raise ImagerecError(
            f"{source.root}: its images are held in arrays, which the cluster cannot read by path; "
            "give image files (a folder or a CSV manifest), or embed without --ray"
        )
    if not len(source):
        raise ImagerecError(f"{source.root}: no images to embed")

    # 2. the model and its preprocessing, decided once for every part
    model = feature_model(backbone)
    name = getattr(model, "backbone_name", type(model).__name__)
    pp = model.preprocessing.resolve(image_size, crop_pct)
    small = _common_small_size(source.paths) if crop_pct is None else None
    if small is not None and max(small) < pp.input_size:
        pp = pp.resolve(crop_pct=1.0)  # as embed does: small images are upsampled whole
    plans = plan_parts(source, _weights_digest(model, pp, name), out, part_size)
    todo = [p for p in plans if not p.done]
    out.mkdir(parents=True, exist_ok=True)

    # 3. the missing parts, embedded by the actor pool
    started, workers, nodes, embedded, skipped = time.perf_counter(), [], set(), 0, 0
    if todo:
        rows = [_row(p, source, len(plans)) for p in todo]
        for result in _run(rows, model, pp, name, source, address, actors, cpus_per_actor, gpus_per_actor, device, engine,
                           batch_size, max_pixels, progress, init_args):  # fmt: skip
            embedded += result["embedded"]
            skipped += result["skipped"]
            workers.append(result["seconds"])
            nodes.add(result["node"])
    missing = [p.file for p in plans if not p.done]
    if missing:
        raise ImagerecError(f"{len(missing)} part(s) were not written (e.g. {missing[0]}); run the same command again to finish them")

    # 4. stale parts of other runs, removed only once this run is complete
    keep = {p.file.name for p in plans}
    stale = [f for f in out.glob(PART_GLOB) if f.name not in keep] + list(out.glob(".part-*.tmp*"))
    for f in stale:
        f.unlink(missing_ok=True)
    return EmbedOnRay([p.file for p in plans], embedded, len(plans) - len(todo), skipped, len(stale), time.perf_counter() - started, workers, nodes)


def _row(plan: PartPlan, source: ImageSource, count: int) -> dict:
    labels = [] if source.labels is None else source.labels[plan.rows].tolist()
    return {
        "part": plan.index, "count": count, "images": len(source), "key": plan.key, "file": str(plan.file),
        "paths": [source.paths[i] for i in plan.rows], "labels": labels,
    }  # fmt: skip


def _run(rows, model, pp, name, source, address, actors, cpus, gpus, device, engine, batch_size, max_pixels, progress, init_args):
    """Yield one small record per part as the actors finish them (the parts are on disk by then)."""
    import ray  # noqa: PLC0415 - optional; only --ray needs it

    started_here = not ray.is_initialized()
    if started_here:
        extra = {} if address not in (None, "local") else {"object_store_memory": LOCAL_OBJECT_STORE}
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, **{**extra, **(init_args or {})})  # fmt: skip
    try:
        resources = ray.cluster_resources()
        if actors is None:
            actors = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // cpus)
        actors = max(1, min(actors, len(rows)))
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        embedded = dataset.map_batches(
            _PartEmbedder,
            batch_size=1,
            batch_format="pandas",
            fn_constructor_kwargs={
                "model": model, "pp": pp.to_dict(), "name": name, "classes": source.classes, "device": device,
                "engine": engine, "batch_size": batch_size, "max_pixels": max_pixels, "workers": max(0, int(cpus) - 1),
            },  # fmt: skip
            compute=ray.data.ActorPoolStrategy(size=actors),  # a fixed pool (concurrency= is deprecated since Ray 2.51)
            num_cpus=cpus,
            num_gpus=gpus or None,
        )
        total = sum(len(r["paths"]) for r in rows)
        with tqdm(total=total, desc=f"embed {name} on {actors} Ray actor(s)", unit="img", disable=not progress) as bar:
            for record in embedded.iter_rows():
                bar.update(int(record["embedded"]) + int(record["skipped"]))
                yield {key: record[key] for key in ("embedded", "skipped", "seconds", "node")}
    finally:
        if started_here:
            ray.shutdown()


class _PartEmbedder:
    """A Ray actor: embeds whole parts with one model and writes each part file atomically."""

    def __init__(self, model, pp, name, classes, device, engine, batch_size, max_pixels, workers):
        self.model, self.pp, self.name, self.classes = model, Preprocessing.from_dict(pp), name, classes
        self.options = {"device": device, "engine": engine, "batch_size": batch_size, "max_pixels": max_pixels, "workers": workers}

    def __call__(self, batch):
        import pandas as pd  # noqa: PLC0415

        records = [self._part(row) for row in batch.to_dict("records")]
        return pd.DataFrame(records)

    def _part(self, row: dict) -> dict:
        import ray  # noqa: PLC0415

        started = time.perf_counter()
        paths = [str(p) for p in row["paths"]]
        labels = np.asarray(row["labels"], dtype=np.int64) if self.classes is not None else None
        source = ImageSource(paths, labels, self.classes, f"part {row['part']}", max_pixels=self.options["max_pixels"])
        try:
            result = embed(source, self.model, image_size=self.pp.input_size, crop_pct=self.pp.crop_pct, progress=False, **self.options)
        except ImagerecError:  # no image of the part could be read: an empty part, so the set stays complete
            dim = int(getattr(self.model, "num_features", 0))
            result = Embeddings(np.zeros((0, dim), np.float32), [], None if labels is None else labels[:0], self.classes,
                                self.name, self.pp, skipped=[None] * len(paths))  # fmt: skip
        assert result.preprocessing == self.pp, "every part is embedded with the preprocessing decided on the driver"
        shard = {"index": int(row["part"]), "count": int(row["count"]), "images": int(row["images"])}
        result.save(row["file"], meta={"shard": shard, "key": row["key"]})
        return {"part": int(row["part"]), "embedded": len(result), "skipped": len(result.skipped), "seconds": time.perf_counter() - started,
                "node": ray.get_runtime_context().get_node_id()}  # fmt: skip

