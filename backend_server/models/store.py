"""Installed morphable models: converted once from their original files into a fast cache.

Layout: `<models dir>/<name>/model.npz` (arrays, see MorphableModel.save) and `manifest.json`
(where it came from, a fingerprint of the source files, counts). The models dir is, in order:
the explicit argument, `$FACERECON_MODELS`, `$XDG_CACHE_HOME/facerecon/models` (~/.cache/...).

A cache is rebuilt when its source files are still there but changed (size or modification time
of any of them), and when the cache format or the correspondence method changed.

Models with a `Download` (ICT-FaceKit) install in one step: `download_and_install` fetches the
pinned upstream archive into `<models dir>/downloads/` (resumable `.part`), checks the files the
loader reads against the pinned content digest, installs, and keeps the archive (a reinstall needs
no network) but not the unpacked files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
import tempfile
from typing import Callable

import numpy as np

from .. import download as downloads
from . import eos_format, ict_facekit
from .builtin import NAME as BUILTIN_NAME
from .calibration import Calibration, ShapeCorrection
from .morphable import CACHE_FORMAT, MorphableModel

MODELS_ENV = "FACERECON_MODELS"
CORRESPONDENCE_VERSION = 1
log = logging.getLogger("facerecon.models")


@dataclass(frozen=True)
class ModelKind:
    """How to read one kind of model from its original files. `files(source)` lists every file the
    loader reads; `load(source)` builds the model (without correspondence)."""

    load: Callable[[dict], MorphableModel]
    files: Callable[[dict], list[Path]]
    how_to_get: str


KINDS = {
    ict_facekit.NAME: ModelKind(
        lambda s: ict_facekit.load_ict_facekit(Path(s["folder"])),
        lambda s: ict_facekit.source_files(Path(s["folder"])),
        f"facerecon-backend models install ict-facekit (downloads and checks the pinned files), or get the "
        f"FaceXModel/ folder of {ict_facekit.SOURCE_URL} yourself (MIT licence; e.g. `git clone` the "
        "repository), then: facerecon-backend models install ict-facekit --from PATH/TO/FaceXModel"),
    eos_format.SFM_NAME: ModelKind(
        lambda s: eos_format.load_sfm(Path(s["folder"])),
        lambda s: eos_format.sfm_files(Path(s["folder"])),
        f"Get share/sfm_shape_3448.bin, share/expression_blendshapes_3448.bin and share/ibug_to_sfm.txt "
        f"from {eos_format.SFM_SOURCE} into one folder (needs `pip install eos-py`), then: "
        "facerecon-backend models install sfm --from FOLDER"),
    "eos": ModelKind(
        lambda s: eos_format.load_eos_model(s["name"], Path(s["model"]),
                                            Path(s["blendshapes"]) if s.get("blendshapes") else None,
                                            Path(s["landmarks"]) if s.get("landmarks") else None),
        lambda s: [Path(s[k]) for k in ("model", "blendshapes", "landmarks") if s.get(k)],
        "Convert the model to eos's .bin format with eos's scripts, then: facerecon-backend models "
        "install eos --name NAME --from MODEL.bin [--blendshapes FILE.bin] [--landmarks ibug_to_x.txt]"),
}


@dataclass(frozen=True)
class Download:
    """Where a model's original files come from when no folder is given: a pinned archive URL
    (`url_env` overrides it, e.g. for a mirror or a test server), the file every copy of the folder
    holds (`marker`), and the content digest (`download.content_digest`) of the files the kind's
    loader reads (ModelKind.files), which decides, for any archive format, that they are the ones
    pinned."""

    url: str
    url_env: str
    content_sha256: str
    marker: str
    nested_archive: str | None
    why: str


# ICT-FaceKit: the repository's own archive at commit 1922d84 (GitHub serves any commit as a zip;
# the OBJs lie in FaceXModel/ there, not in Git LFS). The digest is of the 155 files the loader
# reads, computed from the FaceXModel.tar.xz in FaceRecon's shared test data, which holds the
# upstream folder unchanged; that those files are commit 1922d84's was checked by their sizes and
# contents of generic_neutral_mesh.obj and eyeBlink_L.obj against that commit (this build machine
# reaches no GitHub, so the zip itself was not downloaded). A digest over the files rather than
# the archive: GitHub regenerates archive zips, whose bytes are not guaranteed to stay the same,
# and the same check then accepts a .tar.xz of the same folder from a mirror.
ICT_FACEKIT_COMMIT = "1922d84282a3faf345dbf949c4a63b09f87907bc"
DOWNLOADS = {
    ict_facekit.NAME: Download(
        url=f"https://github.com/ICT-VGL/ICT-FaceKit/archive/{ICT_FACEKIT_COMMIT}.zip",
        url_env="FACERECON_ICT_FACEKIT_URL",
        content_sha256="c3e588d23d578ed3eb14b4a6363aa3f09975fceca4f2595ba5b20d4923fe7479",
        marker=ict_facekit.NEUTRAL, nested_archive="FaceXModel.zip",
        why="ICT-FaceKit's FaceXModel/ folder (MIT licence)"),
}


def models_dir(explicit: Path | str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "facerecon" / "models"


def fingerprint(files: list[Path]) -> str:
    """Changes when any file is added, removed, resized or modified (name, size, mtime)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def install(kind: str, source: dict, directory: Path | None = None) -> dict:
    """Read a model from its original files, compute its MediaPipe correspondence and write the
    cache. `source`: {"folder": ...} for ict-facekit and sfm; {"name", "model", "blendshapes",
    "landmarks"} for eos. Returns the manifest."""
    from .correspondence import compute_correspondence
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    source = {k: str(Path(v).resolve()) if k != "name" else v for k, v in source.items() if v}
    started = time.perf_counter()
    model = KINDS[kind].load(source)
    correspondence = compute_correspondence(model)
    model = model.with_correspondence(correspondence)
    target = models_dir(directory) / model.name
    target.mkdir(parents=True, exist_ok=True)
    model.save(target / "model.npz")
    manifest = {
        "name": model.name, "kind": kind, "source": source,
        "fingerprint": fingerprint(KINDS[kind].files(source)),
        "cache_format": CACHE_FORMAT, "correspondence_version": CORRESPONDENCE_VERSION,
        "vertices": model.vertex_count, "polygons": int(len(model.polygons)),
        "identity_components": int(len(model.identity_basis)), "expressions": list(model.expression_names),
        "mediapipe_points_on_surface": int(correspondence.valid.sum()),
        "mediapipe_to_surface_median_mm": round(1000 * float(np.median(correspondence.residual_m)), 2),
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - started, 1),
        "info": model.info,
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    load_model.cache_clear()
    return manifest


