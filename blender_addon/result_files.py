"""Where a result's files go: a new folder per result, so no earlier result is ever overwritten."""
from __future__ import annotations

from pathlib import Path

from .protocol import ResultFile


def unique_folder(parent: Path, stem: str) -> Path:
    """Create and return parent/stem, or parent/stem_2, stem_3, ... (the first that did not exist)."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        folder = parent / (stem if n == 1 else f"{stem}_{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free folder name for {stem} in {parent}")


def write_result(parent: Path, stem: str, files: tuple[ResultFile, ...]) -> Path:
    """Write every file (bare names, checked by the protocol) into a new folder; returns it."""
    folder = unique_folder(Path(parent), stem)
    for file in files:
        target = folder / file.name
        if target.parent != folder:
            raise ValueError(f"refusing result file name {file.name!r}")
        target.write_bytes(file.data)
    return folder
