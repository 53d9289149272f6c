"""Shared fixtures: real photos (package-shipped and ../shared) and one Reconstructor per session."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACERECON_SHARED", ROOT.parent / "shared"))
SHARED_PHOTOS = SHARED / "photos"
SHARED_MODELS = SHARED / "models"
TEST_CACHE = ROOT / ".cache" / "test-data"          # git-ignored; kept between runs
# No test downloads from the internet: a `models install ict-facekit` without --from that a test
# does not point at its own 127.0.0.1 server fails at once (nothing listens on port 9).
os.environ.setdefault("FACERECON_ICT_FACEKIT_URL", "http://127.0.0.1:9/no-internet-in-tests/FaceXModel.zip")


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


@pytest.fixture(scope="session")
def ict_folder() -> Path:
    """The original ICT-FaceKit FaceXModel/ folder, unpacked once from ../shared into the test cache
    (again whenever the archive changes)."""
    archive = SHARED_MODELS / "ict-facekit" / "FaceXModel.tar.xz"
    if not archive.exists():
        pytest.skip(f"{archive} is absent (set FACERECON_SHARED to the shared data folder)")
    target = TEST_CACHE / "ict-facekit"
    stamp = f"{archive.stat().st_size} {archive.stat().st_mtime_ns}"
    marker = target / "unpacked-from"
    if not marker.exists() or marker.read_text() != stamp:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        marker.write_text(stamp)
    return target / "FaceXModel"


@pytest.fixture(scope="session")
def sfm_folder() -> Path:
    folder = SHARED_MODELS / "sfm"
    if not (folder / "sfm_shape_3448.bin").exists():
        pytest.skip(f"the Surrey Face Model is absent from {folder}")
    pytest.importorskip("eos", reason="eos-py reads the Surrey Face Model (test extra)")
    return folder


@pytest.fixture(scope="session")
def installed_models(tmp_path_factory, ict_folder, sfm_folder) -> Path:
    """ICT-FaceKit and the SFM installed into a fresh models dir, which this session then uses
    (FACERECON_MODELS, inherited by every backend process the tests start)."""
    from backend_server.models import store
    folder = tmp_path_factory.mktemp("models")
    store.install("ict-facekit", {"folder": ict_folder}, folder)
    store.install("sfm", {"folder": sfm_folder}, folder)
    previous = os.environ.get(store.MODELS_ENV)
    os.environ[store.MODELS_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(store.MODELS_ENV, None)
    else:
        os.environ[store.MODELS_ENV] = previous


@pytest.fixture(scope="session")
def sfm_model(request):
    """The SFM as installed in $FACERECON_MODELS, or installed from ../shared for this session."""
    from backend_server.models import store
    if "sfm" not in store.installed_models():
        request.getfixturevalue("installed_models")
    return store.load_model("sfm")


@pytest.fixture(scope="session")
def ict_model(request):
    """ICT-FaceKit as installed in $FACERECON_MODELS (e.g. a cache carried to the GPU machine), or
    installed from ../shared for this session."""
    from backend_server.models import store
    if "ict-facekit" not in store.installed_models():
        request.getfixturevalue("installed_models")
    return store.load_model("ict-facekit")
