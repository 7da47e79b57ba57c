"""imagerec.runtime: numpy preprocessing equal to eval_transform, ONNX predictions equal to
Classifier's, no torch imported, and clear errors for the wrong files."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import _compute_resized_output_size

import imagerec.runtime as rt
from imagerec import Classifier, ImagerecError, SkippedImagesWarning, create_backbone
from imagerec._decode import to_rgb
from imagerec._metadata import KEY_FORMAT
from imagerec.checkpoint import Checkpoint, save_checkpoint
from imagerec.data import Preprocessing
from imagerec.data.transforms import eval_transform
from imagerec.export import export_model
from imagerec.prediction import format_predictions, predict_top_k
from imagerec.runtime._preprocess import resized_size

from .conftest import make_colour_dataset, make_image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PARITY = 1e-4  # max abs difference of normalised pixels, and of probabilities


# -- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "size", "crop_pct"),
    [
        (32, 32, 96, 1.0),  # upscaling
        (500, 375, 224, 0.875),  # downscaling a landscape photo
        (375, 500, 224, 0.875),  # and a portrait one
        (37, 53, 33, 0.9),  # odd sizes, odd crop offsets
        (101, 67, 64, 0.95),
        (40, 40, 32, 1.0),
        (79, 30, 24, 1.0),  # a crop offset of 19.5 rounds to 20
    ],
)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_preprocess_matches_eval_transform(width, height, size, crop_pct, interpolation):
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pp = Preprocessing(size, *IMAGENET, interpolation, crop_pct)
    got = rt.preprocess(pixels, pp)
    per_image = eval_transform(pp)(Image.fromarray(pixels)).numpy()
    batched = eval_transform(pp, batched=True)(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0].numpy()
    assert got.shape == (3, size, size) and got.dtype == np.float32
    assert np.abs(got - per_image).max() <= PARITY
    assert np.abs(got - batched).max() <= PARITY


def test_preprocess_takes_pil_images_of_any_mode_and_runtime_preprocessing():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 30, 4), dtype=np.uint8), "RGBA")
    pp = Preprocessing(24, *IMAGENET, "bicubic", 0.875)
    expected = eval_transform(pp)(to_rgb(image)).numpy()  # Classifier converts PIL images so
    for spec in (pp, pp.to_dict(), rt.Preprocessing.from_dict(pp.to_dict())):
        assert np.abs(rt.preprocess(image, spec) - expected).max() <= PARITY


@pytest.mark.parametrize("short", [24, 33, 224, 256])
def test_resized_size_is_torchvisions(short):
    for height, width in [(375, 500), (500, 375), (37, 53), (1000, 999), (7, 3000), (64, 64)]:
        assert list(resized_size(height, width, short)) == _compute_resized_output_size((height, width), [short])


def test_preprocess_refuses_what_is_not_an_rgb_picture():
    pp = Preprocessing(32, *IMAGENET)
    with pytest.raises(ImagerecError, match=r"uint8 pixels of shape \(H, W, 3\)"):
        rt.preprocess(np.zeros((8, 8, 3), np.float32), pp)
    with pytest.raises(ImagerecError, match="crop_pct=1.5"):
        rt.preprocess(np.zeros((8, 8, 3), np.uint8), dict(pp.to_dict(), crop_pct=1.5))
    with pytest.raises(ImagerecError, match="interpolation 'area'"):
        rt.Preprocessing.from_dict(dict(pp.to_dict(), interpolation="area"))


# -- an exported model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A seed_cnn checkpoint that resizes with bicubic and crops, its ONNX export, and images."""
    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    model = create_backbone("seed_cnn", num_classes=3)
    with torch.no_grad():
        model.fc3.weight.mul_(20)  # spread the probabilities, so a preprocessing error shows
    # the checkpoint's preprocessing is what runs: bicubic with a centre crop exercises every step
    pp = replace(model.preprocessing, interpolation="bicubic", crop_pct=0.875)
    classes = ["blue", "green", "red"]
    meta = {"backbone": "seed_cnn", "classes": classes, "preprocessing": pp.to_dict()}
    ckpt = save_checkpoint(root / "best.safetensors", Checkpoint(model.state_dict(), meta))
    onnx_path = export_model(ckpt, root / "model.onnx")
    data = make_colour_dataset(root / "data", per_class=2, size=(45, 38))
    images = sorted(str(p) for p in data.rglob("*.png")) + [str(make_image(root / "odd.png", (31, 70), seed=3))]
    return ckpt, onnx_path, images


