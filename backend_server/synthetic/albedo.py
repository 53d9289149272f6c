"""Procedural skin albedo for any morphable model: a colour function on the head surface, baked
into the model's own UV layout. No hair, no background: the albedo an artist wants.

The function is evaluated at head-frame points of the model's *mean* shape (metres, +X the face's
left, +Y up, +Z out of the face), so one texture serves every identity and expression of the model.
Features are placed from the model's MediaPipe correspondence (lips, brows, eyes, cheeks, nose by
MediaPipe's landmark ids), so no model-specific data is needed. Layers, in linear RGB:
1. a base skin tone between very light and very dark (`SKIN_TONES_SRGB`, interpolated in linear
   RGB by `melanin` 0..1), shifted toward pink or olive by `undertone`;
2. low-frequency variation: multi-scale lightness noise (40, 12, 4 mm), redder cheeks and nose
   tip, darker and cooler skin under the eyes, lips mixed toward a lip colour, darker brows with
   fine hair-like noise;
3. fine detail: pores (0.5 mm noise spots), freckles on the upper face for some samples.
Colours are stored sRGB-encoded (uint8 textures), as `render.shade` expects.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product

import cv2
import numpy as np

from ..geometry import sample_bilinear, uv_to_texture_px, vertex_normals
from ..models.morphable import MorphableModel, triangulate
from ..render.rasterize import rasterize
from ..render.shade import linear_to_srgb, srgb_to_linear

# Skin tones from very light to very dark (sRGB), hand-picked to span Fitzpatrick types I-VI as
# albedo (no light): interpolated in linear RGB by melanin 0..1.
SKIN_TONES_SRGB = np.array([[236, 202, 186], [226, 180, 156], [204, 154, 122], [178, 126, 92],
                            [142, 96, 66], [104, 68, 48], [70, 45, 33], [46, 31, 25]]) / 255.0
IRIS_SRGB = np.array([[70, 42, 24], [110, 72, 40], [92, 110, 70], [80, 110, 140], [40, 28, 20]]) / 255.0
SCLERA_SRGB = (0.70, 0.66, 0.62)
IRIS_HALF_ANGLE_DEG = 32.0           # an iris of ~12 mm on an eyeball of ~24 mm
PUPIL_HALF_ANGLE_DEG = 12.0
# MediaPipe face-mesh landmark ids (loops) of the features.
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
BROWS = ((70, 63, 105, 66, 107, 55, 65, 52, 53, 46), (300, 293, 334, 296, 336, 285, 295, 282, 283, 276))
EYES = ((33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
        (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466))
CHEEKS = (50, 280)
NOSE_TIP = 4
MOUTH_TOP = 0
GRID_M = 0.00025                      # resolution of the frontal feature masks


@dataclass(frozen=True)
class AlbedoParams:
    """The recipe of one albedo (every value is a plain float; the seed drives the noise).
    melanin 0 (very light) .. 1 (very dark); undertone -1 (pink) .. 1 (olive); redness of cheeks
    and nose, lip_tint, brow_darkness, freckles, pores: 0..1 strengths; iris_srgb the eyes' colour."""

    seed: int
    melanin: float
    undertone: float
    redness: float
    lip_tint: float
    brow_darkness: float
    freckles: float
    pores: float
    iris_srgb: tuple[float, float, float]

    def base_linear(self) -> np.ndarray:
        """(3,) the base skin tone in linear RGB."""
        anchors = srgb_to_linear(SKIN_TONES_SRGB)
        position = self.melanin * (len(anchors) - 1)
        k = min(int(position), len(anchors) - 2)
        t = position - k
        tone = anchors[k] * (1 - t) + anchors[k + 1] * t
        return tone * np.array([1 - 0.03 * self.undertone, 1 + 0.02 * self.undertone, 1 - 0.08 * self.undertone])

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> AlbedoParams:
        return cls(**{**value, "iris_srgb": tuple(value["iris_srgb"])})


