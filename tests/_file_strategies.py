"""Strategies and properties of the file-input fuzz: what ``imagerec index``, ``search`` and
``audit`` are given on disk (embeddings ``.npz``, index folders, parts, CSV manifests, ``--out``).

``tests/test_file_fuzz.py`` runs each property briefly and derandomized; ``benchmarks/fuzz_files.py``
runs the same ones at length with fresh seeds. A property returns the list of its problems
(empty: it held), so the benchmark can count failures instead of stopping at the first.

The promises checked (README, "What it does for your data"): a bad input is refused with exit
status 2 and one line on stderr naming the problem and a fix (no traceback, no exception class
name), before the work starts (the ``--out`` folder is not created); nothing is written outside
``--out``; a failed ``--add`` leaves the previous index byte for byte; a damaged index is refused,
never read into a crash, and the advised fix (rebuild with ``imagerec index``) works; search
results only ever name the index's own images; manifest rows outside their folder are skipped.
No model is needed: the embeddings are made with numpy (a registry backbone's name, random vectors).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import random
import re
import shutil
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import strategies as st

from ._mutate import mutate

BACKBONE = "efficientnet_lite0"  # a registry backbone with pretrained weights: it may index
DIM = 8
PREPROCESSING = {"input_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 1.0}
EXCEPTION_NAMES = sorted(
    {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)}
    | {"BadZipFile", "ImagerecError", "JSONDecodeError", "ParserError", "EmptyDataError"}
)
_LEAK = re.compile(r"\b(" + "|".join(EXCEPTION_NAMES) + r")\b|Traceback|RuntimeWarning|File \"")


# ----------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int | str
    out: str
    err: str


def run_cli(*argv) -> Outcome:
    """``imagerec ARGV`` in this process; an exception that escapes ``main`` is code ``"crash"``."""
    from imagerec.cli import main  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([os.fspath(a) for a in argv])
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - the property reports it
        code = "crash"
        err.write(traceback.format_exc())
    return Outcome(code, out.getvalue(), err.getvalue())


def user_error_problems(o: Outcome, command: str) -> list[str]:
    """Problems with an outcome that should be 0 or a one-line user error (exit 2)."""
    if o.code == 0:
        leak = _LEAK.search(o.err)
        return [f"succeeded but stderr shows {leak.group(0)!r}: {o.err[-400:]}"] if leak else []
    if o.code != 2:
        return [f"exit {o.code!r}, not 0 or 2: {o.err[-800:]}"]
    lines = o.err.strip().splitlines()
    if len(lines) != 1:
        return [f"{len(lines)} lines on stderr, not one: {o.err[-800:]}"]
    line, found = lines[0], []
    if not line.startswith(f"imagerec {command}: error: "):
        found.append(f"not an imagerec error line: {line[:300]}")
    leak = _LEAK.search(line)
    if leak:
        found.append(f"the line shows {leak.group(0)!r}: {line[:400]}")
    if "; " not in line and ": " not in line.removeprefix(f"imagerec {command}: error: "):
        found.append(f"the line names no fix: {line[:300]}")
    return found


def tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, bytes | None]:
    """Every file under ``root`` (not under ``skip``) with its bytes (None for a folder or a link)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames:
            found[os.fsdecode(here / name)] = None
        for name in filenames:
            path = here / name
            found[os.fsdecode(path)] = None if path.is_symlink() else path.read_bytes()
    return found


