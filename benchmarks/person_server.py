"""Latency of a three-photo request (several photos of one person, one head) over ZeroMQ.

    .venv/bin/python benchmarks/person_server.py [--model ict-facekit] [--jobs 10] [--devices cpu]
    .venv/bin/python benchmarks/person_server.py --devices cuda:0          # one GPU worker

Starts `facerecon-backend serve` (one worker on --devices) on a free loopback port, sends the same
three photos (by default a synthetic head's front and ±60° views from benchmarks/quality_v2.py's
set, or --photos A B C) --jobs times, one after another, and prints the latency (request sent ->
Result received) p50/p95, the worker's own time, and its stages' medians.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, free_address, percentile, start_backend
from shared_protocol import PersonPhoto, ReconstructOptions
from shared_protocol.client import Client


def synthetic_photos(folder: Path) -> list[PersonPhoto]:
    from PIL import Image
    sys.path.insert(0, str(ROOT))
    from backend_server.synthetic.dataset import RenderedHead
    from benchmarks.quality.multiview import SIDE_YAW_DEG, view_at
    head = RenderedHead.load(folder)
    photos = []
    for yaw in (0, SIDE_YAW_DEG, -SIDE_YAW_DEG):
        buffer = io.BytesIO()
        Image.fromarray(head.images[view_at(head, yaw)]).save(buffer, format="PNG")
        photos.append(PersonPhoto(f"yaw{yaw}.png", buffer.getvalue()))
    return photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ict-facekit")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--texture-size", type=int, default=2048)
    parser.add_argument("--photos", type=Path, nargs="+", help="photos of one person (default: a synthetic head)")
    parser.add_argument("--head", type=Path, default=ROOT / ".cache" / "quality-v2" / "head000",
                        help="a synthetic head folder of benchmarks/quality_v2.py")
    parser.add_argument("--models-dir", help="installed models (default $FACERECON_MODELS)")
    args = parser.parse_args()
    photos = ([PersonPhoto(p.name, p.read_bytes()) for p in args.photos] if args.photos
              else synthetic_photos(args.head))
    options = ReconstructOptions(model=args.model, texture_size=args.texture_size)
    address = free_address()
    serve = ["--devices", args.devices, "--workers", "1", "--warm-texture-size", str(args.texture_size)]
    if args.models_dir:
        serve += ["--models-dir", args.models_dir]
    backend = start_backend(address, serve)
    latencies, worker_ms, stages = [], [], {}
    try:
        with Client(address) as client:
            for job in range(args.jobs + 1):                        # the first one warms up
                start = time.perf_counter()
                result = client.reconstruct(photos[0].data, photos[0].name, options, timeout_s=600,
                                            more_photos=photos[1:])
                latency = (time.perf_counter() - start) * 1000
                if job == 0:
                    print(f"used photos {result.summary['used_photos']} of {len(photos)}; left out "
                          f"{result.summary['left_out'] or 'none'}")
                    continue
                latencies.append(latency)
                worker_ms.append(result.summary["worker_ms"])
                for stage, ms in result.summary["timings_ms"].items():
                    stages.setdefault(stage, []).append(ms)
    finally:
        backend.terminate()
        backend.wait(60)
    print(f"{len(photos)} photos, model {args.model}, texture {args.texture_size}², devices {args.devices}, "
          f"{args.jobs} requests over ZeroMQ one after another")
    print(f"latency p50 {percentile(latencies, 0.5):.0f} ms, p95 {percentile(latencies, 0.95):.0f} ms; "
          f"worker p50 {statistics.median(worker_ms):.0f} ms")
    print("stages (median ms): " + ", ".join(f"{s} {statistics.median(v):.0f}" for s, v in stages.items()))


if __name__ == "__main__":
    main()
