"""Fitting a morphable model: head pose, identity and expression fitted to MediaPipe's points,
many faces at once in torch (CPU or CUDA).

Inputs per face: 478 landmarks (photo pixels, x right, y down; z MediaPipe's relative depth in
pixels, smaller = nearer) and its `Camera` (fit.py). The model's points at MediaPipe's 468 points
come from the model's stored dense correspondence. The jaw points of MediaPipe's face oval follow
the model's occluding contour instead: every CONTOUR_EVERY iterations each one takes the model
vertex on the current silhouette nearest to it in the photo, so on a turned head the visible jaw
line is matched to the jaw's outline rather than to a fixed point that has turned out of view.

Objective per face, a sum of squared residuals:
    Σ_k |project(x_k) - l_k|² / (σ s)²  +  DEPTH_WEIGHT Σ_k (depth_k - z_k)² / (σ s)²
    + |identity|²  +  EXPRESSION_PRIOR |expression|²
with s the landmarks' size in pixels (√(width × height) of their box) and σ = LANDMARK_NOISE.
Solved by Levenberg-Marquardt, every face its own damping, with the analytic Jacobian in the
parameters: a rotation increment (axis-angle, applied on the left), the head origin as direction
(x/d, y/d) and log distance d (decouples image position from depth), identity, expression.
Expression weights are projected into [0, 1] after each step; gaze shapes (eyeLook*) stay 0: in
ICT-FaceKit they move only the eyelids (its eyeballs turn by a rig, not by blendshapes), so the
iris points cannot measure them and the eyelid points alone gave spurious gaze. Start: the built-in fit's pose
(builtin.fit_landmarks), rigidly aligned to the model's mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import Camera, Pose, rigid_fit, vertex_normals
from .builtin import fit_landmarks
from .calibration import Calibration
from .face_model import FaceFit
from .morphable import MorphableModel

ITERATIONS = 16                   # Levenberg-Marquardt steps of the uncalibrated fit
CALIBRATED_ITERATIONS = 6         # ... of the calibrated one: it starts at the prior's prediction and
                                  # stays near it; 6 steps reach 16 steps' pose within 0.5 mm
CONTOUR_EVERY = 4
LANDMARK_NOISE = 0.04             # landmark error expected, as a fraction of the face's size (chosen on
                                  # the synthetic-heads benchmark: MediaPipe's errors are correlated)
DEPTH_WEIGHT = 0.1
EXPRESSION_PRIOR = 4.0
START_DAMPING = 1e-3              # Levenberg-Marquardt: relative to the diagonal of JᵀJ
SILHOUETTE_COS = 0.2              # |cos(normal, view ray)| below this: on the occluding contour
CONTOUR_REACH = 0.08              # a silhouette vertex farther than this (x size) is not used
UNFITTED_EXPRESSIONS = ("eyeLook",)  # gaze: ICT-FaceKit's eyeLook* shapes move only the eyelids, not
                                     # the eyeballs, so MediaPipe's iris centres cannot measure them
# MediaPipe's face-oval points from one ear's level down around the chin to the other's.
JAW_CONTOUR = (454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136, 172,
               58, 132, 93, 234)


@dataclass(frozen=True)
class ModelFit(FaceFit):
    """A fitted face in a morphable model (pose: model head frame -> camera frame, metres;
    landmark_points: the model at MediaPipe's points)."""

    identity: np.ndarray            # (K_id,)
    expression: np.ndarray          # (K_exp,) in [0, 1]
    reprojection_rms_px: float      # over the landmarks used
    gaze_deg: tuple[float, float] = (0.0, 0.0)   # eyeballs' (yaw, pitch), head frame (models/eyes.py)


def ideal_landmarks(model: MorphableModel, vertices: np.ndarray, camera: Camera) -> np.ndarray:
    """(478, 3) what a perfect landmark detector reports for a model face given as camera-frame
    vertices (V, 3): MediaPipe's 468 points through the correspondence, in photo pixels, z the depth
    in pixels relative to their mean; the 10 iris points repeat point 0 (not fitted)."""
    correspondence = model.correspondence()
    points = np.einsum("nk,nkc->nc", correspondence.bary, vertices[correspondence.corners])
    depth = -points[:, 2]
    z_px = (depth - depth.mean()) * camera.focal_px / depth.mean()
    marks = np.concatenate([camera.project(points), z_px[:, None]], axis=1)
    return np.concatenate([marks, np.repeat(marks[:1], 10, axis=0)])


def rodrigues(axis_angle: torch.Tensor) -> torch.Tensor:
    """(B, 3) axis-angle -> (B, 3, 3) rotation matrices (smooth at zero)."""
    angle = axis_angle.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = axis_angle / angle
    zero = torch.zeros_like(k[:, 0])
    cross = torch.stack([zero, -k[:, 2], k[:, 1], k[:, 2], zero, -k[:, 0], -k[:, 1], k[:, 0], zero],
                        dim=1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(cross)
    s, c = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    return eye + s * cross + (1 - c) * cross @ cross


@dataclass(frozen=True)
class Weighting:
    """How the fit reads MediaPipe: `sigma` (468, 3) each point's expected error in x, y and z over
    the face's size; `prior_weight` (K_id + K_exp,) the prior's strength per coefficient (one over
    its standard deviation); `calibration` (optional) moves the points (its correspondence) and
    predicts the prior's mean from the landmarks; `noise_scale` multiplies every sigma (MediaPipe's
    errors are correlated, so the points carry less than their count suggests); `iterations` the
    Levenberg-Marquardt steps."""

    sigma: np.ndarray
    prior_weight: np.ndarray
    calibration: Calibration | None = None
    noise_scale: float = 1.0
    iterations: int = ITERATIONS

    @classmethod
    def uncalibrated(cls, model: MorphableModel) -> Weighting:
        """The same error for every point (LANDMARK_NOISE; depth DEPTH_WEIGHT as strong), the
        prior N(0, 1) on identity and EXPRESSION_PRIOR on expressions."""
        sigma = np.tile([LANDMARK_NOISE, LANDMARK_NOISE, LANDMARK_NOISE / DEPTH_WEIGHT ** 0.5], (468, 1))
        prior = np.concatenate([np.ones(len(model.identity_basis)),
                                np.full(len(model.expression_basis), EXPRESSION_PRIOR ** 0.5)])
        return cls(sigma, prior)

    @classmethod
    def for_model(cls, model: MorphableModel, calibration: Calibration | None) -> Weighting:
        """Calibrated, with the noise scale the calibration chose, where there is a calibration."""
        if calibration is None:
            return cls.uncalibrated(model)
        return cls.calibrated(model, calibration, float(calibration.facts.get("noise_scale", 1.0)))

    @classmethod
    def calibrated(cls, model: MorphableModel, calibration: Calibration, noise_scale: float) -> Weighting:
        """The calibration's correspondence, per-point noise and prior; an expression's prior is never
        stronger than the uncalibrated one (real photos show expressions the renders rarely do)."""
        k_identity = len(model.identity_basis)
        prior = 1.0 / calibration.prior_sigma
        prior[k_identity:] = np.minimum(prior[k_identity:], EXPRESSION_PRIOR ** 0.5)
        return cls(calibration.noise, prior, calibration, noise_scale, CALIBRATED_ITERATIONS)


class ModelFitter:
    """Holds one model's fitting data on one device; `fit` takes any number of faces."""

    def __init__(self, model: MorphableModel, device: str = "cpu", weighting: Weighting | None = None) -> None:
        self.weighting = weighting or Weighting.uncalibrated(model)
        geometric = model.correspondence()
        calibration = self.weighting.calibration
        correspondence = calibration.correspondence if calibration is not None else geometric
        self.model = model
        self.device = torch.device(device)
        self.valid = np.flatnonzero(correspondence.valid)
        jaw = np.array(JAW_CONTOUR, np.int64)
        self.fixed = np.setdiff1d(self.valid, jaw)                 # landmarks with fixed model points
        self.jaw = jaw[correspondence.valid[jaw]]
        bases = np.concatenate([model.mean[None], model.identity_basis, model.expression_basis])  # (1+K, V, 3)
        at_points = np.einsum("nk,bnkc->bnc", correspondence.bary, bases[:, correspondence.corners])  # (1+K, 468, 3)
        at_anatomy = np.einsum("nk,bnkc->bnc", geometric.bary, bases[:, geometric.corners])
        self.k_identity, self.k_expression = len(model.identity_basis), len(model.expression_basis)
        fitted = [not name.startswith(UNFITTED_EXPRESSIONS) for name in model.expression_names]

        def as_tensor(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=self.device)

        self.point_bases = as_tensor(at_points)              # where the fit expects MediaPipe's points
        self.anatomy_bases = as_tensor(at_anatomy)           # the model's own points (landmark_points)
        self.sigma = as_tensor(self.weighting.sigma * self.weighting.noise_scale)
        self.prior_weight = as_tensor(self.weighting.prior_weight)
        self.expression_mask = as_tensor(np.array(fitted, np.float32))
        # Silhouette candidates: face-region vertices below the nose tip (MediaPipe point 1).
        nose_y = at_points[0, 1, 1]
        region = model.face_region[model.mean[model.face_region, 1] < nose_y]
        self.candidate_side = as_tensor(np.sign(model.mean[region, 0]))
        self.candidate_bases = as_tensor(bases[:, region])                                      # (1+K, C, 3)
        self.candidate_normals = as_tensor(vertex_normals(model.mean.astype(np.float64), model.triangles)[region])
        self.jaw_side = as_tensor(np.sign(at_points[0, self.jaw, 0]))
        self._bases_at: dict[int, tuple[np.ndarray, torch.Tensor]] = {}     # by id of a vertex-id array
        self.parameter_mask = torch.cat([torch.ones(6 + self.k_identity, device=self.device), self.expression_mask])

    def camera_points(self, fits: list[ModelFit], vertex_ids: np.ndarray) -> list[np.ndarray]:
        """Each fit's model vertices `vertex_ids` in the camera frame, (n, 3) metres, computed on
        this fitter's device (the bases at those vertices stay there for later calls with the same
        array)."""
        if id(vertex_ids) not in self._bases_at:
            model = self.model
            bases = np.concatenate([model.mean[None, vertex_ids], model.identity_basis[:, vertex_ids],
                                    model.expression_basis[:, vertex_ids]])
            self._bases_at[id(vertex_ids)] = (vertex_ids, torch.as_tensor(bases, dtype=torch.float32,
                                                                          device=self.device))
        bases_at = self._bases_at[id(vertex_ids)][1]
        coefficients = torch.as_tensor(np.array([np.concatenate([[1.0], f.identity, f.expression]) for f in fits]),
                                       dtype=torch.float32, device=self.device)
        rotation = torch.as_tensor(np.array([f.pose.rotation for f in fits]), dtype=torch.float32, device=self.device)
        translation = torch.as_tensor(np.array([f.pose.translation for f in fits]), dtype=torch.float32,
                                      device=self.device)
        points = torch.einsum("bk,knc->bnc", coefficients, bases_at) @ rotation.transpose(1, 2)
        return list((points + translation[:, None, :]).double().cpu().numpy())

    def fit(self, landmarks: list[np.ndarray], cameras: list[Camera], reference: np.ndarray) -> list[ModelFit]:
        """landmarks: (478, 3) photo pixels per face; cameras: one per face; reference: the built-in
        model's (468, 3) reference shape (for the starting pose)."""
        count = len(landmarks)
        dev, f32 = self.device, torch.float32
        mean_points = self.point_bases[0].cpu().numpy().astype(np.float64)[self.valid]
        starts = [rigid_fit(mean_points, fit_landmarks(marks, reference, camera).landmark_points[self.valid])
                  for marks, camera in zip(landmarks, cameras)]
        calibration = self.weighting.calibration
        prior_mean = np.zeros((count, self.k_identity + self.k_expression))
        if calibration is not None:
            prior_mean = np.array([calibration.predict(marks, reference, camera)
                                   for marks, camera in zip(landmarks, cameras)])
            prior_mean[:, self.k_identity:] = np.clip(prior_mean[:, self.k_identity:], 0, 1) * \
                self.expression_mask.cpu().numpy()
        marks = torch.as_tensor(np.array([m[:468] for m in landmarks]), dtype=f32, device=dev)
        problem = _Problem(self, marks, cameras, torch.as_tensor(prior_mean, dtype=f32, device=dev))
        start = torch.as_tensor(np.array([s.translation for s in starts]), dtype=f32, device=dev)
        state = _State(torch.as_tensor(np.array([s.rotation for s in starts]), dtype=f32, device=dev),
                       start[:, :2] / -start[:, 2:], torch.log(-start[:, 2]),
                       problem.prior_mean.clone())
        damping = torch.full((count,), START_DAMPING, dtype=f32, device=dev)
        jaw_choice = None
        for iteration in range(self.weighting.iterations):
            if iteration % CONTOUR_EVERY == 0 and len(self.jaw):
                jaw_choice = self._contour_choice(state, problem)
            bases = problem.landmark_bases(jaw_choice)
            residual, jacobian = problem.jacobian(bases, state)
            cost = (residual ** 2).sum(1)
            hessian = jacobian.transpose(1, 2) @ jacobian
            gradient = (jacobian.transpose(1, 2) @ residual[..., None])[..., 0]
            diagonal = torch.diagonal(hessian, dim1=1, dim2=2)
            fixed_parameters = 1.0 - self.parameter_mask               # gaze: held at 0
            step = torch.linalg.solve(hessian + torch.diag_embed(damping[:, None] * diagonal + 1e-9 + fixed_parameters),
                                      -gradient)
            trial = state.moved(step, self.k_identity, self.expression_mask)
            trial_cost = (problem.residuals(bases, trial) ** 2).sum(1)
            better = trial_cost < cost
            state = state.where(better, trial)
            damping = torch.where(better, damping / 3, damping * 4).clamp(1e-7, 1e7)

        return self.model_fits(problem, state, marks, cameras)

    def model_fits(self, problem: _Problem, state: _State, marks: torch.Tensor, cameras: list[Camera]
                   ) -> list[ModelFit]:
        """The fitted state of B faces as ModelFits: the pose, the coefficients, MediaPipe's 468
        anatomical points (B, 468, 3) and the reprojection RMS of the fixed points against `marks`
        (B, 478, 3) photo pixels, on the host in float64."""
        count = len(cameras)
        points = problem.points(self.anatomy_bases.permute(1, 0, 2).expand(count, -1, -1, -1), state)  # (B, 468, 3)
        fixed = torch.as_tensor(self.fixed, device=points.device)
        error = ((problem.project(points[:, fixed]) - marks[:, fixed, :2]) ** 2).sum(2).mean(1).sqrt().cpu().numpy()
        rotation = state.rotation.cpu().double().numpy()
        translation = state.translation().cpu().double().numpy()
        coefficients = state.coefficients.cpu().double().numpy()
        at_points = points.cpu().double().numpy()
        return [ModelFit(pose=Pose(rotation[b], translation[b]), camera=cameras[b], landmark_points=at_points[b],
                         identity=coefficients[b, :self.k_identity], expression=coefficients[b, self.k_identity:],
                         reprojection_rms_px=float(error[b])) for b in range(count)]

    def _contour_choice(self, state: "_State", problem: "_Problem") -> torch.Tensor:
        """(B, J) candidate index per jaw landmark on the current silhouette, or -1 (fixed point)."""
        coefficients = torch.cat([torch.ones_like(state.coefficients[:, :1]), state.coefficients], dim=1)
        points = (torch.einsum("bk,knc->bnc", coefficients, self.candidate_bases) @ state.rotation.transpose(1, 2)
                  + state.translation()[:, None, :])                                      # (B, C, 3)
        normals = self.candidate_normals @ state.rotation.transpose(1, 2)
        cos = (normals * points).sum(2) / points.norm(dim=2).clamp_min(1e-9)
        on_silhouette = cos.abs() < SILHOUETTE_COS
        same_side = ((self.jaw_side[None, :, None] == 0) | (self.candidate_side[None, None, :] == 0)
                     | (self.candidate_side[None, None, :] == self.jaw_side[None, :, None]))
        targets = problem.marks[:, torch.as_tensor(self.jaw, device=self.device), :2]
        distance = (problem.project(points)[:, None, :, :] - targets[:, :, None, :]).norm(dim=3)   # (B, J, C)
        distance = torch.where(on_silhouette[:, None, :] & same_side, distance, torch.inf)
        best, index = distance.min(dim=2)
        return torch.where(best < problem.scale / LANDMARK_NOISE * CONTOUR_REACH, index, -1)


@dataclass(frozen=True)
class _State:
    """Per-face parameters: rotation (B, 3, 3), direction (B, 2), log distance (B,), coefficients
    (B, K_id + K_exp)."""

    rotation: torch.Tensor
    direction: torch.Tensor
    log_distance: torch.Tensor
    coefficients: torch.Tensor

    def translation(self) -> torch.Tensor:
        distance = self.log_distance.exp()[:, None]
        return torch.cat([self.direction * distance, -distance], dim=1)

    def moved(self, step: torch.Tensor, k_identity: int, expression_mask: torch.Tensor) -> "_State":
        coefficients = self.coefficients + step[:, 6:]
        expression = (coefficients[:, k_identity:] * expression_mask).clamp(0.0, 1.0)
        return _State(rodrigues(step[:, :3]) @ self.rotation, self.direction + step[:, 3:5],
                      self.log_distance + step[:, 5], torch.cat([coefficients[:, :k_identity], expression], dim=1))

    def where(self, accept: torch.Tensor, other: "_State") -> "_State":
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(accept.reshape((-1,) + (1,) * (a.dim() - 1)), b, a)

        return _State(pick(self.rotation, other.rotation), pick(self.direction, other.direction),
                      pick(self.log_distance, other.log_distance), pick(self.coefficients, other.coefficients))


class _Problem:
    """The landmarks and cameras of a batch, and the residuals and Jacobian of the objective."""

    def __init__(self, fitter: ModelFitter, marks: torch.Tensor, cameras: list[Camera],
                 prior_mean: torch.Tensor) -> None:
        dev, f32 = fitter.device, torch.float32
        self.fitter = fitter
        self.marks = marks                                                                # (B, 468, 3)
        self.focal = torch.as_tensor([c.focal_px for c in cameras], dtype=f32, device=dev)[:, None]
        self.centre = torch.as_tensor([[c.cx, c.cy] for c in cameras], dtype=f32, device=dev)[:, None, :]
        extent = marks[..., :2].amax(1) - marks[..., :2].amin(1)
        self.size = (extent[:, 0] * extent[:, 1]).sqrt()[:, None]                           # s, pixels
        self.scale = self.size * LANDMARK_NOISE                                            # the contour's unit
        self.used = torch.as_tensor(np.concatenate([fitter.fixed, fitter.jaw]), device=dev)
        self.fixed_count = len(fitter.fixed)
        self.targets = marks[:, self.used]                                               # (B, n, 3)
        sigma = fitter.sigma[self.used]                                                  # (n, 3) over s
        self.sigma_xy = self.size[..., None] * sigma[None, :, :2]                         # (B, n, 2) pixels
        self.sigma_z = self.size * sigma[None, :self.fixed_count, 2]                      # (B, nf) pixels
        self.prior = fitter.prior_weight
        self.prior_mean = prior_mean

    def landmark_bases(self, jaw_choice: torch.Tensor | None) -> torch.Tensor:
        """(B, n, 1+K, 3): the model's mean and bases at each used landmark (fixed points, then the
        jaw points: their chosen silhouette vertex, or their fixed point)."""
        fitter = self.fitter
        at_points = fitter.point_bases.permute(1, 0, 2)                                  # (468, 1+K, 3)
        count = len(self.marks)
        fixed = at_points[torch.as_tensor(fitter.fixed, device=fitter.device)].expand(count, -1, -1, -1)
        jaw = at_points[torch.as_tensor(fitter.jaw, device=fitter.device)].expand(count, -1, -1, -1)
        if jaw_choice is not None:
            candidates = fitter.candidate_bases.permute(1, 0, 2)[jaw_choice.clamp_min(0)]  # (B, J, 1+K, 3)
            jaw = torch.where((jaw_choice >= 0)[..., None, None], candidates, jaw)
        return torch.cat([fixed, jaw], dim=1)

    def points(self, bases: torch.Tensor, state: _State) -> torch.Tensor:
        """(B, n, 3) camera-frame metres."""
        coefficients = torch.cat([torch.ones_like(state.coefficients[:, :1]), state.coefficients], dim=1)
        head = torch.einsum("bnkc,bk->bnc", bases, coefficients)
        return head @ state.rotation.transpose(1, 2) + state.translation()[:, None, :]

    def project(self, points: torch.Tensor) -> torch.Tensor:
        distance = (-points[..., 2]).clamp_min(1e-3)
        return torch.stack([self.centre[..., 0] + self.focal * points[..., 0] / distance,
                            self.centre[..., 1] - self.focal * points[..., 1] / distance], dim=-1)

    def residuals(self, bases: torch.Tensor, state: _State) -> torch.Tensor:
        """(B, m) the objective's residuals."""
        return self._evaluate(bases, state, with_jacobian=False)[0]

    def jacobian(self, bases: torch.Tensor, state: _State) -> tuple[torch.Tensor, torch.Tensor]:
        """The residuals (B, m) and their Jacobian (B, m, 6 + K) in (rotation increment, direction,
        log distance, coefficients)."""
        residual, jacobian = self._evaluate(bases, state, with_jacobian=True)
        assert jacobian is not None
        return residual, jacobian

    def _evaluate(self, bases: torch.Tensor, state: _State, with_jacobian: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        points = self.points(bases, state)                                               # (B, n, 3)
        reprojection = (self.project(points) - self.targets[..., :2]) / self.sigma_xy        # (B, n, 2)
        nf = self.fixed_count
        distance = -points[:, :nf, 2]
        mean_distance = distance.mean(1, keepdim=True)
        depth_px = (distance - mean_distance) * self.focal / mean_distance
        observed = self.targets[:, :nf, 2] - self.targets[:, :nf, 2].mean(1, keepdim=True)
        depth = (depth_px - observed) / self.sigma_z
        prior = (state.coefficients - self.prior_mean) * self.prior
        residual = torch.cat([reprojection.flatten(1), depth, prior], dim=1)
        if not with_jacobian:
            return residual, None

        count, n = points.shape[:2]
        translation = state.translation()
        relative = points - translation[:, None, :]                                      # R @ head point
        zero = torch.zeros_like(relative[..., 0])
        x, y, z = relative.unbind(-1)
        d_rotation = torch.stack([zero, z, -y, -z, zero, x, y, -x, zero], dim=-1).reshape(count, n, 3, 3)
        exp_d = state.log_distance.exp()
        d_direction = torch.zeros((count, 3, 2), dtype=points.dtype, device=points.device)
        d_direction[:, 0, 0] = exp_d
        d_direction[:, 1, 1] = exp_d
        d_translation = torch.cat([d_direction, translation[:, :, None]], dim=2)         # (B, 3, 3)
        d_coefficients = torch.einsum("bij,bnkj->bnik", state.rotation, bases[:, :, 1:])  # (B, n, 3, K)
        d_points = torch.cat([d_rotation, d_translation[:, None].expand(-1, n, -1, -1), d_coefficients], dim=3)
        depth_to = (-points[..., 2]).clamp_min(1e-3)
        px, py = points[..., 0], points[..., 1]
        f = self.focal
        d_screen = torch.stack([f / depth_to, zero, f * px / depth_to ** 2,
                                zero, -f / depth_to, -f * py / depth_to ** 2], dim=-1).reshape(count, n, 2, 3)
        j_reprojection = (d_screen @ d_points / self.sigma_xy[..., None]).flatten(1, 2)    # (B, 2n, P)
        d_distance = -d_points[:, :nf, 2, :]                                            # (B, nf, P)
        j_depth = (d_distance - d_distance.mean(1, keepdim=True)) * (f / mean_distance)[..., None] \
            / self.sigma_z[..., None]
        parameters = d_points.shape[-1]
        j_prior = torch.zeros((count, len(self.prior), parameters), dtype=points.dtype, device=points.device)
        j_prior[:, :, 6:] = torch.diag(self.prior)
        j_prior[:, self.fitter.k_identity:, 6 + self.fitter.k_identity:] *= self.fitter.expression_mask
        jacobian = torch.cat([j_reprojection, j_depth, j_prior], dim=1)
        return residual, jacobian * self.fitter.parameter_mask
