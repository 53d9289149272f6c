"""What a morphable model learns about MediaPipe from synthetic renders of itself, and how.

MediaPipe's 478 points are neither unbiased nor equally reliable: some sit consistently off the
surface point the geometric correspondence gives them, depth (z) is a learnt guess, and the
points say little about a face's identity. `backend_server/calibration.py` renders many random
heads of a model, runs the real detector and MediaPipe on them, and records per render the truth
(coefficients, pose, camera) with MediaPipe's output and, per point, where on the true surface
the detected point lies (`CalibrationSample`). `learn` turns those pairs into a `Calibration`:

- **correspondence**: where each point (but the face oval's jaw points, which follow the
  silhouette in the fit) lands on average, on the mean shape, taken to its closest surface point;
- **noise**: each point's spread in x, y (photo) and z (MediaPipe's depth), as a fraction of the
  face's size, once the correspondence is corrected: the fit weighs each point by it;
- **prior**: a ridge regression from the landmarks, brought into a canonical head frame by a
  similarity fit of the built-in reference face, to the identity and expression coefficients, and
  the spread of its error per coefficient: the fit starts at the prediction and is pulled toward it
  as strongly as the prediction deserves; where the points say little, that is the mean;
- **views** (`ViewsPrior`, optional): the same read-out of the identity from three photos of one
  face at once, front and both sides (VIEW_SPANS_DEG), learnt on renders of heads seen so: three
  views' points carry more of the identity than one view's or the mean of three one-view
  predictions (docs/quality.md). The joint fit of several photos (joint_fit.py) takes it as the
  identity's prior mean when its photos include those three views.

Frames: head frame of the model (metres); landmarks in photo pixels (geometry.py).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..geometry import Camera, Pose, similarity_fit
from .face_model import triangulate
from .morphable import Correspondence, MorphableModel

CALIBRATION_VERSION = 1
DEFAULT_RENDERS = 2000                      # renders `models install` and `models calibrate` make
MIN_RENDERS = 24                            # fewer leave too few to learn from and to judge by
JAW_CONTOUR = (454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136, 172,
               58, 132, 93, 234)            # the face oval's points that follow the silhouette in the fit
MIN_HITS = 12                               # renders a point must have landed on the surface in
RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)   # relative to the features' size
FOLDS = 5
VIEW_SPANS_DEG = ((-8.0, 8.0), (43.0, 67.0), (-67.0, -43.0))   # yaw spans of the views ViewsPrior reads:
                                            # front, one side, the other (the renderer's and Pose's yaw)
VIEW_MATCH_DEG = 12.0                       # a photo stands for a span within this of it (its fitted yaw)
MIN_VIEW_HEADS = 10                         # heads seen in all three views a ViewsPrior needs


@dataclass(frozen=True)
class CalibrationSample:
    """One render: the truth (identity (K_id,), expression (K_exp,), pose head -> camera, camera,
    yaw in degrees), MediaPipe's (478, 3) landmarks (photo pixels; None where it found no face)
    and, per MediaPipe point, the true surface under the detected point: (468, 3) vertex ids and
    barycentrics of the triangle hit, and whether it was hit at all (468,)."""

    identity: np.ndarray
    expression: np.ndarray
    pose: Pose
    camera: Camera
    yaw_deg: float
    landmarks: np.ndarray | None
    hit_corners: np.ndarray
    hit_bary: np.ndarray
    hit_valid: np.ndarray


@dataclass(frozen=True, eq=False)          # hashed by identity: fitters are cached per calibration
class Calibration:
    """See the module docstring. correspondence: MediaPipe's 468 points on the model (as
    `Correspondence`); noise (468, 3): σ of x, y, z over the face's size; prior_weights (F, K) and
    prior_bias (K,): coefficients (identity then expression) = canonical landmark features @
    weights + bias; prior_sigma (K,): the spread of that prediction's error per coefficient;
    feature_mean (F,): subtracted from the features first."""

    correspondence: Correspondence
    noise: np.ndarray
    prior_weights: np.ndarray
    prior_bias: np.ndarray
    prior_sigma: np.ndarray
    feature_mean: np.ndarray
    facts: dict
    shape_correction: ShapeCorrection | None = None      # for the built-in model; stored apart (store.py)
    views: ViewsPrior | None = None                       # three views at once; in the same file

    def predict(self, landmarks: np.ndarray, reference: np.ndarray, camera: Camera) -> np.ndarray:
        """(K,) the prior's coefficients for (478, 3) landmarks."""
        features = canonical_landmarks(landmarks, reference, camera).ravel() - self.feature_mean
        return features @ self.prior_weights + self.prior_bias

    def save(self, path: Path) -> None:
        arrays = {"corners": self.correspondence.corners, "bary": self.correspondence.bary,
                  "valid": self.correspondence.valid, "residual_m": self.correspondence.residual_m,
                  "noise": self.noise, "prior_weights": self.prior_weights, "prior_bias": self.prior_bias,
                  "prior_sigma": self.prior_sigma, "feature_mean": self.feature_mean}
        facts = dict(self.facts)
        if self.views is not None:
            arrays.update({f"views_{name}": getattr(self.views, name) for name in ViewsPrior.ARRAYS})
            facts["views"] = self.views.facts
        save_arrays(path, facts, arrays)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """ValueError, naming the file, for a damaged file or one of another version. A file
        without a ViewsPrior (calibrated before it existed) loads with `views` None."""
        facts, arrays = load_arrays(path, ("corners", "bary", "valid", "residual_m", "noise", "prior_weights",
                                           "prior_bias", "prior_sigma", "feature_mean"), "calibrate the model again")
        correspondence = Correspondence(arrays["corners"], arrays["bary"], arrays["valid"], arrays["residual_m"])
        views = None
        if "views" in facts:
            _, parts = load_arrays(path, tuple(f"views_{name}" for name in ViewsPrior.ARRAYS),
                                   "calibrate the model again")
            views = ViewsPrior(**{name: parts[f"views_{name}"] for name in ViewsPrior.ARRAYS},
                               facts=facts.pop("views"))
        return cls(correspondence, arrays["noise"], arrays["prior_weights"], arrays["prior_bias"],
                   arrays["prior_sigma"], arrays["feature_mean"], facts, views=views)


