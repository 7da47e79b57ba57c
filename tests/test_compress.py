"""Compression: int8 quantization (static QDQ and dynamic) and structured pruning with fine-tuning.

The reference model is ``seed_cnn`` trained to 100 % training accuracy on the colour data set,
so its predictions are spread over all three classes: agreement between fp32 and int8 then
means something (a broken quantization that always answered one class would agree on a third).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

from imagerec import (
    Checkpoint,
    Classifier,
    ImagerecError,
    SkippedImagesWarning,
    TrainConfig,
    create_backbone,
    load_checkpoint,
    save_checkpoint,
    train,
)
from imagerec._metadata import KEY_COMPRESSION, KEY_PREPROCESSING
from imagerec._onnx import onnx_session
from imagerec.compress import prune, quantize
from imagerec.data import Preprocessing, iter_batches, load_images
from imagerec.export import export_model
from imagerec.training._calibrate import fit_temperature

from .conftest import make_class_folder, make_colour_dataset

# fp32 and int8 may disagree only where the fp32 top-2 margin is below the int8 logit error
# (about 1 % of the logit range here). A model that separates the classes has few such images;
# 90 % leaves room for those, while a wrong scale or zero point gives about a third (chance).
MIN_TOP1_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A seed_cnn run that fits the colour data set (10 epochs, about 2 s), its data and fp32 ONNX.

    lr 0.32 (per 64 images): 1.0 train accuracy on seeds 0-9 under avx2, default and one thread;
    the default 0.08 gave 0.65-1.0, so the premise held on seed 0 by luck."""
    root = tmp_path_factory.mktemp("compress")
    data = make_colour_dataset(root / "data", per_class=16)
    config = TrainConfig(backbone="seed_cnn", epochs=10, lr=0.32, batch_size=8, val_fraction=0, tta=False, save_every=0, precision="fp32", device="cpu")
    result = train(data, root / "run", config, progress=False)
    assert result.history[-1]["train_acc"] >= 0.9  # the premise of the agreement tests
    fp32 = export_model(root / "run", root / "fp32.onnx")
    return root / "run", data, fp32


def onnx_inputs(path, data) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``data`` prepared as the model's metadata says, and the labels."""
    meta = metadata(path)
    pp = Preprocessing.from_dict(json.loads(meta[KEY_PREPROCESSING]))
    source = load_images(data)
    images = np.concatenate([b.images.numpy() for b in iter_batches(source, pp, batch_size=64, workers=0)])
    return images, source.labels


def logits(path, images) -> np.ndarray:
    return onnx_session(path).run(None, {"images": images})[0]


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def int8_weights_of(path, op_type: str) -> list[str]:
    """Initializers of type int8 that reach an ``op_type`` node through a DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    return [dequantized[name] for n in graph.node if n.op_type == op_type for name in n.input if name in dequantized]


def weight_scales_and_activation_types(path) -> tuple[list[int], set[int]]:
    """Length of each int8 weight's scale vector, and the element types of the quantized activations."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    scale_sizes, activation_types = [], set()
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type == onnx.TensorProto.INT8:
            scale_sizes.append(int(np.prod(inits[node.input[1]].dims)))
        if node.op_type == "QuantizeLinear":
            activation_types.add(inits[node.input[2]].data_type)  # the zero point's type is the output's
    return scale_sizes, activation_types


# ---------------------------------------------------------------------------------------------
# quantize


@pytest.mark.learned
def test_int8_static_qdq_keeps_predictions_metadata_and_shrinks(colour_run, tmp_path):
    run, data, fp32 = colour_run
    out = quantize(run, tmp_path / "model.int8.onnx", calib=data, calib_images=40, batch_size=16)

    ops = op_counts(out)
    assert ops.get("QuantizeLinear", 0) >= 3 and ops.get("DequantizeLinear", 0) >= 5
    assert len(int8_weights_of(out, "Conv")) == 2 and len(int8_weights_of(out, "Gemm")) == 3  # every layer's weights
    scale_sizes, activation_types = weight_scales_and_activation_types(out)
    assert sorted(scale_sizes) == sorted([6, 16, 120, 84, 3])  # one scale per output channel (U8S8: int8 weights...)
    assert activation_types == {onnx.TensorProto.UINT8}  # ...and uint8 activations
    assert out.stat().st_size < 0.5 * fp32.stat().st_size  # 4-byte weights became 1-byte ones

    before, after = metadata(fp32), metadata(out)
    assert {k: v for k, v in after.items() if k != KEY_COMPRESSION} == {k: v for k, v in before.items() if k != KEY_COMPRESSION}
    compression = json.loads(after[KEY_COMPRESSION])
    assert compression["quantize"] == "int8-static-qdq-per-channel"
    assert compression["calibration"] == "minmax" and compression["calib_images"] == 40
    assert compression["source_sha256"] == hashlib.sha256((run / "best.safetensors").read_bytes()).hexdigest()

    images, labels = onnx_inputs(fp32, data)
    reference, quantized = logits(fp32, images).argmax(1), logits(out, images).argmax(1)
    assert (reference == labels).mean() >= 0.9  # a model whose answers vary with the image
    assert (reference == quantized).mean() >= MIN_TOP1_AGREEMENT
    # the agreement it records is measured on its 40 calibration images: a share of 40
    assert 0 <= compression["fp32_top1_agreement"] <= 1 and round(compression["fp32_top1_agreement"] * 40, 2) % 1 == 0


