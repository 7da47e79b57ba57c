"""An exclusive lock on a run folder, so two processes never write one folder at once.

The lock is an OS file lock (``fcntl.flock``) on ``FOLDER/.lock``, held for the life of the run.
The kernel releases it when the process ends, however it ends (a crash, ``kill -9``), so a killed
run never leaves a stale lock behind; the file itself may stay and means nothing on its own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import ImagerecError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the ``with`` block.

    The same process may take the lock again while it holds it (a train that evaluates into its
    own folder); another process gets an error at once, never a wait.

    Args:
        folder: the run folder to lock.
        what: what the folder is, for the message (``"run"``, ``"cluster run"``...).

    Yields:
        The folder, as a Path.

    Raises:
        ImagerecError: ``folder`` is a file, or another process holds its lock.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ImagerecError(f"{folder}: is a file, not a folder; give --out a folder name (e.g. runs/{folder.stem or 'run'})")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _flock(folder / LOCK_NAME, f"{folder}: another imagerec {what} is writing this folder"):
            yield folder
    except BaseException:
        if created and {p.name for p in folder.iterdir()} <= {LOCK_NAME}:  # refused before writing anything: leave no folder
            with contextlib.suppress(OSError):
                (folder / LOCK_NAME).unlink(missing_ok=True)
                folder.rmdir()
        raise


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on one output file (``FOLDER/.NAME.lock`` beside it), as :func:`run_lock`.

    For outputs that are single files with work files beside them (``embed --out x.npz`` and
    its ``x.npz.partial/``), so two runs never write them at once.

    Raises:
        ImagerecError: another process holds the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _flock(path.parent / f".{path.name}.lock", f"{path}: another imagerec {what} is writing this file"):
        yield path


@contextlib.contextmanager
def _flock(path: Path, busy: str) -> Iterator[None]:
    key = str(path.resolve())
    if key in _HELD:  # re-entrant within one process
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    import fcntl  # noqa: PLC0415 - POSIX only; imported here so the module imports anywhere

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImagerecError(f"{busy} ({_read_holder(fd)}); wait for it to finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


_HELD: dict[str, int] = {}


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        pid = int(os.read(fd, 32).decode().strip())
        return f"process {pid}"
    return "another process"
