"""Re-render quality and landmark error of every model on a folder of photos (`facerecon evaluate`
per model), as one table.

    python benchmarks/models_quality.py ../shared/photos [--models builtin ict-facekit sfm]

PSNR and SSIM compare the textured mesh re-rendered into each photo with the photo, over the face
pixels that model covers (so the areas differ between models: ICT-FaceKit covers the whole head
outline, SFM and the built-in mesh the face). The landmark error needs PHOTO.pts (68 iBUG points):
68-point error over the points a model defines (the SFM has no fixed jaw points) and inner-point
error (iBUG 18-68, comparable across models), both relative to the outer-eye-corner distance.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="+")
    parser.add_argument("--models", nargs="+", default=["builtin", "ict-facekit", "sfm"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("| model | photos | PSNR dB (mean) | SSIM (mean) | face pixels (mean) | 68-point error % "
          "| inner-point error % |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        with tempfile.TemporaryDirectory() as folder:
            report = Path(folder) / "rows.json"
            subprocess.run([sys.executable, "-m", "backend_server.cli.facerecon", "evaluate", *args.photos,
                            "--model", model, "--device", args.device, "--json", str(report)],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = json.loads(report.read_text()) if report.exists() else []
        if not rows:
            print(f"| {model} | 0 | - | - | - | - | - |")
            continue

        def mean(key: str, rows: list = rows) -> float:
            values = [r[key] for r in rows if key in r]
            return float(np.mean(values)) if values else float("nan")

        print(f"| {model} | {len(rows)} | {mean('psnr_db'):.2f} | {mean('ssim'):.3f} | {mean('face_pixels'):.0f} | "
              f"{100 * mean('landmark68_normalized'):.2f} | {100 * mean('landmark_inner_normalized'):.2f} |")


if __name__ == "__main__":
    main()
