"""How much of a face's shape MediaPipe's points can give, from one view and from three (issue 18).

Two steps, because the renders want a GPU and the measures do not:

    # on a GPU machine (~100 s for 1 200 heads on an H100): the calibration's own renderer and
    # detector, each random ICT-FaceKit head seen at yaw 0 ± 8°, +43..67° and -67..-43°
    python benchmarks/landmark_ceiling.py render --heads 1200 --device cuda:0 --out mv.npz
    # anywhere (~2 min on 2 cores)
    FACERECON_MODELS=... python benchmarks/landmark_ceiling.py measure mv.npz [more.npz ...]

`measure` prints, all as the neutral face-area vertex error (mm, rigid alignment) unless said:
1. MediaPipe's 468 points against the true surface points under them, per view (mm at the face:
   pixels times depth over focal length, with the head's translation fitted and its rotation true),
   before and after each point's constant offset over the heads is taken out, and the gain with
   which the points follow the identity's own displacement (1: fully);
2. a ridge regression from the canonical landmarks (`calibration.canonical_landmarks`) to the
   identity, of the front view and of the three views, on 200 held-out heads, by training size;
3. the same read-out where the points are perfect but for independent Gaussian noise (an
   orthographic stand-in of the three views, noise per coordinate), best ridge;
4. perfect points through the pipeline's own joint fit (uncalibrated), front photo and three photos.
Frames: the model's head frame; camera frame (x right, y up, -z forward), photo pixels y down.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend_server.models.calibration import VIEW_SPANS_DEG  # noqa: E402 - front, one side, the other
HELD_OUT = 200
LAMBDAS = (0.03, 0.1, 0.3, 1.0, 3.0)


def render(heads: int, device: str, out: Path, seed: int) -> None:
    from backend_server.calibration import render_and_detect
    from backend_server.models.store import load_model
    started = time.perf_counter()
    samples = render_and_detect(load_model("ict-facekit"), 3 * heads, seed, device, os.cpu_count() or 2,
                                lambda done, total: print(f"{done}/{total}", flush=True) if done % 600 < 4 else None,
                                spans=VIEW_SPANS_DEG)
    marks = np.array([s.landmarks if s.landmarks is not None else np.zeros((478, 3)) for s in samples], np.float32)
    np.savez_compressed(out, landmarks=marks, valid=np.array([s.landmarks is not None for s in samples]),
                        identity=np.array([s.identity for s in samples], np.float32),
                        expression=np.array([s.expression for s in samples], np.float32),
                        yaw=np.array([s.yaw_deg for s in samples], np.float32),
                        camera=np.array([[s.camera.focal_px, s.camera.cx, s.camera.cy, s.camera.width,
                                          s.camera.height] for s in samples], np.float32),
                        rotation=np.array([s.pose.rotation for s in samples], np.float32))
    print(f"{len(samples)} renders, {sum(s.landmarks is not None for s in samples)} with a face, "
          f"{time.perf_counter() - started:.0f} s -> {out}")


class Heads:
    """The renders of `render`, three per head (front, left, right)."""

    def __init__(self, files: list[Path]) -> None:
        from backend_server.models.store import load_model
        parts = [np.load(f) for f in files]
        self.a = {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}
        self.model = load_model("ict-facekit")
        self.count = len(self.a["valid"]) // 3
        self.all_found = self.a["valid"].reshape(self.count, 3).all(1)

    def points(self, identity: np.ndarray, expression: np.ndarray) -> np.ndarray:
        """(468, 3) head frame: the true surface points of MediaPipe's 468 (the correspondence)."""
        c = self.model.correspondence()
        v = self.model.vertices(identity.astype(np.float64)) + np.tensordot(
            expression.astype(np.float64), self.model.expression_basis, axes=1)
        return np.einsum("nk,nkc->nc", c.bary, v[c.corners])

    def neutral_error_mm(self, identity: np.ndarray, truth: np.ndarray) -> float:
        from backend_server.calibration import neutral_error_mm
        return neutral_error_mm(self.model, identity, truth)


def detector_error(heads: Heads, count: int = 300) -> None:
    from scipy.optimize import least_squares
    a = heads.a
    for view, name in enumerate(("front", "+55°", "-55°")):
        residual, d_identity, d_detected = [], [], []
        for h in range(min(count, heads.count)):
            i = 3 * h + view
            if not a["valid"][i]:
                continue
            camera = a["camera"][i][:3].astype(np.float64)                  # focal_px, cx, cy
            rotation = a["rotation"][i].astype(np.float64)
            truth = heads.points(a["identity"][i], a["expression"][i]) @ rotation.T
            mean = heads.points(np.zeros_like(a["identity"][i]), a["expression"][i]) @ rotation.T
            detected = a["landmarks"][i][:468, :2].astype(np.float64)
            t = least_squares(lambda t, p=truth, d=detected, c=camera: (_project(p + t, c) - d).ravel(),
                              np.array([0.0, 0.0, -0.6])).x
            mm = 1000 * (-(truth + t)[:, 2] / camera[0])[:, None]
            residual.append((detected - _project(truth + t, camera)) * mm)
            d_identity.append(((_project(truth + t, camera) - _project(mean + t, camera)) * mm).ravel())
            d_detected.append(((detected - _project(mean + t, camera)) * mm).ravel())
        r = np.array(residual)
        di, dd = np.array(d_identity), np.array(d_detected)
        di, dd = di - di.mean(0), dd - dd.mean(0)
        print(f"1. {name}: MediaPipe's points {np.linalg.norm(r, axis=2).mean():.2f} mm off the true surface points, "
              f"{np.linalg.norm(r - r.mean(0), axis=2).mean():.2f} mm after each point's constant offset; "
              f"the identity moves them {np.linalg.norm(di.reshape(len(di), -1, 2), axis=2).mean():.2f} mm, "
              f"MediaPipe follows with gain {(dd * di).sum() / (di ** 2).sum():.2f} ({len(r)} renders)")


