"""The edge-device commands: ``imagerec compress``, ``predict`` and ``evaluate`` on an exported
.onnx (the same answers as the checkpoint's), and ``cluster --adapt simclr`` with its SimCLR step."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnx
import pytest
import torch

from imagerec import Classifier, ImagerecError, TrainConfig, create_backbone, load_checkpoint, train
from imagerec._metadata import KEY_COMPRESSION
from imagerec.clustering._adapt import adapt_backbone, nt_xent
from imagerec.data import load_images
from imagerec.export import export_model

from .conftest import assert_user_error, make_colour_dataset, make_image, run_cli


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A seed_cnn run that fits the colour data set (about 2 s), its data and its ONNX export.

    lr 0.32 (per 64 images): 1.0 train accuracy on seeds 0-9 under avx2, default and one thread
    (0.65-1.0 at the default 0.08)."""
    root = tmp_path_factory.mktemp("cli_edge")
    data = make_colour_dataset(root / "data", per_class=16)
    config = TrainConfig(
        backbone="seed_cnn",
        epochs=10,
        lr=0.32,
        batch_size=8,
        val_fraction=0,
        tta=False,
        save_every=0,
        precision="fp32",
        device="cpu",
    )
    result = train(data, root / "run", config, progress=False)
    assert result.history[-1]["train_acc"] >= 0.9  # a model whose answers vary with the image
    fp32 = export_model(root / "run", root / "model.onnx")
    return root / "run", data, fp32


# -- compress --------------------------------------------------------------------------------


def test_compress_quantize_int8_writes_beside_the_run(colour_run, tmp_path, capsys):
    run_dir, data, _ = colour_run
    target = run_dir / "model.int8.onnx"
    try:
        code, out, err = run_cli(capsys, "compress", run_dir, "--quantize", "int8", "--calib", data, "--calib-images", "16")
        assert code == 0, err
        assert out.startswith(f"wrote {target} (") and target.is_file()
        compression = json.loads(metadata(target)[KEY_COMPRESSION])
        assert compression["quantize"] == "int8-static-qdq-per-channel" and compression["calib_images"] == 16
    finally:
        target.unlink(missing_ok=True)


def test_compress_quantize_to_the_out_given(colour_run, tmp_path, capsys):
    run_dir, data, _ = colour_run
    out_file = tmp_path / "edge" / "q.onnx"
    code, out, err = run_cli(
        capsys, "compress", run_dir, "--quantize", "int8", "--calib", data, "--calib-images", "16", "--out", out_file
    )
    assert code == 0, err
    assert out.startswith(f"wrote {out_file}") and out_file.is_file()
    assert not (run_dir / "model.int8.onnx").exists()
    assert json.loads(metadata(out_file)[KEY_COMPRESSION])["calib_images"] == 16


def test_compress_prune_writes_a_smaller_checkpoint(colour_run, tmp_path, capsys):
    run_dir, _, _ = colour_run
    data = make_colour_dataset(tmp_path / "data", per_class=22)  # 66 images: one batch of prune's 64
    out_file = tmp_path / "pruned.safetensors"
    code, out, err = run_cli(capsys, "compress", run_dir, "--prune", "0.5", "--data", data, "--device", "cpu",
                         "--out", out_file, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert out.strip() == f"wrote {out_file}"
    info = load_checkpoint(out_file).meta["compression"]
    assert info["prune"] == 0.5 and info["fine_tune_steps"] == 1
    assert info["params_after"] < 0.5 * info["params_before"]
    clf = Classifier.load(out_file)
    assert sum(p.numel() for p in clf.model_.parameters()) == info["params_after"]

    # without --out, and with --quantize too: the pruned checkpoint goes beside the run, then int8
    code, out, err = run_cli(capsys, "compress", out_file, "--prune", "0.3", "--data", data, "--device", "cpu",
                         "--quantize", "dynamic", "--no-progress")  # fmt: skip
    assert code == 0, err
    pruned, quantized = tmp_path / "pruned30.safetensors", tmp_path / "pruned30.dynamic.onnx"
    assert out.splitlines()[0] == f"wrote {pruned}" and out.splitlines()[1].startswith(f"wrote {quantized} (")
    assert json.loads(metadata(quantized)[KEY_COMPRESSION]).keys() >= {"prune", "quantize"}


def test_compress_prune_on_fewer_images_than_a_batch(colour_run, tmp_path, capsys):
    run_dir, data, _ = colour_run  # 48 images
    out_file = tmp_path / "pruned.safetensors"
    code, _, err = run_cli(capsys, "compress", run_dir, "--prune", "0.5", "--data", data, "--device", "cpu",
                       "--out", out_file, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert load_checkpoint(out_file).meta["compression"]["prune"] == 0.5


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        ([], ["imagerec compress: error: nothing to do", "--quantize", "--prune"]),
        (["--prune", "0.5"], ["--prune needs --data"]),
        (["--quantize", "int8"], ["needs calibration images"]),
        (["--prune", "1.5", "--data", "{data}"], ["amount=1.5 must be in (0, 1)"]),
        (["--quantize", "int4"], ["invalid choice: 'int4'"]),
    ],
)
def test_compress_user_errors_are_one_line_with_status_2(colour_run, capsys, argv, fragments):
    run_dir, data, _ = colour_run
    before = sorted(p.name for p in run_dir.iterdir())
    code, _, err = run_cli(capsys, "compress", run_dir, *[a.replace("{data}", str(data)) for a in argv])
    assert_user_error(code, err, *fragments)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written


