"""Calibrating a morphable model to MediaPipe: render random heads of it, run the real detector
and MediaPipe on them, learn from the pairs (models/calibration.py), store the result beside the
model's cache (models/store.py). Run by `facerecon-backend models install` and `models calibrate`.

    calibrate(model, renders=DEFAULT_RENDERS, seed=0, device="cpu", workers=2, progress=callback,
              view_heads=renders // 2) -> Calibration

Per head (`synthetic.sampling.sample_head`, one seed each): a random identity (N(0, 1)), up to
three expressions, a light, an albedo from a small pool (albedo textures are the slow part of a
scene and their variety matters less than the geometry's), and VIEWS_PER_HEAD views at random
yaws up to ±MAX_YAW_DEG. Then `view_heads` other heads, each seen once in each of the ViewsPrior's
yaw spans (front and both sides, models/calibration.py VIEW_SPANS_DEG), for the read-out of a
person's three photos. Rendering is the fast renderer (CPU, or batched on a CUDA device);
detection runs on the CPU, in `workers` processes. Deterministic for a seed and a count.
"""
from __future__ import annotations

import multiprocessing
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from .geometry import Camera, Pose, rigid_fit
from .models.builtin import load_builtin
from .models.calibration import (DEFAULT_RENDERS, VIEW_SPANS_DEG, Calibration, CalibrationSample, ViewsPrior, learn,
                                 learn_shape_correction, learn_views)
from .models.morphable import MorphableModel
from .models.morphable_fit import ModelFitter, Weighting
from .render.rasterize import rasterize

VIEWS_PER_HEAD = 2
MAX_YAW_DEG = 70.0
RENDER_SIZE_PX = 320
ALBEDO_POOL = 12
ALBEDO_SIZE_PX = 512
CHUNK_HEADS = 8                      # heads rendered per batch (a GPU renders them in one call)
DETECT_CHUNK = 4                     # renders per task of a detection process
HOLD_OUT_EVERY = 5                   # every 5th render with landmarks judges the noise scale
NOISE_SCALES = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
VIEWS_PER_TRIPLE = len(VIEW_SPANS_DEG)  # renders of a head for the ViewsPrior
VIEW_SEED_OFFSET = 7_919             # its heads' seed: not the one-view renders' heads
Progress = Callable[[int, int], None]  # (renders done, renders in all)


@dataclass(frozen=True)
class _Render:
    """What detection needs of one render, and its truth."""

    rgb: np.ndarray
    identity: np.ndarray
    expression: np.ndarray
    pose: Pose
    camera: Camera
    yaw_deg: float
    posed_camera: np.ndarray          # (V, 3) the true head in the camera frame


def calibrate(model: MorphableModel, renders: int = DEFAULT_RENDERS, seed: int = 0, device: str = "cpu",
              workers: int = 2, progress: Progress | None = None, view_heads: int | None = None) -> Calibration:
    """Render `renders` views of random heads of `model`, detect, learn; then `view_heads` more heads
    (default renders // 2) each in the three views of a ViewsPrior (3 renders a head), and learn
    it. progress: (renders done, renders in all) over both. See the module docstring."""
    started = time.perf_counter()
    view_heads = view_heads_for(renders, view_heads)
    total = renders + VIEWS_PER_TRIPLE * view_heads
    samples = render_and_detect(model, renders, seed, device, workers,
                                None if progress is None else (lambda done, _: progress(done, total)))
    reference = load_builtin().reference_vertices
    calibration = learn(model, samples, reference)
    calibration.facts.update(tune_noise_scale(model, samples, reference, device))
    detected = [s for s in samples if s.landmarks is not None]
    correction = learn_shape_correction(model, detected, reference)
    correction.facts.update(held_out_points_error_mm=builtin_errors(model, detected, reference))
    calibration = replace(calibration, shape_correction=correction)
    if view_heads:
        triples = render_and_detect(model, VIEWS_PER_TRIPLE * view_heads, seed + VIEW_SEED_OFFSET, device, workers,
                                    None if progress is None else (lambda done, _: progress(renders + done, total)),
                                    spans=VIEW_SPANS_DEG)
        calibration = replace(calibration, views=learn_views_judged(model, calibration, triples, reference))
    calibration.facts.update(seed=seed, device=device, renders=len(samples),
                             detected_renders=sum(s.landmarks is not None for s in samples),
                             seconds=round(time.perf_counter() - started, 1))
    return calibration


def view_heads_for(renders: int, asked: int | None) -> int:
    """The heads `calibrate` renders in three views: `asked` (none below 0), or half the renders."""
    return renders // 2 if asked is None else max(0, asked)


