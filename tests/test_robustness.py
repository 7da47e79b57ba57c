"""Generated bad input thrown at every reader: the only outcomes allowed are a decoded RGB image
(or a data set) and a reported skip (``DecodeError``, a ``Skipped`` entry, or one
``ImagerecError`` line). Never another exception, never a hang.

Property-based (Hypothesis) tests cover manifests (CSV text, encodings, headers, paths), file
names (random bytes, non-UTF-8, link loops) and image bytes (random, and mutations of real PNG,
JPEG, GIF, BMP, WebP and TIFF files made here); a seeded fuzz of the decoder runs a fixed number
of mutated files. ``benchmarks/fuzz_decode.py`` is the longer run.
"""

from __future__ import annotations

import faulthandler
import io
import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagerec import load_images
from imagerec._decode import DecodeError, expand_paths, load_rgb, peek_size, walk_images
from imagerec.data import decode_small_images, report_skipped
from imagerec.errors import ImagerecError

from ._mutate import mutate

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
FUZZ_LIMIT = 4_000_000  # pixels: a mutated header may claim a huge image; keep each case cheap
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def real_image_bytes(fmt: str, seed: int = 0, size=(12, 9), mode: str = "RGB") -> bytes:
    """A small real image file of ``fmt``, made here."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


SAMPLES = {fmt: real_image_bytes(fmt) for fmt in FORMATS}


def assert_decoded_or_skipped(path, max_pixels: int = FUZZ_LIMIT) -> str:
    """The one contract of the decoder; returns 'decoded' or 'skipped'."""
    try:
        img = load_rgb(path, max_pixels)
    except DecodeError as e:
        assert str(e), "a skip always has a reason"
        size = peek_size(path)
        assert size is None or (isinstance(size, tuple) and len(size) == 2)
        return "skipped"
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
    assert np.asarray(img).shape == (img.size[1], img.size[0], 3)
    return "decoded"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("robust")


# -- image bytes ---------------------------------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(data=st.binary(max_size=2048), ext=st.sampled_from(sorted(FORMATS.values()) + [".jpeg", ".TIFF"]))
def test_random_bytes_are_decoded_or_skipped(scratch, data, ext):
    path = scratch / f"random{ext}"
    path.write_bytes(data)
    assert_decoded_or_skipped(path)


@settings(max_examples=80, **SETTINGS)
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    seed=st.integers(0, 2**32 - 1),
    ext=st.sampled_from(sorted(FORMATS.values())),
)
def test_mutated_real_images_are_decoded_or_skipped(scratch, fmt, seed, ext):
    path = scratch / f"mutated{ext}"  # any extension: a .jpg may hold a PNG
    path.write_bytes(mutate(SAMPLES[fmt], random.Random(seed)))
    assert_decoded_or_skipped(path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_sample_format_decodes_untouched(scratch, fmt):
    path = scratch / f"clean{FORMATS[fmt]}"
    path.write_bytes(SAMPLES[fmt])
    assert assert_decoded_or_skipped(path) == "decoded"


def test_seeded_fuzz_of_the_decoder(scratch):
    """300 mutated real files, each decoded or skipped; a hang kills the run with a traceback."""
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        rng = random.Random(20261130)
        outcomes = {"decoded": 0, "skipped": 0}
        for case in range(300):
            fmt = rng.choice(sorted(FORMATS))
            path = scratch / f"fuzz{FORMATS[fmt]}"
            path.write_bytes(mutate(SAMPLES[fmt], rng))
            outcomes[assert_decoded_or_skipped(path)] += 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert outcomes["decoded"] > 0 and outcomes["skipped"] > 0  # both kinds of outcome were reached


# -- manifests -----------------------------------------------------------------------------------

CELLS = st.one_of(
    st.sampled_from(
        ["a.png", "sub/b.png", "./a.png", "missing.png", "../outside.png", "sub/../a.png", "", " ", "path", "file"]
    ),
    st.text(max_size=20),
)
HEADERS = st.sampled_from([None, "path,label", "file,class", "filename", "PATH", "image,category,extra"])
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])


@settings(max_examples=80, **SETTINGS)
@given(
    header=HEADERS,
    rows=st.lists(st.tuples(CELLS, st.one_of(st.none(), st.text(max_size=8))), max_size=8),
    encoding=ENCODINGS,
    absolute=st.booleans(),
    allow_outside=st.booleans(),
)
def test_manifests_give_a_data_set_or_one_clear_error(
    tmp_path_factory, header, rows, encoding, absolute, allow_outside
):
    root = tmp_path_factory.mktemp("manifest")
    folder = root / "set"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(SAMPLES["PNG"])
    (folder / "sub" / "b.png").write_bytes(SAMPLES["PNG"])
    (root / "outside.png").write_bytes(SAMPLES["PNG"])
    lines = [] if header is None else [header]
    for cell, label in rows:
        cell = str(root / "outside.png") if absolute and cell == "../outside.png" else cell
        lines.append(cell if label is None else f"{cell},{label}")
    manifest = folder / "m.csv"
    try:
        manifest.write_bytes("\n".join(lines).encode(encoding))
    except UnicodeEncodeError:
        return  # text that this encoding cannot hold
    try:
        source = load_images(manifest, allow_outside=allow_outside)
    except ImagerecError as e:
        assert "\n" not in str(e).strip()
        return
    inside = os.path.abspath(folder)
    for path in source.paths:
        assert os.path.isfile(path)
        if not allow_outside:
            assert os.path.commonpath([inside, os.path.abspath(path)]) == inside
    assert all(s.reason for s in source.skipped)


# -- file names and links ------------------------------------------------------------------------

NAME = st.binary(min_size=1, max_size=24).filter(lambda b: b"/" not in b and b"\0" not in b and not b.startswith(b"."))


@settings(max_examples=30, **SETTINGS)
@given(
    names=st.lists(NAME, min_size=1, max_size=5, unique=True),
    ext=st.sampled_from([b".png", b".JPG", b".bmp"]),
    loop=st.booleans(),
)
def test_any_byte_name_is_listed_decoded_and_reported(tmp_path_factory, names, ext, loop):
    folder = tmp_path_factory.mktemp("names")
    written = []
    for i, raw in enumerate(names):
        path = os.path.join(os.fsencode(folder), raw + ext)
        with open(path, "wb") as f:
            f.write(SAMPLES["BMP"] if i % 2 == 0 else b"broken")
        written.append(os.fsdecode(path))
    if loop:
        os.symlink(".", os.path.join(folder, "loop"))
        os.symlink(".", os.path.join(folder, "again"))
    listed = list(walk_images(folder))
    assert sorted(listed) == sorted(written)  # each once, links followed once
    assert sorted(expand_paths([str(folder)])) == sorted(written)
    source = load_images(folder, labelled=False)
    outcomes = [assert_decoded_or_skipped(p) for p in source.paths]
    assert outcomes.count("decoded") == (len(names) + 1) // 2
    cached = decode_small_images(source, progress=False, workers=1)
    skipped = (cached or source).skipped
    report = report_skipped(skipped, folder / "run.npz") if skipped else None
    if report is not None:
        report.read_text(encoding="utf-8")  # written as UTF-8, with \xNN for odd bytes
