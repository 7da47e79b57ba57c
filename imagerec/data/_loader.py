"""Batches of model-ready tensors from an :class:`ImageSource`, decode overlapped with compute.

Array-backed sources (CIFAR batches, the decode cache) are sliced, resized and augmented a
whole batch at a time in a background thread. File-backed sources are decoded and transformed
image by image in DataLoader worker processes. Either way an unreadable image never stops the
run: it is dropped from its batch and reported in ``Batch.skipped``.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._decode import DecodeError, Skipped
from ._sources import ImageSource
from .transforms import BatchAugment, Preprocessing, eval_transform, train_transform


@dataclass
class Batch:
    """One batch ready for a model.

    Attributes:
        images: float32 tensor of shape (N, 3, S, S), normalised, channels_last.
        labels: int64 tensor of shape (N,), or None for unlabelled sources.
        indices: int64 tensor of shape (N,): each image's position in the source.
        skipped: (position, :class:`Skipped`) for each image of this batch that could not be read.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor
    skipped: list[tuple[int, Skipped]] = field(default_factory=list)


def iter_batches(
    source: ImageSource,
    pp: Preprocessing,
    *,
    batch_size: int,
    indices: np.ndarray | None = None,
    augment: str | None = None,
    shuffle: bool = False,
    seed: int = 0,
    workers: int | None = None,
    drop_last: bool = False,
    start_batch: int = 0,
    prefetch: bool = True,
) -> Iterator[Batch]:
    """Yield batches of ``source`` prepared by ``pp``.

    Args:
        source: the images.
        pp: preprocessing resolved to the input size.
        batch_size: images per batch.
        indices: which images, in which order (default: all, in order).
        augment: None for evaluation transforms; else a training augmentation
            (``"none"``, ``"default"``, ``"strong"``).
        shuffle: visit ``indices`` in a random order drawn from ``seed``.
        seed: seed for the order and the augmentation.
        workers: decoding processes for file-backed sources (default: the number of CPUs).
        drop_last: drop a last batch smaller than ``batch_size`` (for training).
        start_batch: skip this many batches (to resume an epoch). For in-memory sources each
            batch's augmentation is drawn from ``(seed, batch number)``, so a resumed epoch
            draws exactly what the uninterrupted one would.
        prefetch: prepare in-memory batches a step ahead in a thread. Worth it when the model
            runs elsewhere (a GPU); on a CPU the thread's kernels compete with the model's for
            the same cores, so training there prepares each batch in turn.
    """
    order = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng(seed).permutation(order)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    if source.pixels is not None:
        batches = _array_batches(source, pp, chunks, augment, seed, start_batch)
        yield from _prefetch(batches) if prefetch else batches
    else:
        yield from _file_batches(source, pp, chunks[start_batch:], augment, seed + start_batch, workers)


def _array_batches(source, pp, chunks, augment, seed, start_batch) -> Iterator[Batch]:
    evaluate = eval_transform(pp, batched=True)
    augmenter = None if augment is None else BatchAugment(pp, augment)
    labels = None if source.labels is None else torch.from_numpy(np.asarray(source.labels))
    for number in range(start_batch, len(chunks)):
        chunk = chunks[number]
        if isinstance(source.pixels, np.memmap):
            chunk = np.sort(chunk)  # read the mapped file front to back
        pixels = torch.from_numpy(np.ascontiguousarray(source.pixels[chunk]))
        pixels = pixels.permute(0, 3, 1, 2)  # NHWC -> NCHW view: already channels_last
        if augmenter is None:
            images = evaluate(pixels)
        else:
            images = augmenter(pixels, torch.Generator().manual_seed(seed * 1_000_003 + number))
        index = torch.from_numpy(chunk)
        yield Batch(
            images.contiguous(memory_format=torch.channels_last),
            None if labels is None else labels[index],
            index,
        )


def _prefetch(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """Run ``batches`` one or two steps ahead in a thread (torch releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in batches:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer and raised there
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="imagerec-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class _FileDataset(Dataset):
    def __init__(self, source: ImageSource, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image, label = self.source[index]
        except DecodeError as e:
            return None, Skipped(self.source.paths[index], str(e)), index
        return self.transform(image), label, index


def _collate(items) -> Batch:
    good = [it for it in items if it[0] is not None]
    skipped = [(it[2], it[1]) for it in items if it[0] is None]
    if not good:
        empty = torch.empty(0)
        return Batch(empty, None, torch.empty(0, dtype=torch.int64), skipped)
    images = torch.stack([it[0] for it in good]).contiguous(memory_format=torch.channels_last)
    labels = None if good[0][1] is None else torch.tensor([it[1] for it in good], dtype=torch.int64)
    return Batch(images, labels, torch.tensor([it[2] for it in good], dtype=torch.int64), skipped)


def _seed_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # a decoding worker must not compete with the model's threads


def _file_batches(source, pp, chunks, augment, seed, workers) -> Iterator[Batch]:
    transform = eval_transform(pp) if augment is None else train_transform(pp, augment)
    workers = (os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(
        _FileDataset(source, transform),
        batch_sampler=[c.tolist() for c in chunks],
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    yield from loader