def sample_albedo(rng: np.random.Generator) -> AlbedoParams:
    """A random recipe: skin tones uniform over the whole range, freckles on a third of the samples
    (more likely on lighter skin)."""
    melanin = float(rng.uniform(0, 1))
    freckled = rng.random() < 0.45 * (1 - melanin) + 0.05
    iris = IRIS_SRGB[int(rng.integers(len(IRIS_SRGB)))] * rng.uniform(0.85, 1.15)
    return AlbedoParams(int(rng.integers(2 ** 31)), melanin, float(rng.uniform(-1, 1)), float(rng.uniform(0.2, 1)),
                        float(rng.uniform(0.3, 1)), float(rng.uniform(0.3, 0.75)),
                        float(rng.uniform(0.3, 1)) if freckled else 0.0, float(rng.uniform(0.3, 1)),
                        (float(iris[0]), float(iris[1]), float(iris[2])))


def value_noise(points: np.ndarray, wavelength_m: float, seed: int) -> np.ndarray:
    """(N,) smooth 3D value noise at (N, 3) points, about zero-mean, standard deviation ~1,
    features of about `wavelength_m`; deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    table = rng.uniform(-1, 1, 4096) / 0.36
    p = points / wavelength_m + rng.uniform(0, 1000, 3)
    cell = np.floor(p).astype(np.int64)
    f = p - cell
    s = f * f * (3 - 2 * f)
    out = np.zeros(len(points))
    for dx, dy, dz in product((0, 1), repeat=3):
        index = ((cell[:, 0] + dx) * 73856093 ^ (cell[:, 1] + dy) * 19349663 ^ (cell[:, 2] + dz) * 83492791) & 4095
        weight = ((s[:, 0] if dx else 1 - s[:, 0]) * (s[:, 1] if dy else 1 - s[:, 1])
                  * (s[:, 2] if dz else 1 - s[:, 2]))
        out += weight * table[index]
    return out


@dataclass(frozen=True)
class FaceLayout:
    """MediaPipe's 468 points on a model's mean shape (head-frame metres) and which are valid."""

    points: np.ndarray
    valid: np.ndarray

    @classmethod
    def of(cls, model: MorphableModel) -> FaceLayout:
        if model.mediapipe is None:
            raise ValueError(f"model {model.name!r} has no MediaPipe correspondence; reinstall it")
        c = model.mediapipe
        return cls(np.einsum("nk,nkc->nc", c.bary, model.mean.astype(np.float64)[c.corners]), c.valid)


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    return t * t * (3 - 2 * t)


def frontal_mask(layout: FaceLayout, loops: tuple[tuple[int, ...], ...], points: np.ndarray,
                 normals: np.ndarray, blur_m: float, grow_m: float = 0.0, min_facing: float = 0.0) -> np.ndarray:
    """(N,) 0..1: the landmark polygons `loops` seen from the front (head-frame XY), grown by
    `grow_m`, softened by a Gaussian of `blur_m`, sampled at the points whose normal's z exceeds
    `min_facing` (fading in over 0.35) and that lie no deeper than 2 cm behind the polygons' landmarks."""
    ids = [i for loop in loops for i in loop]
    corner = layout.points[ids, :2].min(axis=0) - 0.02
    extent = layout.points[ids, :2].max(axis=0) + 0.02 - corner
    width, height = (np.ceil(extent / GRID_M).astype(int) + 1).tolist()
    canvas: np.ndarray = np.zeros((height, width), np.float32)
    for loop in loops:
        xy = (layout.points[list(loop), :2] - corner) / GRID_M
        polygon = np.round(np.stack([xy[:, 0], height - 1 - xy[:, 1]], axis=1) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [polygon], (1.0,), lineType=cv2.LINE_AA, shift=4)
    if grow_m > 0:
        radius = max(1, int(round(grow_m / GRID_M)))
        canvas = cv2.dilate(canvas, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    canvas = cv2.GaussianBlur(canvas, (0, 0), blur_m / GRID_M)
    col = (points[:, 0] - corner[0]) / GRID_M
    row = height - 1 - (points[:, 1] - corner[1]) / GRID_M
    inside = (col >= 0) & (col <= width - 1) & (row >= 0) & (row <= height - 1)
    sampled = np.zeros(len(points), np.float32)
    if inside.any():
        sampled[inside] = sample_bilinear(canvas, np.stack([col[inside], row[inside]], axis=1) + 0.5)[:, 0]
    depth_ok = smoothstep(-0.03, -0.02, points[:, 2] - layout.points[ids, 2].min())
    return sampled * smoothstep(min_facing, min_facing + 0.35, normals[:, 2]) * depth_ok


def blob(layout: FaceLayout, ids: tuple[int, ...], points: np.ndarray, radius_m: float) -> np.ndarray:
    """(N,) the largest Gaussian (sd `radius_m`) around the landmarks `ids`, in 3D."""
    out = np.zeros(len(points))
    for i in ids:
        out = np.maximum(out, np.exp(-((points - layout.points[i]) ** 2).sum(1) / (2 * radius_m ** 2)))
    return out


def albedo_at(params: AlbedoParams, layout: FaceLayout, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(N, 3) sRGB 0..1 skin albedo at (N, 3) head-frame points of the mean shape with unit normals."""
    seed = params.seed
    colour = np.tile(params.base_linear(), (len(points), 1))
    lightness = (0.07 * value_noise(points, 0.04, seed) + 0.045 * value_noise(points, 0.012, seed + 1)
                 + 0.03 * value_noise(points, 0.004, seed + 2))
    colour *= np.exp(lightness)[:, None]
    blotch = np.clip(0.5 + 0.5 * value_noise(points, 0.009, seed + 3), 0, 1)
    red = params.redness * (0.8 * blob(layout, CHEEKS, points, 0.02) + 0.5 * blob(layout, (NOSE_TIP,), points, 0.01)
                            + 0.25 * blotch)
    colour *= 1 + red[:, None] * np.array([0.08, -0.2, -0.16])
    under_eyes = np.clip(frontal_mask(layout, EYES, points, normals, 0.004, grow_m=0.006)
                         - frontal_mask(layout, EYES, points, normals, 0.001), 0, 1)
    colour *= 1 - 0.12 * under_eyes[:, None] * np.array([1.0, 1.05, 0.92])
    lips = frontal_mask(layout, (LIPS_OUTER,), points, normals, 0.0008, min_facing=-0.9)
    lip_colour = colour * (np.array([0.92, 0.55, 0.58]) ** params.lip_tint)
    colour = colour * (1 - lips[:, None]) + lip_colour * lips[:, None]
    hair = np.clip(0.6 + 0.4 * value_noise(points * np.array([1.0, 4.0, 1.0]), 0.0012, seed + 4), 0, 1)
    brows = frontal_mask(layout, BROWS, points, normals, 0.0015, grow_m=0.0015) * hair
    colour *= 1 - params.brow_darkness * brows[:, None] * np.array([0.95, 1.0, 1.02])
    if params.freckles > 0:
        upper = smoothstep(layout.points[MOUTH_TOP, 1], layout.points[MOUTH_TOP, 1] + 0.02, points[:, 1])
        spots = smoothstep(0.9, 1.6, value_noise(points, 0.0018, seed + 5)) * params.freckles * upper
        colour *= 1 - 0.35 * spots[:, None] * np.array([0.85, 1.05, 1.2])
    pores = smoothstep(1.0, 1.8, value_noise(points, 0.0005, seed + 6)) * params.pores
    colour *= 1 - 0.07 * pores[:, None]
    return linear_to_srgb(colour)


def textured_uv_triangles(model: MorphableModel) -> tuple[np.ndarray, np.ndarray]:
    """The textured parts as (T, 3) vertex-id triangles and (T, 3) UV-id triangles."""
    textured = model.textured_polygons
    return triangulate(model.polygons[textured]), triangulate(model.polygon_uvs[textured])


def pad_islands(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill pixels outside the UV islands from the nearest island colours (coarse-to-fine averages),
    so texture filtering at island edges never mixes in black; known pixels are kept exactly."""
    levels: list[tuple[np.ndarray, np.ndarray]] = [(image * known[..., None], known.astype(np.float32))]
    while min(levels[-1][1].shape) > 1:
        colour, weight = levels[-1]
        size = ((weight.shape[1] + 1) // 2, (weight.shape[0] + 1) // 2)
        levels.append((cv2.resize(colour, size, interpolation=cv2.INTER_AREA),
                       cv2.resize(weight, size, interpolation=cv2.INTER_AREA)))
    filled = levels[-1][0] / np.maximum(levels[-1][1], 1e-8)[..., None]
    for colour, weight in reversed(levels[:-1]):
        up = cv2.resize(filled, (weight.shape[1], weight.shape[0]), interpolation=cv2.INTER_LINEAR)
        up = up.reshape(weight.shape + (-1,))
        alpha = np.minimum(weight, 1)[..., None]
        filled = colour / np.maximum(weight, 1e-8)[..., None] * alpha + up * (1 - alpha)
    return np.where(known[..., None], image, filled)


def texel_surface(model: MorphableModel, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The textured UV islands at `size`² texels: flat texel ids (N,), and per texel its point
    (N, 3) and unit normal (N, 3) on the mean shape (head-frame metres)."""
    vertex_triangles, uv_triangles = textured_uv_triangles(model)
    raster = rasterize(uv_to_texture_px(model.uvs, size), np.zeros(len(model.uvs)), uv_triangles, size, size)
    texel = np.flatnonzero(raster.covered.ravel())
    triangle = raster.triangle.ravel()[texel]
    bary = raster.bary.reshape(-1, 3)[texel].astype(np.float64)
    mean = model.mean.astype(np.float64)
    normals = vertex_normals(mean, model.triangles)
    corners = vertex_triangles[triangle]
    points = np.einsum("nk,nkc->nc", bary, mean[corners])
    normal = np.einsum("nk,nkc->nc", bary, normals[corners])
    return texel, points, normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)


def albedo_texture(model: MorphableModel, params: AlbedoParams, size: int = 1024) -> np.ndarray:
    """(size, size, 3) uint8 sRGB albedo of the model's textured parts in its UV layout (row 0 at
    the top, UV origin bottom-left), islands padded outward."""
    texel, points, normals = texel_surface(model, size)
    flat = np.zeros((size * size, 3), np.float32)
    flat[texel] = albedo_at(params, FaceLayout.of(model), points, normals)
    known = np.zeros(size * size, bool)
    known[texel] = True
    padded = pad_islands(flat.reshape(size, size, 3), known.reshape(size, size))
    return np.clip(np.rint(padded * 255), 0, 255).astype(np.uint8)


def eyeball_colours(points: np.ndarray, params: AlbedoParams) -> np.ndarray:
    """(N, 3) sRGB for the points of one eyeball looking along +Z: the sclera, an iris cap of
    IRIS_HALF_ANGLE_DEG around the gaze (darker at its rim) and a pupil of PUPIL_HALF_ANGLE_DEG.
    (Some models, ICT-FaceKit among them, keep the iris as a sphere just inside the sclera, which a
    renderer never shows; the sclera carries it here.)"""
    centre = points.mean(axis=0)
    direction = points - centre
    cos = direction[:, 2] / np.maximum(np.linalg.norm(direction, axis=1), 1e-12)
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    iris = smoothstep(IRIS_HALF_ANGLE_DEG + 2, IRIS_HALF_ANGLE_DEG - 2, angle)
    pupil = smoothstep(PUPIL_HALF_ANGLE_DEG + 2, PUPIL_HALF_ANGLE_DEG - 2, angle)
    rim = smoothstep(IRIS_HALF_ANGLE_DEG - 8, IRIS_HALF_ANGLE_DEG, angle) * iris
    colour = np.tile(np.asarray(SCLERA_SRGB), (len(points), 1))
    colour = colour * (1 - iris[:, None]) + np.asarray(params.iris_srgb) * (1 - 0.4 * rim)[:, None] * iris[:, None]
    return colour * (1 - pupil[:, None]) + 0.03 * pupil[:, None]


def vertex_albedo(model: MorphableModel, params: AlbedoParams) -> np.ndarray:
    """(V, 3) sRGB 0..1 per vertex: the skin albedo on skin and textured parts, the iris colour on
    parts named iris*, `eyeball_colours` on eye_white*, each other part's plain colour (its linear
    `colour`, encoded)."""
    mean = model.mean.astype(np.float64)
    skin = albedo_at(params, FaceLayout.of(model), mean, vertex_normals(mean, model.triangles))
    out = skin.copy()
    for k, part in enumerate(model.parts):
        if part.textured or part.skin:
            continue
        ids = np.unique(model.polygons[model.polygon_part == k])
        ids = ids[ids >= 0]
        if part.name.startswith("iris"):
            out[ids] = params.iris_srgb
        elif part.name.startswith("eye_white"):
            out[ids] = eyeball_colours(mean[ids], params)
        else:
            out[ids] = linear_to_srgb(np.array(part.colour))
    return out
