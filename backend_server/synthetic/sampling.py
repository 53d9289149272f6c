"""Random synthetic heads for any morphable model: identity, expression, views, light.

A `HeadSample` is one moment: one head (identity and expression) under one light, seen by several
cameras. The world frame is the model's head frame (metres, +X the face's left, +Y up, +Z out of
the face); the light is fixed in it, and each `View` is a camera looking at the head: its pose maps
head-frame points into that camera's frame (`backend_server.geometry`), with the head's yaw,
pitch and roll as that camera sees them (R = Ry(yaw) Rx(pitch) Rz(roll), `Pose.euler_degrees`).
Every camera aims at the centre of the face (the mean of the model's MediaPipe points), so the face
stays in the picture up to a yaw of 90 degrees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Camera, Pose
from ..models.morphable import MorphableModel
from ..render.shade import SH_CONSTANTS, Light, Sun
from .albedo import AlbedoParams, sample_albedo

DEFAULT_YAWS_DEG = (0.0, 30.0, -30.0, 60.0, -60.0, 90.0, -90.0)
LIGHT_KINDS = ("soft", "side", "coloured", "strong")
UNSAMPLED_EXPRESSIONS = ("eyeLook",)     # gaze shapes (ICT-FaceKit: they move the eyelids only)
PAIRED_SUFFIXES = ("_L", "_R")


@dataclass(frozen=True)
class View:
    """One camera: `pose` head frame -> this camera's frame (metres); `camera` its intrinsics; the
    head's yaw/pitch/roll in degrees as this camera sees it (the pose's rotation)."""

    name: str
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    pose: Pose
    camera: Camera

    def to_json(self) -> dict:
        return {"name": self.name, "yaw_deg": self.yaw_deg, "pitch_deg": self.pitch_deg, "roll_deg": self.roll_deg,
                "rotation": self.pose.rotation.tolist(), "translation_m": self.pose.translation.tolist(),
                "camera": self.camera.to_json()}

    @classmethod
    def from_json(cls, value: dict) -> View:
        c = value["camera"]
        return cls(value["name"], value["yaw_deg"], value["pitch_deg"], value["roll_deg"],
                   Pose(np.array(value["rotation"]), np.array(value["translation_m"])),
                   Camera(c["focal_px"], c["cx"], c["cy"], c["width"], c["height"]))


@dataclass(frozen=True)
class HeadSample:
    """One head at one moment. identity (K_id,) prior N(0, 1); expression (K_exp,) in [0, 1];
    light in the head frame; background_srgb the flat backdrop colour (sRGB 0..1) of renders."""

    model_name: str
    seed: int
    identity: np.ndarray
    expression: np.ndarray
    views: tuple[View, ...]
    light: Light
    light_kind: str
    albedo: AlbedoParams
    background_srgb: tuple[float, float, float]


def euler_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """R = Ry(yaw) @ Rx(pitch) @ Rz(roll) (degrees), the convention of Pose.euler_degrees."""
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


def face_centre(model: MorphableModel) -> np.ndarray:
    """(3,) head-frame metres: the mean of the model's MediaPipe points on its mean shape (the
    mean of the face region without a correspondence)."""
    mean = model.mean.astype(np.float64)
    if model.mediapipe is None:
        return mean[model.face_region].mean(axis=0)
    points = np.einsum("nk,nkc->nc", model.mediapipe.bary, mean[model.mediapipe.corners])
    return points[model.mediapipe.valid].mean(axis=0)


def sample_identity(model: MorphableModel, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """(K_id,) N(0, scale²) per component."""
    return rng.normal(0.0, scale, size=len(model.identity_basis))


def sample_expression(model: MorphableModel, rng: np.random.Generator, max_active: int = 3,
                      weight_range: tuple[float, float] = (0.2, 0.8)) -> np.ndarray:
    """(K_exp,) up to `max_active` expressions at weights in `weight_range`; an _L/_R shape takes
    its twin along half the time (at a similar weight); gaze shapes stay 0."""
    names = list(model.expression_names)
    weights = np.zeros(len(names))
    usable = [k for k, n in enumerate(names) if not n.startswith(UNSAMPLED_EXPRESSIONS)]
    if not usable:
        return weights
    for k in rng.choice(usable, size=min(int(rng.integers(0, max_active + 1)), len(usable)), replace=False):
        weights[k] = rng.uniform(*weight_range)
        name = names[k]
        if name.endswith(PAIRED_SUFFIXES) and rng.random() < 0.5:
            twin = name[:-2] + (PAIRED_SUFFIXES[1] if name.endswith(PAIRED_SUFFIXES[0]) else PAIRED_SUFFIXES[0])
            if twin in names:
                weights[names.index(twin)] = np.clip(weights[k] + rng.normal(0, 0.05), 0, 1)
    return weights


def sample_views(model: MorphableModel, rng: np.random.Generator, yaws_deg: tuple[float, ...] = DEFAULT_YAWS_DEG,
                 size_px: int = 512, distance_m: tuple[float, float] = (0.36, 0.48), pitch_sd_deg: float = 5.0,
                 roll_sd_deg: float = 3.0, focal_35mm: float = 50.0) -> tuple[View, ...]:
    """One camera per yaw, all at one random distance (±3 %), each with its own small pitch and roll
    (normal, clipped at 2 sd) and a small offset of the face in the picture; square pictures of
    `size_px` with the project's default intrinsics (`Camera.for_photo`)."""
    centre = face_centre(model)
    distance = rng.uniform(*distance_m)
    views = []
    for yaw in yaws_deg:
        pitch = float(np.clip(rng.normal(0, pitch_sd_deg), -2 * pitch_sd_deg, 2 * pitch_sd_deg))
        roll = float(np.clip(rng.normal(0, roll_sd_deg), -2 * roll_sd_deg, 2 * roll_sd_deg))
        rotation = euler_rotation(yaw, pitch, roll)
        target = np.array([rng.uniform(-0.015, 0.015), rng.uniform(-0.015, 0.015),
                           -distance * rng.uniform(0.97, 1.03)])
        pose = Pose(rotation, target - rotation @ centre)
        views.append(View(f"yaw{yaw:+04.0f}", float(yaw), pitch, roll, pose,
                          Camera.for_photo(size_px, size_px, focal_35mm)))
    return tuple(views)


def direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Unit vector in the head frame toward azimuth (from +Z, the face's front, toward +X) and
    elevation (toward +Y, up)."""
    a, e = np.radians([azimuth_deg, elevation_deg])
    return np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])


def _hsv_tint(rng: np.random.Generator, saturation: tuple[float, float]) -> np.ndarray:
    """A random hue at a saturation in the range, as linear RGB with its largest channel 1."""
    import colorsys
    rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), 1.0))
    return rgb ** 2.2


def sample_light(rng: np.random.Generator, kind: str | None = None) -> tuple[Light, str]:
    """A head-frame light of one of LIGHT_KINDS (random when None):
    soft (bright ambient, weak broad sun), side (dim ambient, hard sun from 60-100 degrees to one
    side), coloured (tinted ambient, sun of another tint), strong (bright sun near the front: the
    brightest skin clips). Every kind adds a sky/ground gradient (brighter from above) to the SH."""
    kind = kind or LIGHT_KINDS[int(rng.integers(len(LIGHT_KINDS)))]
    side = rng.choice([-1.0, 1.0])
    if kind == "soft":
        ambient = rng.uniform(0.45, 0.75) * (1 + rng.uniform(-0.05, 0.05, 3))
        sun = Sun(direction(side * rng.uniform(0, 40), rng.uniform(10, 50)), np.full(3, rng.uniform(0.2, 0.45)),
                  rng.uniform(20, 40))
    elif kind == "side":
        ambient = np.full(3, rng.uniform(0.06, 0.18))
        sun = Sun(direction(side * rng.uniform(60, 100), rng.uniform(0, 30)), np.full(3, rng.uniform(0.9, 1.4)),
                  rng.uniform(1, 3))
    elif kind == "coloured":
        ambient = rng.uniform(0.3, 0.5) * _hsv_tint(rng, (0.3, 0.6))
        sun = Sun(direction(side * rng.uniform(0, 70), rng.uniform(0, 40)),
                  rng.uniform(0.4, 0.8) * _hsv_tint(rng, (0.1, 0.4)), rng.uniform(2, 10))
    elif kind == "strong":
        ambient = np.full(3, rng.uniform(0.3, 0.5))
        sun = Sun(direction(side * rng.uniform(0, 30), rng.uniform(10, 40)), np.full(3, rng.uniform(1.6, 2.6)),
                  rng.uniform(2, 5))
    else:
        raise ValueError(f"unknown light kind {kind!r}; known: {', '.join(LIGHT_KINDS)}")
    light = Light.ambient(ambient, (sun,))
    sh = light.sh.copy()
    sh[:, 1] = rng.uniform(0.0, 0.25) * np.asarray(ambient) / SH_CONSTANTS[1]     # +Y (up) brighter
    return Light(sh, light.suns), kind


def sample_head(model: MorphableModel, seed: int, yaws_deg: tuple[float, ...] = DEFAULT_YAWS_DEG,
                size_px: int = 512, light_kind: str | None = None, identity_scale: float = 1.0) -> HeadSample:
    """Everything random about one head, from `seed` alone (same seed, same head)."""
    rng = np.random.default_rng(seed)
    identity = sample_identity(model, rng, identity_scale)
    expression = sample_expression(model, rng)
    views = sample_views(model, rng, yaws_deg, size_px)
    light, kind = sample_light(rng, light_kind)
    albedo = sample_albedo(rng)
    grey = rng.uniform(0.15, 0.75)
    background = tuple(float(np.clip(grey + rng.uniform(-0.08, 0.08), 0, 1)) for _ in range(3))
    return HeadSample(model.name, seed, identity, expression, views, light, kind, albedo,
                      (background[0], background[1], background[2]))
