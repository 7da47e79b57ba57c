"""Embeddings: shapes, determinism, the file format, skipped images, and resuming a killed run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imagerec.embedding as embedding_module
from imagerec import Embeddings, ImagerecError, ImagerecWarning, create_backbone, embed, load_images

from .conftest import make_class_folder, make_image


def test_embed_a_class_folder(class_folder):
    torch.manual_seed(0)  # seed_cnn starts from random weights
    result = embed(class_folder, "seed_cnn", progress=False)
    assert result.features.shape == (12, 84) and result.features.dtype == np.float32
    assert result.classes == ["cat", "dog"] and result.labels.tolist() == [0] * 6 + [1] * 6
    assert result.paths == load_images(class_folder).paths
    torch.manual_seed(0)
    again = embed(class_folder, "seed_cnn", progress=False)
    np.testing.assert_array_equal(result.features, again.features)
    assert result.backbone == "seed_cnn"


def test_pretrained_backbone_at_a_chosen_size(class_folder):
    result = embed(class_folder, "efficientnet_lite0", image_size=64, batch_size=5, progress=False)
    assert result.features.shape == (12, 1280)
    assert result.preprocessing.input_size == 64
    assert result.preprocessing.crop_pct == 1.0  # 32 px images are upsampled whole
    np.testing.assert_array_equal(result.features, embed(class_folder, "efficientnet_lite0", image_size=64, progress=False).features)


def test_the_same_image_gives_the_same_vector(tmp_path):
    make_image(tmp_path / "u" / "a.png", seed=5)
    make_image(tmp_path / "u" / "copy" / "b.png", seed=5)
    make_image(tmp_path / "u" / "c.png", seed=6)
    result = embed(tmp_path / "u", "efficientnet_lite0", image_size=64, progress=False)
    by_name = {p.rsplit("/", 1)[1]: f for p, f in zip(result.paths, result.features)}
    np.testing.assert_array_equal(by_name["a.png"], by_name["b.png"])
    assert not np.allclose(by_name["a.png"], by_name["c.png"])


def test_file_path_and_cached_path_agree(tmp_path):
    small = make_class_folder(tmp_path / "small", per_class=3)
    source = load_images(small)  # file-backed: embed decodes and caches it
    cached = embed(source, "efficientnet_lite0", image_size=64, progress=False)
    from imagerec.data import iter_batches  # the per-image path, as for large photos

    model = create_backbone("efficientnet_lite0", num_classes=0)
    pp = cached.preprocessing
    with torch.inference_mode():
        rows = [
            model.forward_head(model.forward_features(b.images), pre_logits=True)
            for b in iter_batches(source, pp, batch_size=4, workers=0)
        ]
    np.testing.assert_allclose(torch.cat(rows).numpy(), cached.features, atol=1e-4)


def test_onnx_and_torch_engines_give_the_same_features(class_folder, imagerec_home):
    by_torch = embed(class_folder, "efficientnet_lite0", image_size=64, engine="torch", progress=False)
    by_onnx = embed(class_folder, "efficientnet_lite0", image_size=64, engine="onnx", progress=False)
    assert len(list((imagerec_home / "onnx").glob("*.onnx"))) == 1  # exported once, cached
    np.testing.assert_allclose(by_onnx.features, by_torch.features, rtol=0, atol=1e-4)
    with pytest.raises(ImagerecError, match="engine 'tpu'"):
        embed(class_folder, "seed_cnn", engine="tpu", progress=False)


def test_auto_engine_falls_back_to_torch_when_export_fails(class_folder, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(embedding_module, "export_onnx", broken)
    with pytest.warns(ImagerecWarning, match="ONNX export failed"):
        result = embed(class_folder, "seed_cnn", engine="auto", progress=False)
    assert result.features.shape == (12, 84)
    with pytest.raises(RuntimeError, match="unsupported operator"):
        embed(class_folder, "seed_cnn", engine="onnx", progress=False)


def test_save_and_load_round_trip(class_folder, tmp_path):
    out = tmp_path / "emb.npz"
    result = embed(class_folder, "seed_cnn", out=out, progress=False)
    with np.load(out, allow_pickle=False) as raw:  # plain numpy reads it
        assert raw["features"].shape == (12, 84)
        assert raw["paths"][0].endswith("000.png")
    loaded = Embeddings.load(out)
    np.testing.assert_array_equal(loaded.features, result.features)
    assert loaded.paths == result.paths and loaded.classes == result.classes
    assert loaded.preprocessing == result.preprocessing and loaded.backbone == "seed_cnn"
    assert not (tmp_path / "emb.npz.partial").exists()


def test_unlabelled_file_has_no_labels(tmp_path):
    make_image(tmp_path / "u" / "x.png")
    out = tmp_path / "u.npz"
    embed(tmp_path / "u", "seed_cnn", out=out, progress=False)
    loaded = Embeddings.load(out)
    assert loaded.labels is None and loaded.classes is None


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ImagerecError, match="not an imagerec embeddings file"):
        Embeddings.load(tmp_path / "other.npz")
    with pytest.raises(ImagerecError, match="no such embeddings file"):
        Embeddings.load(tmp_path / "missing.npz")


def test_unreadable_images_are_skipped_and_listed(tmp_path, capsys):
    root = make_class_folder(tmp_path / "photos", per_class=3, size=(80, 80))  # large: no cache
    (root / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "photos.npz"
    result = embed(root, "seed_cnn", image_size=32, out=out, workers=1, progress=False)
    assert len(result) == 6 and len(result.skipped) == 2
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    listed = (tmp_path / "photos.skipped.csv").read_text()
    assert "bad.png" in listed and "empty.jpg" in listed


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jpg").write_bytes(b"")
    with pytest.raises(ImagerecError, match="none of its 1 images could be read"):
        embed(tmp_path / "d", "seed_cnn", progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"batch_size": 0}, "batch_size=0"), ({"backbone": "nope"}, "unknown backbone"), ({"device": "tpu"}, "device 'tpu'")],
)
def test_bad_arguments(class_folder, kwargs, match):
    with pytest.raises(ImagerecError, match=match):
        embed(class_folder, **{"backbone": "seed_cnn", "progress": False, **kwargs})


class Crashing(torch.nn.Module):
    """Wraps a model; counts forward passes and dies after ``crash_after`` of them."""

    def __init__(self, model, crash_after=None):
        super().__init__()
        self.model, self.crash_after, self.calls = model, crash_after, 0
        self.preprocessing, self.backbone_name = model.preprocessing, model.backbone_name

    def forward_features(self, x):
        if self.crash_after is not None and self.calls == self.crash_after:
            raise RuntimeError("killed")
        self.calls += 1
        return self.model.forward_features(x)

    def forward_head(self, x, pre_logits=False):
        return self.model.forward_head(x, pre_logits=pre_logits)


def test_a_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_module, "CHUNK", 4)
    root = make_class_folder(tmp_path / "d", per_class=6)  # 12 images = 3 chunks of 4
    torch.manual_seed(0)
    model = create_backbone("seed_cnn", num_classes=0)
    full = embed(root, model, batch_size=4, progress=False)
    out = tmp_path / "e.npz"

    with pytest.raises(RuntimeError, match="killed"):
        embed(root, Crashing(model, crash_after=2), out=out, batch_size=4, engine="torch", progress=False)
    assert len(list((tmp_path / "e.npz.partial").glob("chunk_*.npz"))) == 2
    assert not out.exists()

    resumed_model = Crashing(model)
    resumed = embed(root, resumed_model, out=out, batch_size=4, engine="torch", progress=False)
    assert resumed_model.calls == 1  # only the chunk that was not finished
    np.testing.assert_allclose(resumed.features, full.features, rtol=0, atol=1e-6)
    assert resumed.paths == full.paths
    assert not (tmp_path / "e.npz.partial").exists()


def test_partial_results_of_other_inputs_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_module, "CHUNK", 4)
    root = make_class_folder(tmp_path / "d", per_class=6)
    out = tmp_path / "e.npz"
    model = create_backbone("seed_cnn", num_classes=0)
    with pytest.raises(RuntimeError):
        embed(root, Crashing(model, crash_after=1), out=out, batch_size=4, engine="torch", progress=False)
    other = Crashing(create_backbone("seed_cnn", num_classes=0))  # other weights
    embed(root, other, out=out, batch_size=4, engine="torch", progress=False)
    assert other.calls == 3  # everything recomputed