def changes(before: dict, after: dict) -> list[str]:
    """The paths that appeared, vanished or changed between two :func:`tree` snapshots."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p, 0) != after.get(p, 0))


# ----------------------------------------------------------------------------- embeddings files


def good_arrays(n: int = 5, dim: int = DIM, seed: int = 0, prefix: str = "/virtual", labelled: bool = False) -> dict:
    """The arrays of a valid embeddings file, made with numpy only."""
    rng = np.random.default_rng(seed)
    arrays = {
        "features": rng.normal(size=(n, dim)).astype(np.float32),
        "paths": np.asarray([f"{prefix}/{seed}_{i:03d}.png" for i in range(n)]),
        "meta": np.asarray(json.dumps({"backbone": BACKBONE, "preprocessing": PREPROCESSING})),
    }
    if labelled:
        arrays["labels"] = rng.integers(0, 2, n).astype(np.int64)
        arrays["classes"] = np.asarray(["cat", "dog"])
    return arrays


def npz_bytes(arrays: dict, compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


ODD_NAMES = [
    "",
    "a\x00b.png",
    "../outside.png",
    "/etc/passwd",
    "x" * 300 + ".png",
    "tab\tnew\nline.png",
    "caf\udce9.png",  # a non-UTF-8 byte, as Python reads it from a Linux name
    "\u202eevil.png",
    "white space .png",
    "#3",
]


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=6,
    )


@st.composite
def _array_edit(draw, arrays: dict) -> str:
    """Change ``arrays`` in place in one way a damaged or foreign file could; returns what was done."""
    n = len(arrays.get("paths", arrays.get("features", [])))
    kind = draw(st.sampled_from(["drop", "junk", "features", "values", "paths", "name", "labels", "meta", "object"]))
    if kind == "drop":
        key = draw(st.sampled_from(sorted(arrays)))
        del arrays[key]
        return f"drop {key}"
    if kind == "junk":
        arrays[draw(st.sampled_from(["extra", "features2", "x"]))] = np.arange(draw(st.integers(0, 5)))
        return "junk key"
    if kind == "features":
        dtype = draw(st.sampled_from(["float16", "float64", "int32", "complex64", "bool", "U3", "uint8"]))
        shape = draw(st.sampled_from([(n, DIM), (n,), (n, 2, 4), (n, 0), (0, DIM), (n + 1, DIM), (max(n - 1, 0), DIM), (n, 1)]))
        arrays["features"] = np.zeros(shape, dtype=dtype) + (np.ones(shape, dtype=dtype) if dtype != "U3" else "1")
        return f"features {dtype} {shape}"
    if kind == "values":
        f = arrays.get("features")
        numeric = isinstance(f, np.ndarray) and (np.issubdtype(f.dtype, np.number) or f.dtype == bool)
        f = np.array(f if numeric else np.ones((n, DIM)), dtype=np.float32, copy=True)  # after an "object" or "U3" edit: fresh values
        if f.size:
            f.flat[draw(st.integers(0, f.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, 0.0]))
        if draw(st.booleans()) and f.size:
            f[:] = 0.0  # all-zero vectors: no direction
        arrays["features"] = f
        return "feature values"
    if kind == "paths":
        choice = draw(st.sampled_from(["int", "bytes", "2d", "short", "long", "dupe"]))
        paths = [str(p) for p in np.asarray(arrays.get("paths", [f"/v/{i}" for i in range(n)])).reshape(-1)][:n]  # after any earlier edit
        arrays["paths"] = {
            "int": lambda: np.arange(n),
            "bytes": lambda: np.asarray([os.fsencode(str(p)) for p in paths]),
            "2d": lambda: np.asarray(paths).reshape(n, 1) if n else np.zeros((0, 1), str),
            "short": lambda: np.asarray(paths[:-1]),
            "long": lambda: np.asarray([*paths, "/v/more.png"]),
            "dupe": lambda: np.asarray([paths[0]] * n) if n else np.asarray(paths),
        }[choice]()
        return f"paths {choice}"
    if kind == "name":
        paths = [str(p) for p in arrays.get("paths", [])]
        if paths:
            paths[draw(st.integers(0, len(paths) - 1))] = draw(st.sampled_from(ODD_NAMES))
            arrays["paths"] = np.asarray(paths)
        return "odd name"
    if kind == "labels":
        choice = draw(st.sampled_from(["range", "negative", "float", "length", "no-classes", "int-classes"]))
        arrays["classes"] = np.asarray(["cat", "dog"])
        arrays["labels"] = {
            "range": lambda: np.full(n, 7, np.int64),
            "negative": lambda: np.full(n, -1, np.int64),
            "float": lambda: np.zeros(n, np.float32),
            "length": lambda: np.zeros(n + 2, np.int64),
            "no-classes": lambda: np.zeros(n, np.int64),
            "int-classes": lambda: np.zeros(n, np.int64),
        }[choice]()
        if choice == "no-classes":
            del arrays["classes"]
        if choice == "int-classes":
            arrays["classes"] = np.asarray([1, 2])
        return f"labels {choice}"
    if kind == "meta":
        meta = {"backbone": BACKBONE, "preprocessing": dict(PREPROCESSING)}
        choice = draw(st.sampled_from(["not-json", "value", "key", "pp", "backbone", "2d"]))
        if choice == "not-json":
            arrays["meta"] = np.asarray(draw(st.sampled_from(["{", "", "nan", "\udce9"])))
        elif choice == "value":
            arrays["meta"] = np.asarray(json.dumps(draw(_json_values())))
        elif choice == "key":
            meta[draw(st.sampled_from(["backbone", "preprocessing"]))] = draw(_json_values())
            arrays["meta"] = np.asarray(json.dumps(meta))
        elif choice == "pp":
            meta["preprocessing"][draw(st.sampled_from(sorted(PREPROCESSING) + ["unknown"]))] = draw(_json_values())
            arrays["meta"] = np.asarray(json.dumps(meta))
        elif choice == "backbone":
            meta["backbone"] = draw(st.sampled_from(["efficientnet_lite2", "seed_cnn", "no_such_net", BACKBONE + "+flip"]))
            arrays["meta"] = np.asarray(json.dumps(meta))
        else:
            arrays["meta"] = np.asarray([json.dumps(meta)] * 2)
        return f"meta {choice}"
    key = draw(st.sampled_from(["features", "paths", "meta"]))
    arrays[key] = np.asarray([{"a": 1}, None], dtype=object)  # np.savez pickles it
    return f"object {key}"


def forged_header(data: bytes, shape: tuple[int, ...]) -> bytes:
    """The archive with its features entry's header declaring ``shape`` (the data left as it is)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename == "features.npy":
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
                body = header.getvalue() + body[len(header.getvalue()) :]
            target.writestr(info.filename, body)
    return out.getvalue()


