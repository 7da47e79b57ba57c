"""Checkpoints: safetensors + JSON, no pickle, atomic, and refused when truncated or tampered."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from imagerec import ImagerecError, create_backbone
from imagerec.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint


def make_checkpoint(with_optimizer=True):
    torch.manual_seed(0)
    model = create_backbone("seed_cnn", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    meta = {"backbone": "seed_cnn", "classes": ["a", "b", "c"], "step": 7}
    return Checkpoint(model.state_dict(), meta, optimizer.state_dict() if with_optimizer else None), model, optimizer


def test_round_trip_with_optimizer(tmp_path):
    ckpt, model, optimizer = make_checkpoint()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    loaded = load_checkpoint(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model[key], value)
    assert loaded.meta["classes"] == ["a", "b", "c"] and loaded.meta["step"] == 7
    assert "imagerec_version" in loaded.meta
    fresh = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    fresh.load_state_dict(loaded.optimizer)
    assert fresh.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(fresh.state[model.fc3.bias]["momentum_buffer"], optimizer.state[model.fc3.bias]["momentum_buffer"])


def test_the_file_is_plain_safetensors_with_a_json_header(tmp_path):
    ckpt, _, _ = make_checkpoint(with_optimizer=False)
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert header["__metadata__"]["format"] == "imagerec.checkpoint/1"
    assert b"\x80\x04" not in raw[:16]  # no pickle protocol marker at the start
    assert json.loads(header["__metadata__"]["meta"])["backbone"] == "seed_cnn"


def test_truncated_file_is_refused(tmp_path):
    ckpt, _, _ = make_checkpoint()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImagerecError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_tampered_tensor_is_refused(tmp_path):
    ckpt, _, _ = make_checkpoint()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ImagerecError, match="checksum mismatch"):
        load_checkpoint(path)


def test_other_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ImagerecError, match="not an imagerec checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_not_a_checkpoint_at_all(tmp_path):
    (tmp_path / "x.safetensors").write_text("hello")
    with pytest.raises(ImagerecError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "x.safetensors")


def test_run_folder_means_its_best_checkpoint(tmp_path):
    ckpt, _, _ = make_checkpoint()
    save_checkpoint(tmp_path / "last.safetensors", ckpt)
    assert resolve_checkpoint(tmp_path).name == "last.safetensors"  # no best yet: the last
    save_checkpoint(tmp_path / "best.safetensors", ckpt)
    assert resolve_checkpoint(tmp_path).name == "best.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImagerecError, match="no best.safetensors or last.safetensors"):
        resolve_checkpoint(tmp_path / "empty")


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    ckpt, _, _ = make_checkpoint()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("imagerec.checkpoint.save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, ckpt)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left


def test_a_checkpoint_gets_the_usual_file_mode(tmp_path):
    """Temporary files are 0600; the finished checkpoint must be readable as any new file is."""
    import os

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.safetensors", Checkpoint(model={"w": torch.zeros(2)}, meta={}))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def _rewrite_header(path, edit) -> None:
    """Rewrite the safetensors JSON header of ``path`` through ``edit(metadata dict)``; tensors untouched."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    edit(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def _swap_classes(meta_header: dict) -> None:
    meta = json.loads(meta_header["meta"])
    meta["classes"] = list(reversed(meta["classes"]))
    meta_header["meta"] = json.dumps(meta)


def test_swapped_class_names_in_the_header_are_refused(tmp_path):
    ckpt, _, _ = make_checkpoint()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    _rewrite_header(path, _swap_classes)
    with pytest.raises(ImagerecError, match="checksum mismatch"):
        load_checkpoint(path)


def test_every_metadata_field_is_covered(tmp_path):
    ckpt, _, _ = make_checkpoint()
    ckpt.meta.update(preprocessing={"input_size": 32}, config={"lr": 0.1})
    for key, value in (("preprocessing", {"input_size": 64}), ("config", {"lr": 0.2}), ("step", 8), ("extra", 1)):
        path = save_checkpoint(tmp_path / f"{key}.safetensors", ckpt)

        def edit(h, key=key, value=value):
            meta = json.loads(h["meta"])
            meta[key] = value
            h["meta"] = json.dumps(meta)

        _rewrite_header(path, edit)
        with pytest.raises(ImagerecError, match="checksum mismatch"):
            load_checkpoint(path)


@pytest.mark.parametrize(
    "meta_text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a JSON list where an object belongs"),
        ('{"classes": "ab", "backbone": "seed_cnn"}', "'classes' is 'ab'"),
        ('{"classes": ["a", "a"], "backbone": "seed_cnn"}', "distinct strings"),
        ('{"classes": ["a", "b"], "step": "7"}', "'step' is '7'"),
        ('{"classes": ["a", "b"], "optimizer": {"state": 3, "param_groups": []}}', "broken optimizer metadata"),
    ],
)
def test_broken_metadata_with_a_matching_checksum_is_one_error(tmp_path, meta_text, fragment):
    """A file whose checksum was recomputed over broken metadata: an ImagerecError, never JSONDecodeError."""
    from imagerec.checkpoint import COVERS, FORMAT, _digest

    path = save_checkpoint(tmp_path / "c.safetensors", Checkpoint(model={"w": torch.zeros(2)}, meta={}))
    tensors = {"model.w": torch.zeros(2)}

    def edit(h):
        h.update(meta=meta_text, covers=COVERS, sha256=_digest(tensors, FORMAT, meta_text))

    _rewrite_header(path, edit)
    with pytest.raises(ImagerecError, match=fragment) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_broken_metadata_through_the_cli_is_one_line(tmp_path, capsys):
    from .conftest import assert_user_error, run_cli

    ckpt, _, _ = make_checkpoint(with_optimizer=False)
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    _rewrite_header(path, lambda h: h.update(meta="{oops"))
    code, _, err = run_cli(capsys, "predict", path, tmp_path / "x.png")
    assert_user_error(code, err, "checksum mismatch")


def test_an_older_checkpoint_is_verified_the_old_way_with_a_warning(tmp_path):
    """Files from before the checksum covered the metadata still load (tensors verified)."""
    from imagerec.checkpoint import _digest
    from imagerec.errors import ImagerecWarning

    ckpt, _, _ = make_checkpoint(with_optimizer=False)
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    loaded = load_checkpoint(path)
    tensors = {f"model.{k}": v for k, v in loaded.model.items()}

    def to_old(h):
        del h["covers"]
        h["sha256"] = _digest(tensors)

    _rewrite_header(path, to_old)
    with pytest.warns(ImagerecWarning, match="checksum covers the tensors only"):
        old = load_checkpoint(path)
    assert old.meta["classes"] == ["a", "b", "c"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(ImagerecWarning), pytest.raises(ImagerecError, match="checksum mismatch"):
        load_checkpoint(path)
