"""The byte mutator of the decoder fuzz: ``tests/test_robustness.py`` runs it briefly,
``benchmarks/fuzz_decode.py`` at length (more and longer edits, header bytes twice as often)."""

from __future__ import annotations

import random


def mutate(data: bytes, rng: random.Random, edits: int = 6, span: int = 16, header_weight: int = 1) -> bytes:
    """Flip, overwrite, insert, delete or truncate 1 to ``edits`` times (``span`` bytes at most
    at a time); ``header_weight`` makes an overwrite of the first 64 bytes that many times as
    likely as each other edit."""
    out = bytearray(data)
    kinds = ["flip", "set", "insert", "delete", "truncate"] + ["header"] * header_weight
    for _ in range(rng.randint(1, edits)):
        kind = rng.choice(kinds)
        pos = rng.randrange(len(out)) if out else 0
        if kind == "flip" and out:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == "set" and out:
            out[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind == "insert":
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, span)))
        elif kind == "delete" and out:
            del out[pos : pos + rng.randint(1, span)]
        elif kind == "truncate":
            del out[rng.randrange(len(out) + 1) :]
        elif kind == "header" and len(out) > 8:
            out[rng.randrange(min(64, len(out)))] = rng.randrange(256)
    return bytes(out)