@st.composite
def embeddings_files(draw, valid_share: int = 4) -> tuple[bytes, str]:
    """(bytes of an ``.npz``, how it was made): valid, edited arrays, forged headers, damaged bytes."""
    n = draw(st.integers(1, 6))
    arrays = good_arrays(n, seed=draw(st.integers(0, 3)), labelled=draw(st.booleans()))
    how = []
    if draw(st.integers(0, valid_share)):
        for _ in range(draw(st.integers(1, 3))):
            how.append(draw(_array_edit(arrays)))
    data = npz_bytes(arrays, compressed=draw(st.booleans()))
    damage = draw(st.sampled_from(["none", "none", "bytes", "truncate", "forge", "empty", "text"]))
    if damage == "bytes":
        data = mutate(data, random.Random(draw(st.integers(0, 2**32))), header_weight=2)
    elif damage == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif damage == "forge" and "features" in arrays and not how:
        data = forged_header(data, draw(st.sampled_from([(10**9, 10**4), (2**40, 2), (n, DIM * 1000), (n * 3, DIM)])))
    elif damage == "empty":
        data = b""
    elif damage == "text":
        data = b"features,paths\n1,2\n"
    how.append(damage)
    return data, ", ".join(how)


def save_arrays(path: Path, arrays: dict) -> Path:
    path.write_bytes(npz_bytes(arrays))
    return path


