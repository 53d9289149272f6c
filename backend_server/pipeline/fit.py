"""Stage 4, fit: 478 landmarks (photo pixels) -> metric 3D mesh in the camera frame, and head pose.

Camera model: a pinhole at the origin of the camera frame (metres, +X right, +Y up, +Z toward the
viewer; the face lies at z < 0), principal point at the photo centre, square pixels, no
distortion, focal length in pixels `focal_px = FOCAL_35MM_EQUIV / 36 mm * long side`, i.e. a 50 mm
lens on a full-frame camera unless the caller knows better.

Built-in model: the face is assumed to have the reference face's size (63 mm between the iris
centres). A similarity (Procrustes) fit of the reference shape to the landmarks gives the head
rotation and the pixels-per-metre scale, hence the distance (depth = focal_px / scale); every
landmark is then lifted to its own 3D point on its camera ray at its own depth, so the mesh
reprojects onto the landmarks exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FOCAL_35MM_EQUIV = 50.0   # millimetres


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels for a photo of width x height pixels."""

    focal_px: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def for_photo(cls, width: int, height: int, focal_35mm: float = FOCAL_35MM_EQUIV) -> "Camera":
        return cls(focal_35mm / 36.0 * max(width, height), width / 2.0, height / 2.0, width, height)

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) camera-frame metres (z < 0) -> (N, 2) photo pixels."""
        distance = -points[:, 2]
        return np.stack([self.cx + self.focal_px * points[:, 0] / distance,
                         self.cy - self.focal_px * points[:, 1] / distance], axis=1)

    def to_json(self) -> dict:
        return {"model": "pinhole", "focal_px": self.focal_px, "cx": self.cx, "cy": self.cy,
                "width": self.width, "height": self.height,
                "focal_35mm_equiv": self.focal_px * 36.0 / max(self.width, self.height)}


@dataclass(frozen=True)
class Pose:
    """Head frame -> camera frame: x_cam = rotation @ x_head + translation (metres)."""

    rotation: np.ndarray      # (3, 3)
    translation: np.ndarray   # (3,)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) head-frame points -> (N, 3) camera frame."""
        return points @ self.rotation.T + self.translation

    def euler_degrees(self) -> dict[str, float]:
        """Yaw (about +Y, positive turns the face to the photo's left), pitch (about +X, positive
        raises the chin), roll (about +Z): R = Ry(yaw) @ Rx(pitch) @ Rz(roll)."""
        r = self.rotation
        pitch = math.asin(max(-1.0, min(1.0, -r[1, 2])))
        yaw = math.atan2(r[0, 2], r[2, 2])
        roll = math.atan2(r[1, 0], r[1, 1])
        return {"yaw": math.degrees(yaw), "pitch": math.degrees(pitch), "roll": math.degrees(roll)}

    def to_json(self) -> dict:
        return {"rotation": self.rotation.tolist(), "translation_m": self.translation.tolist(),
                "scale": 1.0, **{f"{k}_deg": v for k, v in self.euler_degrees().items()}}


@dataclass(frozen=True)
class Fit:
    """A fitted face. vertices: (468, 3) camera-frame metres; rigid_rms_px: how far the rigid
    reference shape (before per-vertex lifting) lies from the landmarks, in pixels."""

    vertices: np.ndarray
    pose: Pose
    camera: Camera
    rigid_rms_px: float

    @property
    def landmark_points(self) -> np.ndarray:
        """(468, 3) camera-frame metres at MediaPipe's points (here the mesh's own vertices)."""
        return self.vertices

    def head_frame(self, points: np.ndarray) -> np.ndarray:
        """Camera-frame points -> head frame (pose removed: upright, facing +Z, metres)."""
        return (points - self.pose.translation) @ self.pose.rotation


def similarity_fit(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, rotation, translation) minimising |scale * R @ source + t - target| (Umeyama)."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    u, sigma, vt = np.linalg.svd(t.T @ s)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = float(np.trace(np.diag(sigma) @ d) / (s ** 2).sum())
    return scale, rotation, mu_t - scale * rotation @ mu_s


def rigid_fit(source: np.ndarray, target: np.ndarray) -> Pose:
    """The rotation and translation (no scale) moving `source` onto `target`: Umeyama's rotation,
    then the translation that matches the centroids."""
    _, rotation, _ = similarity_fit(source, target)
    return Pose(rotation, target.mean(0) - rotation @ source.mean(0))


def fit_builtin(landmarks: np.ndarray, reference: np.ndarray, camera: Camera) -> Fit:
    """landmarks: (478, 3) photo pixels (x, y down, z MediaPipe depth); reference: (468, 3) metres."""
    mesh = landmarks[:len(reference)]
    # Landmarks in a Y-up, Z-toward-viewer frame centred on the principal point (pixels).
    observed = np.stack([mesh[:, 0] - camera.cx, camera.cy - mesh[:, 1], -mesh[:, 2]], axis=1)
    scale, rotation, shift = similarity_fit(reference, observed)         # pixels per metre
    rigid = scale * reference @ rotation.T + shift
    rigid_rms = float(np.sqrt(((rigid[:, :2] - observed[:, :2]) ** 2).sum(1).mean()))
    distance = camera.focal_px / scale                                   # metres to the head origin
    depth = distance - (observed[:, 2] - shift[2]) / scale               # per-vertex distance
    vertices = np.stack([observed[:, 0] * depth / camera.focal_px,
                         observed[:, 1] * depth / camera.focal_px, -depth], axis=1)
    translation = np.array([shift[0] * distance / camera.focal_px, shift[1] * distance / camera.focal_px,
                            -distance])
    return Fit(vertices, Pose(rotation, translation), camera, rigid_rms)