@dataclass(frozen=True, eq=False)
class ViewsPrior:
    """The identity from one face's three views at once (the module docstring's **views**): the
    views' canonical landmarks (`canonical_landmarks`, flattened, in VIEW_SPANS_DEG's order,
    concatenated: 3 x 1 404 features) less `feature_mean` (3F,), times `weights` (3F, K_id), plus
    `bias` (K_id,): identity coefficients; `sigma` (K_id,): its cross-validated error per
    coefficient."""

    ARRAYS = ("weights", "bias", "sigma", "feature_mean")

    weights: np.ndarray
    bias: np.ndarray
    sigma: np.ndarray
    feature_mean: np.ndarray
    facts: dict

    def predict(self, landmarks: Sequence[np.ndarray], reference: np.ndarray, cameras: Sequence[Camera]
                ) -> np.ndarray:
        """(K_id,) for the three views' (478, 3) landmarks (photo pixels) and cameras, in
        VIEW_SPANS_DEG's order."""
        return self.features(landmarks, reference, cameras) @ self.weights + self.bias

    def features(self, landmarks: Sequence[np.ndarray], reference: np.ndarray, cameras: Sequence[Camera]
                 ) -> np.ndarray:
        return views_features(landmarks, reference, cameras) - self.feature_mean

    @staticmethod
    def pick(yaws_deg: Sequence[float]) -> list[int] | None:
        """The photos (indices into `yaws_deg`, their fitted yaws in degrees) that stand for the
        three views, in VIEW_SPANS_DEG's order: per span the photo nearest its centre, within
        VIEW_MATCH_DEG of the span; None unless three different photos are found."""
        chosen: list[int] = []
        for low, high in VIEW_SPANS_DEG:
            near = [k for k, yaw in enumerate(yaws_deg)
                    if low - VIEW_MATCH_DEG <= yaw <= high + VIEW_MATCH_DEG and k not in chosen]
            if not near:
                return None
            chosen.append(min(near, key=lambda k: abs(yaws_deg[k] - (low + high) / 2)))
        return chosen