def render_and_detect(model: MorphableModel, renders: int, seed: int = 0, device: str = "cpu", workers: int = 2,
                      progress: Progress | None = None, spans: Sequence[tuple[float, float]] | None = None
                      ) -> list[CalibrationSample]:
    """The (truth, MediaPipe) pairs of `renders` renders (see the module docstring), head after
    head. spans: each head seen once in each of these yaw spans (degrees), in their order, instead
    of VIEWS_PER_HEAD random yaws."""
    samples: list[CalibrationSample] = []
    context = multiprocessing.get_context("spawn")
    from .models.face_model import triangulate
    triangles = triangulate(model.polygons[model.textured_polygons])
    with ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=_detect_init,
                             initargs=(triangles,)) as pool:
        pending: deque[tuple[Future, list[_Render]]] = deque()

        def collect() -> None:
            future, rendered = pending.popleft()
            samples.extend(_sample(r, found) for r, found in zip(rendered, future.result()))
            if progress:
                progress(len(samples), renders)

        for batch in _render_batches(model, renders, seed, device, spans):  # rendering overlaps detection
            jobs = [(r.rgb, r.posed_camera.astype(np.float32), r.camera) for r in batch]
            for start in range(0, len(jobs), DETECT_CHUNK):                  # spread over the workers
                pending.append((pool.submit(_detect_batch, jobs[start:start + DETECT_CHUNK]),
                                batch[start:start + DETECT_CHUNK]))
            while len(pending) > 2 * max(1, workers):
                collect()
        while pending:
            collect()
    return samples


def tune_noise_scale(model: MorphableModel, samples: list[CalibrationSample], reference: np.ndarray,
                     device: str) -> dict:
    """The noise scale (how much less the points carry than their count suggests) that gives the
    smallest face-area vertex error on a held-out fifth of the renders, with the calibration
    learnt on the rest; and that error, the uncalibrated fit's and the mean face's, in mm."""
    detected = [s for s in samples if s.landmarks is not None]
    held_out = detected[::HOLD_OUT_EVERY]
    train = [s for k, s in enumerate(detected) if k % HOLD_OUT_EVERY]
    calibration = learn(model, train, reference)
    errors = {scale: vertex_error_mm(model, held_out, Weighting.calibrated(model, calibration, scale), device)
              for scale in NOISE_SCALES}
    best = min(errors, key=lambda s: errors[s])
    return {"noise_scale": best, "held_out_renders": len(held_out),
            "held_out_vertex_error_mm": {"calibrated": round(errors[best], 3),
                                         "uncalibrated": round(vertex_error_mm(model, held_out,
                                                               Weighting.uncalibrated(model), device), 3),
                                         "mean_face": round(mean_face_error_mm(model, held_out), 3)},
            "noise_scale_errors_mm": {str(s): round(e, 3) for s, e in errors.items()}}


def learn_views_judged(model: MorphableModel, calibration: Calibration, samples: list[CalibrationSample],
                       reference: np.ndarray) -> ViewsPrior | None:
    """The ViewsPrior of `samples` (three a head, VIEW_SPANS_DEG's order), with in its facts the
    neutral face-area error (mm, rigid) on a held-out fifth of the heads: its read-out learnt on
    the rest, the mean of `calibration`'s three one-view predictions, the front view's, the mean face."""
    triples = [samples[k:k + VIEWS_PER_TRIPLE] for k in range(0, len(samples) - VIEWS_PER_TRIPLE + 1,
                                                                VIEWS_PER_TRIPLE)]
    views = learn_views(triples, reference)
    found = [t for t in triples if all(s.landmarks is not None for s in t)]
    held_out, train = found[::HOLD_OUT_EVERY], [t for k, t in enumerate(found) if k % HOLD_OUT_EVERY]
    judge = learn_views(train, reference)
    if views is None or judge is None or not held_out:
        return views
    k_id = len(model.identity_basis)

    def error(identities: list[np.ndarray]) -> float:
        return round(float(np.mean([neutral_error_mm(model, mine, t[0].identity)
                                    for mine, t in zip(identities, held_out)])), 3)
    one_view = [[calibration.predict(s.landmarks, reference, s.camera)[:k_id] for s in t]  # type: ignore[arg-type]
                for t in held_out]
    views.facts.update(held_out_heads=len(held_out), held_out_neutral_error_mm={
        "three_views": error([judge.predict([s.landmarks for s in t], reference, [s.camera for s in t])  # type: ignore[misc]
                              for t in held_out]),
        "mean_of_one_view_predictions": error([np.mean(p, axis=0) for p in one_view]),
        "front_view_prediction": error([p[0] for p in one_view]),
        "mean_face": error([np.zeros(k_id) for _ in held_out])})
    return views


