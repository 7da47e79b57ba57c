"""Transforms built from a model's preprocessing: per image and per batch agree; augmentation
draws its own parameters for every image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imagerec import ImagerecError, Preprocessing
from imagerec.data import BatchAugment, eval_transform, train_transform

PP = Preprocessing(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", 0.875)


def random_batch(n=4, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def test_eval_transform_per_image_equals_per_batch():
    batch = random_batch()
    batched = eval_transform(PP, batched=True)(batch)
    single = torch.stack([eval_transform(PP)(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in batch])
    assert batched.shape == (4, 3, 64, 64)
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_eval_transform_normalises_with_mean_and_std():
    grey = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    out = eval_transform(PP.resolve(16, 1.0), batched=True)(grey)
    expected = (128 / 255 - torch.tensor(PP.mean)) / torch.tensor(PP.std)
    torch.testing.assert_close(out[0, :, 8, 8], expected)


def test_crop_pct_crops_the_centre():
    img = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    img[..., 8:24, 8:24] = 255  # a white square in the middle
    out = eval_transform(PP.resolve(32, 0.5), batched=True)(img)
    assert out.mean() > 0.9 * ((1 - 0.4) / 0.25)  # almost all white after cropping to the middle half


@pytest.mark.parametrize(
    "size, crop, match", [(8, None, "outside"), (4000, None, "outside"), (64, 0.0, "crop_pct"), (64, 1.5, "crop_pct")]
)
def test_resolve_rejects_bad_values(size, crop, match):
    with pytest.raises(ImagerecError, match=match):
        PP.resolve(size, crop)


def test_fixed_input_size_is_enforced():
    fixed = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, fixed_input_size=True)
    assert fixed.resolve(32).input_size == 32
    with pytest.raises(ImagerecError, match="takes only 32 px"):
        fixed.resolve(64)


def test_preprocessing_round_trips_through_a_dict():
    assert Preprocessing.from_dict(PP.to_dict()) == PP


def test_batch_augment_shape_and_seeded_determinism():
    aug = BatchAugment(PP, "default")
    batch = random_batch(8)
    a = aug(batch, torch.Generator().manual_seed(3))
    b = aug(batch, torch.Generator().manual_seed(3))
    c = aug(batch, torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 64, 64) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_batch_augment_draws_per_image_parameters():
    same = random_batch(1).repeat(16, 1, 1, 1)
    out = BatchAugment(PP, "default")(same, torch.Generator().manual_seed(0))
    distinct = {tuple(x.flatten()[:50].tolist()) for x in out}
    assert len(distinct) == 16


def test_batch_augment_without_crop_or_rotation_is_resize_or_mirror():
    batch = random_batch(16)
    aug = BatchAugment(PP.resolve(32), "default", scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0)
    out = aug(batch, torch.Generator().manual_seed(0))
    plain = (batch.float() / 255 - aug.mean) / aug.std
    flipped = plain.flip(-1)
    is_plain = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-4
    is_flipped = (out - flipped).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert bool((is_plain | is_flipped).all())
    assert 0 < int(is_flipped.sum()) < 16  # about half the images are mirrored


def test_batch_augment_none_is_a_resize():
    batch = random_batch(2)
    aug = BatchAugment(PP, "none")
    expected = F.interpolate(batch.float() / 255, size=(64, 64), mode="bilinear", antialias=True)
    torch.testing.assert_close(aug(batch), (expected - aug.mean) / aug.std)


def test_strong_batch_augment_erases_a_square():
    white = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    out = BatchAugment(PP.resolve(32), "strong")(white, torch.Generator().manual_seed(0))
    grey = ((0.5 - BatchAugment(PP).mean) / BatchAugment(PP).std).view(3, 1, 1)
    for img in out:
        assert ((img - grey).abs() < 1e-5).all(dim=0).sum() == 8 * 8


@pytest.mark.parametrize("augment", ["none", "default", "strong"])
def test_per_image_train_transform(augment):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    out = train_transform(PP, augment)(img)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32


def test_unknown_augment():
    with pytest.raises(ImagerecError, match="augment='wild'"):
        train_transform(PP, "wild")


# -- issue 10: thin images cost bounded memory ---------------------------------------------------

_THIN = """
import resource, sys
from PIL import Image
from imagerec import Preprocessing
from imagerec.data import DecodeError, eval_transform, load_rgb
folder = sys.argv[1]
t = eval_transform(Preprocessing(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875))
t(Image.new("RGB", (64, 64)))  # warm up the kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Image.new("RGB", (2000, 1), "red").save(folder + "/thin.png")  # 765 MB when resized whole
try:
    t(load_rgb(folder + "/thin.png"))
    print("decoded")
except DecodeError as e:
    print("skipped:", e)
Image.new("RGB", (1000, 20), "red").save(folder + "/at_cap.png")  # 50:1 is still read
print(tuple(t(load_rgb(folder + "/at_cap.png")).shape))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_thin_images_are_refused_and_the_thinnest_read_cost_little_memory(tmp_path):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    # a fresh process, so that the peak resident size measures this work alone
    run = subprocess.run([sys.executable, "-c", _THIN, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    thin, shape, grown_mib = run.stdout.splitlines()
    assert thin.startswith("skipped: too thin (2000 x 1")
    assert shape == "(3, 224, 224)"
    assert int(grown_mib) < 150, f"peak RSS grew by {grown_mib} MiB"
