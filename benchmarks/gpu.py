"""GPU benchmark: latency over ZeroMQ, batch throughput on 1..N GPUs, peak GPU memory, CPU ratio.

    python benchmarks/gpu.py --photos PHOTO_DIR --count 1200 --device-sets 0 0,1 --json results.json

1. Latency: `facerecon-backend serve --devices 0`, one client, one photo at a time (cycling the
   photos): request sent -> every result file received, 2048² texture; p50/p95. Same for a CPU
   server (one worker) on this machine, for the ratio.
2. Batch throughput: the batch command line's GPU path (pipeline.batch_gpu) over `--count`
   photos (the given photos repeated under new names) for each device set; photos/s over the whole
   run and in steady state (after the first 5 %), peak GPU memory per worker, where the time goes.
3. CPU batch throughput with every core (the CPU path), for the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, free_address, percentile, start_backend
from shared_protocol import ReconstructOptions
from shared_protocol.client import Client

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def replicate(photos: list[Path], count: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for k in range(count):
        source = photos[k % len(photos)]
        target = folder / f"p{k:05d}_{source.name}"
        if not target.exists():
            os.link(source, target) if source.stat().st_dev == folder.stat().st_dev else shutil.copy(source, target)
        copies.append(target)
    return copies


def serve_latency(devices: str, photos: list[Path], runs: int, log: Path, model: str) -> dict:
    address = free_address()
    server = start_backend(address, ["--devices", devices, "--workers", "1"], log)
    try:
        with Client(address) as client:
            data = [p.read_bytes() for p in photos]
            for k in range(3):
                client.reconstruct(data[k % len(data)], "warm.jpg", ReconstructOptions(model=model), timeout_s=300)
            latencies, worker_ms = [], []
            for k in range(runs):
                start = time.perf_counter()
                result = client.reconstruct(data[k % len(data)], photos[k % len(photos)].name,
                                            ReconstructOptions(model=model), timeout_s=300)
                latencies.append((time.perf_counter() - start) * 1000)
                worker_ms.append(result.summary["worker_ms"])
                stages = result.summary["timings_ms"]
            status = client.status()
        return {"devices": devices, "runs": runs, "p50_ms": percentile(latencies, 0.5),
                "p95_ms": percentile(latencies, 0.95), "worker_p50_ms": statistics.median(worker_ms),
                "last_stage_ms": stages, "gpu_memory_mb": [w["gpu_memory_mb"] for w in status.workers]}
    finally:
        server.terminate()
        server.wait(60)


def batch_throughput(devices: list[str], photos: list[Path], out_dir: Path, batch_size: int,
                     cpu_workers: int | None, model: str) -> dict:
    from backend_server.cli.facerecon import output_stems
    from backend_server.pipeline.batch_gpu import GpuBatchRunner
    shutil.rmtree(out_dir, ignore_errors=True)
    stems = output_stems(photos)
    finished: list[float] = []
    failures: list[str] = []

    def on_outcome(outcome) -> None:
        finished.append(time.perf_counter())
        if outcome.status.value != "done":
            failures.append(f"{outcome.photo.name}: {outcome.detail}")

    runner = GpuBatchRunner(devices, ReconstructOptions(model=model), batch_size, cpu_workers)
    start = time.perf_counter()
    report = runner.run([(p, stems[p]) for p in photos], out_dir, on_outcome)
    total = time.perf_counter() - start
    warm = max(1, len(finished) // 20)
    steady = (len(finished) - warm) / (finished[-1] - finished[warm - 1])
    return {"devices": devices, "photos": len(photos), "failed": len(failures), "failures": failures[:5],
            "wall_s": total, "photos_per_s": len(photos) / total, "steady_photos_per_s": steady,
            "cpu_workers": runner.cpu_workers, "batch_size": batch_size,
            "gpu": report.gpu, "cpu_stage_ms_per_photo": {k: v / max(report.photos, 1)
                                                          for k, v in report.cpu_stage_ms.items()}}


def cpu_throughput(photos: list[Path], out_dir: Path, workers: int, model: str) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "backend_server.cli.facerecon", "reconstruct", *map(str, photos),
                           "-o", str(out_dir), "--workers", str(workers), "--model", model, "-q"], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return {"photos": len(photos), "workers": workers, "wall_s": seconds, "photos_per_s": len(photos) / seconds,
            "exit": done.returncode, "tail": done.stdout[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--device-sets", nargs="+", default=["0"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--latency-runs", type=int, default=40, help="0 skips the latency part")
    parser.add_argument("--cpu-workers-per-gpu", type=int,
                        help="give each GPU this many CPU workers (default: every core for any device set)")
    parser.add_argument("--cpu-photos", type=int, default=96, help="0 skips the CPU batch")
    parser.add_argument("--work", type=Path, default=Path("/tmp/facerecon_bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model", default="builtin", help="an installed model ($FACERECON_MODELS)")
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    results: dict = {"machine": {"cpus": os.cpu_count()}, "model": args.model}
    import torch
    results["machine"]["gpus"] = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]

    def save() -> None:
        print(json.dumps(results, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    logs = args.json.parent if args.json else args.work
    logs.mkdir(parents=True, exist_ok=True)
    if args.latency_runs:
        results["latency_gpu"] = serve_latency("0", photos, args.latency_runs, logs / "serve_gpu.log", args.model)
        save()
        results["latency_cpu"] = serve_latency("cpu", photos, max(8, args.latency_runs // 4), logs / "serve_cpu.log",
                                              args.model)
        save()
    many = replicate(photos, args.count, args.work / "in")
    results["batch"] = []
    for device_set in args.device_sets:
        devices = [f"cuda:{d}" for d in device_set.split(",")]
        workers = args.cpu_workers_per_gpu * len(devices) if args.cpu_workers_per_gpu else None
        results["batch"].append(batch_throughput(devices, many, args.work / "out", args.batch_size, workers,
                                                 args.model))
        save()
    if len(results["batch"]) > 1:
        one, last = results["batch"][0], results["batch"][-1]
        results["scaling_efficiency"] = (last["steady_photos_per_s"] /
                                         (len(last["devices"]) * one["steady_photos_per_s"]))
    if args.cpu_photos:
        results["cpu_batch"] = cpu_throughput(many[:args.cpu_photos], args.work / "out_cpu", os.cpu_count(),
                                              args.model)
        results["gpu_vs_cpu_throughput"] = (results["batch"][0]["steady_photos_per_s"]
                                            / results["cpu_batch"]["photos_per_s"])
    if args.latency_runs:
        results["gpu_vs_cpu_latency"] = results["latency_cpu"]["p50_ms"] / results["latency_gpu"]["p50_ms"]
    save()


if __name__ == "__main__":
    main()
