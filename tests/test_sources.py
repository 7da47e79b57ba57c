"""Every way to name images gives one ImageSource; bad layouts give errors that name the folder."""

from __future__ import annotations

import numpy as np
import pytest

from imagerec import ImagerecError, load_images
from imagerec.data import report_skipped, stratified_split
from imagerec._decode import Skipped

from .conftest import make_class_folder, make_image


def test_class_folders(class_folder):
    src = load_images(class_folder)
    assert src.classes == ["cat", "dog"]
    assert len(src) == 12 and src.labelled
    assert np.bincount(src.labels).tolist() == [6, 6]
    img, label = src[7]
    assert img.mode == "RGB" and label == 1


def test_extensions_in_any_case_and_other_files_ignored(tmp_path):
    root = tmp_path / "d"
    make_image(root / "a" / "x.JPG", fmt="JPEG")
    make_image(root / "a" / "y.webp")
    make_image(root / "b" / "z.TIFF", fmt="TIFF")
    (root / "b" / "readme.txt").write_text("not an image")
    src = load_images(root)
    assert sorted(p.rsplit("/", 1)[1] for p in src.paths) == ["x.JPG", "y.webp", "z.TIFF"]


def test_split_root_with_test_folder(tmp_path):
    make_class_folder(tmp_path / "train", per_class=5)
    make_class_folder(tmp_path / "test", per_class=2)
    assert len(load_images(tmp_path, "train")) == 10
    assert len(load_images(tmp_path, "test")) == 4
    assert len(load_images(tmp_path)) == 14
    train = load_images(tmp_path, "train", val_fraction=0.2)
    val = load_images(tmp_path, "val", val_fraction=0.2)
    assert len(train) == 8 and len(val) == 2
    assert not set(train.paths) & set(val.paths)


def test_split_root_classes_must_match(tmp_path):
    make_class_folder(tmp_path / "train", classes=("cat", "dog"))
    make_class_folder(tmp_path / "val", classes=("cat", "cow"))
    with pytest.raises(ImagerecError, match="differ from those of"):
        load_images(tmp_path, "train")


def test_stratified_seeded_split(class_folder):
    a = load_images(class_folder, "val", val_fraction=0.34, seed=1)
    b = load_images(class_folder, "val", val_fraction=0.34, seed=1)
    c = load_images(class_folder, "val", val_fraction=0.34, seed=2)
    assert a.paths == b.paths and a.paths != c.paths
    assert np.bincount(a.labels).tolist() == [2, 2]  # each class contributes its share


def test_stratified_split_keeps_every_class_in_both_parts():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    train, val = stratified_split(labels, len(labels), 0.1, seed=0)
    assert set(labels[val]) == {0, 1, 2} and set(labels[train]) == {0, 1, 2}
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(12))


def test_no_test_split_is_an_error(class_folder):
    with pytest.raises(ImagerecError, match="has no test split"):
        load_images(class_folder, "test")


def test_val_without_fraction_is_an_error(class_folder):
    with pytest.raises(ImagerecError, match="--val-fraction"):
        load_images(class_folder, "val")


def test_unlabelled_folder_is_searched_recursively(tmp_path):
    make_image(tmp_path / "p" / "top.jpg", fmt="JPEG")
    make_image(tmp_path / "p" / "2024" / "may" / "deep.png")
    src = load_images(tmp_path / "p")
    assert not src.labelled and src.classes is None
    assert len(src) == 2


def test_forcing_unlabelled_on_class_folders(class_folder):
    src = load_images(class_folder, labelled=False)
    assert not src.labelled and len(src) == 12


def test_empty_class_folder_is_an_error_naming_it(class_folder):
    (class_folder / "zebra").mkdir()
    with pytest.raises(ImagerecError, match=r"class folder .*zebra has no images"):
        load_images(class_folder)


def test_empty_dataset_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ImagerecError, match=r"nothing: holds no images"):
        load_images(tmp_path / "nothing")


def test_missing_path(tmp_path):
    with pytest.raises(ImagerecError, match="no such file or folder"):
        load_images(tmp_path / "absent")


def test_requiring_labels_on_loose_images(tmp_path):
    make_image(tmp_path / "p" / "a.png")
    with pytest.raises(ImagerecError, match="one folder per class"):
        load_images(tmp_path / "p", labelled=True)


