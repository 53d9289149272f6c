"""Where a three-photo request's time goes, in process (no ZeroMQ): each pipeline call of
`Reconstructor.run_person` timed with a device synchronisation around it (`Locator.locate` runs
in a thread per photo: its row sums the threads' times, more than the wall time they took).

    .venv/bin/python benchmarks/person_profile.py --device cuda:0 --model ict-facekit --photos A B C
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared_protocol import PersonPhoto, ReconstructOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ict-facekit")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--texture-size", type=int, default=2048)
    parser.add_argument("--photos", type=Path, nargs="+", required=True)
    parser.add_argument("--fit-device", help="the person fit's device (default: the pipeline's choice)")
    parser.add_argument("--profile-export", action="store_true", help="cProfile the last request's export")
    args = parser.parse_args()
    import torch
    from backend_server.pipeline import reconstruct as R
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    timings: dict[str, list[float]] = defaultdict(list)

    def timed(owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*a, **k):
            sync()
            start = time.perf_counter()
            out = original(*a, **k)
            sync()
            timings[label].append((time.perf_counter() - start) * 1000)
            return out
        setattr(owner, name, wrapper)

    options = ReconstructOptions(model=args.model, texture_size=args.texture_size)
    reconstructor = R.Reconstructor(args.device)
    reconstructor.person_fit_device = args.fit_device or reconstructor.person_fit_device
    reconstructor.warm_up(args.texture_size, 1, (args.model,))
    model = R.face_model(options)
    for owner, name in [(R, "fuse_observations"), (R, "appearance_mismatch"), (R, "completed"),
                        (R, "export_person"), (R, "covered_texels"), (type(model), "fit_person"),
                        (type(model), "texture_vertices"), (type(reconstructor.baker), "observe"),
                        (type(reconstructor.baker), "complete"), (R.Locator, "locate")]:
        timed(owner, name, name)
    photos = [PersonPhoto(p.name, p.read_bytes()) for p in args.photos]
    totals = []
    for run in range(args.runs + 1):
        if run == 1:
            timings.clear()
            totals.clear()
        if args.profile_export and run == args.runs:
            profile_export(R)
        sync()
        start = time.perf_counter()
        out = reconstructor.run_person(photos, options)
        sync()
        totals.append((time.perf_counter() - start) * 1000)
    print(f"{args.model} on {args.device}, {len(photos)} photos, {args.texture_size}²: run_person median "
          f"{statistics.median(totals):.0f} ms over {args.runs} runs; stage clock: "
          + ", ".join(f"{k} {v:.0f}" for k, v in out.timings_ms.items()))
    for label, values in timings.items():
        per_run = sum(values) / args.runs
        print(f"  {label:20s} {per_run:8.1f} ms a request ({len(values) // args.runs} calls, median call "
              f"{statistics.median(values):.1f} ms)")


def profile_export(R) -> None:
    """Wrap R.export_person to print its cProfile (cumulative, top 25) when next called."""
    import cProfile
    import pstats
    original = R.export_person

    def profiled(*a, **k):
        profile = cProfile.Profile()
        out = profile.runcall(original, *a, **k)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
        return out
    R.export_person = profiled


if __name__ == "__main__":
    main()