def test_load_reads_the_metadata(exported):
    _, path, _ = exported
    model = rt.load(path, threads=1)
    assert model.classes == ["blue", "green", "red"] and model.backbone == "seed_cnn"
    assert model.preprocessing == rt.Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875, True)
    assert model.compression == {} and model.path == path
    assert rt.load(path.parent).path == path  # a run folder means its model.onnx


@pytest.mark.parametrize("tta", [False, True])
def test_predict_proba_matches_classifier(exported, tta):
    ckpt, path, images = exported
    expected = Classifier.load(ckpt).predict_proba(images, tta=tta)
    got = rt.load(path, threads=1).predict_proba(images, tta=tta, batch_size=3)
    assert got.shape == expected.shape == (len(images), 3) and got.dtype == np.float32
    assert np.ptp(expected, axis=0).max() > 0.05  # the images differ enough for the check to mean something
    assert np.abs(got - expected).max() <= PARITY


def test_tta_averages_the_logits_of_the_mirror(exported):
    _, path, images = exported
    model = rt.load(path, threads=1)
    batch = np.stack([rt.preprocess(Image.open(p), model.preprocessing) for p in images[:3]])
    logits = (model.logits(batch) + model.logits(batch[..., ::-1])) / 2
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.abs(model.predict_proba(images[:3], tta=True) - expected).max() <= 1e-6
    assert np.abs(model.predict_proba(images[:3]) - expected).max() > 1e-4  # tta changes something


def test_predict_paths_pil_images_arrays_and_folders_alike(exported):
    ckpt, path, images = exported
    model = rt.load(path, threads=1)
    names = model.predict(images)
    assert names == Classifier.load(ckpt).predict(images)
    assert set(names) <= set(model.classes)
    pils = [Image.open(p) for p in images]
    assert model.predict(pils) == names
    assert model.predict([np.asarray(img.convert("RGB")) for img in pils]) == names
    folder = path.parent / "data"
    assert model.predict(folder) == model.predict(sorted(images[:-1]))
    assert model.predict(str(folder / "red" / "*.png")) == names[4:6]


# -- no PyTorch ------------------------------------------------------------------------------


def test_runs_with_torch_blocked(exported):
    _, path, images = exported
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'timm'): sys.modules[name] = None\n"
        "import imagerec.runtime as rt\n"
        f"m = rt.load({str(path)!r}, threads=1)\n"
        f"print(m.predict([{images[0]!r}])[0])\n"
        "leaked = [k for k, v in sys.modules.items() if v is not None and\n"
        "          (k.split('.')[0] in ('torch', 'torchvision', 'timm') or k.startswith('imagerec.data'))]\n"
        "print('leaked', leaked)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    name, leaked = result.stdout.splitlines()
    assert name in ("blue", "green", "red")
    assert leaked == "leaked []"


# -- bad input -------------------------------------------------------------------------------


def test_load_refuses_a_checkpoint_and_says_to_export_it(exported):
    ckpt, _, _ = exported
    with pytest.raises(ImagerecError, match=r"not an ONNX model.*imagerec export"):
        rt.load(ckpt)
    renamed = ckpt.parent / "checkpoint.bin"  # recognised by its content, not only its name
    renamed.write_bytes(ckpt.read_bytes())
    with pytest.raises(ImagerecError, match="safetensors"):
        rt.load(renamed)