# --------------------------------------------------------------------------------- properties


def expected_paths(npz: Path) -> set[str]:
    """The absolute paths an accepted embeddings file must put in an index."""
    with np.load(npz, allow_pickle=False) as d:
        return {os.path.abspath(p) for p in d["paths"].tolist()}


def prop_index_from_npz(tmp: Path, data: bytes) -> list[str]:
    """``imagerec index FILE.npz --out DIR``: an index of exactly its images, or one line and no DIR."""
    npz, out = tmp / "given.npz", tmp / "idx"
    npz.write_bytes(data)
    before = tree(tmp)
    o = run_cli("index", npz, "--out", out)
    found = user_error_problems(o, "index")
    stray = [p for p in changes(before, tree(tmp)) if not p.startswith(os.fspath(out))]
    found += [f"wrote outside --out: {stray[:3]}"] if stray else []
    if o.code == 2 and out.exists():
        found.append(f"refused, yet --out was created: {sorted(os.listdir(out))}")
    if o.code == 0:
        from imagerec import load_index  # noqa: PLC0415

        try:
            paths = set(load_index(out).items.paths)
        except Exception as e:  # noqa: BLE001
            return [*found, f"the index written cannot be loaded: {e}"]
        if paths != expected_paths(npz):
            found.append(f"the index holds {sorted(paths)[:3]}..., not the file's images")
    return found


def prop_search_with_npz(tmp: Path, index_dir: Path, data: bytes) -> list[str]:
    """``imagerec search INDEX FILE.npz``: neighbours from the index only, or one line; the index unchanged."""
    npz = tmp / "query.npz"
    npz.write_bytes(data)
    before = tree(index_dir)
    o = run_cli("search", index_dir, npz, "--top-k", "3", "--format", "csv")
    found = user_error_problems(o, "search")
    found += [f"search changed the index: {changes(before, tree(index_dir))[:3]}"] if changes(before, tree(index_dir)) else []
    if o.code == 0:
        found += outside_results(o.out, index_dir)
    return found


def outside_results(csv_text: str, index_dir: Path) -> list[str]:
    """Result rows whose path is not one of the index's images."""
    from imagerec import load_index  # noqa: PLC0415

    table = pd.read_csv(io.StringIO(csv_text), dtype=str, keep_default_na=False) if csv_text.strip() else pd.DataFrame({"path": []})
    known = set(load_index(index_dir).items.paths)
    outside = sorted(set(table["path"]) - known)
    return [f"results name files outside the index: {outside[:3]}"] if outside else []


AUDIT_CHECKS = "near_duplicates,outliers,label_issues"


def prop_audit_npz(tmp: Path, data: bytes) -> list[str]:
    """``imagerec audit FILE.npz --out DIR``: a report, or one line and no DIR."""
    npz, out = tmp / "given.npz", tmp / "audit"
    npz.write_bytes(data)
    before = tree(tmp)
    o = run_cli("audit", npz, "--out", out, "--checks", AUDIT_CHECKS, "--no-progress")
    found = user_error_problems(o, "audit")
    stray = [p for p in changes(before, tree(tmp)) if not p.startswith(os.fspath(out))]
    found += [f"wrote outside --out: {stray[:3]}"] if stray else []
    if o.code == 2 and out.exists():
        found.append(f"refused, yet --out was created: {sorted(os.listdir(out))}")
    return found


# ------------------------------------------------------------------------------- index folders


def build_good_index(folder: Path, arrays: dict | None = None) -> None:
    from imagerec import Embeddings, build_index  # noqa: PLC0415

    npz = save_arrays(folder.parent / f"{folder.name}.src.npz", arrays or good_arrays(6, seed=0))
    build_index(Embeddings.load(npz), folder, progress=False)
    npz.unlink()