def neutral_error_mm(model: MorphableModel, identity: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance (mm) over the face area between two identities' neutral shapes, rigidly aligned."""
    region = model.face_region
    mine, theirs = model.vertices(identity)[region], model.vertices(truth)[region]
    return 1000 * float(np.linalg.norm(rigid_fit(mine, theirs).apply(mine) - theirs, axis=1).mean())


def builtin_errors(model: MorphableModel, samples: list[CalibrationSample], reference: np.ndarray) -> dict:
    """The built-in model's 468-point error (mm, rigid alignment, the points on the model) on a
    held-out fifth of the renders: MediaPipe's geometry as is, the reference face, corrected."""
    from .models.builtin import fit_landmarks
    held_out = samples[::HOLD_OUT_EVERY]
    correction = learn_shape_correction(model, [s for k, s in enumerate(samples) if k % HOLD_OUT_EVERY], reference)
    geometric = model.correspondence()
    valid = geometric.valid
    heads = model.vertices_at(geometric.corners, np.array([s.identity for s in held_out]),
                              np.array([s.expression for s in held_out]), geometric.bary)
    errors: dict[str, list[float]] = {"mediapipe": [], "reference_face": [], "corrected": []}
    for sample, head in zip(held_out, heads):
        truth = sample.pose.apply(head)[valid]
        fit = fit_landmarks(sample.landmarks, reference, sample.camera)                      # type: ignore[arg-type]
        corrected = fit.pose.apply(correction.predict(sample.landmarks, reference, sample.camera))  # type: ignore[arg-type]
        for key, points in (("mediapipe", fit.landmark_points), ("reference_face", reference),
                            ("corrected", corrected)):
            errors[key].append(aligned_error_mm(points[valid].astype(np.float64), truth))
    return {key: round(float(np.mean(values)), 3) for key, values in errors.items()}


def vertex_error_mm(model: MorphableModel, samples: list[CalibrationSample], weighting: Weighting,
                    device: str) -> float:
    """Mean face-area vertex error (mm, after a rigid alignment) of fits of the samples' landmarks."""
    fitter = ModelFitter(model, device, weighting)
    reference = load_builtin().reference_vertices
    fits = fitter.fit([s.landmarks for s in samples], [s.camera for s in samples], reference)  # type: ignore[misc]
    fitted = model.vertices_at(model.face_region, np.array([f.identity for f in fits]),
                               np.array([f.expression for f in fits]))
    return float(np.mean([aligned_error_mm(face, truth) for face, truth in zip(fitted, true_faces(model, samples))]))


def mean_face_error_mm(model: MorphableModel, samples: list[CalibrationSample]) -> float:
    mean = model.mean.astype(np.float64)[model.face_region]
    return float(np.mean([aligned_error_mm(mean, truth) for truth in true_faces(model, samples)]))


def true_faces(model: MorphableModel, samples: list[CalibrationSample]) -> np.ndarray:
    """(S, R, 3) the samples' true face regions, head frame."""
    return model.vertices_at(model.face_region, np.array([s.identity for s in samples]),
                             np.array([s.expression for s in samples]))


def aligned_error_mm(points: np.ndarray, truth: np.ndarray) -> float:
    return float(1000 * np.linalg.norm(rigid_fit(points, truth).apply(points) - truth, axis=1).mean())


def yaws(rng: np.random.Generator) -> tuple[float, ...]:
    return tuple(float(y) for y in rng.uniform(-MAX_YAW_DEG, MAX_YAW_DEG, VIEWS_PER_HEAD))


def _render_batches(model: MorphableModel, renders: int, seed: int, device: str,
                    spans: Sequence[tuple[float, float]] | None = None) -> Iterator[list[_Render]]:
    """The renders, CHUNK_HEADS heads at a time (`render_and_detect`'s spans)."""
    from .synthetic.albedo import albedo_texture, vertex_albedo
    from .synthetic.sampling import sample_head
    from .synthetic.scene import SyntheticScene, model_render_mesh
    from .render.shade import Light, render_batch
    rng = np.random.default_rng(seed)
    heads = -(-renders // (VIEWS_PER_HEAD if spans is None else len(spans)))
    albedos = [sample_head(model, seed * 100_003 + k).albedo for k in range(ALBEDO_POOL)]
    looks: dict[int, tuple] = {}                                  # pool index -> (texture, render mesh)
    made = 0
    for chunk, start in enumerate(range(0, heads, CHUNK_HEADS)):
        pick = chunk % ALBEDO_POOL                                # one albedo for the chunk's heads
        if pick not in looks:
            looks[pick] = (albedo_texture(model, albedos[pick], ALBEDO_SIZE_PX),
                           model_render_mesh(model, vertex_albedo(model, albedos[pick])))
        texture, mesh = looks[pick]
        batch: list[_Render] = []
        vertices: list[np.ndarray] = []
        cameras: list[Camera] = []
        lights: list[Light | None] = []
        for k in range(start, min(heads, start + CHUNK_HEADS)):
            views = yaws(rng) if spans is None else tuple(float(rng.uniform(low, high)) for low, high in spans)
            sample = sample_head(model, seed * 100_003 + ALBEDO_POOL + k, yaws_deg=views, size_px=RENDER_SIZE_PX)
            neutral = model.vertices(sample.identity)
            scene = SyntheticScene(model, sample, neutral, neutral + np.tensordot(sample.expression,
                                   model.expression_basis, axes=1), texture, np.zeros((model.vertex_count, 3)))
            for view in sample.views[:renders - made]:
                posed = scene.in_view(view)
                vertices.append(posed)
                cameras.append(view.camera)
                lights.append(scene.light_in_view(view))
                batch.append(_Render(np.empty(0), sample.identity, sample.expression, view.pose, view.camera,
                                     view.yaw_deg, posed))
                made += 1
        rendered = render_batch(mesh, np.stack(vertices), cameras, texture, lights, (0.45, 0.45, 0.45), device)
        yield [replace(r, rgb=image.rgb) for image, r in zip(rendered, batch)]


# --- detection (worker processes) -------------------------------------------------------------------
_detectors = None
_triangles: np.ndarray | None = None
_Found = tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]


def _detect_init(triangles: np.ndarray) -> None:
    global _detectors, _triangles
    from .pipeline.batch import ignore_sigint_in_children
    from .pipeline.detect import FaceDetector
    from .pipeline.landmarks import LandmarkDetector
    ignore_sigint_in_children()
    _detectors = (FaceDetector(), LandmarkDetector())
    _triangles = triangles


def _detect_batch(jobs: list[tuple[np.ndarray, np.ndarray, Camera]]) -> list[_Found]:
    """Per render (image, camera-frame true vertices, camera): MediaPipe's (478, 3) landmarks of
    the largest face (None if none) and the true surface under each of its 468 mesh points."""
    from shared_protocol import ProtocolError
    assert _detectors is not None and _triangles is not None
    detector, landmarker = _detectors
    found: list[_Found] = []
    for index, (rgb, posed, camera) in enumerate(jobs):
        boxes = detector(rgb)
        try:
            marks = landmarker(rgb, boxes[0], f"render{index}") if boxes else None
        except ProtocolError:
            marks = None
        if marks is None:
            found.append((None, np.zeros((468, 3), np.int64), np.zeros((468, 3)), np.zeros(468, bool)))
        else:
            found.append((marks, *surface_under(_triangles, posed, camera, marks[:468, :2])))
    return found


def _sample(render: _Render, found: _Found) -> CalibrationSample:
    return CalibrationSample(render.identity, render.expression, render.pose, render.camera, render.yaw_deg, *found)


def surface_under(triangles: np.ndarray, vertices: np.ndarray, camera: Camera, pixels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (N, 2) photo pixel: the visible front-facing triangle (of (T, 3) `triangles`: the
    model's textured ones) of the (V, 3) camera-frame head there ((N, 3) vertex ids, (N, 3)
    barycentrics in the screen, (N,) hit or not)."""
    screen = camera.project(vertices)
    corners = screen[triangles]
    signed = ((corners[:, 1, 0] - corners[:, 0, 0]) * (corners[:, 2, 1] - corners[:, 0, 1])
              - (corners[:, 1, 1] - corners[:, 0, 1]) * (corners[:, 2, 0] - corners[:, 0, 0]))
    front = triangles[signed < 0]
    width, height = camera.width, camera.height
    raster = rasterize(screen, -vertices[:, 2], front, width, height)
    col = np.clip(np.floor(pixels[:, 0]).astype(int), 0, width - 1)
    row = np.clip(np.floor(pixels[:, 1]).astype(int), 0, height - 1)
    triangle = raster.triangle[row, col]
    valid = triangle >= 0
    hit = front[np.maximum(triangle, 0)]
    # barycentrics of the exact pixel position within the hit triangle (screen-linear)
    a, b, c = (screen[hit[:, k]] for k in range(3))
    v0, v1, v2 = b - a, c - a, pixels - a
    denominator = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    denominator = np.where(np.abs(denominator) < 1e-12, 1e-12, denominator)
    w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / denominator
    w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / denominator
    bary = np.clip(np.stack([1 - w1 - w2, w1, w2], axis=1), 0, 1)
    bary /= np.maximum(bary.sum(1, keepdims=True), 1e-12)
    return hit, bary, valid
