"""``imagerec export``: ONNX and TorchScript files that give PyTorch's logits, carry the class
names and preprocessing, refuse what they cannot write, and never leave a wrong file behind."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

import imagerec.export
from imagerec import ImagerecError, __version__, create_backbone
from imagerec._metadata import (
    INPUT_NAME,
    KEY_BACKBONE,
    KEY_CLASSES,
    KEY_COMPRESSION,
    KEY_FORMAT,
    KEY_PREPROCESSING,
    KEY_VERSION,
    ONNX_FORMAT,
    OUTPUT_NAME,
    onnx_metadata,
)
from imagerec._onnx import onnx_session
from imagerec.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from imagerec.data import Preprocessing, decode_small_images, iter_batches, load_images
from imagerec.export import PARITY_RTOL, export_model

from .conftest import CIFAR_JPEG, make_colour_dataset, make_image, needs_cifar, run_cli

CLASSES = ["blue", "green", "red"]


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    """The export's own rule: the largest difference relative to the largest logit."""
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def image_batch(data, pp: Preprocessing) -> torch.Tensor:
    """Every image under ``data`` prepared by ``pp``: float tensor (N, 3, S, S)."""
    source = load_images(data, labelled=False)
    return torch.cat([b.images for b in iter_batches(source, pp, batch_size=64, workers=0)])


def torch_logits(ckpt_path, images: torch.Tensor) -> np.ndarray:
    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    with torch.inference_mode():
        return model(images).numpy()


def jit_load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch marks TorchScript deprecated
        return torch.jit.load(str(path), **kwargs)