@st.composite
def index_damage(draw) -> tuple[str, object]:
    """(kind, detail) of one way an index folder gets damaged or tampered with."""
    kind = draw(
        st.sampled_from(
            ["meta-key", "meta-drop", "meta-bytes", "faiss-bytes", "faiss-truncate", "faiss-swap", "items-bytes", "items-rows", "delete", "none"]
        )
    )
    if kind == "meta-key":
        key = draw(st.sampled_from(["generation", "count", "dim", "kind", "format", "nprobe", "nlist", "exact_max", "backbone",
                                    "preprocessing", "labelled", "faiss_index", "sha256", "metric"]))  # fmt: skip
        value = draw(
            st.one_of(_json_values(), st.sampled_from(["../../outside", "/etc/passwd", "1", -1, 0, 2, 10**20, "ivf", "flat", [1], {}]))
        )
        return kind, (key, value)
    if kind == "meta-drop":
        return kind, draw(st.sampled_from(["generation", "count", "dim", "kind", "backbone", "preprocessing", "exact_max", "sha256"]))
    if kind in ("meta-bytes", "faiss-bytes", "items-bytes"):
        return kind, draw(st.integers(0, 2**32))
    if kind == "faiss-truncate":
        return kind, draw(st.floats(0, 0.999))
    if kind == "faiss-swap":
        return kind, draw(st.sampled_from([(6, 4), (3, DIM), (6, DIM), (50, DIM)]))  # (count, dim) of the other index
    if kind == "items-rows":
        return kind, draw(st.sampled_from(["drop-row", "add-row", "outside-path", "drop-column", "empty"]))
    if kind == "delete":
        return kind, draw(st.sampled_from(["meta.json", "index-1.faiss", "items-1.csv"]))
    return kind, None


def damage_index(folder: Path, kind: str, detail) -> None:
    """Apply :func:`index_damage`'s ``(kind, detail)`` to an index folder of generation 1."""
    meta_path, faiss_path, items_path = folder / "meta.json", folder / "index-1.faiss", folder / "items-1.csv"
    if kind == "meta-key":
        meta = json.loads(meta_path.read_text())
        meta[detail[0]] = detail[1]
        meta_path.write_text(json.dumps(meta))
    elif kind == "meta-drop":
        meta = json.loads(meta_path.read_text())
        meta.pop(detail, None)
        meta_path.write_text(json.dumps(meta))
    elif kind in ("meta-bytes", "faiss-bytes", "items-bytes"):
        path = {"meta-bytes": meta_path, "faiss-bytes": faiss_path, "items-bytes": items_path}[kind]
        path.write_bytes(mutate(path.read_bytes(), random.Random(detail), header_weight=3))
    elif kind == "faiss-truncate":
        data = faiss_path.read_bytes()
        faiss_path.write_bytes(data[: int(len(data) * detail)])
    elif kind == "faiss-swap":
        other = folder.parent / f"{folder.name}.other"
        shutil.rmtree(other, ignore_errors=True)
        count, dim = detail
        build_good_index(other, good_arrays(count, dim=dim, seed=9))
        shutil.copyfile(other / "index-1.faiss", faiss_path)
        shutil.rmtree(other)
    elif kind == "items-rows":
        lines = items_path.read_text().splitlines()
        lines = {
            "drop-row": lambda: lines[:-1],
            "add-row": lambda: [*lines, "/virtual/extra.png,,x"],
            "outside-path": lambda: [lines[0], "/etc/passwd,,x", *lines[2:]],
            "drop-column": lambda: [line.rsplit(",", 1)[0] for line in lines],
            "empty": lambda: [],
        }[detail]()
        items_path.write_text("\n".join(lines) + ("\n" if lines else ""))
    elif kind == "delete":
        (folder / detail).unlink()


