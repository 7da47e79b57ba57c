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
