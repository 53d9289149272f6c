"""Stage 4, fit: 478 landmarks (photo pixels) -> metric 3D mesh in the camera frame, and head pose.

Camera and pose: `backend_server.geometry`.

Built-in model: the face is assumed to have the reference face's size (63 mm between the iris
centres). A similarity (Procrustes) fit of the reference shape to the landmarks gives the head
rotation and the pixels-per-metre scale, hence the distance (depth = focal_px / scale); every
landmark is then lifted to its own 3D point on its camera ray at its own depth, so the mesh
reprojects onto the landmarks exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Camera, Pose, similarity_fit


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
        return self.pose.head_frame(points)


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