def _project(points: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """(N, 2) photo pixels (y down) of (N, 3) camera-frame points; camera: focal_px, cx, cy."""
    focal, cx, cy = camera
    return np.stack([cx + focal * points[:, 0] / -points[:, 2], cy - focal * points[:, 1] / -points[:, 2]], 1)


def ridge_curve(heads: Heads) -> None:
    from backend_server.geometry import Camera
    from backend_server.models.builtin import load_builtin
    from backend_server.models.calibration import canonical_landmarks
    a, reference = heads.a, load_builtin().reference_vertices
    found = np.flatnonzero(heads.all_found)
    x = np.array([[canonical_landmarks(a["landmarks"][3 * h + v].astype(np.float64), reference, Camera(
        *(float(c) for c in a["camera"][3 * h + v][:3]), *(int(c) for c in a["camera"][3 * h + v][3:]))).ravel()
        for v in range(3)] for h in found])
    y = a["identity"].reshape(heads.count, 3, -1)[found, 0].astype(np.float64)
    order = np.random.default_rng(0).permutation(len(y))
    test, pool = order[:HELD_OUT], order[HELD_OUT:]
    print(f"2. held out: {HELD_OUT} heads; mean face "
          f"{np.mean([heads.neutral_error_mm(np.zeros_like(t), t) for t in y[test]]):.2f} mm")
    for views, name in (([0], "front view"), ([0, 1, 2], "three views")):
        features = x[:, views].reshape(len(x), -1)
        for n in sorted({len(pool) // 8, len(pool) // 4, len(pool) // 2, len(pool)}):
            train = pool[:n]
            best = min(np.mean([heads.neutral_error_mm(p, t) for p, t in
                                zip(_ridge(features[train], y[train], lam)(features[test]), y[test])])
                       for lam in LAMBDAS)
            print(f"2. ridge on the {name}, {n} training heads: {best:.2f} mm", flush=True)


def _ridge(x: np.ndarray, y: np.ndarray, lam: float):  # type: ignore[no-untyped-def]
    mu, y_mean = x.mean(0), y.mean(0)
    xc = x - mu
    scale = (xc ** 2).sum() / len(xc)
    weights = np.linalg.solve(xc.T @ xc + lam * scale * np.eye(xc.shape[1]), xc.T @ (y - y_mean))
    return lambda z: (z - mu) @ weights + y_mean


def independent_noise(heads: Heads) -> None:
    from scipy.spatial.transform import Rotation
    model, c = heads.model, heads.model.correspondence()
    k = len(model.identity_basis)
    basis = np.einsum("nk,inkc->inc", c.bary, model.identity_basis[:, c.corners])
    for yaws in ((0,), (0, 55, -55)):
        rows = []
        for yaw in yaws:
            turned = np.einsum("inc,dc->ind", basis, Rotation.from_euler("y", yaw, degrees=True).as_matrix())[:, :, :2]
            rows.append((turned - turned.mean(1, keepdims=True)).reshape(k, -1).T)      # translation unknown
        design = np.vstack(rows)
        for sigma_mm in (1.0, 2.0, 3.0):
            errors = []
            for lam in (1e-6, 1e-5, 1e-4, 1e-3):
                e = []
                for seed in range(20, 36):
                    rng = np.random.default_rng(seed)
                    truth = rng.normal(0, 1, k)
                    seen = design @ truth + rng.normal(0, sigma_mm / 1000, len(design))
                    e.append(heads.neutral_error_mm(np.linalg.solve(design.T @ design + lam * np.eye(k),
                                                                    design.T @ seen), truth))
                errors.append(np.mean(e))
            print(f"3. perfect points + independent noise σ {sigma_mm:.0f} mm, views {yaws}: {min(errors):.2f} mm")


def ideal_joint_fit(heads: Heads) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_person import views_of
    from backend_server.models.morphable_face import MorphableFaceModel
    face, model = MorphableFaceModel(heads.model), heads.model
    rows = []
    for seed in range(20, 32):
        truth = np.random.default_rng(seed).normal(0, 1, len(model.identity_basis))
        marks, cameras = views_of(model, truth, (0, 55, -55))
        [single] = face.fit(marks[:1], cameras[:1])
        joint = face.fit_person(marks, cameras).fits[0]
        rows.append((heads.neutral_error_mm(single.identity, truth), heads.neutral_error_mm(joint.identity, truth)))
    front, three = np.mean(rows, 0)
    print(f"4. perfect points, the pipeline's joint fit (uncalibrated), 12 faces: front {front:.2f} mm, "
          f"three {three:.2f} mm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    r = sub.add_parser("render")
    r.add_argument("--heads", type=int, default=1200)
    r.add_argument("--device", default="cpu")
    r.add_argument("--seed", type=int, default=11)
    r.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    if args.step == "render":
        render(args.heads, args.device, args.out, args.seed)
        return
    heads = Heads(args.files)
    print(f"{heads.count} heads, {int(heads.all_found.sum())} with a face found in all three views")
    detector_error(heads)
    ridge_curve(heads)
    independent_noise(heads)
    ideal_joint_fit(heads)


if __name__ == "__main__":
    main()