@dataclass(frozen=True, eq=False)
class ShapeCorrection:
    """The built-in model's 468-vertex geometry from MediaPipe's points, learnt on a morphable
    model's renders: a ridge regression from the canonical landmarks (`canonical_landmarks`,
    flattened, less `feature_mean` (F,)) to the true anatomical points (the model's geometric
    correspondence) brought onto the reference face by a similarity: (F, 1404) `weights`, (1404,)
    `bias`, reference-frame metres. MediaPipe's own geometry puts its depth (a learnt guess) and
    its face oval (not the silhouette) into the mesh; the prediction removes that bias."""

    weights: np.ndarray
    bias: np.ndarray
    feature_mean: np.ndarray
    facts: dict

    def predict(self, landmarks: np.ndarray, reference: np.ndarray, camera: Camera) -> np.ndarray:
        """(468, 3) reference-frame metres for (478, 3) landmarks (photo pixels)."""
        return self.predict_many([landmarks], reference, [camera])[0]

    def predict_many(self, landmarks: Sequence[np.ndarray], reference: np.ndarray, cameras: Sequence[Camera]
                     ) -> np.ndarray:
        """(B, 468, 3) float64 for B faces' (478, 3) landmarks, one matrix product in the weights'
        float32 (a float64 product would first copy the 8 MB of weights: 7 ms a face)."""
        features = np.stack([canonical_landmarks(marks, reference, camera).ravel()
                             for marks, camera in zip(landmarks, cameras)]) - self.feature_mean
        predicted = features.astype(self.weights.dtype) @ self.weights + self.bias
        return predicted.reshape(len(features), -1, 3).astype(np.float64)

    def save(self, path: Path) -> None:
        save_arrays(path, self.facts, {"weights": self.weights.astype(np.float32), "bias": self.bias,
                                       "feature_mean": self.feature_mean})

    @classmethod
    def load(cls, path: Path) -> ShapeCorrection:
        """ValueError, naming the file, for a damaged file or one of another version."""
        facts, arrays = load_arrays(path, ("weights", "bias", "feature_mean"), "calibrate a model again")
        return cls(facts=facts, **arrays)


def save_arrays(path: Path, facts: dict, arrays: dict[str, np.ndarray]) -> None:
    """One compressed .npz: the arrays and the facts (JSON, with CALIBRATION_VERSION), written to a
    temporary file first so a reader never sees half of it."""
    text = json.dumps({"version": CALIBRATION_VERSION, **facts}).encode()
    temporary = path.with_name(path.name + ".part.npz")
    np.savez_compressed(temporary, facts=np.frombuffer(text, np.uint8), **arrays)
    temporary.replace(path)


