"""A picture sheet of several photos of one person against the front photo alone, as the add-on
imports them (docs/images/person_views.png):

    FACERECON_MODELS=... .venv/bin/python benchmarks/quality_v2.py --multiview --results RESULTS ...
    .venv/bin/python benchmarks/person_sheet.py --results RESULTS [--heads head000 head001 head004] \\
        [--models ict-facekit builtin] [--out docs/images/person_views.png]

Per head and model two rows, "front photo" (RESULTS/<head>/<model>/front) and "3 photos"
(.../three): the photos used (the synthetic set's front and ±60° views), then the result imported
by the add-on's importer and rendered by Cycles from the front, at 45° and at 90°
(benchmarks/quality/sheet_render.py, in a Blender subprocess; renders kept in --work).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CELL_PX = 150
LABEL_PX = 160


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="quality_v2.py --multiview --results folder")
    parser.add_argument("--data", type=Path, default=ROOT / ".cache" / "quality-v2", help="the synthetic set")
    parser.add_argument("--heads", nargs="+", default=["head000", "head001", "head004"])
    parser.add_argument("--models", nargs="+", default=["ict-facekit", "builtin"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "person_views.png")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "person-sheet")
    args = parser.parse_args()
    from backend_server.pipeline.export import safe_stem
    from backend_server.synthetic.dataset import RenderedHead
    from benchmarks.quality.multiview import SIDE_YAW_DEG, view_at
    started = time.perf_counter()
    jobs, rows = [], []
    for head_name in args.heads:
        head = RenderedHead.load(args.data / head_name)
        views = [view_at(head, yaw) for yaw in (0, SIDE_YAW_DEG, -SIDE_YAW_DEG)]
        photos = [Image.fromarray(head.images[k]).convert("RGB") for k in views]
        stem = safe_stem(f"{head_name}_{head.sample.views[views[0]].name}.png")     # as multiview.py names it
        for model in args.models:
            for method, used in (("front", photos[:1]), ("three", photos)):
                folder = args.results / head_name / model / method
                if not (folder / f"{stem}.json").is_file():
                    raise SystemExit(f"no result in {folder}: run quality_v2.py --multiview --results first")
                renders = [str(args.work / head_name / model / method / f"{angle}.png") for angle in (0, 45, 90)]
                jobs.append({"folder": str(folder), "photo": f"{stem}.png", "out": renders})
                used_count = json.loads((folder / f"{stem}.json").read_text()).get("person", {}).get("used", 1)
                label = f"{head_name}\n{model}\n{'front photo' if method == 'front' else f'{used_count} photos used'}"
                rows.append((label, used, renders))
    args.work.mkdir(parents=True, exist_ok=True)
    job_file = args.work / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    if not all(Path(out).is_file() for job in jobs for out in job["out"]):
        script = ROOT / "benchmarks" / "quality" / "sheet_render.py"
        subprocess.run([sys.executable, str(script), str(job_file)], check=True, stdout=subprocess.DEVNULL)
    sheet = Image.new("RGB", (LABEL_PX + 6 * CELL_PX, 24 + CELL_PX * len(rows)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(("photos used", "", "", "front", "45°", "90°")):
        draw.text((LABEL_PX + k * CELL_PX + 6, 6), title, fill=(230, 230, 230))
    for row, (label, used, renders) in enumerate(rows):
        y = 24 + row * CELL_PX
        draw.multiline_text((6, y + 6), label, fill=(230, 230, 230))
        for k, photo in enumerate(used):
            sheet.paste(photo.resize((CELL_PX, CELL_PX)), (LABEL_PX + k * CELL_PX, y))
        for k, path in enumerate(renders):
            sheet.paste(Image.open(path).convert("RGB").resize((CELL_PX, CELL_PX)), (LABEL_PX + (3 + k) * CELL_PX, y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"{args.out} ({args.out.stat().st_size / 1e6:.2f} MB), {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
