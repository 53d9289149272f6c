"""The eyes of a morphable model: where each eyeball sits, its texture, and its gaze.

A model marks the parts of each eyeball with `Part.eye` ("left" or "right"); they turn together,
and the one reaching furthest forward is the visible surface (ICT-FaceKit: its outer eye shell,
whose UVs unroll the eyeball around its axis). From that surface on the model's mean shape come
the eyeball's centre and radius (a sphere fitted to its back, which the cornea's bulge does not
reach) and the iris's angular radius (where the cornea's bulge falls to a quarter of its height:
the limbus).

Head frame (metres, +X the face's left, +Y up, +Z out of the face): an eye at rest looks along +Z.
A gaze is (yaw, pitch) in degrees: yaw turns toward +X (the face's left), pitch upward.

The eye texture, one per eye in that eye part's UV layout, sRGB: sclera, a dark limbal ring, an
iris of the measured colour with radial fibres, and a pupil; painted as a function of each texel's
angle from the eye's axis on the model's mean shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..render.rasterize import rasterize
from ..render.shade import srgb8_of_linear, srgb_to_linear
from .face_model import triangulate
from .morphable import MorphableModel

EYE_TEXTURE_SIZE = 512
PUPIL_FRACTION = 0.38              # pupil radius over iris radius (a daylight pupil)
LIMBUS_WIDTH = 0.12                # the dark ring at the iris's edge, as a fraction of its radius
SCLERA_LINEAR = np.array([0.70, 0.66, 0.62])
PUPIL_LINEAR = np.array([0.012, 0.010, 0.010])
DEFAULT_IRIS_SRGB = (96, 72, 52)   # brown, where a photo's iris cannot be measured
MAX_GAZE_DEG = (35.0, 25.0)        # yaw, pitch: beyond this a measurement is taken for an error


@dataclass(frozen=True)
class Eye:
    """One eyeball: `side` ("left": +X), the vertices that turn with it, its centre (3,) head-frame
    metres on the mean shape and its offset from the centroid of its visible surface (so a fitted
    shape's centre is that centroid plus the offset), its radius and the iris's angular radius."""

    side: str
    vertex_ids: np.ndarray
    surface_ids: np.ndarray
    centre_m: np.ndarray
    centre_offset_m: np.ndarray
    radius_m: float
    iris_angle_rad: float
    part: int                      # the index of its visible part (its texture's layout)


def sphere_fit(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through (N, 3) points: centre (3,), radius."""
    design = np.c_[2 * points, np.ones(len(points))]
    solution = np.linalg.lstsq(design, (points ** 2).sum(1), rcond=None)[0]
    centre = solution[:3]
    return centre, float(np.sqrt(solution[3] + centre @ centre))


def find_eyes(model: MorphableModel) -> tuple[Eye, ...]:
    """The model's eyes: per side, the parts marked with it turn together, and the one reaching
    furthest forward is the visible surface that takes the eye texture. None if no part is marked."""
    eyes = []
    mean = model.mean.astype(np.float64)
    for side in ("left", "right"):
        parts = [k for k, part in enumerate(model.parts) if part.eye == side]
        if not parts:
            continue
        ids = {k: np.unique(model.polygons[model.polygon_part == k]) for k in parts}
        ids = {k: v[v >= 0] for k, v in ids.items()}
        visible = max(parts, key=lambda k: mean[ids[k], 2].max())
        points = mean[ids[visible]]
        rough_centre, _ = sphere_fit(points)
        centre, radius = sphere_fit(points[angle_from_axis(points - rough_centre) > math.radians(60)])
        bulge = np.linalg.norm(points - centre, axis=1) - radius                # behind the cornea: 0
        eyes.append(Eye(side, np.unique(np.concatenate(list(ids.values()))), ids[visible], centre,
                        centre - points.mean(0), radius, limbus_angle(angle_from_axis(points - centre), bulge),
                        visible))
    return tuple(eyes)


def angle_from_axis(directions: np.ndarray) -> np.ndarray:
    """(N,) radians between each (N, 3) direction and +Z."""
    return np.arccos(np.clip(directions[:, 2] / np.maximum(np.linalg.norm(directions, axis=1), 1e-12), -1, 1))


def limbus_angle(angles: np.ndarray, bulge_m: np.ndarray) -> float:
    """Where the cornea's bulge over the eyeball's sphere falls to a quarter of its height at the
    front (30 degrees if the surface has no bulge)."""
    bins = np.arange(0, 70, 4)
    heights = [bulge_m[(angles >= math.radians(b)) & (angles < math.radians(b + 4))] for b in bins]
    profile = np.array([h.mean() if len(h) else np.nan for h in heights])
    front = profile[0] if np.isfinite(profile[0]) else np.nanmax(profile)
    if not np.isfinite(front) or front < 2e-4:
        return math.radians(30.0)
    below = np.flatnonzero(profile < front / 4)
    return math.radians(float(bins[below[0]]) if len(below) else 30.0)


# --- texture ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EyeTextureLayout:
    """Per texel of an eye's UV layout (size x size, row 0 at the top): its angle from the eye's
    axis over the iris's angular radius (NaN where no polygon covers it) and its azimuth."""

    size: int
    iris_radius: np.ndarray        # (size, size) float32: 0 at the pupil's centre, 1 at the limbus
    azimuth: np.ndarray            # (size, size) float32 radians

    @cached_property
    def paint(self) -> tuple[np.ndarray, np.ndarray]:
        """What `paint_eye` needs of the layout, whatever the iris colour: the iris colour's gain
        (size, size, 1) and the base (size, size, 3), float32, linear RGB = iris x gain + base."""
        r = np.nan_to_num(self.iris_radius, nan=9.0)[..., None].astype(np.float64)
        fibres = (0.55 * np.sin(self.azimuth * 37.0) + 0.3 * np.sin(self.azimuth * 91.0 + 1.3)
                  + 0.15 * np.sin(self.azimuth * 173.0 + 0.4))[..., None]
        shade = 1.0 + 0.18 * fibres + 0.25 * (0.7 - r)                    # lighter near the pupil
        sclera_blend = smoothstep(0.97, 1.03, r)
        ring = 1 - 0.7 * np.exp(-(((r - 1.0) / LIMBUS_WIDTH) ** 2))        # a dark ring at the edge
        pupil = 1 - smoothstep(PUPIL_FRACTION - 0.03, PUPIL_FRACTION + 0.03, r)
        gain = shade * (1 - sclera_blend) * ring * (1 - pupil)
        base = SCLERA_LINEAR * sclera_blend * ring * (1 - pupil) + PUPIL_LINEAR * pupil
        return gain.astype(np.float32), base.astype(np.float32)


def eye_texture_layout(model: MorphableModel, eye: Eye, size: int = EYE_TEXTURE_SIZE) -> EyeTextureLayout:
    polygons = model.polygon_part == eye.part
    corners = triangulate(model.polygons[polygons])
    corner_uvs = triangulate(model.polygon_uvs[polygons])
    uv_px = np.stack([model.uvs[corner_uvs.ravel(), 0] * size, (1 - model.uvs[corner_uvs.ravel(), 1]) * size], 1)
    triangles = np.arange(len(uv_px)).reshape(-1, 3)
    raster = rasterize(uv_px, np.zeros(len(uv_px)), triangles, size, size)
    points = raster.interpolate(model.mean[corners.ravel()].astype(np.float64), triangles) - eye.centre_m
    radius = np.where(raster.covered, angle_from_axis(points.reshape(-1, 3)).reshape(size, size), np.nan)
    azimuth = np.arctan2(points[..., 1], points[..., 0])
    return EyeTextureLayout(size, (radius / eye.iris_angle_rad).astype(np.float32), azimuth.astype(np.float32))


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    return t * t * (3 - 2 * t)


def paint_eye(layout: EyeTextureLayout, iris_srgb: tuple[int, int, int]) -> np.ndarray:
    """(size, size, 3) uint8 sRGB: sclera, limbal ring, iris whose mean colour is `iris_srgb`
    (radial fibres, lighter toward the pupil), pupil. Texels outside the layout take the sclera.
    The linear colour is iris x gain + base, both the layout's (`layout.paint`), so a photo pays
    one multiply-add and a table lookup per texel."""
    gain, base = layout.paint
    iris = srgb_to_linear(np.asarray(iris_srgb, np.float64) / 255.0).astype(np.float32)
    return srgb8_of_linear(gain * iris + base)


# --- gaze ------------------------------------------------------------------------------------------
def gaze_rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """(3, 3) the rotation that turns +Z to the gaze (yaw toward +X, pitch up), head frame."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), math.sin(pitch)], [0, -math.sin(pitch), math.cos(pitch)]])
    return ry @ rx


def gaze_of(direction: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) degrees of a head-frame direction, clamped to MAX_GAZE_DEG."""
    x, y, z = direction / np.linalg.norm(direction)
    yaw = math.degrees(math.atan2(x, z))
    pitch = math.degrees(math.asin(max(-1.0, min(1.0, y))))
    return (max(-MAX_GAZE_DEG[0], min(MAX_GAZE_DEG[0], yaw)), max(-MAX_GAZE_DEG[1], min(MAX_GAZE_DEG[1], pitch)))


def turn_eyes(vertices: np.ndarray, eyes: tuple[Eye, ...], gaze_deg: tuple[float, float],
              centres: list[np.ndarray]) -> np.ndarray:
    """A copy of (V, 3) head-frame vertices with each eye's vertices turned about its centre."""
    if not eyes or gaze_deg == (0.0, 0.0):
        return vertices
    rotation = gaze_rotation(*gaze_deg)
    turned = vertices.copy()
    for eye, centre in zip(eyes, centres):
        turned[eye.vertex_ids] = (vertices[eye.vertex_ids] - centre) @ rotation.T + centre
    return turned


def ray_sphere_point(direction: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """The nearest point where a ray from the origin along `direction` meets the sphere, or the
    sphere's point nearest the ray where it misses (all camera frame, metres)."""
    d = direction / np.linalg.norm(direction)
    along = d @ centre
    closest = along * d
    miss = np.linalg.norm(closest - centre)
    if miss >= radius:
        return centre + (closest - centre) / max(miss, 1e-12) * radius
    return (along - math.sqrt(radius ** 2 - miss ** 2)) * d
