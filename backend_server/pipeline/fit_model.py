"""Stage 4 for morphable models: head pose, identity and expression fitted to MediaPipe's points,
many faces at once in torch (CPU or CUDA).

Inputs per face: 478 landmarks (photo pixels, x right, y down; z MediaPipe's relative depth in
pixels, smaller = nearer) and its `Camera` (fit.py). The model's points at MediaPipe's 468 points
come from the model's stored dense correspondence. The jaw points of MediaPipe's face oval follow
the model's occluding contour instead: every CONTOUR_EVERY steps each one takes the model vertex
on the current silhouette nearest to it in the photo, so on a turned head the visible jaw line is
matched to the jaw's outline rather than to a fixed point that has turned out of view.

Objective per face (minimised with Adam over rotation (axis-angle on top of the start), the head
origin as its direction (x/d, y/d) and log distance d (metres; decouples image position from depth),
identity and expression; expression weights are clamped to [0, 1] after each step; gaze
shapes (eyeLook*) stay 0: the irises' 3D centres are not part of the correspondence):
    Σ_k |project(x_k) - l_k|² / (σ s)²  +  DEPTH_WEIGHT Σ_k (depth_k - z_k)² / (σ s)²
    + |identity|²  +  EXPRESSION_PRIOR |expression|²
with s the landmarks' size in pixels (√(width × height) of their box) and σ = LANDMARK_NOISE.
The start is the built-in fit's pose (fit.fit_builtin), rigidly aligned to the model's mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.morphable import MorphableModel, triangulate
from .bake import vertex_normals
from .fit import Camera, Pose, fit_builtin, similarity_fit

STEPS = 250
CONTOUR_EVERY = 20
LEARNING_RATE = {"rotation": 0.01, "direction": 0.002, "log_distance": 0.02, "identity": 0.15, "expression": 0.05}
LANDMARK_NOISE = 0.012            # landmark error expected, as a fraction of the face's size
DEPTH_WEIGHT = 0.1
EXPRESSION_PRIOR = 4.0
SILHOUETTE_COS = 0.2              # |cos(normal, view ray)| below this: on the occluding contour
CONTOUR_REACH = 0.08              # a silhouette vertex farther than this (x size) is not used
UNFITTED_EXPRESSIONS = ("eyeLook",)  # gaze: needs the irises' 3D centres, which no model here marks
# MediaPipe's face-oval points from one ear's level down around the chin to the other's.
JAW_CONTOUR = (454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136, 172,
               58, 132, 93, 234)


@dataclass(frozen=True)
class ModelFit:
    """A fitted face in a morphable model. pose: model head frame -> camera frame (metres)."""

    pose: Pose
    camera: Camera
    identity: np.ndarray            # (K_id,)
    expression: np.ndarray          # (K_exp,) in [0, 1]
    landmark_points: np.ndarray     # (468, 3) camera-frame metres: the model at MediaPipe's points
    reprojection_rms_px: float      # over the landmarks used

    def head_frame(self, points: np.ndarray) -> np.ndarray:
        """Camera-frame points -> the model's head frame (pose removed)."""
        return (points - self.pose.translation) @ self.pose.rotation


def ideal_landmarks(model: MorphableModel, vertices: np.ndarray, camera: Camera) -> np.ndarray:
    """(478, 3) what a perfect landmark detector reports for a model face given as camera-frame
    vertices (V, 3): MediaPipe's 468 points through the correspondence, in photo pixels, z the depth
    in pixels relative to their mean; the 10 iris points repeat point 0 (not fitted)."""
    points = np.einsum("nk,nkc->nc", model.mediapipe.bary, vertices[model.mediapipe.corners])
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