# -- predict and evaluate on an exported model -----------------------------------------------


def predictions(capsys, model, images) -> list[dict]:
    code, out, err = run_cli(capsys, "predict", model, *images, "--format", "json", "--top-k", "3")
    assert code == 0, err
    return json.loads(out)


def test_predict_onnx_matches_the_checkpoint_and_reports_a_corrupt_image(colour_run, tmp_path, capsys):
    run_dir, data, fp32 = colour_run
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    odd = make_image(tmp_path / "odd.png", (45, 70), seed=5)
    images = [data / "red" / "000.png", bad, data / "green" / "003.png", data / "blue" / "007.png", odd]

    by_torch, by_onnx = predictions(capsys, run_dir, images), predictions(capsys, fp32, images)
    assert [r["path"] for r in by_onnx] == [r["path"] for r in by_torch] == [str(p) for p in images]
    for a, b in zip(by_torch, by_onnx):
        if a["path"] == str(bad):
            continue
        assert a["error"] is None and b["error"] is None
        assert [t["class"] for t in b["top"]] == [t["class"] for t in a["top"]]
        assert (
            np.abs(np.array([t["probability"] for t in b["top"]]) - [t["probability"] for t in a["top"]]).max() <= 1e-4
        )
    assert [r["top"][0]["class"] for r in by_onnx if r["top"]][:3] == ["red", "green", "blue"]  # a trained model

    for rows in (by_torch, by_onnx):  # the corrupt image is a row with its reason, not a failure
        row = rows[1]
        assert row["top"] == [] and row["error"]
    code, out, _ = run_cli(capsys, "predict", fp32, bad, data / "red" / "000.png", "--format", "csv", "--top-k", "1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "path,class1,p1,error"
    assert lines[1].startswith(f"{bad},,,") and len(lines[1]) > len(f"{bad},,,")  # an error text in the last column
    assert lines[2].startswith(f"{data / 'red' / '000.png'},red,") and lines[2].endswith(",")


def test_evaluate_onnx_gives_the_checkpoints_accuracy(colour_run, tmp_path, capsys):
    run_dir, _, fp32 = colour_run
    # colour images the model knows, and noise it can only guess at: an accuracy below 1
    data = make_colour_dataset(tmp_path / "eval", per_class=4, size=(40, 36))
    for i, name in enumerate(["blue", "green", "red"] * 2):
        make_image(data / name / f"noise{i}.png", (32, 32), seed=100 + i)
    code, out_t, err = run_cli(capsys, "evaluate", run_dir, data, "--out", tmp_path / "torch")
    assert code == 0, err
    code, out_o, err = run_cli(capsys, "evaluate", fp32, data, "--out", tmp_path / "onnx")
    assert code == 0, err
    a = json.loads((tmp_path / "torch" / "summary.json").read_text())
    b = json.loads((tmp_path / "onnx" / "summary.json").read_text())
    assert a["images"] == b["images"] == 18
    assert 0 < a["accuracy"] < 1
    assert b["accuracy"] == a["accuracy"] and b["macro_f1"] == pytest.approx(a["macro_f1"])
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["ece"] == pytest.approx(a["ece"], abs=1e-4)
    assert out_o.split("->")[0] == out_t.split("->")[0]  # the same line of figures


def test_an_onnx_model_refuses_cuda(colour_run, capsys):
    _, data, fp32 = colour_run
    with pytest.raises(ImagerecError, match=r"model\.onnx|'cuda'") as info:
        Classifier.load(fp32, device="cuda")
    # where there is no GPU, the device is refused; where there is one, the ONNX model is
    assert "--device cpu" in str(info.value) and "cuda" in str(info.value)
    code, _, err = run_cli(capsys, "predict", fp32, data / "red" / "000.png", "--device", "cuda")
    assert_user_error(code, err, "--device cpu")


# -- cluster --adapt simclr ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_colours(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("tiny") / "data", per_class=8, size=(32, 32))


def test_cluster_with_simclr_adaptation_from_the_command_line(tiny_colours, tmp_path, capsys):
    out_dir = tmp_path / "clusters"
    # the backbone is named so the test does not depend on what "auto" picks for small images
    code, out, err = run_cli(capsys, "cluster", tiny_colours, "--method", "kmeans", "--k", "3", "--adapt", "simclr",
                         "--adapt-epochs", "1", "--out", out_dir, "--batch-size", "8", "--image-size", "32",
                         "--backbone", "efficientnet_lite0", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "3 clusters of 24 images" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    adapt = summary["config"]["adapt"]
    assert adapt["method"] == "simclr" and adapt["epochs"] == 1 and adapt["image_size"] == 32
    assert adapt["steps"] == 1  # 24 images, one batch of all of them, one epoch
    assert "adapt" in summary["seconds"]


def test_adapt_backbone_refuses_bad_settings(tiny_colours):
    source = load_images(tiny_colours)
    with pytest.raises(ImagerecError, match=r"adapt method 'byol' is not one of \('simclr',\)"):
        adapt_backbone(source, "seed_cnn", method="byol", progress=False)
    for epochs in (0, -1):
        with pytest.raises(ImagerecError, match=rf"epochs={epochs} must be > 0"):
            adapt_backbone(source, "seed_cnn", epochs=epochs, progress=False)
    with pytest.raises(ImagerecError, match=r"batch_size=1 must be at least 2.*negatives"):
        adapt_backbone(source, "seed_cnn", batch_size=1, progress=False)


def test_adapt_backbone_trains_and_sets_the_input_size(tiny_colours):
    source = load_images(tiny_colours)
    torch.manual_seed(0)
    start = create_backbone("efficientnet_lite0", num_classes=3, pretrained=False)
    before = copy.deepcopy(start.state_dict())
    model = adapt_backbone(source, start, epochs=0.5, image_size=40, batch_size=8, progress=False)
    assert model.num_classes == 0  # the classifier is dropped: the features are what clusters use
    assert model.preprocessing.input_size == 40 and model.preprocessing.crop_pct == 1.0
    assert model.adapt_info["method"] == "simclr" and model.adapt_info["steps"] == 2  # half of 24 images, 8 a step
    after = model.state_dict()
    assert not torch.equal(after["conv_stem.weight"], before["conv_stem.weight"])
    assert not torch.equal(after["conv_head.weight"], before["conv_head.weight"])
    assert not model.training
    with torch.inference_mode():
        features = model(torch.zeros(2, 3, 40, 40))
    assert features.shape == (2, model.num_features)


def test_nt_xent_prefers_matching_views():
    # four orthogonal unit vectors, each with its exact twin as the second view: row i sees its
    # positive at similarity 1 and six negatives at 0, so the loss is log(1 + 6 exp(-1 / t))
    base = torch.eye(4, 8)
    t = 0.5
    matching = nt_xent(torch.cat([base, base]), t)
    assert matching.item() == pytest.approx(math.log(1 + 6 * math.exp(-1 / t)), rel=1e-5)
    assert nt_xent(torch.cat([base, 3 * base]), t).item() == pytest.approx(matching.item(), rel=1e-5)  # scale-free

    shuffled = nt_xent(torch.cat([base, base[[1, 2, 3, 0]]]), t)  # each "positive" is another image
    assert shuffled.item() > matching.item() + 1

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(16, 32, generator=generator)
    noisy = z + 0.1 * torch.randn(16, 32, generator=generator)
    assert nt_xent(torch.cat([z, noisy]), 0.2) < nt_xent(
        torch.cat([z, noisy[torch.randperm(16, generator=generator)]]), 0.2
    )


# -- issue 10: one line and status 2, checked before the work ---------------------------------


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the output was checked")


def test_evaluate_out_file_is_refused_before_the_evaluation(colour_run, tmp_path, capsys, monkeypatch):
    run_dir, data, _ = colour_run
    (tmp_path / "report").write_text("a file")
    monkeypatch.setattr(Classifier, "_predictions", _no_work)
    code, _, err = run_cli(capsys, "evaluate", run_dir, data, "--out", tmp_path / "report")
    assert_user_error(code, err, "report: is a file, not a folder")


@pytest.mark.parametrize("out", ["{dir}", "{dir}/new/"])
def test_predict_out_folder_is_refused_before_the_predictions(colour_run, tmp_path, capsys, monkeypatch, out):
    run_dir, data, _ = colour_run
    monkeypatch.setattr("imagerec.prediction.predict_top_k", _no_work)
    code, _, err = run_cli(capsys, "predict", run_dir, data / "red" / "000.png", "--out", out.format(dir=tmp_path))
    assert_user_error(code, err, "is a folder; give a file name", "--out predictions.table")


@pytest.mark.parametrize(("value", "fragment"), [("inf", "epochs=inf must be a finite number"), ("nan", "epochs=nan must be a finite number"),
                                                  ("-1", "epochs=-1.0 must be > 0"), ("0", "epochs=0.0 must be > 0")])
def test_train_epochs_must_be_a_positive_finite_number(colour_run, tmp_path, capsys, value, fragment):
    _, data, _ = colour_run
    code, _, err = run_cli(capsys, "train", data, "--out", tmp_path / "run", "--backbone", "seed_cnn", f"--epochs={value}")
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_evaluate_where_every_image_is_broken(colour_run, tmp_path, capsys):
    run_dir, _, _ = colour_run
    for name in ("red", "green", "blue"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.png").write_bytes(b"not an image")
    code, _, err = run_cli(capsys, "evaluate", run_dir, tmp_path / "data", "--out", tmp_path / "report")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("imagerec evaluate: error: ")
    assert "none of its 3 image(s) could be read" in err and "skipped.csv" in err
    assert len((tmp_path / "report" / "skipped.csv").read_text().splitlines()) == 1 + 3


def test_evaluate_reports_skipped_images_like_embed(colour_run, tmp_path, capsys):
    run_dir, data, _ = colour_run
    import shutil

    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / "red" / "broken.png").write_bytes(b"not an image")
    code, _, err = run_cli(capsys, "evaluate", run_dir, tmp_path / "data", "--out", tmp_path / "report")
    assert code == 0, err
    assert "imagerec: skipped 1 unreadable image(s)" in err and "broken.png" in err
    rows = (tmp_path / "report" / "skipped.csv").read_text().splitlines()
    assert rows[0] == "path,reason" and len(rows) == 2 and "broken.png" in rows[1]
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["skipped"] == 1


def test_a_class_named_like_mathtext_is_drawn_literally(tmp_path, capsys):
    data = make_colour_dataset(tmp_path / "data", per_class=4, classes=("red", "green"))
    (data / "red").rename(data / "price $^{$")
    config = TrainConfig(backbone="seed_cnn", epochs=1, batch_size=4, val_fraction=0, tta=False, save_every=0, precision="fp32", device="cpu")
    train(data, tmp_path / "run", config, progress=False)
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "run", data, "--out", tmp_path / "report")
    assert code == 0, err
    assert (tmp_path / "report" / "confusion.png").stat().st_size > 1000
    assert "price $^{$" in json.loads((tmp_path / "report" / "summary.json").read_text())["classes"]


def test_a_full_disk_is_one_line(colour_run, tmp_path, capsys, monkeypatch):
    import errno

    run_dir, data, _ = colour_run

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("imagerec.evaluation._report.write_text_atomic", full)
    code, _, err = run_cli(capsys, "evaluate", run_dir, data, "--out", tmp_path / "report")
    err = err.rpartition("\r")[2]  # after the progress bar
    assert_user_error(code, err, "summary.json: No space left on device; free some disk space")


def test_a_unicode_error_is_one_line_but_a_bug_keeps_its_traceback(colour_run, tmp_path, capsys, monkeypatch):
    run_dir, data, _ = colour_run

    def bad_encoding(rows, fmt):
        raise UnicodeEncodeError("utf-8", "caf\udce9", 3, 4, "surrogates not allowed")

    monkeypatch.setattr("imagerec.prediction.format_predictions", bad_encoding)
    code, _, err = run_cli(capsys, "predict", run_dir, data / "red" / "000.png")
    assert_user_error(code, err, "surrogates not allowed", "not in the expected encoding")

    def bug(rows, fmt):
        raise RuntimeError("a real bug")

    monkeypatch.setattr("imagerec.prediction.format_predictions", bug)
    from imagerec.cli import main

    with pytest.raises(RuntimeError, match="a real bug"):
        main(["predict", str(run_dir), str(data / "red" / "000.png")])


@pytest.mark.parametrize("meta_key, value, fragment", [
    ("imagerec.preprocessing", "{broken", "imagerec.preprocessing is not valid JSON"),
    ("imagerec.preprocessing", "[1]", "imagerec.preprocessing is a JSON list, not a dict"),
    ("imagerec.compression", "7", "imagerec.compression is a JSON int, not a dict"),
    ("imagerec.classes", '["a", 2]', "imagerec.classes must be a list of names"),
])
def test_compress_of_an_onnx_with_bad_metadata(colour_run, tmp_path, capsys, monkeypatch, meta_key, value, fragment):
    _, _, fp32 = colour_run
    proto = onnx.load(str(fp32))
    for prop in proto.metadata_props:
        if prop.key == meta_key:
            prop.value = value
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    monkeypatch.setattr("onnxruntime.quantization.shape_inference.quant_pre_process", _no_work)
    code, _, err = run_cli(capsys, "compress", tmp_path / "bad.onnx", "--quantize", "dynamic", "--out", tmp_path / "q.onnx")
    assert_user_error(code, err, "broken imagerec metadata", fragment)
    assert not (tmp_path / "q.onnx").exists()


def test_quickstart_time_budget_must_be_positive(tmp_path, capsys):
    from imagerec._quickstart import quickstart

    for value in ("-1", "0", "inf", "nan"):
        code, _, err = run_cli(capsys, "quickstart", "--time-budget", value, "--out", tmp_path / "q")
        assert_user_error(code, err, f"argument --time-budget: {value} must be a positive number")
    with pytest.raises(ImagerecError, match=r"time_budget=-1 must be a positive number of minutes"):
        quickstart(tmp_path, tmp_path / "q", time_budget=-1)
    assert not (tmp_path / "q").exists()


def test_evaluate_out_held_by_another_process_is_refused(colour_run, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    run_dir, data, _ = colour_run
    out = tmp_path / "report"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; from imagerec._lock import run_lock\nwith run_lock({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(Classifier, "_predictions", _no_work)
        code, _, err = run_cli(capsys, "evaluate", run_dir, data, "--out", out)
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(code, err, f"process {holder.pid}", "another imagerec evaluation is writing this folder")


@pytest.mark.parametrize("command", ["train", "evaluate", "embed", "cluster", "compress"])
def test_allow_outside_is_a_flag_of_every_command_that_reads_data(command):
    from imagerec.cli import build_parser

    positional = {"train": ["d"], "evaluate": ["c", "d"], "embed": ["d"], "cluster": ["d"], "compress": ["c"]}[command]
    required = {"evaluate": ["--out", "o"], "embed": ["--out", "o.npz"], "cluster": ["--out", "o"]}.get(command, [])
    args = build_parser().parse_args([command, *positional, *required, "--allow-outside"])
    assert args.allow_outside is True