def onnx_logits(path, images: torch.Tensor) -> np.ndarray:
    return onnx_session(path).run(None, {INPUT_NAME: images.numpy()})[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A seed_cnn run folder and an (untrained) EfficientNet-Lite0 checkpoint at 48 px, and real images."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    seed = create_backbone("seed_cnn", num_classes=3)
    with torch.no_grad():
        seed.fc3.weight.mul_(20)  # logits of a few units, so that a wrong model shows
    seed_pp = replace(seed.preprocessing, interpolation="bicubic", crop_pct=0.875)
    seed_ckpt = save_checkpoint(
        root / "run" / "best.safetensors",
        Checkpoint(seed.state_dict(), {"backbone": "seed_cnn", "classes": CLASSES, "preprocessing": seed_pp.to_dict()}),
    )
    torch.manual_seed(0)
    eff = create_backbone("efficientnet_lite0", num_classes=4, pretrained=False)
    eff_pp = eff.preprocessing.resolve(48, 1.0)
    eff_meta = {"backbone": "efficientnet_lite0", "classes": ["a", "b", "c", "d"], "preprocessing": eff_pp.to_dict()}
    eff_ckpt = save_checkpoint(root / "eff.safetensors", Checkpoint(eff.state_dict(), eff_meta))
    data = make_colour_dataset(root / "data", per_class=2, size=(45, 38))
    make_image(data / "odd.png", (31, 70), seed=3)
    return {"seed_cnn": seed_ckpt, "efficientnet_lite0": eff_ckpt, "data": data, "root": root}


# -- ONNX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["seed_cnn", "efficientnet_lite0"])
def test_onnx_export_names_axes_metadata_and_parity(checkpoints, tmp_path, backbone):
    ckpt_path = checkpoints[backbone]
    ckpt = load_checkpoint(ckpt_path)
    size = ckpt.meta["preprocessing"]["input_size"]
    out = export_model(ckpt_path, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx" and out.is_file()

    session = onnx_session(out)
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and outp.name == "logits" == OUTPUT_NAME
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, size, size]  # a named, dynamic batch axis
    assert isinstance(outp.shape[0], str) and outp.shape[1] == len(ckpt.meta["classes"])

    meta = metadata(out)
    assert meta[KEY_FORMAT] == ONNX_FORMAT
    assert json.loads(meta[KEY_CLASSES]) == ckpt.meta["classes"]
    assert json.loads(meta[KEY_PREPROCESSING]) == ckpt.meta["preprocessing"]
    assert meta[KEY_BACKBONE] == backbone and meta[KEY_VERSION] == __version__
    assert json.loads(meta[KEY_COMPRESSION]) == {}
    assert meta["classes"] == ",".join(ckpt.meta["classes"]) and meta["input_size"] == str(size)

    pp = Preprocessing.from_dict(ckpt.meta["preprocessing"])
    images = image_batch(checkpoints["data"], pp)
    assert images.shape == (7, 3, size, size)
    expected = torch_logits(ckpt_path, images)
    for batch in (images[:1], images[:5]):  # batch 1 and batch 5 through the one file
        got = session.run(None, {"images": batch.numpy()})[0]
        assert got.shape == (len(batch), len(ckpt.meta["classes"]))
        assert relative_error(expected[: len(batch)], got) <= 1e-4
    assert np.ptp(expected, axis=0).max() > 1e-3 * np.abs(expected).max()  # the images give different logits


def test_default_output_is_model_onnx_beside_the_checkpoint(checkpoints):
    run = checkpoints["seed_cnn"].parent
    out = export_model(run)
    try:
        assert out == run / "model.onnx" and out.is_file()
    finally:
        out.unlink()


def test_image_size_override_is_stored_in_the_metadata(checkpoints, tmp_path):
    ckpt_path = checkpoints["efficientnet_lite0"]
    out = export_model(ckpt_path, tmp_path / "m64.onnx", image_size=64)
    stored = json.loads(metadata(out)[KEY_PREPROCESSING])
    assert stored == dict(load_checkpoint(ckpt_path).meta["preprocessing"], input_size=64)
    assert metadata(out)["input_size"] == "64"
    assert onnx_session(out).get_inputs()[0].shape[1:] == [3, 64, 64]
    images = image_batch(checkpoints["data"], Preprocessing.from_dict(stored))
    assert relative_error(torch_logits(ckpt_path, images), onnx_logits(out, images)) <= 1e-4


def test_a_fixed_size_model_refuses_another_size(checkpoints, tmp_path):
    with pytest.raises(ImagerecError, match=r"image size 64 px: this model takes only 32 px"):
        export_model(checkpoints["seed_cnn"], tmp_path / "m.onnx", image_size=64)
    assert not (tmp_path / "m.onnx").exists()
    assert export_model(checkpoints["seed_cnn"], tmp_path / "m.onnx", image_size=32).is_file()  # its own size is fine


# -- TorchScript -----------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["seed_cnn", "efficientnet_lite0"])
def test_torchscript_loads_carries_metadata_and_matches(checkpoints, tmp_path, backbone):
    ckpt_path = checkpoints[backbone]
    out = export_model(ckpt_path, tmp_path / "m.pt", format="torchscript")
    extra = {"imagerec.json": ""}
    scripted = jit_load(out, _extra_files=extra)
    stored = json.loads(extra["imagerec.json"])
    ckpt = load_checkpoint(ckpt_path)
    # the same metadata as an ONNX file of the checkpoint carries
    assert stored == onnx_metadata(backbone, ckpt.meta["classes"], ckpt.meta["preprocessing"])
    assert json.loads(stored[KEY_CLASSES]) == ckpt.meta["classes"]
    assert json.loads(stored[KEY_PREPROCESSING]) == ckpt.meta["preprocessing"]

    images = image_batch(checkpoints["data"], Preprocessing.from_dict(ckpt.meta["preprocessing"]))
    with torch.inference_mode():
        got = scripted(images).numpy()  # traced on one image, run on seven
    assert relative_error(torch_logits(ckpt_path, images), got) <= 1e-4


# -- errors ----------------------------------------------------------------------------------


def test_unknown_format(checkpoints, tmp_path):
    with pytest.raises(ImagerecError, match=r"format 'tflite' is not one of onnx, torchscript"):
        export_model(checkpoints["seed_cnn"], tmp_path / "m.tflite", format="tflite")


@pytest.mark.parametrize(
    ("fmt", "name", "fragment"),
    [("onnx", "m.pt", r"m\.pt: a onnx file should end in \.onnx"), ("torchscript", "m.onnx", r"should end in \.pt")],
)
def test_wrong_suffix(checkpoints, tmp_path, fmt, name, fragment):
    with pytest.raises(ImagerecError, match=fragment):
        export_model(checkpoints["seed_cnn"], tmp_path / name, format=fmt)
    assert not (tmp_path / name).exists()


def test_files_that_are_not_checkpoints(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(ImagerecError, match=r"notes\.txt: not a readable checkpoint"):
        export_model(notes, tmp_path / "m.onnx")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ImagerecError, match=r"junk\.safetensors: not a readable checkpoint"):
        export_model(junk, tmp_path / "m.onnx")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ImagerecError, match=r"not an imagerec checkpoint"):
        export_model(foreign, tmp_path / "m.onnx")
    with pytest.raises(ImagerecError, match=r"nothing\.safetensors: no such checkpoint file or run folder"):
        export_model(tmp_path / "nothing.safetensors", tmp_path / "m.onnx")
    with pytest.raises(ImagerecError, match=r"no best\.safetensors or last\.safetensors in this folder"):
        export_model(tmp_path, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# -- the parity check ------------------------------------------------------------------------


class _Shifted:
    """An ONNX Runtime session whose logits are off by ``shift`` times the largest logit."""

    def __init__(self, session, shift: float):
        self.session, self.shift = session, shift

    def run(self, names, feeds):
        out = self.session.run(names, feeds)
        return [out[0] + self.shift * np.abs(out[0]).max()] + out[1:]


def test_parity_check_removes_an_onnx_file_that_differs(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(imagerec.export, "onnx_session", lambda path: _Shifted(onnx_session(path), 1e-3))
    with pytest.raises(
        ImagerecError, match=r"m\.onnx: the exported model's logits differ from PyTorch's by 1\.00e-03.*removed"
    ):
        export_model(checkpoints["seed_cnn"], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one is left

    # a difference within the rule (relative to the largest logit) is accepted
    monkeypatch.setattr(imagerec.export, "onnx_session", lambda path: _Shifted(onnx_session(path), 0.1 * PARITY_RTOL))
    assert export_model(checkpoints["seed_cnn"], tmp_path / "m.onnx").is_file()


def test_parity_check_removes_a_torchscript_file_that_differs(checkpoints, tmp_path, monkeypatch):
    original = imagerec.export._export_torchscript

    def shifted(*args):
        got = original(*args)
        assert args[1].is_file()  # the file was written, and must now go
        return got + 1e-2 * np.abs(got).max()

    monkeypatch.setattr(imagerec.export, "_export_torchscript", shifted)
    with pytest.raises(ImagerecError, match="differ from PyTorch's"):
        export_model(checkpoints["seed_cnn"], tmp_path / "m.pt", format="torchscript")
    assert not (tmp_path / "m.pt").exists()


# -- the command line ------------------------------------------------------------------------




def test_cli_export_writes_the_file(checkpoints, tmp_path, capsys):
    run = checkpoints["seed_cnn"].parent
    out_file = tmp_path / "F.onnx"
    code, out, err = run_cli(capsys, "export", run, "--out", out_file)
    assert code == 0, err
    assert out.startswith(f"wrote {out_file} (") and "outputs match PyTorch's" in out
    assert json.loads(metadata(out_file)[KEY_CLASSES]) == CLASSES

    code, out, err = run_cli(capsys, "export", run, "--format", "torchscript", "--out", tmp_path / "F.pt")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'F.pt'}") and jit_load(tmp_path / "F.pt") is not None


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["{notes}", "--out", "{tmp}/F.onnx"], ["imagerec export: error:", "notes.txt: not a readable checkpoint"]),
        (["{tmp}/missing", "--out", "{tmp}/F.onnx"], ["no such checkpoint file or run folder"]),
        (["{run}", "--out", "{tmp}/F.onnx", "--format", "torchscript"], ["should end in .pt"]),
        (["{run}", "--out", "{tmp}/F.onnx", "--image-size", "64"], ["only 32 px"]),
        (["{run}", "--format", "tflite"], ["invalid choice: 'tflite'"]),
    ],
)
def test_cli_export_errors_are_one_line_with_status_2(checkpoints, tmp_path, capsys, argv, fragments):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    run = checkpoints["seed_cnn"].parent
    argv = [a.replace("{notes}", str(notes)).replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for a in argv]
    code, out, err = run_cli(capsys, "export", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "F.onnx").exists()


