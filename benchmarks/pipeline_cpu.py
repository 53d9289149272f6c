"""CPU time per photo by stage (one process, one thread of work), at a given texture size.

    .venv/bin/python benchmarks/pipeline_cpu.py [PHOTO_OR_DIR...] [--texture-size 2048] [--repeat 3]

Prints per-stage median milliseconds and the end-to-end median, PNG encoding included.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend_server.cli.facerecon import demo_photo, gather_photos  # noqa: E402
from backend_server.pipeline.reconstruct import Reconstructor  # noqa: E402
from shared_protocol import ReconstructOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", nargs="*")
    parser.add_argument("--texture-size", type=int, default=2048)
    parser.add_argument("--subdivision", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    photos = gather_photos(args.inputs or [str(demo_photo())])
    reconstructor = Reconstructor()
    options = ReconstructOptions(texture_size=args.texture_size, subdivision=args.subdivision)
    start = time.perf_counter()
    reconstructor.warm_up(args.texture_size, args.subdivision)
    print(f"warm-up (UV rasterization, once per worker): {(time.perf_counter() - start) * 1000:.0f} ms")
    stages: dict[str, list[float]] = {}
    totals = []
    for _ in range(args.repeat):
        for photo in photos:
            data = photo.read_bytes()
            start = time.perf_counter()
            result = reconstructor.run(data, photo.name, options)
            totals.append((time.perf_counter() - start) * 1000)
            for stage, ms in result.timings_ms.items():
                stages.setdefault(stage, []).append(ms)
    print(f"{len(photos)} photo(s) x {args.repeat}, texture {args.texture_size}², subdivision {args.subdivision}")
    for stage, values in stages.items():
        print(f"  {stage:10s} {statistics.median(values):8.1f} ms")
    print(f"  {'total':10s} {statistics.median(totals):8.1f} ms median, "
          f"{sorted(totals)[int(0.95 * (len(totals) - 1))]:.1f} ms p95")


if __name__ == "__main__":
    main()
