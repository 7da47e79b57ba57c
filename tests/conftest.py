"""Shared fixtures: tiny generated images, and imagerec's cache redirected to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"
needs_cifar = pytest.mark.skipif(
    not (CIFAR_JPEG / "test").is_dir(), reason=f"CIFAR-10 JPEG copy not found at {CIFAR_JPEG}"
)


@pytest.fixture(autouse=True)
def imagerec_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty imagerec cache folder."""
    home = tmp_path_factory.mktemp("imagerec_home")
    monkeypatch.setenv("IMAGEREC_HOME", str(home))
    return home


def make_image(path: Path, size=(32, 32), seed: int = 0, mode: str = "RGB", fmt: str | None = None) -> Path:
    """Write a random image of ``size`` (width, height) to ``path``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_class_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size=(32, 32), ext: str = ".png") -> Path:
    """``root/<class>/<i><ext>`` with distinct random images."""
    seed = 0
    for name in classes:
        for i in range(per_class):
            make_image(root / name / f"{i:03d}{ext}", size, seed=seed)
            seed += 1
    return root


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_colour_dataset(
    root: Path, per_class: int = 16, size=(32, 32), classes=("red", "green", "blue"), noise: float = 40
) -> Path:
    """A learnable data set: each class is noisy images of one colour (pixel noise of std ``noise``),
    with a random dark square."""
    rng = np.random.default_rng(0)
    for name in classes:
        for i in range(per_class):
            pixels = np.clip(rng.normal(COLOURS[name], noise, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
            pixels[y : y + size[1] // 3, x : x + size[0] // 3] //= 3
            path = root / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return make_colour_dataset(tmp_path / "colours")


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "data")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``imagerec ARGV`` in this process: (exit status, stdout, stderr)."""
    from imagerec.cli import main  # noqa: PLC0415

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits for --help, --version and bad arguments
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments) -> None:
    """A user error: status 2 and one line on stderr (no traceback) holding every fragment."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