def test_int8_from_an_onnx_file_with_another_calibration_method(colour_run, tmp_path):
    _, data, fp32 = colour_run
    out = quantize(fp32, tmp_path / "p.onnx", calib=data, calib_images=24, method="percentile", seed=1)
    compression = json.loads(metadata(out)[KEY_COMPRESSION])
    assert compression["calibration"] == "percentile" and compression["calib_images"] == 24
    images, _ = onnx_inputs(fp32, data)
    assert (logits(fp32, images).argmax(1) == logits(out, images).argmax(1)).mean() >= MIN_TOP1_AGREEMENT


def test_int8_efficientnet_with_tf_same_padding(colour_run, tmp_path):
    # EfficientNet-Lite computes its "same" pads from the input shape at run time; at 32 px a
    # 5x5 stride-2 layer sees a 2x2 map, where quantizing that arithmetic rounds a pad of 3 to 2
    # and ONNX Runtime refuses the convolution. The pads must stay fp32.
    _, data, _ = colour_run
    torch.manual_seed(0)
    model = create_backbone("efficientnet_lite0", num_classes=3, pretrained=False)
    pp = model.preprocessing.resolve(32, 1.0)
    meta = {"backbone": "efficientnet_lite0", "classes": ["blue", "green", "red"], "preprocessing": pp.to_dict()}
    ckpt = save_checkpoint(tmp_path / "e.safetensors", Checkpoint(model=model.state_dict(), meta=meta))
    fp32 = export_model(ckpt, tmp_path / "e.onnx")
    out = quantize(fp32, tmp_path / "e.int8.onnx", calib=data, calib_images=32)
    assert len(int8_weights_of(out, "Conv")) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    images, _ = onnx_inputs(fp32, data)
    a, b = logits(fp32, images), logits(out, images)
    # untrained, so compare how the logits vary between images rather than the top-1
    assert np.corrcoef((a - a.mean(0)).ravel(), (b - b.mean(0)).ravel())[0, 1] > 0.9


def test_dynamic_quantizes_the_linear_layers_only(colour_run, tmp_path):
    _, data, fp32 = colour_run
    out = quantize(fp32, tmp_path / "d.onnx", mode="dynamic")
    ops = op_counts(out)
    assert ops.get("MatMulInteger") == 3 and "Gemm" not in ops  # fc1, fc2, fc3
    assert ops.get("Conv") == 2 and "QuantizeLinear" not in ops  # convolutions stay fp32
    source = hashlib.sha256(fp32.read_bytes()).hexdigest()  # made from the fp32 .onnx given
    assert json.loads(metadata(out)[KEY_COMPRESSION]) == {"quantize": "int8-dynamic-matmul", "weights": "int8", "source_sha256": source}
    assert out.stat().st_size < 0.5 * fp32.stat().st_size  # fc1 holds most of seed_cnn's weights
    images, _ = onnx_inputs(fp32, data)
    assert (logits(fp32, images).argmax(1) == logits(out, images).argmax(1)).mean() >= MIN_TOP1_AGREEMENT


def test_quantize_errors(colour_run, tmp_path):
    run, data, fp32 = colour_run
    with pytest.raises(ImagerecError, match=r"mode='int4' is not one of int8, dynamic"):
        quantize(run, tmp_path / "q.onnx", mode="int4", calib=data)
    with pytest.raises(ImagerecError, match="needs calibration images"):
        quantize(run, tmp_path / "q.onnx")
    with pytest.raises(ImagerecError, match="method='max' is not one of minmax, percentile, entropy"):
        quantize(run, tmp_path / "q.onnx", calib=data, method="max")
    with pytest.raises(ImagerecError, match=r"should end in \.onnx"):
        quantize(run, tmp_path / "q.bin", calib=data)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(ImagerecError, match="not a readable checkpoint"):
        quantize(notes, tmp_path / "q.onnx", mode="dynamic")
    foreign = tmp_path / "foreign.onnx"
    proto = onnx.load(str(fp32))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    with pytest.raises(ImagerecError, match="without imagerec metadata"):
        quantize(foreign, tmp_path / "q.onnx", mode="dynamic")
    quantized = quantize(fp32, tmp_path / "d.onnx", mode="dynamic")
    with pytest.raises(ImagerecError, match="already quantized"):
        quantize(quantized, tmp_path / "q.onnx", mode="dynamic")
    assert not (tmp_path / "q.onnx").exists()


