"""Dynamic batching: the images of concurrent requests go through the model in one forward pass.

Requests put their prepared images on a queue. One collector task takes the first
waiting request, then keeps taking requests until ``max_batch_size`` images are gathered, and
runs them as one batch in the single forward thread; while that runs, the next requests queue
up, so under load batches fill without waiting. The collector waits for more (at most
``max_wait_ms``) only while other requests are on their way (admitted, still being read or
decoded): a lone request is never held back waiting for company that cannot come.
Requests of different kinds (logits with or without TTA, embeddings) go in separate batches.
A request larger than ``max_batch_size`` runs alone, in chunks of that size.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Job:
    kind: tuple  # ("logits", tta) or ("features",)
    images: np.ndarray  # float32 (n, 3, S, S)
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Gather prepared images into batches and run ``run(kind, batch)`` in one worker thread.

    Args:
        run: ``run(kind, batch) -> array (N, ...)``; called in the forward thread.
        max_batch_size: images per forward pass at most.
        max_wait_ms: how long the first request of a batch waits for others.
        on_batch: called with each batch's size (for metrics).
        arriving: how many requests are on their way to the queue (None: always wait).
    """

    def __init__(
        self,
        run: Callable,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] = lambda n: None,
        arriving: Callable[[], int] | None = None,
    ):
        self._run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait_ms / 1000
        self._on_batch = on_batch
        self._arriving = arriving or (lambda: 1)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imagerec-forward")

    def start(self) -> None:
        """Start the collector on the running event loop."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="imagerec-batcher")

    @property
    def waiting(self) -> int:
        """Requests queued for a forward pass."""
        return len(self._jobs)

    async def stop(self) -> None:
        """Stop the collector (requests still queued get an error) and the forward thread."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pool.shutdown(wait=True)

    async def submit(self, kind: tuple, images: np.ndarray) -> np.ndarray:
        """Queue ``images`` (float32 (n, 3, S, S)) and wait for their outputs (n, ...)."""
        job = _Job(kind, images, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._arrived.set()
        return await job.future

    async def _next(self, timeout: float | None) -> _Job | None:
        """The oldest live job, waiting up to ``timeout`` seconds (None: forever) for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._jobs:
                job = self._jobs.popleft()
                if not job.future.done():  # a done one was cancelled: its request timed out
                    return job
            self._arrived.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:  # an Event, not Queue.get, so that a timeout can never lose a job
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return None

    async def _collect(self) -> None:
        while True:
            first = await self._next(None)
            jobs, count = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch_size:
                job = self._next_nowait_fitting(first.kind, self.max_batch_size - count)
                if job is None:
                    if self._jobs:  # the next one does not fit this batch: it starts the next
                        break
                    if not self._arriving():  # nobody else is coming
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
                    continue
                jobs.append(job)
                count += len(job.images)
            await self._forward(jobs)

    def _next_nowait_fitting(self, kind: tuple, room: int) -> _Job | None:
        """Pop the oldest live job if it is of ``kind`` and has at most ``room`` images."""
        while self._jobs and self._jobs[0].future.done():
            self._jobs.popleft()
        if self._jobs and self._jobs[0].kind == kind and len(self._jobs[0].images) <= room:
            return self._jobs.popleft()
        return None

    async def _forward(self, jobs: list[_Job]) -> None:
        batch = np.concatenate([job.images for job in jobs]) if len(jobs) > 1 else jobs[0].images
        kind = jobs[0].kind
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, self._chunked, kind, batch)
        except Exception as e:  # noqa: BLE001 - handed to every waiting request, which answers 500
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        start = 0
        for job in jobs:
            stop = start + len(job.images)
            if not job.future.done():
                job.future.set_result(out[start:stop])
            start = stop

    def _chunked(self, kind: tuple, batch: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(batch), self.max_batch_size):
            chunk = batch[start : start + self.max_batch_size]
            self._on_batch(len(chunk))
            outs.append(self._run(kind, chunk))
        return np.concatenate(outs)