def prop_damaged_index(tmp: Path, kind: str, detail) -> list[str]:
    """A damaged index: search and ``--add`` answer or refuse in one line; a refused ``--add``
    changes nothing; results only name the index's images; a rebuild (the advised fix) works."""
    folder = tmp / "idx"
    build_good_index(folder)
    original = set(pd.read_csv(folder / "items-1.csv", dtype=str, keep_default_na=False)["path"])
    damage_index(folder, kind, detail)
    query, new = save_arrays(tmp / "q.npz", good_arrays(2, seed=1)), save_arrays(tmp / "new.npz", good_arrays(3, seed=2))
    found = []
    o = run_cli("search", folder, query, "--top-k", "4", "--format", "csv")
    found += [f"search: {p}" for p in user_error_problems(o, "search")]
    if o.code == 0:
        table = pd.read_csv(io.StringIO(o.out), dtype=str, keep_default_na=False)
        outside = sorted(set(table["path"]) - original)
        found += [f"search results name files outside the index: {outside[:3]}"] if outside else []
    before = tree(tmp, skip=(folder / ".lock",))
    o = run_cli("index", new, "--out", folder, "--add")
    found += [f"--add: {p}" for p in user_error_problems(o, "index")]
    after = tree(tmp, skip=(folder / ".lock",))
    if o.code == 2 and changes(before, after):
        found.append(f"a refused --add changed files: {changes(before, after)[:4]}")
    if o.code != 2:
        stray = [p for p in changes(before, after) if not p.startswith(os.fspath(folder))]
        found += [f"--add wrote outside the index: {stray[:3]}"] if stray else []
    o = run_cli("index", new, "--out", folder)  # the fix the errors advise: rebuild
    if o.code != 0:
        found.append(f"rebuilding over the damaged index failed: {o.err.strip()[-400:]}")
    else:
        o = run_cli("search", folder, query, "--format", "csv")
        if o.code != 0:
            found.append(f"search after the rebuild failed: {o.err.strip()[-300:]}")
        else:
            found += outside_results(o.out, folder)
            found += index_folder_problems(folder)
    return found


def index_folder_problems(folder: Path) -> list[str]:
    """An index folder holds its meta, the lock and exactly the current generation's two files."""
    g = json.loads((folder / "meta.json").read_text())["generation"]
    left = sorted(set(os.listdir(folder)) - {"meta.json", ".lock", f"index-{g}.faiss", f"items-{g}.csv"})
    missing = [name for name in (f"index-{g}.faiss", f"items-{g}.csv") if not (folder / name).is_file()]
    return ([f"the index folder also holds {left}"] if left else []) + ([f"the index folder lacks {missing}"] if missing else [])


# ------------------------------------------------------------------------- parts and --out