# -- CIFAR-10: the full test set through PyTorch and ONNX Runtime ----------------------------


@needs_cifar
@pytest.mark.cifar
@pytest.mark.slow
def test_cifar10_test_set_logits_match_pytorch(tmp_path):
    started = time.perf_counter()
    source = load_images(CIFAR_JPEG, "test")
    torch.manual_seed(0)  # the new 10-class head; the backbone has its ImageNet weights
    model = create_backbone("efficientnet_lite0", num_classes=10)
    pp = model.preprocessing.resolve(64, 1.0)
    meta = {"backbone": "efficientnet_lite0", "classes": source.classes, "preprocessing": pp.to_dict()}
    ckpt_path = save_checkpoint(tmp_path / "best.safetensors", Checkpoint(model.state_dict(), meta))
    out = export_model(ckpt_path, tmp_path / "model.onnx")

    reference = model_from_checkpoint(load_checkpoint(ckpt_path))
    session = onnx_session(out)
    small = decode_small_images(source, progress=False)
    assert small is not None and len(small) == 10_000

    errors, agree, total = [], 0, 0
    for batch in iter_batches(small, pp, batch_size=500, workers=0):
        with torch.inference_mode():
            a = reference(batch.images).numpy()
        b = session.run(None, {"images": batch.images.numpy()})[0]
        errors.append(relative_error(a, b))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(a)
    worst, agreement = max(errors), agree / total
    print(
        f"\nCIFAR-10 test, efficientnet_lite0 @ 64 px, PyTorch vs ONNX Runtime: {total} images, "
        f"max relative logit error {worst:.2e} (median per batch {np.median(errors):.2e}), "
        f"top-1 agreement {agreement:.4%}, {time.perf_counter() - started:.1f} s"
    )
    assert total == 10_000 and len(errors) == 20
    assert worst <= 1e-4
    assert agreement >= 0.999



