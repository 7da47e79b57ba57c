"""Sharded embedding: N processes, under any launcher, each embed a deterministic 1/N of the images.

Shard ``I/N`` (``I`` counted from 0, like torchrun's ``RANK`` or a Ray task index; ``auto``
reads the launcher's environment) takes the images at positions ``I, I+N, I+2N, ...`` of the list sorted by path.
Strided, not contiguous, so that every shard gets a share of every class folder and the shards
take about equally long. The part file records ``shard = {index, count, images}`` in its meta,
so that merging (:func:`merge_parts`) can tell a missing shard or an overlap from a complete set.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from .._io import atomic_path
from ..data import DEFAULT_MAX_PIXELS, Preprocessing, load_images
from ..embedding import Embeddings, embed
from ..errors import ImagerecError


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``; ``"auto"`` reads the launcher's environment.

    ``auto`` takes a Slurm array's ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of
    ``SLURM_ARRAY_TASK_COUNT``, else torchrun's (or any MPI-style launcher's) ``RANK`` of
    ``WORLD_SIZE``: under torchrun the shell expands ``$RANK`` once, before the processes exist,
    so ``auto`` is the way to shard there.

    Raises:
        ImagerecError: not of the form I/N with 0 <= I < N, or ``auto`` outside a launcher.
    """
    if str(text).strip().lower() == "auto":
        text = _from_environment()
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not int(match[1]) < int(match[2]):
        raise ImagerecError(
            f"--shard {text!r} must be I/N with 0 <= I < N (I counts from 0), e.g. --shard 0/4 ... --shard 3/4, "
            "or --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"
        )
    return int(match[1]), int(match[2])


def _from_environment() -> str:
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}"
    if "RANK" in env and "WORLD_SIZE" in env:
        return f"{env['RANK']}/{env['WORLD_SIZE']}"
    raise ImagerecError(
        "--shard auto: no launcher found (neither SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT nor RANK/WORLD_SIZE is set); "
        "give --shard I/N"
    )


def shard_path(out: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """``out`` with ``{shard}`` replaced by the shard's number (zero-padded: part-{shard}.npz -> part-003.npz)."""
    index, count = shard
    return Path(str(out).replace("{shard}", f"{index:0{len(str(count - 1))}d}"))


def shard_indices(paths: list[str], index: int, count: int) -> np.ndarray:
    """Positions in ``paths`` of shard ``index`` of ``count``: every count-th image by sorted path."""
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    return np.sort(np.asarray(order[index::count], dtype=np.int64))


def embed_shard(
    data: str | os.PathLike,
    backbone: str = "efficientnet_lite0",
    *,
    shard: str | tuple[int, int],
    out: str | os.PathLike,
    split: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
    **embed_args,
) -> Embeddings:
    """Embed shard ``I/N`` of ``data`` into the part file ``out``.

    Args:
        data: a data set spec for :func:`~imagerec.load_images`.
        backbone: registry name; every shard must use the same one.
        shard: ``"I/N"``, ``(I, N)`` or ``"auto"`` (see :func:`parse_shard`).
        out: the part's ``.npz`` file (resumable like :func:`~imagerec.embed`'s); ``{shard}`` in
            it becomes the shard's number, for launchers that start every process with one command.
        split: one split of the data, or None.
        max_pixels: decompression-bomb limit per image.
        allow_outside: read CSV manifest rows whose paths lead outside the manifest's folder.
        embed_args: passed to :func:`~imagerec.embed` (image_size, batch_size, device...).

    Returns:
        The shard's embeddings.

    Raises:
        ImagerecError: a bad shard, or more shards than images.
    """
    index, count = parse_shard(f"{shard[0]}/{shard[1]}" if isinstance(shard, tuple) else shard)
    out = shard_path(out, (index, count))
    source = load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)
    if count > len(source):
        raise ImagerecError(f"--shard {index}/{count}: {source.root} has only {len(source)} images; use at most {len(source)} shards")
    part = source.subset(shard_indices(source.paths, index, count))
    result = embed(part, backbone, out=out, max_pixels=max_pixels, **embed_args)
    _record_shard(out, {"index": index, "count": count, "images": len(source)})
    return result


