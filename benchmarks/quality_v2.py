"""Quality benchmark v2: synthetic heads with a truth, baselines, the eos peer, real photos.

    .venv/bin/python benchmarks/quality_v2.py                   # the default set, CPU, < 15 min
    .venv/bin/python benchmarks/quality_v2.py --device cuda:0   # bake and renders on a GPU
    .venv/bin/python benchmarks/quality_v2.py --heads 24 --data DIR --json results.json

1. Generates (or reuses, saying so) the synthetic set: --heads random ICT-FaceKit heads, each seen
   from yaw 0, ±30, ±60, ±90 (small random pitch and roll), rendered by Cycles (bpy, in a
   subprocess) with a procedural albedo and one of four light kinds (`backend_server.synthetic`).
2. Reconstructs every view with each model (--models) and with eos (the peer), builds the
   baselines (mean face; mean identity with the fitted expression) and measures geometry, texture
   and novel views against the truth (`benchmarks/quality/metrics.py` defines every measure).
3. Measures the real photos (re-render, landmark error on eos_image_0010).
4. Prints every table (markdown) and the fast renderer's speed.
Needs the models installed (`facerecon-backend models install ...`) and ../shared (or
$FACERECON_SHARED) for the eos files and the photos.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("FACERECON_SHARED", ROOT.parent / "shared"))


def generate(args: argparse.Namespace) -> list[Path]:
    """The synthetic set, rendered in a subprocess (bpy and MediaPipe stay in separate processes)."""
    command = [sys.executable, "-m", "backend_server.synthetic.dataset", "--model", "ict-facekit", "--out",
               str(args.data), "--count", str(args.heads), "--seed", str(args.seed), "--renderer", args.renderer,
               "--size", str(args.size), "--samples", str(args.samples), "--device", args.device]
    started = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    for line in process.stdout.splitlines():
        if line.startswith("head ") or " reused " in line:
            print("  " + line, flush=True)
    if process.returncode != 0:
        raise SystemExit(f"generation failed:\n{process.stderr[-3000:]}")
    print(f"synthetic set: {args.heads} heads in {args.data} ({time.perf_counter() - started:.0f} s)", flush=True)
    return [args.data / f"head{k:03d}" for k in range(args.heads)]


def fast_renderer_speed(folder: Path, device: str) -> str:
    """Median time of a 512² render of one ICT-FaceKit head by render.shade (one CPU thread)."""
    import numpy as np
    import torch
    from backend_server.models import store
    from backend_server.render.shade import render
    from backend_server.synthetic.dataset import RenderedHead
    from backend_server.synthetic.sampling import View
    from backend_server.synthetic.scene import model_render_mesh
    from backend_server.geometry import Camera
    head = RenderedHead.load(folder)
    model = store.load_model("ict-facekit")
    view = head.sample.views[0]
    big = View(view.name, view.yaw_deg, view.pitch_deg, view.roll_deg, view.pose, Camera.for_photo(512, 512))
    mesh = model_render_mesh(model, head.vertex_colours)
    light = head.sample.light.rotated(big.pose.rotation)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        render(mesh, big.pose.apply(head.posed), big.camera, head.texture, light, device=device)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return (f"fast renderer (render/shade.py, {device}): {1000 * np.median(times[1:]):.0f} ms median for a 512² "
            f"render of ICT-FaceKit ({model.vertex_count} vertices, {len(model.triangles)} triangles, "
            f"1024² albedo, SH + sun), one thread")


def head_figure(folder: Path, path: Path) -> None:
    """One synthetic head for the docs: its seven renders in a row, then its truth albedo (face tile)."""
    import numpy as np
    from PIL import Image
    from backend_server.synthetic.dataset import RenderedHead
    head = RenderedHead.load(folder)
    order = sorted(range(len(head.images)), key=lambda k: head.sample.views[k].yaw_deg)
    size = 192
    cells = [Image.fromarray(head.images[k]).resize((size, size), Image.LANCZOS) for k in order]
    cells.append(Image.fromarray(head.texture).resize((size, size), Image.LANCZOS))
    Image.fromarray(np.concatenate([np.asarray(c) for c in cells], axis=1)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / ".cache" / "quality-v2", help="synthetic set folder")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1500)
    parser.add_argument("--renderer", choices=("cycles", "fast"), default="cycles")
    parser.add_argument("--size", type=int, default=384, help="render size in pixels")
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    parser.add_argument("--models", nargs="+", default=["builtin", "ict-facekit", "sfm"])
    parser.add_argument("--no-peer", action="store_true", help="leave out eos")
    parser.add_argument("--no-photos", action="store_true", help="leave out the real photos")
    parser.add_argument("--texture-size", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (bake, fast renderer)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--json", type=Path, help="write every record here")
    parser.add_argument("--multiview", action="store_true",
                        help="several photos of one person instead (issue 18): front + ±60° against the front "
                             "photo alone and the mean face, and another person's photo flagged (--tries)")
    parser.add_argument("--tries", type=int, default=10, help="--multiview: outlier tries per model")
    parser.add_argument("--results", type=Path, help="--multiview: also write each head's result files here")
    parser.add_argument("--figure", type=Path, help="write the first head's renders and albedo here (an image)")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    torch.set_num_threads(args.threads)
    from benchmarks.quality import photos, synthetic_v2, tables
    from benchmarks.quality.reconstruction import installed
    missing = [m for m in args.models + ["ict-facekit", "sfm"] if not installed(m)]
    if missing:
        raise SystemExit(f"models not installed: {', '.join(sorted(set(missing)))} (facerecon-backend models install)")
    peer = None if args.no_peer else SHARED / "models" / "sfm"
    if peer is not None and not (peer / "sfm_shape_3448.bin").is_file():
        print(f"eos peer left out: {peer} lacks the SFM files", flush=True)
        peer = None

    folders = generate(args)
    if args.multiview:
        from benchmarks.quality import multiview
        from benchmarks.quality.peer_eos import EosPeer
        records = multiview.run(folders, args.models, args.texture_size, args.tries, results=args.results,
                                peer=None if peer is None else EosPeer(peer))
        print(f"\n## Several photos of one person: {args.heads} heads, front + ±{multiview.SIDE_YAW_DEG}°, "
              f"texture {args.texture_size}²\n")
        print(multiview.table(records, args.models))
        print(f"total {time.perf_counter() - started:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(records, indent=1, default=float))
        return
    if args.figure:
        head_figure(folders[0], args.figure)
    synthetic = synthetic_v2.run(folders, args.models, peer, args.device, args.texture_size)
    photo_records: list[dict] = []
    if not args.no_photos:
        chosen = photos.package_photos()
        if (SHARED / "photos").is_dir():
            chosen += photos.folder_photos(SHARED / "photos")
        photo_records = photos.run(chosen, args.models, SHARED / "photos", peer, args.device, args.texture_size)
    speed = fast_renderer_speed(folders[0], args.device)

    print(f"\n## Synthetic heads v2: {args.heads} heads x 7 views, {args.renderer} {args.size}², "
          f"texture {args.texture_size}²\n")
    print(tables.synthetic_tables(synthetic))
    if photo_records:
        print("\n" + tables.photo_tables(photo_records))
    print("\n" + speed)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"synthetic": synthetic, "photos": photo_records, "fast_renderer": speed},
                                        indent=1, default=float))


if __name__ == "__main__":
    main()