def _differing(monkeypatch, fmt: str) -> None:
    """Make the exported model of ``fmt`` disagree with PyTorch's logits."""
    if fmt == "onnx":
        monkeypatch.setattr(imagerec.export, "onnx_session", lambda path: _Shifted(onnx_session(path), 1e-2))
    else:
        original = imagerec.export._export_torchscript
        monkeypatch.setattr(imagerec.export, "_export_torchscript", lambda *a: original(*a) + 1e-2 * np.abs(original(*a)).max())


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fmt, name", [("onnx", "m.onnx"), ("torchscript", "m.pt")])
def test_a_failed_export_keeps_the_previous_file(checkpoints, tmp_path, monkeypatch, fmt, name):
    """The old model survives a failed check and a failing exporter; no temporary file is left."""
    out = tmp_path / name
    out.write_bytes(b"the previous good model")
    _differing(monkeypatch, fmt)
    with pytest.raises(ImagerecError, match="previous file there is kept"):
        export_model(checkpoints["seed_cnn"], out, format=fmt)
    assert out.read_bytes() == b"the previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]

    monkeypatch.undo()
    monkeypatch.setattr(torch.onnx if fmt == "onnx" else torch.jit, "export" if fmt == "onnx" else "save", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(checkpoints["seed_cnn"], out, format=fmt)
    assert out.read_bytes() == b"the previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