def download_url(kind: str, url: str | None = None) -> str:
    """The archive URL a download of `kind` uses: `url`, else $<url_env>, else the pinned one."""
    return url or os.environ.get(DOWNLOADS[kind].url_env) or DOWNLOADS[kind].url


def download_and_install(kind: str, directory: Path | None = None, url: str | None = None,
                         on_progress: downloads.ProgressCallback | None = None) -> dict:
    """Fetch `kind`'s archive (resuming a `.part`), check its files against the pinned digest,
    install from them, and return the manifest. DownloadError says what failed and what to do;
    an archive whose files do not match is deleted (the next call fetches it anew)."""
    pinned = DOWNLOADS[kind]
    url = download_url(kind, url)
    folder = models_dir(directory) / "downloads"
    archive = folder / f"{kind}-{downloads.archive_name(url)}"
    downloads.fetch(url, archive, on_progress)
    with tempfile.TemporaryDirectory(prefix=f"{kind}-", dir=folder) as scratch:
        source = downloads.find_folder(downloads.unpack(archive, Path(scratch)), pinned.marker, pinned.nested_archive)
        try:
            files = KINDS[kind].files({"folder": str(source)})
            digest = downloads.content_digest(files, source)
        except (OSError, ValueError, KeyError) as exc:
            digest = f"unreadable ({exc})"
        if digest != pinned.content_sha256:
            archive.unlink(missing_ok=True)
            raise downloads.DownloadError(
                f"checksum mismatch: the files in {url} are not the pinned {pinned.why} (content SHA-256 "
                f"{digest}, expected {pinned.content_sha256}); the download was deleted. Run again, or get the "
                f"files by hand: {KINDS[kind].how_to_get}")
        manifest = install(kind, {"folder": str(source)}, directory)
    manifest["source"] = {"archive": str(archive), "url": url}
    (models_dir(directory) / manifest["name"] / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(name: str, directory: Path | None = None) -> dict | None:
    path = models_dir(directory) / name / "manifest.json"
    if not path.is_file() or not path.with_name("model.npz").is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def installed_models(directory: Path | None = None) -> list[str]:
    """Names of the installed models, sorted (the built-in model is not among them)."""
    root = models_dir(directory)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and read_manifest(p.name, directory))