class ModelFitter:
    """Holds one model's fitting data on one device; `fit` takes any number of faces."""

    def __init__(self, model: MorphableModel, device: str = "cpu") -> None:
        if model.mediapipe is None:
            raise ValueError(f"model {model.name!r} has no MediaPipe correspondence; reinstall it")
        self.model = model
        self.device = torch.device(device)
        correspondence = model.mediapipe
        self.valid = np.flatnonzero(correspondence.valid)
        jaw = np.array(JAW_CONTOUR)
        self.fixed = np.setdiff1d(self.valid, jaw)                 # landmarks with fixed model points
        self.jaw = jaw[correspondence.valid[jaw]]
        bases = np.concatenate([model.mean[None], model.identity_basis, model.expression_basis])  # (1+K, V, 3)
        corners, bary = correspondence.corners, correspondence.bary
        at_points = np.einsum("nk,bnkc->bnc", bary, bases[:, corners])                          # (1+K, 468, 3)
        self.k_identity, self.k_expression = len(model.identity_basis), len(model.expression_basis)
        fitted = [not name.startswith(UNFITTED_EXPRESSIONS) for name in model.expression_names]
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=self.device)
        self.point_bases = as_tensor(at_points)
        self.expression_mask = as_tensor(np.array(fitted, np.float32))
        # Silhouette candidates: face-region vertices below the nose tip (MediaPipe point 1).
        nose_y = at_points[0, 1, 1]
        region = model.face_region[model.mean[model.face_region, 1] < nose_y]
        self.candidate_side = np.sign(model.mean[region, 0])
        self.candidates = region
        self.candidate_bases = as_tensor(bases[:, region])                                      # (1+K, C, 3)
        self.candidate_normals = as_tensor(vertex_normals(model.mean.astype(np.float64),
                                                          triangulate(model.polygons)[0])[region])
        self.jaw_side = np.sign(at_points[0, self.jaw, 0])

    def fit(self, landmarks: list[np.ndarray], cameras: list[Camera], reference: np.ndarray) -> list[ModelFit]:
        """landmarks: (478, 3) photo pixels per face; cameras: one per face; reference: the built-in
        model's (468, 3) reference shape (for the starting pose)."""
        count = len(landmarks)
        dev, f32 = self.device, torch.float32
        start_rotation, start_translation = [], []
        mean_points = self.point_bases[0].cpu().numpy().astype(np.float64)
        for marks, camera in zip(landmarks, cameras):
            lifted = fit_builtin(marks, reference, camera).vertices
            _, rotation, _ = similarity_fit(mean_points[self.valid], lifted[self.valid])
            start_rotation.append(rotation)
            start_translation.append(lifted[self.valid].mean(0) - rotation @ mean_points[self.valid].mean(0))
        rotation0 = torch.as_tensor(np.array(start_rotation), dtype=f32, device=dev)
        marks = torch.as_tensor(np.array([m[:468] for m in landmarks]), dtype=f32, device=dev)       # (B, 468, 3)
        focal = torch.as_tensor([c.focal_px for c in cameras], dtype=f32, device=dev)[:, None]
        centre = torch.as_tensor([[c.cx, c.cy] for c in cameras], dtype=f32, device=dev)[:, None, :]
        extent = marks[..., :2].amax(1) - marks[..., :2].amin(1)
        scale = (extent[:, 0] * extent[:, 1]).sqrt()[:, None] * LANDMARK_NOISE                    # σ s, pixels

        start = torch.as_tensor(np.array(start_translation), dtype=f32, device=dev)
        params = {
            "rotation": torch.zeros((count, 3), dtype=f32, device=dev, requires_grad=True),
            "direction": (start[:, :2] / -start[:, 2:]).requires_grad_(),          # x/d, y/d of the head origin
            "log_distance": torch.log(-start[:, 2]).requires_grad_(),
            "identity": torch.zeros((count, self.k_identity), dtype=f32, device=dev, requires_grad=True),
            "expression": torch.zeros((count, self.k_expression), dtype=f32, device=dev, requires_grad=True),
        }
        optimizer = torch.optim.Adam([{"params": [p], "lr": LEARNING_RATE[k]} for k, p in params.items()])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS, eta_min=0.05 * min(LEARNING_RATE.values()))
        fixed, jaw = torch.as_tensor(self.fixed, device=dev), torch.as_tensor(self.jaw, device=dev)
        jaw_targets = marks[:, jaw, :2]
        jaw_choice = None

        def head_origin() -> torch.Tensor:
            """(B, 3) the translation, metres, from its direction and log distance."""
            distance = params["log_distance"].exp()[:, None]
            return torch.cat([params["direction"] * distance, -distance], dim=1)

        def posed(bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            coefficients = torch.cat([torch.ones((count, 1), dtype=f32, device=dev), params["identity"],
                                      params["expression"] * self.expression_mask], dim=1)
            points = torch.einsum("bk,knc->bnc", coefficients, bases)
            rotation = rotation0 @ rodrigues(params["rotation"])
            return points @ rotation.transpose(1, 2) + head_origin()[:, None, :], rotation

        def project(points: torch.Tensor) -> torch.Tensor:
            distance = (-points[..., 2]).clamp_min(1e-3)
            return torch.stack([centre[..., 0] + focal * points[..., 0] / distance,
                                centre[..., 1] - focal * points[..., 1] / distance], dim=-1)

        for step in range(STEPS):
            if step % CONTOUR_EVERY == 0 and len(self.jaw):
                with torch.no_grad():
                    jaw_choice = self._contour_choice(posed, project, jaw_targets, scale)
            optimizer.zero_grad()
            camera_points, _ = posed(self.point_bases)
            screen = project(camera_points)
            residual = (screen[:, fixed] - marks[:, fixed, :2]) / scale[..., None]
            loss = (residual ** 2).sum((1, 2))
            if jaw_choice is not None:
                candidates, _ = posed(self.candidate_bases)
                chosen = torch.where(jaw_choice[..., None] >= 0,
                                     project(candidates.gather(1, jaw_choice.clamp_min(0)[..., None].expand(-1, -1, 3))),
                                     screen[:, jaw])
                loss = loss + (((chosen - jaw_targets) / scale[..., None]) ** 2).sum((1, 2))
            depth = -camera_points[:, fixed, 2]
            depth_px = (depth - depth.mean(1, keepdim=True)) * focal / depth.mean(1, keepdim=True)
            observed = marks[:, fixed, 2] - marks[:, fixed, 2].mean(1, keepdim=True)
            loss = loss + DEPTH_WEIGHT * (((depth_px - observed) / scale) ** 2).sum(1)
            loss = loss + (params["identity"] ** 2).sum(1) + EXPRESSION_PRIOR * (params["expression"] ** 2).sum(1)
            loss.sum().backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                params["expression"].clamp_(0.0, 1.0)

        with torch.no_grad():
            camera_points, rotation = posed(self.point_bases)
            screen = project(camera_points)
            error = ((screen[:, fixed] - marks[:, fixed, :2]) ** 2).sum(2).mean(1).sqrt()
            translation = head_origin().cpu().double().numpy()
        rotation = rotation.cpu().double().numpy()
        identity = params["identity"].detach().cpu().double().numpy()
        expression = (params["expression"] * self.expression_mask).detach().cpu().double().numpy()
        points = camera_points.cpu().double().numpy()
        return [ModelFit(Pose(rotation[b], translation[b]), cameras[b], identity[b], expression[b], points[b],
                         float(error[b])) for b in range(count)]

    def _contour_choice(self, posed, project, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(B, J) candidate index per jaw landmark on the current silhouette, or -1 (fixed point)."""
        points, rotation = posed(self.candidate_bases)                                  # (B, C, 3)
        normals = self.candidate_normals @ rotation.transpose(1, 2)
        cos = (normals * points).sum(2) / points.norm(dim=2).clamp_min(1e-9)
        on_silhouette = cos.abs() < SILHOUETTE_COS
        side = torch.as_tensor(self.candidate_side, device=self.device)[None, None, :]
        jaw_side = torch.as_tensor(self.jaw_side, device=self.device)[None, :, None]
        same_side = (jaw_side == 0) | (side == jaw_side) | (side == 0)
        distance = (project(points)[:, None, :, :] - targets[:, :, None, :]).norm(dim=3)  # (B, J, C)
        distance = torch.where(on_silhouette[:, None, :] & same_side, distance, torch.inf)
        best, index = distance.min(dim=2)
        reach = scale / LANDMARK_NOISE * CONTOUR_REACH
        return torch.where(best < reach, index, -1)
