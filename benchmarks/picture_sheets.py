"""Picture sheets of real photos reconstructed by each model, as the Blender add-on imports them.

    .venv/bin/python benchmarks/picture_sheets.py [--models builtin ict-facekit sfm] [--out docs/images]

One sheet per model (docs/images/quality_sheet_<model>.png): per photo (the package photos and
../shared/photos) the photo cropped to the face, then the result imported by the add-on's own
importer and rendered by Cycles from the front, at 45° and at 90°. About 4 minutes on 2 CPU cores
(renders already in --work are reused; delete it to render again).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["builtin", "ict-facekit", "sfm"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "picture-sheets")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from benchmarks.quality.sheets import make_sheets
    shared = Path(os.environ.get("FACERECON_SHARED", ROOT.parent / "shared")) / "photos"
    started = time.perf_counter()
    for path in make_sheets(args.models, shared, args.work, args.out, args.device):
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