@st.composite
def part_sets(draw) -> list[tuple[dict, object]]:
    """2 or 3 part files: (arrays, shard record or None), some from another model, dimension or run."""
    count = draw(st.integers(2, 3))
    parts = []
    for i in range(count):
        arrays = good_arrays(3, seed=10 + i, prefix=f"/parts/{i}")
        meta = {"backbone": BACKBONE, "preprocessing": dict(PREPROCESSING), "shard": {"index": i, "count": count, "images": 3 * count}}
        edit = draw(st.sampled_from(["none", "none", "none", "dim", "backbone", "size", "no-shard", "shard-value", "same-index", "overlap", "drop"]))
        if edit == "dim":
            arrays["features"] = np.ones((3, DIM // 2), np.float32)
        elif edit == "backbone":
            meta["backbone"] = "efficientnet_lite2"
        elif edit == "size":
            meta["preprocessing"]["input_size"] = 96
        elif edit == "no-shard":
            del meta["shard"]
        elif edit == "shard-value":
            meta["shard"] = draw(st.one_of(_json_values(), st.just({"index": count, "count": count, "images": 1})))
        elif edit == "same-index":
            meta["shard"]["index"] = 0
        elif edit == "overlap":
            arrays["paths"] = np.asarray([f"/parts/0/{10}_{j:03d}.png" for j in range(3)])
        if edit == "drop" and i:
            continue
        arrays["meta"] = np.asarray(json.dumps(meta))
        parts.append(arrays)
    return parts


def prop_parts(tmp: Path, parts: list[dict]) -> list[str]:
    """``imagerec index --parts ...``: the union of the parts, or one line and no --out."""
    files = [save_arrays(tmp / f"part-{i}.npz", arrays) for i, arrays in enumerate(parts)]
    out = tmp / "idx"
    before = tree(tmp)
    o = run_cli("index", "--parts", *files, "--out", out)
    found = user_error_problems(o, "index")
    stray = [p for p in changes(before, tree(tmp)) if not p.startswith(os.fspath(out))]
    found += [f"wrote outside --out: {stray[:3]}"] if stray else []
    if o.code == 2 and out.exists():
        found.append(f"refused, yet --out was created: {sorted(os.listdir(out))}")
    if o.code == 0:
        from imagerec import load_index  # noqa: PLC0415

        paths = set(load_index(out).items.paths)
        wanted = set().union(*(expected_paths(f) for f in files))
        found += [] if paths == wanted else [f"the merged index holds {len(paths)} images, not the parts' {len(wanted)}"]
    return found


OUT_KINDS = ["file", "under-a-file", "folder-of-photos", "folder-with-notes", "empty-folder", "an-index", "new", "nested-new", "odd-name", "long-name"]
ODD_FOLDER = os.fsdecode(b"caf\xe9 \t\x01 idx")  # a byte that is not UTF-8, a tab, a control character


def prop_out_kind(tmp: Path, kind: str) -> list[str]:
    """``imagerec index E.npz --out OUT``: OUT of every kind either becomes the index or is refused
    in one line, before any work, with nothing of the user's changed."""
    npz = save_arrays(tmp / "e.npz", good_arrays(4, seed=3))
    out = {"file": tmp / "notes.txt", "under-a-file": tmp / "notes.txt" / "idx", "folder-of-photos": tmp / "photos",
           "folder-with-notes": tmp / "mixed", "empty-folder": tmp / "empty", "an-index": tmp / "old",
           "new": tmp / "idx", "nested-new": tmp / "a" / "b" / "idx", "odd-name": tmp / ODD_FOLDER,
           "long-name": tmp / "new" / ("l" * 300)}[kind]  # fmt: skip
    (tmp / "notes.txt").write_text("mine")
    (tmp / "photos").mkdir()
    (tmp / "photos" / "cat.png").write_bytes(b"not really a png")
    (tmp / "photos" / "index-keep.faiss").write_bytes(b"a file of the user's that looks like ours")
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "meta.json").write_text("{}")
    (tmp / "mixed" / "README").write_text("mine")
    (tmp / "empty").mkdir()
    build_good_index(tmp / "old")
    before = tree(tmp)
    o = run_cli("index", npz, "--out", out)
    found = user_error_problems(o, "index")
    after = tree(tmp)
    touched = [p for p in changes(before, after) if not (p.startswith(os.fspath(out) + os.sep) or p == os.fspath(out))]
    touched = [p for p in touched if not (kind == "nested-new" and p in (os.fspath(tmp / "a"), os.fspath(tmp / "a" / "b")))]
    found += [f"changed outside --out: {touched[:3]}"] if touched else []
    should_refuse = kind in ("file", "under-a-file", "folder-of-photos", "folder-with-notes", "long-name")
    if should_refuse and o.code != 2:
        found.append(f"--out {kind} was not refused (exit {o.code})")
    if should_refuse and changes(before, after):
        found.append(f"a refused --out {kind} changed files: {changes(before, after)[:3]}")
    if not should_refuse:
        if o.code != 0:
            found.append(f"--out {kind} failed: {o.err.strip()[-300:]}")
        else:
            found += index_folder_problems(out)
            o = run_cli("search", out, npz, "--format", "csv")
            found += [f"search: {p}" for p in user_error_problems(o, "search")] + ([] if o.code else outside_results(o.out, out))
    return found


# --------------------------------------------------------------------------------- manifests

MANIFEST_ROWS = [
    "a.png",
    "sub/b.png",
    "sub/../a.png",  # inside once normalised
    "../outside.png",
    "sub/../../outside.png",
    "{abs_outside}",
    "{abs_inside}",
    "link.png",  # a link inside the folder to a file outside: the folder owner's choice, followed
    "missing.png",
    "tab\tname.png",
    "n" * 200 + ".png",
    "./a.png",
    "",
    "/",
    "..",
    "a.png\x00x",
]


def make_manifest_folder(tmp: Path) -> Path:
    """``tmp/data`` with a few small images (odd names among them) and ``tmp/outside.png`` beside it."""
    from PIL import Image  # noqa: PLC0415

    data = tmp / "data"
    (data / "sub").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["a.png", "sub/b.png", "tab\tname.png", "n" * 200 + ".png"]):
        Image.new("RGB", (16, 16), (40 * i, 200 - 30 * i, 90)).save(data / name)
    Image.new("RGB", (16, 16), (250, 0, 0)).save(tmp / "outside.png")
    link = data / "link.png"
    if not link.is_symlink():
        link.symlink_to(tmp / "outside.png")
    return data


