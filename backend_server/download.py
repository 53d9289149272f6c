"""Downloading a model's original files: HTTP with resume, archive unpacking, content checks.

Standard library only (urllib, zipfile, tarfile, hashlib); nothing here knows a model:

    fetch(url, target, on_progress)      # target.part grows (HTTP Range resumes it), then target
    unpack(archive, folder)              # .zip, .tar, .tar.gz, .tar.xz; no entry may leave the folder
    find_folder(root, marker)            # the folder holding `marker`, at any depth (a repository
                                         # archive's <repo>-<commit>/FaceXModel/, or a nested .zip)
    content_digest(files, root)          # SHA-256 over the files' names and SHA-256s

Every failure a user can meet (offline, HTTP error, cut connection, damaged archive) is a
`DownloadError` whose message says what happened and what to do.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence
from urllib.parse import urlparse

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0
MAX_UNPACKED_BYTES = 4 << 30           # a damaged or hostile archive cannot fill the disk
USER_AGENT = "facerecon-model-installer"
ProgressCallback = Callable[[int, "int | None"], None]      # (bytes so far, total bytes or None)


class DownloadError(Exception):
    """A download or unpacking failure, its message meant for the user."""


def archive_name(url: str) -> str:
    """A safe file name for the archive at `url` (its last path segment, suffix kept)."""
    name = PurePosixPath(urlparse(url).path).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "download"


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def fetch(url: str, target: Path, on_progress: ProgressCallback | None = None, timeout_s: float = TIMEOUT_S) -> Path:
    """Download `url` to `target` (kept: a second call returns it at once). Bytes go to
    `target.part` first; a `.part` left by an interrupted call is resumed with an HTTP Range
    request (a server that ignores it sends the whole file again, which then replaces the part)."""
    target = Path(target)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(target)
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:                    # the part is already the whole file
            part.replace(target)
            return target
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {url}: {reason}. Is this machine offline, or is the address "
                            "blocked here?") from None
    with response:
        if response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != have:
                raise DownloadError(f"cannot resume {url}: the server sent bytes from {start}, not {have}; "
                                    f"delete {part} and run again")
        else:
            have = 0                                    # 200: the whole file, from its first byte
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        done = have
        if on_progress:
            on_progress(done, total)
        try:
            with open(part, "ab" if have else "wb") as file:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
                    done += len(chunk)
                    if on_progress:
                        on_progress(done, total)
        except (OSError, http.client.HTTPException, ValueError) as exc:     # reset, timeout, IncompleteRead
            raise _cut(url, part, done, total, exc) from None
    if total is not None and done != total:
        raise _cut(url, part, done, total, "the connection closed early")
    part.replace(target)
    return target


def _cut(url: str, part: Path, done: int, total: int | None, why: object) -> DownloadError:
    of = f" of {total / 1e6:.1f} MB" if total else ""
    return DownloadError(f"the download of {url} stopped at {done / 1e6:.1f} MB{of} ({why}); run the same "
                         f"command again to resume it (kept in {part})")


def _content_range_start(value: str) -> int:
    """The first byte of `Content-Range: bytes START-END/SIZE` (-1 when it cannot be read)."""
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def unpack(archive: Path, folder: Path) -> Path:
    """Unpack a .zip or a tar archive (.tar, .tar.gz, .tgz, .tar.xz, .tar.bz2) into `folder`.
    An entry that would land outside it, a link, or over MAX_UNPACKED_BYTES in all is refused."""
    archive, folder = Path(archive), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                _check_members([(i.filename, i.file_size, False) for i in zipped.infolist()], archive)
                zipped.extractall(folder)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                _check_members([(m.name, m.size, m.issym() or m.islnk()) for m in members], archive)
                tar.extractall(folder, filter="data")
        else:
            raise DownloadError(f"{archive.name} is neither a zip nor a tar archive (damaged download?)")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(f"cannot unpack {archive.name}: {exc} (damaged download?)") from None
    return folder


def _check_members(members: Sequence[tuple[str, int, bool]], archive: Path) -> None:
    total = 0
    for name, size, link in members:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or link:
            raise DownloadError(f"{archive.name} holds an unsafe entry {name!r}; refused")
        total += size
    if total > MAX_UNPACKED_BYTES:
        raise DownloadError(f"{archive.name} would unpack to {total / 1e9:.1f} GB; refused")


def find_folder(root: Path, marker: str, nested: str | None = None) -> Path:
    """The folder under `root` holding a file named `marker` (the shallowest one). Where none does
    but an archive named `nested` lies there (e.g. FaceXModel.zip inside a repository), it is
    unpacked beside itself and searched."""
    root = Path(root)
    found = sorted(root.rglob(marker), key=lambda p: (len(p.parts), str(p)))
    if found:
        return found[0].parent
    if nested:
        for inner in sorted(root.rglob(nested), key=lambda p: len(p.parts)):
            unpacked = unpack(inner, inner.with_name(inner.name + ".unpacked"))
            found = sorted(unpacked.rglob(marker), key=lambda p: (len(p.parts), str(p)))
            if found:
                return found[0].parent
    raise DownloadError(f"the archive holds no {marker}: not the expected files")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(files: Sequence[Path], root: Path) -> str:
    """SHA-256 over `name<TAB>sha256` lines of `files` (names relative to `root`, sorted): the same
    for the same files in any archive format or folder."""
    lines = sorted(f"{Path(f).relative_to(root).as_posix()}\t{file_sha256(Path(f))}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def remove_quietly(path: Path) -> None:
    if Path(path).is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