def available_models(directory: Path | None = None) -> tuple[str, ...]:
    """What a request may name: the built-in model, then the installed ones."""
    return (BUILTIN_NAME, *installed_models(directory))


def is_stale(manifest: dict) -> str | None:
    """Why the cache must be rebuilt, or None. A source that is gone leaves the cache valid."""
    if manifest.get("cache_format") != CACHE_FORMAT:
        return "the cache format changed"
    if manifest.get("correspondence_version") != CORRESPONDENCE_VERSION:
        return "the correspondence method changed"
    try:
        current = fingerprint(KINDS[manifest["kind"]].files(manifest["source"]))
    except (OSError, ValueError, KeyError):
        return None
    return "its source files changed" if current != manifest["fingerprint"] else None


@lru_cache(maxsize=4)
def load_model(name: str, directory: Path | None = None) -> MorphableModel:
    """An installed model, its cache rebuilt first if stale. KeyError names the installed ones."""
    manifest = read_manifest(name, directory)
    if manifest is None:
        raise KeyError(f"model {name!r} is not installed in {models_dir(directory)}; installed: "
                       f"{', '.join(installed_models(directory)) or 'none'}")
    reason = is_stale(manifest)
    if reason:
        log.warning("rebuilding the cache of model %s: %s", name, reason)
        if "archive" in manifest["source"]:              # downloaded: unpacked again from the kept archive
            download_and_install(manifest["kind"], directory, manifest["source"]["url"])
        else:
            install(manifest["kind"], manifest["source"], directory)
    return MorphableModel.load(models_dir(directory) / name / "model.npz")


# --- calibration (made by backend_server/calibration.py; see models/calibration.py) -----------------
CALIBRATION_FILE = "calibration.npz"
BUILTIN_FOLDER = "builtin"          # the built-in model's correction (no model files there)


def model_stamp(name: str, directory: Path | None = None) -> str:
    """What a calibration belongs to: the digest of the model's manifest less what changes with
    every rebuild of the same model (when and from where it was installed, the source files'
    times), so a cache rebuilt from the same files keeps its calibration and another model does not."""
    manifest = read_manifest(name, directory) or {}
    kept = {k: v for k, v in manifest.items() if k not in ("installed_at", "seconds", "source", "fingerprint")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def save_calibration(name: str, calibration: Calibration, directory: Path | None = None) -> Path:
    """Store a model's calibration in its cache, and its correction of the built-in model (if it
    has one) as the built-in model's (the last model calibrated provides it)."""
    path = models_dir(directory) / name / CALIBRATION_FILE
    calibration.facts["model_stamp"] = model_stamp(name, directory)
    calibration.save(path)
    if calibration.shape_correction is not None:
        builtin = models_dir(directory) / BUILTIN_FOLDER
        builtin.mkdir(parents=True, exist_ok=True)
        calibration.shape_correction.save(builtin / CALIBRATION_FILE)
    load_calibration.cache_clear()
    load_shape_correction.cache_clear()
    return path


@lru_cache(maxsize=4)
def load_shape_correction(directory: Path | None = None) -> ShapeCorrection | None:
    """The built-in model's geometry correction, learnt when a morphable model was calibrated;
    None (MediaPipe's geometry as it is) if no model was."""
    path = models_dir(directory) / BUILTIN_FOLDER / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return ShapeCorrection.load(path)
    except ValueError as exc:
        log.warning("built-in model: %s; its geometry stays MediaPipe's until a model is calibrated again", exc)
        return None


@lru_cache(maxsize=8)
def load_calibration(name: str, directory: Path | None = None) -> Calibration | None:
    """The model's calibration, or None (with a warning that says how to make one) if it has none,
    or one made for another cache of the model, or a damaged one."""
    path = models_dir(directory) / name / CALIBRATION_FILE
    how = f"run `facerecon-backend models calibrate {name}` (a few minutes on a CPU) for a better fit"
    if not path.is_file():
        log.warning("model %s is not calibrated; %s", name, how)
        return None
    try:
        calibration = Calibration.load(path)
    except ValueError as exc:
        log.warning("model %s: %s; %s", name, exc, how)
        return None
    if calibration.facts.get("model_stamp") != model_stamp(name, directory):
        log.warning("model %s: its calibration was made for an earlier install; %s", name, how)
        return None
    return calibration