@st.composite
def manifests(draw) -> tuple[list[str], bool, bool]:
    """(rows, labelled, with a header)."""
    rows = draw(st.lists(st.sampled_from(MANIFEST_ROWS), min_size=1, max_size=8))
    return rows, draw(st.booleans()), draw(st.booleans())


def prop_manifest(tmp: Path, rows: list[str], labelled: bool, header: bool) -> list[str]:
    """``imagerec audit MANIFEST`` (pixel checks only, no model): no row outside the manifest's
    folder is read (it is a reported skip), or one line; nothing written outside --out."""
    import csv  # noqa: PLC0415

    data = make_manifest_folder(tmp)
    manifest, out = data / "list.csv", tmp / "audit"
    lines = [r.format(abs_outside=tmp / "outside.png", abs_inside=data / "a.png") for r in rows]
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(["path", "label"] if labelled else ["path"])
        for n, line in enumerate(lines):
            writer.writerow([line, f"c{n % 2}"] if labelled else [line])
    before = tree(tmp, skip=(out,))
    o = run_cli("audit", manifest, "--out", out, "--checks", "exact_duplicates,quality", "--no-progress")
    found = user_error_problems(o, "audit")
    stray = changes(before, tree(tmp, skip=(out,)))
    found += [f"wrote outside --out: {stray[:3]}"] if stray else []
    if o.code == 0:
        images = pd.read_csv(out / "images.csv", dtype=str, keep_default_na=False)
        inside = os.path.abspath(data)
        outside = [p for p in images["path"] if os.path.commonpath([inside, os.path.abspath(p)]) != inside]
        found += [f"read rows outside the manifest's folder: {outside[:3]}"] if outside else []
        wanted = {os.path.normpath(os.path.join(inside, r)) for r in lines}
        extra = sorted(set(images["path"]) - wanted)
        found += [f"audited files the manifest does not list: {extra[:3]}"] if extra else []
        skipped = set(pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)["path"]) if (out / "skipped.csv").is_file() else set()
        unread = set(pd.read_csv(out / "unreadable.csv", dtype=str, keep_default_na=False)["path"]) if (out / "unreadable.csv").is_file() else set()
        rows_read = [r for r in lines if r.strip()]  # blank rows are not rows
        for r in rows_read if header else rows_read[1:]:  # without a header, the first row may be taken for one
            file = os.path.normpath(os.path.join(inside, r))
            if os.path.commonpath([inside, file]) != inside and file not in skipped | unread:
                found.append(f"the row {r!r} outside the folder is not reported as skipped")
                break
    return found