def test_load_refuses_random_bytes_and_missing_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(ImagerecError, match=r"junk.onnx: not an ONNX model that ONNX Runtime can read"):
        rt.load(junk)
    with pytest.raises(ImagerecError, match=r"nope.onnx: no such file"):
        rt.load(tmp_path / "nope.onnx")
    with pytest.raises(ImagerecError, match="without model.onnx"):
        rt.load(tmp_path)


def test_load_refuses_onnx_without_imagerec_metadata(tmp_path):
    path = tmp_path / "plain.onnx"
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, torch.zeros(1, 3, 8, 8), str(path), input_names=["images"], output_names=["logits"], dynamo=False
        )
    with pytest.raises(ImagerecError, match=r"without imagerec's metadata.*imagerec export"):
        rt.load(path)


def test_load_refuses_an_unknown_format(exported, tmp_path):
    _, path, _ = exported
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == KEY_FORMAT:
            entry.value = "imagerec.onnx/2"
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(ImagerecError, match=r"'imagerec.onnx/2'.*upgrade imagerec"):
        rt.load(tmp_path / "future.onnx")


def test_a_corrupt_image_gives_a_nan_row_and_a_warning(exported, tmp_path):
    _, path, images = exported
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    model = rt.load(path, threads=1)
    with pytest.warns(SkippedImagesWarning, match=r"1 image\(s\) could not be read: .*bad.jpg"):
        proba = model.predict_proba([images[0], bad, images[1]], batch_size=2)
    assert np.isnan(proba[1]).all() and not np.isnan(proba[[0, 2]]).any()
    assert [s.path for s in model.last_skipped] == [str(bad)]
    assert np.abs(proba[[0, 2]] - model.predict_proba(images[:2])).max() == 0
    with pytest.warns(SkippedImagesWarning):
        assert model.predict([bad, images[0]])[0] is None


def test_predict_refuses_missing_paths_and_wrong_objects(exported, tmp_path):
    _, path, images = exported
    model = rt.load(path, threads=1)
    with pytest.raises(ImagerecError, match="missing.png: no such file or folder"):
        model.predict([images[0], tmp_path / "missing.png"])
    with pytest.raises(ImagerecError, match="type dict"):
        model.predict([{"not": "an image"}])
    with pytest.raises(ImagerecError, match=r"\(N, 3, 32, 32\)"):
        model.logits(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ImagerecError, match="no images given"):
        model.predict([])


# -- issue 10: names before globs, odd names, formats, skips reported --------------------------


def test_an_existing_name_with_brackets_is_a_file_not_a_glob(exported, tmp_path):
    _, onnx_path, images = exported
    photo = tmp_path / "photo[1].png"
    photo.write_bytes(open(images[0], "rb").read())
    model = rt.load(onnx_path)
    np.testing.assert_allclose(model.predict_proba(str(photo)), model.predict_proba(images[0]), atol=1e-6)
    rows = predict_top_k(onnx_path, [str(photo)], top_k=1)
    assert rows[0]["path"] == str(photo) and rows[0]["error"] is None


def test_predict_reports_skips_like_embed_and_shows_odd_names(exported, tmp_path, capsys):
    _, onnx_path, images = exported
    odd = tmp_path / os.fsdecode(b"caf\xe9.png")
    odd.write_bytes(open(images[0], "rb").read())
    eps = tmp_path / "photo.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EOF\n")
    out = tmp_path / "pred.csv"
    rows = predict_top_k(onnx_path, [str(odd), str(eps)], top_k=1, out=out)
    assert rows[0]["error"] is None and "not an image file imagerec reads" in rows[1]["error"]
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "photo.jpg" in err
    assert "photo.jpg" in (tmp_path / "pred.skipped.csv").read_text()
    text = format_predictions(rows, "csv")
    text.encode("utf-8")  # writable as UTF-8: no lone surrogates
    assert "caf\\xe9.png" in text
