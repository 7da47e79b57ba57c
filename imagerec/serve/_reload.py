"""New model versions without downtime: build a candidate beside the serving model, then swap.

A server started on a run folder or a checkpoint can take a new version of it, by
``POST /admin/reload`` (behind the token) or by watching the file (``--watch``). A reload:

1. hashes the checkpoint the source names now (a run folder: its best checkpoint); the same
   SHA-256 as the version serving does nothing, the same as the last candidate refused is
   refused again for the reason kept (not rebuilt);
2. builds a candidate engine from it in the reload thread, as the server's start did:
   :func:`~imagerec.serve._engines.load_engine` reads the checkpoint (its checksum verified) and,
   for the ONNX engine, exports it with :func:`imagerec.export.export_model`, which runs the
   export and PyTorch on the same batch and refuses logits that differ;
3. warms the candidate up (a forward pass of each kind, whose outputs must be finite and of the
   right shape), so the first request on it does not pay for that;
4. swaps it in with one assignment on the event loop. Each request reads the engine once, when
   it starts, and keeps it to the end (its images are prepared by that engine and batched only
   with requests of the same engine), so requests in flight finish on the old version; the old
   engine is freed when the last of them is answered.

A candidate that fails any step is refused: the old version keeps serving, and the reason is
logged and answered on ``GET /model`` (``reload.last``) and by ``POST /admin/reload`` (409).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ImagerecError
from ._engines import Engine, file_sha256

log = logging.getLogger("imagerec.serve")


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Version:
    """Which model answers: the served file's SHA-256 and times.

    Attributes:
        sha256: hex SHA-256 of the checkpoint (or ``.onnx``) served.
        file: that file.
        modified: its modification time, ISO 8601 UTC.
        serving_since: when this version began answering, ISO 8601 UTC.
    """

    sha256: str
    file: str
    modified: str
    serving_since: str

    @classmethod
    def of(cls, engine: Engine) -> Version:
        path = Path(engine.path)
        modified = _utc(path.stat().st_mtime) if path.exists() else ""
        return cls(engine.sha256, str(path), modified, _utc(datetime.datetime.now().timestamp()))


class Refused(Exception):
    """A candidate version that failed a check; ``str()`` is the reason, for people."""


def check_candidate(engine: Engine, batch_sizes: tuple[int, ...] = (1,)) -> None:
    """Warm ``engine`` up and check its outputs: finite, one row per image, one logit per class.

    Raises:
        Refused: a forward pass failed or gave outputs of the wrong shape or not finite.
    """
    size = engine.preprocessing["input_size"]
    for n in batch_sizes:
        blank = np.zeros((n, 3, size, size), dtype=np.float32)
        outputs = [("logits", engine.logits(blank), len(engine.classes))]
        if engine.embed_dim:
            outputs.append(("embedding", engine.features(blank), engine.embed_dim))
        for what, out, width in outputs:
            if out.shape != (n, width):
                raise Refused(f"its {what} output has shape {out.shape} for {n} image(s), not ({n}, {width})")
            if not np.isfinite(out).all():
                raise Refused(f"its {what} output is not finite (NaN or infinity) on a blank image")


@dataclass
class Attempt:
    """The last reload that did something: a swap or a refusal."""

    status: str  # "swapped" or "refused"
    sha256: str
    file: str
    at: str
    reason: str = ""


class Reloader:
    """Finds a new checkpoint in ``source`` and builds a checked, warmed-up engine from it.

    Args:
        source: the run folder or checkpoint the server was started on.
        build: ``build(checkpoint) -> Engine``, as the server's start built its engine.
        batch_sizes: the batch sizes a candidate is warmed up at.
    """

    def __init__(self, source: Path, build: Callable[[Path], Engine], batch_sizes: tuple[int, ...] = (1,)):
        self.source, self._build, self._batch_sizes = Path(source), build, batch_sizes
        self.last: Attempt | None = None
        self._refused: str | None = None  # SHA-256 of the last candidate refused: not retried
        self._seen: tuple | None = None  # (path, mtime_ns, size) at the last poll

    def checkpoint(self) -> Path:
        """The checkpoint ``source`` names now (a run folder: its best, else its last)."""
        from ..checkpoint import resolve_checkpoint  # noqa: PLC0415 - torch, only where reloading

        return resolve_checkpoint(self.source)

    def changed(self) -> bool:
        """Whether the checkpoint file is another (path, time or size) than at the last call; True at the first."""
        try:
            path = self.checkpoint()
            stat = path.stat()
        except (ImagerecError, OSError):
            return False  # nothing there right now (a run being set up): look again later
        seen = (str(path), stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return False
        self._seen = seen
        return True

    def candidate(self, serving: str) -> tuple[Engine, Path] | None:
        """A new engine checked and warmed up, or None when the checkpoint is the one serving.

        Args:
            serving: SHA-256 of the version serving now.

        Raises:
            Refused: the checkpoint failed a check (the reason is also kept in :attr:`last`).
        """
        try:
            path = self.checkpoint()
            sha = file_sha256(path)
        except (ImagerecError, OSError) as e:
            raise self._refuse("", str(self.source), f"no checkpoint to read ({e})") from None
        if sha == serving:
            return None
        if sha == self._refused and self.last is not None:  # the same bytes again: not rebuilt
            raise Refused(f"{self.last.reason} (refused at {self.last.at}; not tried again until the file changes)")
        try:
            engine = self._build(path)
            check_candidate(engine, self._batch_sizes)
        except (ImagerecError, Refused) as e:
            raise self._refuse(sha, str(path), str(e)) from None
        except Exception as e:  # noqa: BLE001 - any failure of a candidate refuses it
            first = str(e).splitlines()[0] if str(e) else "no message"
            raise self._refuse(sha, str(path), f"it could not be loaded or run ({first[:300]})") from None
        if engine.sha256 != sha:  # replaced again while it was being built: next poll takes it
            log.info("reload: %s changed while it was being checked; the next reload takes the newest", path)
        return engine, path

    def swapped(self, old: Version, new: Version) -> None:
        """Note a swap (kept in :attr:`last`, logged)."""
        self._refused = None
        self.last = Attempt("swapped", new.sha256, new.file, new.serving_since)
        log.info("reload: now serving %s (sha256 %s), was sha256 %s", new.file, new.sha256, old.sha256)

    def _refuse(self, sha: str, file: str, reason: str) -> Refused:
        self._refused = sha or None
        self.last = Attempt("refused", sha, file, _utc(datetime.datetime.now().timestamp()), reason)
        log.warning("reload: refused %s (sha256 %s): %s; the previous version keeps serving", file, sha or "?", reason)
        return Refused(reason)

    def describe(self) -> dict:
        return {"source": os.fspath(self.source), "last": asdict(self.last) if self.last else None}