def test_manifest_with_relative_paths(tmp_path):
    make_image(tmp_path / "imgs" / "a.png", seed=1)
    make_image(tmp_path / "imgs" / "b.png", seed=2)
    (tmp_path / "list.csv").write_text("path,label\nimgs/a.png,zebra\nimgs/b.png,ant\nimgs/gone.png,ant\n")
    src = load_images(tmp_path / "list.csv")
    assert src.classes == ["ant", "zebra"]
    assert src.labels.tolist() == [1, 0]
    assert [s.reason for s in src.skipped] == ["file not found (listed in the manifest)"]


def test_manifest_without_labels(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("a.png\n")
    assert not load_images(tmp_path / "m.csv").labelled


def test_manifest_with_some_labels_missing(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("a.png,x\nb.png\n")
    with pytest.raises(ImagerecError, match="row 2 has no label"):
        load_images(tmp_path / "m.csv")


def test_not_a_manifest(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ImagerecError, match="not a .csv manifest"):
        load_images(tmp_path / "x.txt")


@pytest.mark.parametrize("kwargs", [{"split": "dev"}, {"val_fraction": 1.0}, {"max_pixels": 0}])
def test_bad_arguments(class_folder, kwargs):
    with pytest.raises(ImagerecError):
        load_images(class_folder, **kwargs)


def test_report_skipped_prints_a_count_and_writes_the_full_list(tmp_path, capsys):
    skipped = [Skipped(f"/d/{i}.jpg", "corrupt") for i in range(8)]
    written = report_skipped(skipped, tmp_path / "run")
    err = capsys.readouterr().err
    assert "skipped 8 unreadable image(s)" in err and "(+3 more)" in err
    assert written.read_text().count("\n") == 9  # header + 8 rows


# -- issue 10: manifests that point outside, headers, encodings; link loops; odd names ----------

import os  # noqa: E402


def test_manifest_paths_outside_its_folder_are_refused_and_reported(tmp_path):
    make_image(tmp_path / "secret.png", seed=3)
    make_image(tmp_path / "set" / "a.png", seed=1)
    manifest = tmp_path / "set" / "m.csv"
    manifest.write_text(f"path\na.png\n../secret.png\n{tmp_path / 'secret.png'}\n")
    src = load_images(manifest)
    assert [os.path.basename(p) for p in src.paths] == ["a.png"]
    assert len(src.skipped) == 2
    assert all("--allow-outside" in s.reason for s in src.skipped)
    assert load_images(manifest, allow_outside=True).paths[1:] == [str(tmp_path / "secret.png")] * 2


def test_a_manifest_whose_every_path_is_outside_says_so(tmp_path):
    make_image(tmp_path / "x.png")
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "m.csv").write_text("../x.png\n")
    with pytest.raises(ImagerecError, match="outside its folder.*--allow-outside"):
        load_images(tmp_path / "set" / "m.csv")


@pytest.mark.parametrize("header", ["file,class", "filename,label", "image,category", "path,label"])
def test_any_header_row_is_not_read_as_an_image(tmp_path, header):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", seed=1)
    (tmp_path / "m.csv").write_text(f"{header}\na.png,x\nb.png,y\n")
    src = load_images(tmp_path / "m.csv")
    assert src.classes == ["x", "y"] and src.skipped == []


def test_a_first_row_naming_an_image_is_data(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("a.png,x\nmissing.png,y\n")
    src = load_images(tmp_path / "m.csv")
    assert len(src) == 1 and src.classes == ["x"] and len(src.skipped) == 1


def test_a_latin1_manifest_is_one_clear_error(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("a.png,café\n".encode("latin-1"))
    with pytest.raises(ImagerecError, match="not UTF-8.*save it as UTF-8"):
        load_images(tmp_path / "m.csv")


def test_link_loops_give_each_image_once_and_terminate(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", seed=1)
    os.symlink(".", tmp_path / "self")
    assert len(load_images(tmp_path)) == 2
    os.symlink(".", tmp_path / "again")
    assert len(load_images(tmp_path)) == 2


def test_report_skipped_writes_a_non_utf8_name_as_an_escape(tmp_path, capsys):
    name = os.fsdecode(b"/d/caf\xe9.jpg")
    written = report_skipped([Skipped(name, "corrupt")], tmp_path / "run")
    assert "caf\\xe9.jpg" in written.read_text(encoding="utf-8")
    assert "caf\\xe9.jpg" in capsys.readouterr().err
