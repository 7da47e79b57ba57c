"""Property-based fuzz of the files ``imagerec index``, ``search`` and ``audit`` read (Hypothesis):
embeddings ``.npz`` files with wrong keys, dtypes, shapes, values, names and damaged or forged
bytes; index folders with tampered meta, swapped or truncated FAISS files and edited item lists;
``--parts`` of other models; CSV manifests that climb out of their folder; ``--out`` of the
wrong kind.

Whatever is given: exit 0, or exit 2 with one line naming the problem and a fix (no traceback,
no exception class name), checked before the work starts; nothing written outside ``--out``; a
refused ``--add`` leaves the index byte for byte; search results name only indexed images.
No model but in one test (broken query images): the embeddings are numpy arrays under a
registry backbone's name.

Brief and deterministic here (``derandomize``); ``benchmarks/fuzz_files.py`` runs the same
properties (``tests/_file_strategies.py``) at length with fresh seeds.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from . import _file_strategies as fz

CI = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def _fresh(tmp_path, name: str):
    folder = tmp_path / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


# ------------------------------------------------------------------------- embeddings files

BAD_NPZ = {
    "nan": lambda a: a.update(features=np.full_like(a["features"], np.nan)),
    "inf": lambda a: a["features"].__setitem__((0, 0), np.inf),
    "int paths": lambda a: a.update(paths=np.arange(len(a["paths"]))),
    "bytes paths": lambda a: a.update(paths=np.asarray([p.encode() for p in a["paths"].tolist()])),
    "2-D paths": lambda a: a.update(paths=a["paths"].reshape(-1, 1)),
    "empty path": lambda a: a["paths"].__setitem__(0, ""),
    "NUL in a path": lambda a: a.update(paths=np.asarray(["/v/a\x00b.png", *a["paths"].tolist()[1:]])),
    "no features": lambda a: a.update(features=np.zeros((len(a["paths"]), 0), np.float32)),
    "meta a list": lambda a: a.update(meta=np.asarray("[1, 2]")),
    "backbone a number": lambda a: a.update(meta=np.asarray(json.dumps({"backbone": 5, "preprocessing": fz.PREPROCESSING}))),
    "int classes": lambda a: a.update(labels=np.zeros(len(a["paths"]), np.int64), classes=np.asarray([3])),
}


@pytest.mark.parametrize("name", sorted(BAD_NPZ))
@pytest.mark.parametrize("command", ["index", "search", "audit"])
def test_a_bad_embeddings_file_is_one_line(tmp_path, name, command):
    arrays = fz.good_arrays(5)
    BAD_NPZ[name](arrays)
    data = fz.npz_bytes(arrays)
    if command == "index":
        problems = fz.prop_index_from_npz(tmp_path, data)
    elif command == "search":
        fz.build_good_index(tmp_path / "good")
        problems = fz.prop_search_with_npz(tmp_path, tmp_path / "good", data)
    else:
        problems = fz.prop_audit_npz(tmp_path, data)
    assert not problems
    if command == "search":
        o = fz.run_cli("search", tmp_path / "good", tmp_path / "query.npz")
    else:
        o = fz.run_cli(command, tmp_path / "given.npz", "--out", tmp_path / "o")
    assert o.code == 2 and "embeddings file" in o.err  # refused, naming the file's problem


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda d: d[: len(d) // 2], "damaged embeddings file"),
        (lambda d: b"", "not an .npz"),
        (lambda d: fz.forged_header(d, (10**9, 10**4)), "declares shape (1000000000, 10000)"),
    ],
    ids=["truncated", "empty", "forged-shape"],
)
def test_a_damaged_or_forged_archive_is_one_line(tmp_path, damage, fragment):
    data = damage(fz.npz_bytes(fz.good_arrays(5)))
    assert not fz.prop_index_from_npz(tmp_path, data)
    o = fz.run_cli("index", tmp_path / "given.npz", "--out", tmp_path / "idx")
    assert o.code == 2 and fragment in o.err


def test_a_bad_crc_is_one_line(tmp_path):
    data = bytearray(fz.npz_bytes(fz.good_arrays(5)))
    data[data.find(b"NUMPY") + 150] ^= 0xFF  # inside the features' data: the zip CRC no longer matches
    assert not fz.prop_index_from_npz(tmp_path, bytes(data))
    assert "CRC" in fz.run_cli("index", tmp_path / "given.npz", "--out", tmp_path / "idx").err


@settings(max_examples=40, **CI)
@given(file=fz.embeddings_files())
def test_any_embeddings_file_indexes_exactly_its_images_or_is_refused(tmp_path_factory, file):
    data, _how = file
    assert not fz.prop_index_from_npz(tmp_path_factory.mktemp("npz"), data)


@settings(max_examples=30, **CI)
@given(file=fz.embeddings_files())
def test_any_query_file_searches_the_index_or_is_refused(tmp_path_factory, file):
    tmp = tmp_path_factory.mktemp("query")
    fz.build_good_index(tmp / "good")
    data, _how = file
    assert not fz.prop_search_with_npz(tmp, tmp / "good", data)


@settings(max_examples=20, **CI)
@given(file=fz.embeddings_files())
def test_any_embeddings_file_is_audited_or_refused(tmp_path_factory, file):
    data, _how = file
    assert not fz.prop_audit_npz(tmp_path_factory.mktemp("audit"), data)


# ----------------------------------------------------------------------------- index folders

TAMPERED_META = {
    "generation a string": ("meta-key", ("generation", "1")),
    "generation climbing out": ("meta-key", ("generation", "/../../outside")),
    "count a string": ("meta-key", ("count", "5")),
    "unknown kind": ("meta-key", ("kind", "hnsw")),
    "ivf without lists": ("meta-key", ("kind", "ivf")),
    "format a string": ("meta-key", ("format", "x")),
    "exact_max null": ("meta-key", ("exact_max", None)),
    "preprocessing a list": ("meta-key", ("preprocessing", [1])),
    "no checksums": ("meta-drop", "sha256"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED_META))
def test_a_tampered_meta_is_one_line_and_a_rebuild_fixes_it(tmp_path, name):
    kind, detail = TAMPERED_META[name]
    assert not fz.prop_damaged_index(tmp_path, kind, detail)
    fz.build_good_index(_fresh(tmp_path, "again"))
    fz.damage_index(tmp_path / "again", kind, detail)
    o = fz.run_cli("search", tmp_path / "again", tmp_path / "q.npz")
    assert o.code == 2 and "meta.json" in o.err and "rebuild the index" in o.err


def test_a_damaged_faiss_file_is_caught_by_its_checksum(tmp_path):
    fz.build_good_index(tmp_path / "idx")
    faiss_file = tmp_path / "idx" / "index-1.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[-5] ^= 0x40  # one bit of the last vector: FAISS itself would read it without a word
    faiss_file.write_bytes(bytes(data))
    o = fz.run_cli("search", tmp_path / "idx", fz.save_arrays(tmp_path / "q.npz", fz.good_arrays(2, seed=1)))
    assert not fz.user_error_problems(o, "search")
    assert o.code == 2 and "index-1.faiss: its SHA-256 is not the one meta.json recorded" in o.err
    assert not fz.prop_damaged_index(_fresh(tmp_path, "prop"), "faiss-bytes", 3)


def test_the_checksums_are_recorded_and_cover_both_files(tmp_path):
    fz.build_good_index(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    from imagerec.index._store import file_sha256  # noqa: PLC0415

    assert meta["sha256"] == {"index": file_sha256(tmp_path / "idx" / "index-1.faiss"), "items": file_sha256(tmp_path / "idx" / "items-1.csv")}
    (tmp_path / "idx" / "items-1.csv").write_text("path,label,identity\n/etc/passwd,,x\n" * 6)
    o = fz.run_cli("search", tmp_path / "idx", fz.save_arrays(tmp_path / "q.npz", fz.good_arrays(2, seed=1)))
    assert o.code == 2 and "items-1.csv: its SHA-256" in o.err and "/etc/passwd" not in o.out


@settings(max_examples=30, **CI)
@given(damage=fz.index_damage())
def test_any_damaged_index_is_refused_or_searched_and_a_rebuild_fixes_it(tmp_path_factory, damage):
    kind, detail = damage
    assert not fz.prop_damaged_index(tmp_path_factory.mktemp("damaged"), kind, detail)


# ------------------------------------------------------------------------- parts and --out


@pytest.mark.parametrize("kind", fz.OUT_KINDS)
def test_out_of_every_kind_becomes_the_index_or_is_refused_first(tmp_path, kind):
    assert not fz.prop_out_kind(tmp_path, kind)


def test_a_folder_of_the_users_files_is_not_an_index_to_replace(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "index-keep.faiss").write_text("mine")
    o = fz.run_cli("index", fz.save_arrays(tmp_path / "e.npz", fz.good_arrays(3)), "--out", tmp_path / "photos")
    assert o.code == 2 and "holds files that are not an index's (index-keep.faiss)" in o.err
    assert (tmp_path / "photos" / "index-keep.faiss").read_text() == "mine" and len(list((tmp_path / "photos").iterdir())) == 1


def test_embeddings_of_another_dimension_are_refused_by_add_search_and_parts(tmp_path):
    fz.build_good_index(tmp_path / "idx")
    other = fz.save_arrays(tmp_path / "d4.npz", fz.good_arrays(3, dim=4, seed=4))
    before = fz.tree(tmp_path / "idx", skip=(tmp_path / "idx" / ".lock",))
    for argv in (["index", other, "--out", tmp_path / "idx", "--add"], ["search", tmp_path / "idx", other]):
        o = fz.run_cli(*argv)
        assert not fz.user_error_problems(o, argv[0]) and o.code == 2 and "4-dim features" in o.err
    assert not fz.changes(before, fz.tree(tmp_path / "idx", skip=(tmp_path / "idx" / ".lock",)))
    o = fz.run_cli("index", "--parts", fz.save_arrays(tmp_path / "p.npz", fz.good_arrays(3, seed=5)), other, "--out", tmp_path / "merged")
    assert o.code == 2 and "dims" in o.err and "4" in o.err and not (tmp_path / "merged").exists()  # the parts scan names every dimension it found


def test_embeddings_of_no_images_are_nothing_to_index(tmp_path):
    arrays = fz.good_arrays(1)
    arrays.update(features=np.zeros((0, fz.DIM), np.float32), paths=np.asarray([], dtype=str))
    assert not fz.prop_index_from_npz(tmp_path, fz.npz_bytes(arrays))
    assert "nothing to index" in fz.run_cli("index", tmp_path / "given.npz", "--out", tmp_path / "idx").err


@settings(max_examples=25, **CI)
@given(parts=fz.part_sets())
def test_any_parts_merge_into_their_union_or_are_refused(tmp_path_factory, parts):
    assert not fz.prop_parts(tmp_path_factory.mktemp("parts"), parts)


# --------------------------------------------------------------------------------- manifests


@settings(max_examples=8, **CI)
@given(manifest=fz.manifests())
def test_a_manifest_never_reads_outside_its_folder(tmp_path_factory, manifest):
    rows, labelled, header = manifest
    assert not fz.prop_manifest(tmp_path_factory.mktemp("manifest"), rows, labelled, header)


# ------------------------------------------------------------------------------ query images


@pytest.mark.slow
def test_broken_query_images_are_skips_and_results_stay_in_the_index(tmp_path):
    """The one test here with a model (EfficientNet-Lite0 at 64 px, as tests/test_index.py uses it):
    broken query images are reported skips, never a crash; with none readable, one line."""
    from PIL import Image  # noqa: PLC0415

    from imagerec import build_index  # noqa: PLC0415

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 200 - 40 * i, 30)).save(photos / f"p{i}.png")
    build_index(photos, tmp_path / "idx", backbone="efficientnet_lite0", image_size=64, progress=False)
    queries = tmp_path / "queries"
    queries.mkdir()
    good = (photos / "p1.png").read_bytes()
    broken = {"truncated.png": good[: len(good) // 2], "empty.png": b"", "text.jpg": b"not an image", "flipped.png": good[:40] + b"\xff" * 40 + good[80:]}
    for name, data in broken.items():
        (queries / name).write_bytes(data)
    Image.new("RGB", (3000, 2), "white").save(queries / "thin.png")  # refused by its header before decoding
    o = fz.run_cli("search", tmp_path / "idx", queries, "--format", "csv")
    assert not fz.user_error_problems(o, "search") and o.code == 2 and "none of the" in o.err
    (queries / "good.png").write_bytes(good)
    o = fz.run_cli("search", tmp_path / "idx", queries, "--format", "csv", "--top-k", "2")
    assert o.code == 0, o.err
    assert not fz.outside_results(o.out, tmp_path / "idx")
    assert set(__import__("pandas").read_csv(__import__("io").StringIO(o.out))["query"]) == {str(queries / "good.png")}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["search", "{idx}", "{q}", "--out", "{tmp}"], "is a folder; give a file name for the table result, e.g. --out hits.table"),
        (["search", "{idx}", "{q}", "--sheet", "{q}"], "is a file; give a folder for the contact sheets"),
        (["search", "{idx}", "{q}", "--format", "json", "--out", "{idx}/meta.json"], "is inside the index"),
        (["search", "{idx}", "{q}", "--sheet", "{idx}/sheets"], "is inside the index"),
        (["index", "{q}", "--out", "{tmp}/nowhere", "--add"], "no such folder"),
    ],
    ids=["search-out-folder", "sheet-a-file", "search-out-in-index", "sheet-in-index", "add-to-nothing"],
)
def test_a_bad_result_place_is_refused_before_the_search_and_writes_nothing(tmp_path, argv, fragment):
    fz.build_good_index(tmp_path / "idx")
    q = fz.save_arrays(tmp_path / "q.npz", fz.good_arrays(2, seed=1))
    before = fz.tree(tmp_path)
    o = fz.run_cli(*[a.format(idx=tmp_path / "idx", q=q, tmp=tmp_path) for a in argv])
    assert not fz.user_error_problems(o, argv[0])
    assert o.code == 2 and fragment in o.err and not o.out
    assert not fz.changes(before, fz.tree(tmp_path))


def test_an_index_from_before_the_checksums_loads_with_a_warning_and_add_records_them(tmp_path):
    fz.build_good_index(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    meta["format"] = 1
    del meta["sha256"]
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(meta))
    from imagerec import ImagerecWarning, add_to_index, load_index  # noqa: PLC0415

    with pytest.warns(ImagerecWarning, match="before imagerec recorded checksums"):
        assert len(load_index(tmp_path / "idx")) == 6
    with pytest.warns(ImagerecWarning):
        add_to_index(tmp_path / "idx", fz.save_arrays(tmp_path / "new.npz", fz.good_arrays(2, seed=7)))
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["format"] == 2 and set(meta["sha256"]) == {"index", "items"}
    assert len(load_index(tmp_path / "idx")) == 8