def test_unreadable_calibration_images(colour_run, tmp_path):
    run, _, _ = colour_run
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    with pytest.raises(ImagerecError, match=rf"{re.escape(str(bad))}: none of the 3 calibration image\(s\) drawn could be read \(3 skipped: .*0\.jpg"):
        quantize(run, tmp_path / "q.onnx", calib=bad)
    assert not (tmp_path / "q.onnx").exists()

    # a few unreadable images among good ones: a warning, and the count leaves them out
    mixed = make_colour_dataset(tmp_path / "mixed", per_class=3)
    (mixed / "red" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.warns(SkippedImagesWarning, match=r"1 calibration image\(s\) could not be read.*broken\.png"):
        out = quantize(run, tmp_path / "q.onnx", calib=mixed)
    assert json.loads(metadata(out)[KEY_COMPRESSION])["calib_images"] == 9


# ---------------------------------------------------------------------------------------------
# prune


def conv_widths(model) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def nll(clf: Classifier, data) -> float:
    """Mean negative log-likelihood of the true class over every image of ``data``."""
    images = sorted(data.rglob("*.png"))
    labels = np.array([clf.classes_.index(p.parent.name) for p in images])
    proba = clf.predict_proba([str(p) for p in images])
    return float(-np.log(proba[np.arange(len(labels)), labels]).mean())


def test_prune_seed_cnn_shrinks_fine_tunes_loads_predicts_and_exports(colour_run, tmp_path):
    run, data, _ = colour_run
    out = prune(run, tmp_path / "pruned.safetensors", amount=0.5, data=data, steps=30, lr=0.1, batch_size=8, progress=False)

    source, pruned = load_checkpoint(run), load_checkpoint(out)
    kept = ("backbone", "classes", "preprocessing")
    assert {k: pruned.meta[k] for k in kept} == {k: source.meta[k] for k in kept}
    info = pruned.meta["compression"]
    assert info["prune"] == 0.5 and info["fine_tune_steps"] == 30
    # channels halve, so layers between two pruned layers keep about a quarter of their weights
    assert 0.2 < info["params_after"] / info["params_before"] < 0.3

    clf = Classifier.load(out)
    assert sum(p.numel() for p in clf.model_.parameters()) == info["params_after"]  # the real count
    assert conv_widths(clf.model_) == [6, 8]  # from 6 and 16: kept widths are multiples of ROUND_TO (8), so 6 stays
    assert set(clf.predict(sorted(str(p) for p in data.rglob("*.png")))) <= {"blue", "green", "red"}

    # the fine-tune recovers part of what pruning cost (measured: 1.05 -> 0.70 on these images)
    untuned = prune(run, tmp_path / "untuned.safetensors", amount=0.5, data=data, steps=0, progress=False)
    assert load_checkpoint(untuned).meta["compression"]["fine_tune_steps"] == 0
    assert nll(clf, data) < 0.8 * nll(Classifier.load(untuned), data)

    onnx_file = export_model(out, tmp_path / "pruned.onnx")
    assert json.loads(metadata(onnx_file)[KEY_COMPRESSION])["prune"] == 0.5
    both = quantize(onnx_file, tmp_path / "pruned.int8.onnx", mode="dynamic")
    assert json.loads(metadata(both)[KEY_COMPRESSION]).keys() >= {"prune", "params_after", "quantize"}


def test_prune_fits_a_new_temperature_on_images_the_fine_tune_never_saw(colour_run, tmp_path, capsys):
    run, data, _ = colour_run  # trained with val_fraction=0: no temperature of its own
    out = prune(run, tmp_path / "pruned.safetensors", amount=0.5, data=data, steps=20, lr=0.1, batch_size=8, val_fraction=0.25, progress=False)
    meta = load_checkpoint(out).meta
    held_out = load_images(data, "val", val_fraction=0.25, seed=0)  # the training config's seed
    assert meta["calibration"]["images"] == len(held_out) == 12  # 4 of each class's 16
    assert meta["compression"]["fine_tune_images"] == 48 - 12  # the rest, and only the rest
    # the colours are easy: every held-out image is right, so no temperature fits (T stays 1)
    assert meta["temperature"] == 1.0 and meta["calibration"]["all_right"]
    assert "all 12 held-out images are right" in capsys.readouterr().err

    # a validation folder with one image in the wrong class folder: a confident mistake to fit on
    split = tmp_path / "split"
    shutil.copytree(data, split / "train")
    shutil.copytree(data, split / "val")
    (split / "val" / "red" / "000.png").rename(split / "val" / "blue" / "red-000.png")
    out = prune(run, tmp_path / "split.safetensors", amount=0.5, data=split, steps=20, lr=0.1, batch_size=8, progress=False)
    meta = load_checkpoint(out).meta
    assert meta["calibration"]["images"] == 48 and meta["compression"]["fine_tune_images"] == 48
    assert "calibration: temperature" in capsys.readouterr().err
    # T is the one that minimises the pruned model's NLL on those images, and predict applies it
    clf, val = Classifier.load(out), load_images(split, "val")
    assert clf.temperature_ == pytest.approx(meta["temperature"]) and meta["temperature"] != pytest.approx(1.0, abs=1e-3)
    raw = clf.predict_proba(list(val.paths)) ** clf.temperature_  # undo T: softmax(z/T)^T is proportional to softmax(z)
    raw /= raw.sum(1, keepdims=True)
    assert meta["temperature"] == pytest.approx(fit_temperature(np.log(raw), val.labels), rel=1e-3)

    # no held-out images: T = 1, said on stderr
    plain = prune(run, tmp_path / "plain.safetensors", amount=0.5, data=data, steps=1, batch_size=8, progress=False)
    assert "temperature" not in load_checkpoint(plain).meta
    assert "no held-out images" in capsys.readouterr().err
    with pytest.raises(ImagerecError, match=r"val_fraction=1.0 must be in \[0, 1\)"):
        prune(run, tmp_path / "p.safetensors", amount=0.5, data=data, val_fraction=1.0, progress=False)


def test_prune_efficientnet_lite0(colour_run, tmp_path):
    _, data, _ = colour_run
    torch.manual_seed(0)
    model = create_backbone("efficientnet_lite0", num_classes=3, pretrained=False)
    pp = model.preprocessing.resolve(32, 1.0)
    meta = {"backbone": "efficientnet_lite0", "classes": ["blue", "green", "red"], "preprocessing": pp.to_dict()}
    ckpt = save_checkpoint(tmp_path / "e.safetensors", Checkpoint(model=model.state_dict(), meta=meta))

    out = prune(ckpt, tmp_path / "pruned.safetensors", amount=0.3, data=data, steps=2, batch_size=16, progress=False)
    info = load_checkpoint(out).meta["compression"]
    assert info["params_before"] == sum(p.numel() for p in model.parameters())
    assert 0.4 < info["params_after"] / info["params_before"] < 0.6  # about 0.7 ** 2

    clf = Classifier.load(out)
    widths, original = conv_widths(clf.model_), conv_widths(model)
    assert all(w < o for w, o in zip(widths, original))  # every convolution lost channels
    # residual adds tie channels together: the pruned model must still run end to end
    assert set(clf.predict(sorted(str(p) for p in data.rglob("*.png"))[:8])) <= {"blue", "green", "red"}
    assert export_model(out, tmp_path / "pruned.onnx").is_file()


@pytest.mark.parametrize("amount", [0.0, 1.0, -0.2, 1.5])
def test_prune_amount_must_be_a_share(colour_run, tmp_path, amount):
    run, data, _ = colour_run
    with pytest.raises(ImagerecError, match=rf"amount={amount} must be in \(0, 1\)"):
        prune(run, tmp_path / "p.safetensors", amount=amount, data=data, progress=False)


def test_prune_refuses_data_with_other_classes(colour_run, tmp_path):
    run, _, _ = colour_run
    other = make_class_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=2)
    with pytest.raises(ImagerecError, match=r"classes \['cat', 'dog'\] differ from the checkpoint's \['blue', 'green', 'red'\]"):
        prune(run, tmp_path / "p.safetensors", amount=0.3, data=other, steps=1, progress=False)
    assert not (tmp_path / "p.safetensors").exists()


def test_prune_without_torch_pruning_says_what_to_install(colour_run, tmp_path, monkeypatch):
    run, data, _ = colour_run
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # makes the import fail
    with pytest.raises(ImagerecError, match=r"pip install 'imagerec\[compress\]'"):
        prune(run, tmp_path / "p.safetensors", amount=0.3, data=data, progress=False)
