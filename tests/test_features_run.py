"""``--features RUN``: a trained run's network embeds images wherever features are used (embed,
cluster, audit, index and search, label, the studio), cached by its weights like any backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imagerec import ImagerecError, create_backbone, embed
from imagerec.checkpoint import RUN_PREFIX, Checkpoint, feature_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from imagerec.features import compute_features

from .conftest import assert_user_error, make_colour_dataset, run_cli

CLASSES = ["blue", "green", "red"]


def write_run(folder: Path, seed: int) -> Path:
    """A seed_cnn run folder with weights drawn from ``seed`` (what ``imagerec train`` would write)."""
    torch.manual_seed(seed)
    net = create_backbone("seed_cnn", num_classes=len(CLASSES))
    meta = {"backbone": "seed_cnn", "classes": CLASSES, "preprocessing": net.preprocessing.to_dict()}
    save_checkpoint(folder / "best.safetensors", Checkpoint(net.state_dict(), meta))
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    return make_colour_dataset(tmp_path / "data", per_class=4, size=(32, 32))


def test_a_run_embeds_with_its_own_network_and_is_named_by_its_weights(tmp_path, data):
    run = write_run(tmp_path / "run", seed=1)
    result = embed(data, RUN_PREFIX + str(run), progress=False)
    model = model_from_checkpoint(load_checkpoint(run))
    expected = embed(data, model, progress=False).features
    np.testing.assert_allclose(result.features, expected, rtol=1e-5, atol=1e-6)
    assert result.features.shape[1] == model.num_features
    name, digest = result.backbone.rsplit("#", 1)
    assert name == RUN_PREFIX + str((run / "best.safetensors").resolve()) and len(digest) == 16
    other = embed(data, RUN_PREFIX + str(write_run(tmp_path / "other", seed=2)), progress=False)
    assert not np.allclose(other.features, result.features)  # other weights, other features


def test_a_recorded_digest_refuses_a_checkpoint_changed_since(tmp_path):
    run = write_run(tmp_path / "run", seed=1)
    recorded = feature_model(RUN_PREFIX + str(run)).backbone_name
    assert feature_model(recorded).backbone_name == recorded  # the same file loads by its digest
    write_run(run, seed=3)
    with pytest.raises(ImagerecError, match="changed since"):
        feature_model(recorded)


def test_the_cache_reuses_rows_of_the_same_run_and_embeds_again_for_new_weights(tmp_path, data, capsys):
    run, cache = write_run(tmp_path / "run", seed=1), tmp_path / "cache"
    first = compute_features(data, backbone=RUN_PREFIX + str(run), cache_dir=cache, progress=False)
    capsys.readouterr()
    again = compute_features(data, backbone=RUN_PREFIX + str(run), cache_dir=cache, progress=False)
    assert "re-embedding" not in capsys.readouterr().err
    np.testing.assert_array_equal(first.embeddings.features, again.embeddings.features)
    write_run(run, seed=4)  # trained again: same folder, new weights
    retrained = compute_features(data, backbone=RUN_PREFIX + str(run), cache_dir=cache, progress=False)
    assert "re-embedding all" in capsys.readouterr().err
    assert not np.allclose(retrained.embeddings.features, first.embeddings.features)


def test_cli_features_flag_on_embed_cluster_label_and_audit(tmp_path, data, capsys):
    run = write_run(tmp_path / "run", seed=1)
    code, out, err = run_cli(capsys, "embed", data, "--features", run, "--out", tmp_path / "e.npz", "--no-progress")
    assert code == 0, err
    from imagerec import Embeddings

    assert Embeddings.load(tmp_path / "e.npz").backbone.startswith(RUN_PREFIX)
    code, _, err = run_cli(capsys, "cluster", data, "--features", run, "--k", "3", "--out", tmp_path / "c", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "c" / "assignments.csv").is_file()
    code, _, err = run_cli(capsys, "label", data, "--features", run, "--out", tmp_path / "s.csv", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(capsys, "audit", data, "--features", run, "--checks", "near_duplicates,outliers", "--out", tmp_path / "a", "--no-progress")
    assert code == 0, err


def test_cli_refuses_a_missing_run_and_both_flags_before_any_work(tmp_path, data, capsys):
    code, _, err = run_cli(capsys, "embed", data, "--features", tmp_path / "nowhere", "--out", tmp_path / "e.npz")
    assert_user_error(code, err, "nowhere", "no such checkpoint file or run folder")
    run = write_run(tmp_path / "run", seed=1)
    code, _, err = run_cli(capsys, "cluster", data, "--backbone", "seed_cnn", "--features", run, "--out", tmp_path / "c")
    assert_user_error(code, err, "not allowed with argument")
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "c").exists()


def test_an_index_of_run_features_is_searched_with_that_run_and_refused_once_it_changes(tmp_path, data, capsys):
    from imagerec.index import build_index, load_index

    run = write_run(tmp_path / "run", seed=1)
    index = build_index(data, tmp_path / "index", backbone=RUN_PREFIX + str(run), progress=False)
    query = sorted(data.rglob("*.png"))[5]
    found = load_index(tmp_path / "index").search(str(query), top_k=1)
    assert Path(found["path"][0]).resolve() == query.resolve() and found["score"][0] == pytest.approx(1.0, abs=1e-4)
    assert index.backbone.startswith(RUN_PREFIX)
    write_run(run, seed=5)
    with pytest.raises(ImagerecError, match="changed since"):
        load_index(tmp_path / "index").search(str(query), top_k=1)


def test_the_studio_embeds_with_its_latest_finished_run(tmp_path):
    from imagerec.studio._db import Project
    from imagerec.studio._setup import features_backbone

    project = Project(tmp_path / "project")
    assert features_backbone(project, "auto", 160) == ("auto", 160)
    run_id = project.start_run(1.0, "seed_cnn", str(tmp_path / "r1"), 12)
    project.finish_run(run_id, "failed", message="stopped")
    assert features_backbone(project, "auto", 160) == ("auto", 160)  # no finished run, no checkpoint
    run_id = project.start_run(1.0, "seed_cnn", str(write_run(tmp_path / "r2", seed=1)), 12)
    project.finish_run(run_id, "done", accuracy=0.5)
    assert features_backbone(project, "auto", 160) == (RUN_PREFIX + str((tmp_path / "r2").resolve()), None)  # at its own size
