"""Server throughput and latency on CPU: closed-loop clients over ZeroMQ against a real backend.

    .venv/bin/python benchmarks/server_cpu.py [--clients 1 4 8] [--jobs 40] [--workers 2]

Starts `facerecon-backend serve` on a free loopback port, then for each client count runs that
many clients, each sending its next photo as soon as its previous result arrived, until `--jobs`
jobs are done. Latency = request sent -> Result (all files) received. Server overhead per job =
latency - the worker's own pipeline time (`summary.worker_ms`): queueing, framing, both socket
hops and the result bytes' transfer. Overhead at 1 client is the figure with no queueing in it.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from common import free_address, percentile, start_backend
from backend_server.cli.facerecon import demo_photo
from shared_protocol import ReconstructOptions
from shared_protocol.client import Client


def run_load(address: str, clients: int, jobs: int, photo: bytes, options: ReconstructOptions) -> dict:
    latencies, overheads, result_bytes = [], [], []
    lock = threading.Lock()
    remaining = [jobs]

    def client_loop() -> None:
        with Client(address) as client:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                result = client.reconstruct(photo, "bench.jpg", options, timeout_s=600)
                latency = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(latency)
                    overheads.append(latency - result.summary["worker_ms"])
                    result_bytes.append(sum(len(f.data) for f in result.files))

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"clients": clients, "jobs": jobs, "requests_per_s": jobs / elapsed,
            "p50_ms": percentile(latencies, 0.5), "p95_ms": percentile(latencies, 0.95),
            "overhead_p50_ms": statistics.median(overheads), "overhead_p95_ms": percentile(overheads, 0.95),
            "result_mib": statistics.mean(result_bytes) / 2**20}


def direct_pipeline_ms(photo: bytes, options: ReconstructOptions, repeat: int) -> float:
    from backend_server.pipeline.reconstruct import Reconstructor
    reconstructor = Reconstructor()
    reconstructor.warm_up(options.texture_size, options.subdivision)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        reconstructor.run(photo, "bench.jpg", options)
        times.append((time.perf_counter() - start) * 1000)
    reconstructor.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--jobs", type=int, default=40, help="jobs per client count")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--texture-size", type=int, default=2048)
    parser.add_argument("--photo", type=Path, default=demo_photo())
    args = parser.parse_args()
    photo = args.photo.read_bytes()
    options = ReconstructOptions(texture_size=args.texture_size)
    direct = direct_pipeline_ms(photo, options, 10)
    print(f"direct pipeline call, one process: {direct:.0f} ms median ({args.photo.name}, {args.texture_size}²)")
    address = free_address()
    backend = start_backend(address, ["--workers", str(args.workers), "--warm-texture-size",
                                      str(args.texture_size)])
    try:
        run_load(address, 1, 4, photo, options)                     # warm-up
        print(f"{'clients':>7s} {'jobs':>5s} {'req/s':>6s} {'p50 ms':>7s} {'p95 ms':>7s} "
              f"{'overhead p50':>12s} {'overhead p95':>12s} {'result MiB':>10s}")
        for clients in args.clients:
            row = run_load(address, clients, args.jobs, photo, options)
            print(f"{row['clients']:7d} {row['jobs']:5d} {row['requests_per_s']:6.2f} {row['p50_ms']:7.0f} "
                  f"{row['p95_ms']:7.0f} {row['overhead_p50_ms']:12.1f} {row['overhead_p95_ms']:12.1f} "
                  f"{row['result_mib']:10.2f}")
    finally:
        backend.terminate()
        backend.wait(60)


if __name__ == "__main__":
    main()