def _record_shard(path: Path, shard: dict) -> None:
    """Add ``shard`` to the meta of the part file (rewritten atomically; still a plain embeddings file)."""
    with np.load(path, allow_pickle=False) as d:
        arrays = {key: d[key] for key in d.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.asarray(json.dumps({**meta, "shard": shard}))
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_shard(path: str | os.PathLike) -> dict | None:
    """The ``shard`` record of a part file, or None for an embeddings file made without --shard.

    Raises:
        ImagerecError: a record that is not ``{index, count, images}`` with 0 <= index < count.
    """
    try:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # Embeddings.load gives the one-line error
    shard = meta.get("shard") if isinstance(meta, dict) else None
    if shard is None:
        return None
    whole = isinstance(shard, dict) and all(type(shard.get(k)) is int for k in ("index", "count", "images"))
    if not (whole and 0 <= shard["index"] < shard["count"] and shard["images"] >= 0):
        raise ImagerecError(
            f"{path}: its shard record {shard!r} is not index/count/images with 0 <= index < count (a damaged part); "
            "embed that shard again with 'imagerec embed --shard I/N'"
        )
    return shard


def merge_parts(parts: list[str | os.PathLike]) -> Embeddings:
    """One :class:`~imagerec.Embeddings` from the part files of a sharded run.

    The parts must share backbone and preprocessing and must not overlap; when they were made
    with ``--shard``, every shard of the run must be there, once.

    Raises:
        ImagerecError: no parts, a part missing or given twice, mixed models, or shared images.
    """
    if not parts:
        raise ImagerecError("--parts needs at least one .npz file from 'imagerec embed --shard I/N'")
    loaded = [Embeddings.load(p) for p in parts]
    first = loaded[0]
    for path, part in zip(parts, loaded):
        if (part.backbone, part.preprocessing, part.features.shape[1]) != (first.backbone, first.preprocessing, first.features.shape[1]):
            raise ImagerecError(
                f"{path}: made with {part.backbone} at {part.preprocessing.input_size} px ({part.features.shape[1]} dims), but {parts[0]} "
                f"with {first.backbone} at {first.preprocessing.input_size} px ({first.features.shape[1]} dims); "
                "embed every shard with the same --backbone and --image-size"
            )
    _check_shards(parts, [read_shard(p) for p in parts])
    seen: dict[str, str] = {}
    for path, part in zip(parts, loaded):
        for p in part.paths:
            if p in seen:
                raise ImagerecError(f"{p} is in both {seen[p]} and {path}; parts must not overlap (give each shard once)")
            seen[p] = str(path)
    return _concatenate(loaded)


def scan_parts(parts: list[str | os.PathLike]) -> tuple[int, int, str, Preprocessing]:
    """Check part files as :func:`merge_parts` does, reading only their meta and headers.

    Overlaps between parts are left to the caller (the on-disk index refuses a path given twice).

    Returns:
        (rows in all, dimension, backbone, preprocessing).

    Raises:
        ImagerecError: no parts, a part unreadable, missing or given twice, or mixed models.
    """
    from ._ondisk import part_shape  # noqa: PLC0415

    if not parts:
        raise ImagerecError("--parts needs at least one .npz file from 'imagerec embed --shard I/N' or 'imagerec embed --ray'")
    metas, rows, dims = [], 0, set()
    for path in parts:
        try:
            with np.load(path, allow_pickle=False) as d:
                meta = json.loads(str(d["meta"]))
                backbone_pp = (str(meta["backbone"]), Preprocessing.from_dict(meta["preprocessing"]))
        except FileNotFoundError:
            raise ImagerecError(f"{path}: no such embeddings file; make one with 'imagerec embed'") from None
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise ImagerecError(f"{path}: not an imagerec embeddings file ({e}); make it again with 'imagerec embed'") from None
        metas.append((*backbone_pp, read_shard(path)))  # the one check of a shard record
        n, dim = part_shape(path)
        rows += n
        dims.add(dim if n else 0)
    backbone, pp, _ = metas[0]
    for path, (b, q, _) in zip(parts, metas):
        if (b, q) != (backbone, pp):
            raise ImagerecError(
                f"{path}: made with {b} at {q.input_size} px, but {parts[0]} with {backbone} at {pp.input_size} px; "
                "embed every shard with the same --backbone and --image-size"
            )
    _check_shards(parts, [m[2] for m in metas])
    dims.discard(0)  # an empty part (every image unreadable)
    if len(dims) > 1:
        raise ImagerecError(f"the parts hold vectors of {sorted(dims)} dims; embed every part with the same backbone")
    return rows, (dims.pop() if dims else 0), backbone, pp


def _check_shards(parts, shards: list[dict | None]) -> None:
    recorded = [s for s in shards if s]
    if not recorded:
        return
    if len(recorded) != len(shards):
        plain = parts[shards.index(None)]
        raise ImagerecError(f"{plain}: was not made with --shard, unlike the other parts; merge parts of one sharded run")
    runs = {(s["count"], s["images"]) for s in recorded}
    if len(runs) > 1:
        raise ImagerecError(f"the parts come from different runs (shard count, images): {sorted(runs)}; merge the parts of one run")
    count = recorded[0]["count"]
    got = [s["index"] for s in recorded]
    twice = sorted({i for i in got if got.count(i) > 1})
    if twice:
        raise ImagerecError(f"shard {twice[0]}/{count} is given more than once; give each part once")
    missing = sorted(set(range(count)) - set(got))
    if missing:
        raise ImagerecError(
            f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing: {len(got)} of {count} parts given; "
            "run 'imagerec embed --shard' for them (or wait for them to finish) and pass every part"
        )


def _concatenate(parts: list[Embeddings]) -> Embeddings:
    classes = sorted({c for p in parts for c in (p.classes or [])}) or None
    labels = None
    if classes is not None and all(p.labels is not None for p in parts):
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.concatenate([np.asarray([lookup[p.classes[i]] for i in p.labels], dtype=np.int64) for p in parts])
    return Embeddings(
        features=np.concatenate([p.features for p in parts]),
        paths=[path for p in parts for path in p.paths],
        labels=labels,
        classes=classes if labels is not None else None,
        backbone=parts[0].backbone,
        preprocessing=parts[0].preprocessing,
    )