def load_arrays(path: Path, names: tuple[str, ...], advice: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The facts and the arrays `names` of a file `save_arrays` wrote; ValueError naming the file
    (and `advice`) if it is damaged, lacks one of them, or is of another CALIBRATION_VERSION."""
    try:
        with np.load(path) as data:
            facts = json.loads(bytes(data["facts"]).decode())
            arrays = {name: data[name] for name in names}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is damaged ({exc}); {advice}") from None
    if facts.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{path}: calibration version {facts.get('version')}, expected {CALIBRATION_VERSION}")
    return facts, arrays


def learn_shape_correction(model: MorphableModel, samples: list[CalibrationSample], reference: np.ndarray
                           ) -> ShapeCorrection:
    """The built-in model's correction (`ShapeCorrection`) from renders of `model` with landmarks."""
    geometric = model.correspondence()
    heads = model.vertices_at(geometric.corners, np.array([s.identity for s in samples]),
                              np.array([s.expression for s in samples]), geometric.bary)        # (S, 468, 3)
    rows, targets = [], []
    for sample, head in zip(samples, heads):
        truth = sample.pose.apply(head)
        scale, rotation, shift = similarity_fit(reference[geometric.valid], truth[geometric.valid])
        canonical = canonical_landmarks(sample.landmarks, reference, sample.camera)  # type: ignore[arg-type]
        target = (truth - shift) @ rotation / scale
        target[~geometric.valid] = canonical[~geometric.valid]      # points off the model: MediaPipe's own
        rows.append(canonical.ravel())
        targets.append(target.ravel())
    features = np.array(rows)
    feature_mean = features.mean(0)
    weights, bias, _, ridge = ridge_prior(features - feature_mean, np.array(targets))
    return ShapeCorrection(weights, bias, feature_mean, {"learnt_from": model.name, "renders": len(samples),
                                                         "ridge": ridge})


def learn_views(triples: Sequence[Sequence[CalibrationSample]], reference: np.ndarray) -> ViewsPrior | None:
    """A ViewsPrior from heads each seen in VIEW_SPANS_DEG's three views (`triples`: per head its
    three samples in that order); heads where a view has no landmarks are left out; None when
    fewer than MIN_VIEW_HEADS remain."""
    seen = [t for t in triples if all(s.landmarks is not None for s in t)]
    if len(seen) < MIN_VIEW_HEADS:
        return None
    features = np.array([views_features([s.landmarks for s in t], reference, [s.camera for s in t])  # type: ignore[misc]
                         for t in seen])
    feature_mean = features.mean(0)
    weights, bias, sigma, ridge = ridge_prior(features - feature_mean, np.array([t[0].identity for t in seen]))
    return ViewsPrior(weights, bias, sigma, feature_mean, {"heads": len(seen), "ridge": ridge,
                                                           "spans_deg": [list(s) for s in VIEW_SPANS_DEG]})


def views_features(landmarks: Sequence[np.ndarray], reference: np.ndarray, cameras: Sequence[Camera]) -> np.ndarray:
    """(3 x 1 404,) a ViewsPrior's features before its mean is taken out: the views' canonical
    landmarks, flattened and concatenated in VIEW_SPANS_DEG's order."""
    return np.concatenate([canonical_landmarks(marks, reference, camera).ravel()
                           for marks, camera in zip(landmarks, cameras)])


def canonical_landmarks(landmarks: np.ndarray, reference: np.ndarray, camera: Camera) -> np.ndarray:
    """(468, 3) MediaPipe's points in the head frame of the built-in reference face (metres): the
    landmarks (x, y from the principal point, y up; z MediaPipe's depth, toward the viewer) with the
    similarity that best maps the reference onto them undone: pose and size removed."""
    mesh = landmarks[:len(reference)]
    observed = np.stack([mesh[:, 0] - camera.cx, camera.cy - mesh[:, 1], -mesh[:, 2]], axis=1)
    scale, rotation, shift = similarity_fit(reference, observed)
    return (observed - shift) @ rotation / scale


def surface_points(model: MorphableModel, corners: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """(N, 3) points on the model's mean shape at (N, 3) vertex ids and barycentrics."""
    return np.einsum("nk,nkc->nc", bary, model.mean.astype(np.float64)[corners])


def learn(model: MorphableModel, samples: list[CalibrationSample], reference: np.ndarray) -> Calibration:
    """A model's calibration from renders of it (samples where MediaPipe failed are counted, not used)."""
    detected = [s for s in samples if s.landmarks is not None]
    if len(detected) < MIN_RENDERS * 2 // 3:
        raise ValueError(f"only {len(detected)} of {len(samples)} renders gave landmarks; at least "
                         f"{MIN_RENDERS * 2 // 3} are needed")
    correspondence = learn_correspondence(model, detected)
    noise = learn_noise(model, detected, correspondence)
    features = np.array([canonical_landmarks(s.landmarks, reference, s.camera).ravel()  # type: ignore[arg-type]
                         for s in detected])
    targets = np.array([np.concatenate([s.identity, s.expression]) for s in detected])
    feature_mean = features.mean(0)
    weights, bias, sigma, ridge = ridge_prior(features - feature_mean, targets)
    yaws = np.array([abs(s.yaw_deg) for s in samples])
    found = np.array([s.landmarks is not None for s in samples])
    facts = {"renders": len(samples), "with_landmarks": len(detected), "ridge": ridge,
             "landmarks_found_by_yaw": {f"{lo}-{lo + 15}": float(found[(yaws >= lo) & (yaws < lo + 15)].mean())
                                        for lo in range(0, 90, 15) if ((yaws >= lo) & (yaws < lo + 15)).any()},
             "points_moved_mm_median": float(1000 * np.median(np.linalg.norm(
                 surface_points(model, correspondence.corners, correspondence.bary)
                 - surface_points(model, model.correspondence().corners, model.correspondence().bary), axis=1))),
             "identity_explained": float(1 - (sigma[:len(model.identity_basis)] ** 2).mean())}
    return Calibration(correspondence, noise, weights, bias, sigma, feature_mean, facts)


def learn_correspondence(model: MorphableModel, samples: list[CalibrationSample]) -> Correspondence:
    """Each point but the jaw's: the mean, over the renders it landed on the face in, of where it
    landed (on the mean shape), taken to the closest point of the textured surface."""
    from .correspondence import closest_surface_points
    geometric = model.correspondence()
    corners = geometric.corners.copy()
    bary = geometric.bary.copy()
    valid = geometric.valid.copy()
    hit_valid = np.array([s.hit_valid for s in samples])                                     # (S, 468)
    landed = np.einsum("snk,snkc->snc", np.array([s.hit_bary for s in samples]),
                       model.mean.astype(np.float64)[np.array([s.hit_corners for s in samples])])  # (S, 468, 3)
    movable = np.setdiff1d(np.flatnonzero(valid), JAW_CONTOUR)
    counts = hit_valid[:, movable].sum(0)
    movable = movable[counts >= MIN_HITS]
    mean_landed = (landed[:, movable] * hit_valid[:, movable, None]).sum(0) / hit_valid[:, movable].sum(0)[:, None]
    triangles = triangulate(model.polygons[model.textured_polygons])
    triangle, new_bary, distance = closest_surface_points(mean_landed, model.mean.astype(np.float64), triangles)
    corners[movable] = triangles[triangle]
    bary[movable] = new_bary
    residual = geometric.residual_m.copy()
    residual[movable] = distance
    return Correspondence(corners, bary, valid, residual)


def learn_noise(model: MorphableModel, samples: list[CalibrationSample], correspondence: Correspondence
                ) -> np.ndarray:
    """(468, 3) RMS error of each point's x, y and z over the face's size (√(w h) of the landmarks'
    box), against the true points at the corrected correspondence (z: depth relative to the
    points' mean, in pixels, as MediaPipe gives it)."""
    truths = model.vertices_at(correspondence.corners, np.array([s.identity for s in samples]),
                               np.array([s.expression for s in samples]), correspondence.bary)   # (S, 468, 3)
    errors = []
    for sample, head in zip(samples, truths):
        marks = sample.landmarks[:468]                                   # type: ignore[index]
        truth = sample.pose.apply(head)                                  # the sample's camera frame
        extent = marks[:, :2].max(0) - marks[:, :2].min(0)
        size = float(np.sqrt(extent[0] * extent[1]))
        depth = -truth[:, 2]
        z_px = (depth - depth.mean()) * sample.camera.focal_px / depth.mean()
        xy = sample.camera.project(truth) - marks[:, :2]
        z = z_px - (marks[:, 2] - marks[:, 2].mean())
        errors.append(np.concatenate([xy, z[:, None]], axis=1) / size)
    noise = np.sqrt(np.mean(np.array(errors) ** 2, axis=0))
    return np.maximum(noise, 1e-3)


def ridge_prior(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge regression (F -> K), its strength chosen by FOLDS-fold cross-validation; returns the
    weights (F, K), the bias (K,), the cross-validated RMS error per target (K,) and the strength.
    One SVD per fold serves every strength in RIDGE_GRID (relative to the features' RMS norm)."""
    folds = np.arange(len(features)) % FOLDS
    bias = targets.mean(0)
    centred = targets - bias
    unit = float(np.sqrt((features ** 2).sum(1).mean())) or 1.0
    features = features / unit
    errors = {ridge: np.zeros_like(centred) for ridge in RIDGE_GRID}
    for fold in range(FOLDS):
        train, test = folds != fold, folds == fold
        u, singular, vt = np.linalg.svd(features[train], full_matrices=False)
        projected = features[test] @ vt.T                                  # (test, r)
        rotated = u.T @ centred[train]                                     # (r, K)
        for ridge in RIDGE_GRID:
            shrink = singular / (singular ** 2 + ridge)
            errors[ridge][test] = projected @ (shrink[:, None] * rotated) - centred[test]
    ridge = min(RIDGE_GRID, key=lambda r: float((errors[r] ** 2).mean()))
    sigma = np.sqrt((errors[ridge] ** 2).mean(0))
    u, singular, vt = np.linalg.svd(features, full_matrices=False)
    weights = vt.T @ ((singular / (singular ** 2 + ridge))[:, None] * (u.T @ centred))
    return weights / unit, bias, np.maximum(sigma, 1e-3), ridge
