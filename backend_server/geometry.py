"""Geometry shared by the face models and the pipeline stages: camera, pose, alignments, normals,
image sampling and texture-pixel coordinates. numpy only; nothing here knows a model or a stage.

Frames (every function names the one it takes and gives):
- photo pixels: x right, y down, origin at the top-left corner, pixel centres at +0.5;
- camera frame: metres, +X right, +Y up, +Z toward the viewer (the face lies at z < 0), OpenGL-like;
- head frame: metres, +X the face's left (image right in a frontal photo), +Y up, +Z out of the face;
- UV: origin bottom-left (OBJ and Blender convention); texture pixels: x right, y down.

Camera model: a pinhole at the origin of the camera frame, principal point at the photo centre,
square pixels, no distortion, `focal_px = FOCAL_35MM_EQUIV / 36 mm * long side` (a 50 mm lens on
a full-frame camera) unless the caller knows better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
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
    def for_photo(cls, width: int, height: int, focal_35mm: float = FOCAL_35MM_EQUIV) -> Camera:
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

    def head_frame(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) camera-frame points -> head frame (the inverse of `apply`)."""
        return (points - self.translation) @ self.rotation

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


def similarity_fit(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, rotation, translation) minimising |scale * R @ source + t - target| (Umeyama);
    source and target (N, 3) in any one unit each."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    u, sigma, vt = np.linalg.svd(t.T @ s)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = float(np.trace(np.diag(sigma) @ d) / (s ** 2).sum())
    return scale, rotation, mu_t - scale * rotation @ mu_s


def rigid_fit(source: np.ndarray, target: np.ndarray) -> Pose:
    """The rotation and translation (no scale) moving `source` (N, 3) onto `target` (N, 3):
    Umeyama's rotation, then the translation that matches the centroids."""
    _, rotation, _ = similarity_fit(source, target)
    return Pose(rotation, target.mean(0) - rotation @ source.mean(0))


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit normals (V, 3) of (V, 3) vertices in any frame; outward for
    counter-clockwise (T, 3) triangles."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    face = np.cross(b - a, c - a)
    corners = triangles.T.ravel()                  # every triangle's first corners, then second, third
    summed = np.stack([np.bincount(corners, np.tile(face[:, j], 3), len(vertices)) for j in range(3)], 1)
    normals = summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    return normals.astype(vertices.dtype, copy=False)      # summed in float64 (np.add.at: 2x slower)


def sample_bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, C) float32 of an (H, W, C) image at (N, 2) pixel positions (x, y),
    pixel centres at +0.5; positions outside take the nearest border pixel."""
    count = len(xy)
    channels = image.shape[2] if image.ndim == 3 else 1
    if count == 0:
        return np.zeros((0, channels), np.float32)
    padded = np.zeros((-(-count // 1024) * 1024, 2), np.float32)        # cv2.remap: < 32767 columns
    padded[:count] = xy - 0.5
    samples = cv2.remap(image, padded.reshape(-1, 1024, 2), None, cv2.INTER_LINEAR,   # type: ignore[call-overload]
                        borderMode=cv2.BORDER_REPLICATE)         # (OpenCV's stubs lack map2=None: one 2-channel map)
    return samples.reshape(-1, channels)[:count].astype(np.float32)


def uv_to_texture_px(uvs: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) UVs (origin bottom-left) -> (N, 2) texture pixel positions (x right, y down) of a
    `size` x `size` texture."""
    return np.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], axis=1)
