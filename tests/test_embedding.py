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
    with pytest.raises(ImagerecError, match="none of its 1 images could be read"):
        embed(tmp_path / "d", "seed_cnn", out=tmp_path / "e.npz", progress=False)
    assert not (tmp_path / "e.npz.partial").exists()  # a refused run leaves nothing behind


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
    changed = create_backbone("seed_cnn", num_classes=0)
    with torch.no_grad():
        changed.fc1.weight.add_(0.01)  # other weights (seed_cnn's own initialisation is seeded)
    other = Crashing(changed)
    embed(root, other, out=out, batch_size=4, engine="torch", progress=False)
    assert other.calls == 3  # everything recomputed


# -- issue 10: content-keyed resume, outputs checked first, odd names, thin images ---------------

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402

from PIL import Image  # noqa: E402


def test_a_resumed_run_re_embeds_images_replaced_with_the_same_size_and_mtime(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embedding_module, "CHUNK", 4)
    root = make_class_folder(tmp_path / "d", per_class=6, ext=".bmp")  # 12 images = 3 chunks of 4
    donor = make_image(tmp_path / "donor.bmp", seed=99)
    model = create_backbone("seed_cnn", num_classes=0)
    out = tmp_path / "e.npz"
    with pytest.raises(RuntimeError, match="killed"):
        embed(root, Crashing(model, crash_after=2), out=out, batch_size=4, engine="torch", progress=False)
    target = root / "cat" / "000.bmp"  # in the first, finished chunk
    st = os.stat(target)
    target.write_bytes(donor.read_bytes())  # same size (BMP), written in place
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime, as touch -r
    capsys.readouterr()

    resumed_model = Crashing(model)
    resumed = embed(root, resumed_model, out=out, batch_size=4, engine="torch", progress=False)
    assert "re-embedding 1 changed image" in capsys.readouterr().err
    assert resumed_model.calls == 2  # the changed image's chunk and the unfinished one
    fresh = embed(root, model, batch_size=4, engine="torch", progress=False)
    np.testing.assert_allclose(resumed.features, fresh.features, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "out, workers, match",
    [("", None, "empty file name"), ("folder", None, "is a folder"), ("plain", None, "must end in .npz"),
     ("e.npz", -1, "workers=-1"), ("file.txt/e.npz", None, "is a file, not a folder")],
)
def test_outputs_are_checked_before_any_work(tmp_path, monkeypatch, out, workers, match):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    root = make_class_folder(tmp_path / "d", per_class=2)
    monkeypatch.chdir(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(embedding_module, "load_images", never)
    with pytest.raises(ImagerecError, match=match):
        embed(root, "seed_cnn", out=out, workers=workers, progress=False)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("folder/*"))


def test_an_unwritable_out_folder_is_refused_first(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anywhere: use a read-only file system instead
        folder = "/sys"
        if os.access(folder, os.W_OK) and os.path.isdir("/sys/kernel"):
            folder = "/sys/kernel"
    root = make_class_folder(tmp_path / "d", per_class=2)
    with pytest.raises(ImagerecError, match="cannot write in"):
        embed(root, "seed_cnn", out=os.path.join(folder, "e.npz"), progress=False)


def test_load_refuses_paths_fewer_than_rows(tmp_path):
    meta = {"backbone": "seed_cnn", "preprocessing": create_backbone("seed_cnn", num_classes=0).preprocessing.to_dict()}
    features, paths = np.zeros((3, 4), np.float32), np.asarray(["a", "b"])
    np.savez(tmp_path / "bad.npz", features=features, paths=paths, meta=np.asarray(json.dumps(meta)))
    with pytest.raises(ImagerecError, match="2 paths for 3 rows"):
        Embeddings.load(tmp_path / "bad.npz")


def test_non_utf8_names_are_embedded_saved_and_reported(tmp_path, capsys):
    root = tmp_path / "u"
    good = make_image(root / os.fsdecode(b"caf\xe9.png"), (40, 40))
    make_image(root / "plain.png", (40, 40), seed=1)
    make_image(root / "other.png", (20, 20), seed=2)  # mixed sizes: read from the files
    (root / os.fsdecode(b"bro\xefken.jpg")).write_bytes(b"not a jpeg")
    out = tmp_path / "u.npz"
    result = embed(root, "seed_cnn", out=out, workers=0, progress=False)
    assert str(good) in result.paths and len(result.skipped) == 1
    assert str(good) in Embeddings.load(out).paths
    assert "bro\\xefken.jpg" in (tmp_path / "u.skipped.csv").read_text(encoding="utf-8")
    assert "bro\\xefken.jpg" in capsys.readouterr().err


def test_seed_cnn_embeddings_are_deterministic(class_folder):
    first = embed(class_folder, "seed_cnn", progress=False)
    torch.rand(100)  # the global random state moves on
    second = embed(class_folder, "seed_cnn", progress=False)
    np.testing.assert_array_equal(first.features, second.features)


def test_a_thin_strip_is_a_reported_skip_with_bounded_memory(tmp_path):
    root = tmp_path / "thin"
    root.mkdir()
    Image.new("RGB", (30_000, 1), "red").save(root / "strip.png")  # a few hundred bytes
    make_image(root / "photo.png", (80, 80))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = embed(root, "seed_cnn", workers=0, progress=False)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(result) == 1 and [s.path for s in result.skipped] == [str(root / "strip.png")]
    assert "too thin (30000 x 1" in result.skipped[0].reason
    assert grown_mib < 300, f"peak memory grew by {grown_mib:.0f} MiB"


def test_manifest_rows_outside_its_folder_need_allow_outside(tmp_path, capsys):
    make_image(tmp_path / "elsewhere.png", seed=1)
    make_image(tmp_path / "set" / "a.png", seed=2)
    (tmp_path / "set" / "m.csv").write_text("path\na.png\n../elsewhere.png\n")
    result = embed(tmp_path / "set" / "m.csv", "seed_cnn", progress=False)
    assert len(result) == 1 and "--allow-outside" in result.skipped[0].reason
    assert "--allow-outside" in capsys.readouterr().err
    assert len(embed(tmp_path / "set" / "m.csv", "seed_cnn", progress=False, allow_outside=True)) == 2
