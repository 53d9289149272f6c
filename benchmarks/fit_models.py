"""Fitting (and, on CUDA, baking) speed of the morphable models, on faces whose landmarks are ideal
(generated from random model faces), so no photo or landmark detector is needed.

    python benchmarks/fit_models.py --device cpu --batches 1 8
    python benchmarks/fit_models.py --device cuda:0 --batches 1 16 64 256 --bake

Prints per model and batch size: ms per batch, ms per face, mean reprojection error; with --bake the
GPU bake of a 2048² texture in the model's topology (ms per face, peak memory); on CUDA also how far
the GPU fit is from the CPU fit of the same faces. Uses the installed models ($FACERECON_MODELS).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from backend_server.models import store
from backend_server.models.builtin import load_builtin
from backend_server.geometry import Camera
from backend_server.models.morphable_fit import ModelFitter, Weighting, ideal_landmarks, rodrigues


def random_faces(model, count: int, camera: Camera, seed: int = 0) -> list[np.ndarray]:
    """Camera-frame vertices of random faces: identity N(0, 1), a few expressions, yaw up to 30°."""
    rng = np.random.default_rng(seed)
    faces = []
    for _ in range(count):
        expression = np.where(rng.uniform(size=len(model.expression_names)) < 0.15,
                              rng.uniform(0, 0.6, len(model.expression_names)), 0.0)
        angles = torch.tensor([[rng.uniform(-0.2, 0.2), rng.uniform(-0.5, 0.5), rng.uniform(-0.1, 0.1)]])
        rotation = rodrigues(angles.double())[0].numpy()
        translation = np.array([rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), -rng.uniform(0.5, 0.9)])
        faces.append(model.vertices(rng.normal(size=len(model.identity_basis)), expression) @ rotation.T + translation)
    return faces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=None, help="default: every installed model")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bake", action="store_true", help="CUDA: also time the GPU bake in the model's topology")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="fit without the model's calibration (default: with it, where one is stored)")
    args = parser.parse_args()
    reference = load_builtin().reference_vertices
    camera = Camera.for_photo(1024, 1024)
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name(args.device)})" if args.device != "cpu" else
                                      f" ({torch.get_num_threads()} threads)"))
    for name in args.models or store.installed_models():
        model = store.load_model(name)
        calibration = None if args.uncalibrated else store.load_calibration(name)
        weighting = Weighting.for_model(model, calibration)
        print(f"{name}: {'calibrated' if calibration is not None else 'uncalibrated'} fit")
        fitter = ModelFitter(model, args.device, weighting)
        faces = random_faces(model, max(args.batches), camera)
        marks = [ideal_landmarks(model, f, camera) for f in faces]
        fitter.fit(marks[:1], [camera], reference)                    # warm-up
        for batch in args.batches:
            times = []
            for _ in range(args.repeats):
                if args.device != "cpu":
                    torch.cuda.synchronize(args.device)
                start = time.perf_counter()
                fits = fitter.fit(marks[:batch], [camera] * batch, reference)
                times.append(time.perf_counter() - start)
            best = min(times)
            rms = np.mean([f.reprojection_rms_px for f in fits])
            print(f"{name:12s} fit  batch {batch:4d}: {1000 * best:8.1f} ms per batch, {1000 * best / batch:7.2f} ms "
                  f"per face, reprojection {rms:.2f} px")
        if args.device != "cpu":
            count = min(8, max(args.batches))
            on_gpu = fitter.fit(marks[:count], [camera] * count, reference)
            on_cpu = ModelFitter(model, "cpu", weighting).fit(marks[:count], [camera] * count, reference)
            identity = max(np.abs(g.identity - c.identity).max() for g, c in zip(on_gpu, on_cpu))
            shift_mm = max(1000 * np.abs(g.pose.translation - c.pose.translation).max() for g, c in zip(on_gpu, on_cpu))
            print(f"{name:12s} GPU vs CPU fit of {count} faces: identity differs by <= {identity:.4f}, "
                  f"translation by <= {shift_mm:.3f} mm")
        if args.bake and args.device != "cpu":
            bake_speed(name, model, faces, camera, args.device, max(args.batches))


def bake_speed(name: str, model, faces: list[np.ndarray], camera: Camera, device: str, batch: int) -> None:
    from backend_server.pipeline.bake_gpu import GpuBaker
    from backend_server.models.registry import face_model
    topology = face_model(name).topology
    baker = GpuBaker(device)
    baker.warm_up(topology, 2048)
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8) for _ in range(min(batch, 16))]
    vertices = [topology.refine @ faces[k % len(faces)] for k in range(len(photos))]
    torch.cuda.reset_peak_memory_stats(device)
    baker.bake(photos, vertices, [camera] * len(photos), topology, 2048)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        baker.bake(photos, vertices, [camera] * len(photos), topology, 2048)
    torch.cuda.synchronize(device)
    per_face = (time.perf_counter() - start) / 3 / len(photos)
    print(f"{name:12s} bake 2048² on GPU, {len(photos)} faces per call: {1000 * per_face:.2f} ms per face "
          f"(incl. copies back), peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
