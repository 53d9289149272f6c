"""Shared fixtures: real photos (package-shipped and ../shared) and one Reconstructor per session."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACERECON_SHARED", ROOT.parent / "shared"))
SHARED_PHOTOS = SHARED / "photos"


def shared_photo(name: str) -> Path:
    path = SHARED_PHOTOS / name
    if not path.exists():
        pytest.skip(f"test photo {path} is absent (set FACERECON_SHARED to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def grace_hopper_bytes() -> bytes:
    import matplotlib
    return (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()


@pytest.fixture(scope="session")
def astronaut_png() -> bytes:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def reconstructor():
    from backend_server.pipeline.reconstruct import Reconstructor
    instance = Reconstructor()
    yield instance
    instance.close()
