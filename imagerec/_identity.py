"""What identifies a file's content, for every cache and every resume.

A path and a size and modification time are not enough: ``cp`` then ``touch -r``, ``rsync -t``
or an untar give a different file the same size and mtime. :func:`file_identity` adds the inode
and the change time (which no user tool can set back), and for small files a hash of the bytes
themselves, so a replaced file is always seen as changed.

Paths are bytes on Linux and need not be UTF-8: they are hashed through ``os.fsencode``, which
gives back the original bytes of a name Python decoded with ``surrogateescape``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

HASH_BELOW = 256 * 1024  # files smaller than this (CIFAR-like images) are also hashed by content


def file_identity(path: str | os.PathLike, hash_below: int = HASH_BELOW) -> str:
    """A string that changes whenever the file at ``path`` may have changed.

    Args:
        path: a file.
        hash_below: files smaller than this many bytes also contribute a BLAKE2 hash of their bytes.

    Returns:
        ``"size:mtime_ns:inode:ctime_ns[:hash]"``, or ``"missing"`` when the file cannot be read.
    """
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    parts = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"
    if st.st_size < hash_below:
        try:
            with open(path, "rb") as f:
                parts += ":" + hashlib.blake2b(f.read(), digest_size=16).hexdigest()
        except OSError:
            return "missing"
    return parts


def fingerprint(paths: Iterable[str | os.PathLike], *extra: str) -> str:
    """One hex digest over many files' paths and identities, plus any ``extra`` strings.

    Args:
        paths: the files, in order (the order is part of the fingerprint).
        extra: other things the cached result depends on (backbone, preprocessing, format version).

    Returns:
        A 32-character hex digest.
    """
    digest = hashlib.sha256("|".join(extra).encode("utf-8", "surrogateescape"))
    for path in paths:
        digest.update(b"\n" + os.fsencode(os.path.abspath(path)) + b"|" + file_identity(path).encode())
    return digest.hexdigest()[:32]


def changed_files(old: dict[str, str], paths: Iterable[str]) -> list[str]:
    """The paths whose identity differs from the one recorded in ``old`` (path -> identity)."""
    return [p for p in paths if p in old and old[p] != file_identity(p)]
