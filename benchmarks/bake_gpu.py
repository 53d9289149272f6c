"""The GPU bake alone: milliseconds per face at a batch size, and where they go.

    python benchmarks/bake_gpu.py --photos PHOTO_DIR --model builtin --batch 16 --faces 256 \\
        [--faces-per-pass 4 8 16] [--profile]

Locates and fits the photos on the CPU (once), then bakes `--faces` faces in batches of `--batch`
on cuda:0 with `GpuBaker.bake` as the GPU batch process calls it (skin maps, de-lit unless
`--lit-texture`, textures copied into page-locked host arrays). Prints ms per face (median of
`--repeats` runs over all faces) for each `--faces-per-pass` and, with `--profile` (for the
last), torch.profiler's top operations by GPU and by CPU time plus cProfile's top Python
functions for one run.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend_server.pipeline.fit import fit_faces  # noqa: E402
from backend_server.pipeline.progress import StageClock  # noqa: E402
from backend_server.pipeline.reconstruct import Reconstructor, face_model  # noqa: E402
from shared_protocol import ReconstructOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--faces", type=int, default=256)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--faces-per-pass", type=int, nargs="+", default=[8])
    parser.add_argument("--lit-texture", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import torch
    from backend_server.pipeline.bake_gpu import GpuBaker

    options = ReconstructOptions(model=args.model, texture_size=args.size)
    model = face_model(options)
    reconstructor = Reconstructor("cpu")
    photos, skins, vertices, cameras = [], [], [], []
    for path in sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}):
        try:
            photo, located, skin = reconstructor.locate(path.read_bytes(), path.name, options, StageClock())
        except Exception as exc:                        # a photo without a face: skip it
            print(f"skip {path.name}: {exc}")
            continue
        fitted = fit_faces(model, [located.faces[0].landmarks], [located.camera], "cpu")
        photos.append(photo.rgb)
        skins.append(skin.probability)
        vertices.append(fitted[0].texture_vertices)
        cameras.append(located.camera)
    reconstructor.close()
    print(f"{len(photos)} photos located; {model.topology.vertex_count} texture vertices")

    baker = GpuBaker("cuda:0")
    baker.warm_up(model.topology, args.size)
    targets = [np.empty((args.size, args.size, 3), np.uint8) for _ in range(args.batch)]
    for target in targets:
        torch.cuda.cudart().cudaHostRegister(target.ctypes.data, target.nbytes, 0)
    pick = [k % len(photos) for k in range(args.faces)]

    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, args.faces, args.batch):
            chosen = pick[first:first + args.batch]
            baker.bake([photos[k] for k in chosen], [vertices[k] for k in chosen], [cameras[k] for k in chosen],
                       model.topology, args.size, targets[:len(chosen)], skins=[skins[k] for k in chosen],
                       delit=not args.lit_texture)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / args.faces

    for per_pass in args.faces_per_pass:
        baker.faces_per_pass = per_pass
        run()                                               # warm-up (kernels, caches)
        torch.cuda.reset_peak_memory_stats()
        times = [run() for _ in range(args.repeats)]
        print(f"bake {args.model} {args.size}² batch {args.batch}, {per_pass} faces a pass: "
              f"{statistics.median(times):.2f} ms a face (runs {', '.join(f'{t:.2f}' for t in times)}), "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=50))
        print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())


if __name__ == "__main__":
    main()
