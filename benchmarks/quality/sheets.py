"""Picture sheets: photo | the result as the add-on imports it, rendered front, 45° and 90° (Cycles);
one row per photo, one sheet per model, written to docs/images/quality_sheet_<model>.png."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .photos import folder_photos, package_photos
from .reconstruction import Pipeline

CELL_PX = 200


def crop_to_face(photo: Image.Image, landmarks: list[list[float]]) -> Image.Image:
    """A square around the face's landmarks (1.6 x their extent), resized to one cell."""
    xs, ys = [p[0] for p in landmarks], [p[1] for p in landmarks]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    half = 0.8 * max(max(xs) - min(xs), max(ys) - min(ys))
    box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
    return photo.crop(box).resize((CELL_PX, CELL_PX), Image.LANCZOS)


def small_png(sheet: Image.Image) -> Image.Image:
    """The sheet in 256 colours (median cut, Floyd-Steinberg dithering): about a third of the
    true-colour PNG's size, so a sheet of 17 photos stays under 1 MB; renders look the same."""
    return sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)


def make_sheets(models: list[str], shared_photos: Path | None, work: Path, out_dir: Path,
                device: str = "cpu") -> list[Path]:
    photos = package_photos() + (folder_photos(shared_photos) if shared_photos and shared_photos.is_dir() else [])
    pipeline = Pipeline(device)
    jobs, rows = [], {m: [] for m in models}
    for model in models:
        for name, data in photos:
            folder = work / model / Path(name).stem
            try:
                obj = pipeline.write_result_files(data, name, model, folder)
            except Exception as exc:                # noqa: BLE001 - a failed photo gets an empty row
                print(f"{model} {name}: {exc}")
                continue
            facts = json.loads(obj.with_suffix(".json").read_text())
            photo = Image.open(io.BytesIO(data)).convert("RGB")
            scale = facts["photo"]["scale"]
            marks = [[x / scale, y / scale] for x, y, _ in facts["landmarks_px"]]
            renders = [str(folder / f"sheet_{angle}.png") for angle in (0, 45, 90)]
            jobs.append({"folder": str(folder), "photo": name, "out": renders})
            rows[model].append((name, crop_to_face(photo, marks), renders))
    pipeline.close()
    job_file = work / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    script = Path(__file__).with_name("sheet_render.py")
    if not all(Path(out).is_file() for job in jobs for out in job["out"]):       # renders kept in `work`
        subprocess.run([sys.executable, str(script), str(job_file)], check=True, stdout=subprocess.DEVNULL)
    written = []
    for model in models:
        sheet = Image.new("RGB", (4 * CELL_PX, 24 + CELL_PX * len(rows[model])), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for k, title in enumerate(("photo", "front", "45°", "90°")):
            draw.text((k * CELL_PX + 6, 6), f"{model}: {title}" if k == 0 else title, fill=(0, 0, 0))
        for row, (name, crop, renders) in enumerate(rows[model]):
            y = 24 + row * CELL_PX
            sheet.paste(crop, (0, y))
            for k, path in enumerate(renders):
                sheet.paste(Image.open(path).convert("RGB").resize((CELL_PX, CELL_PX)), ((k + 1) * CELL_PX, y))
            draw.text((4, y + 4), name, fill=(255, 255, 0))
        target = out_dir / f"quality_sheet_{model}.png"
        small_png(sheet).save(target, optimize=True)
        written.append(target)
    return written
