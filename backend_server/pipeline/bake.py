"""Stage 5, bake: photo colours -> UV texture through the fitted mesh.

Texture frame: `size` x `size` pixels, row 0 at the top; UV (u, v) has its origin bottom-left, so
texel (row r, column c) sits at u = (c + 0.5) / size, v = 1 - (r + 0.5) / size.

Three steps, the same maths on the CPU (here) and the GPU (bake_gpu.py):
1. lighting (lighting.py): the photo's light fitted on the mesh's texture vertices that the photo
   sees on skin (their normals, their photo colours; weights as below);
2. observe: per texel its photo colour (bilinear, linear RGB) divided by the lighting's shading at
   the texel's normal (kept lit with `delit=False`), and its weight in [0, 1]: 0 where the photo
   does not see it (facing away by more than MIN_FACING_COS, outside the photo, or behind the
   z-buffer), else the view angle's ramp (MIN_FACING_COS -> FULL_FACING_COS) x the photo's skin
   probability there (segment.py: background, hair, clothes, glasses are 0) x not clipped (the
   brightest channel below CLIP_START) x not in deep shadow (shading below SHADOW_SHADING);
   the lit texture (`delit=False`, ReconstructOptions.lit_texture) reproduces the photo as it is:
   its weight is the seen test x the view angle's ramp only (the photo's light, hair, glasses and
   clipped highlights stay, as the photo shows them: what `evaluate` re-renders against the photo);
3. complete (complete.py): fill, mirror and blend into the whole texture, sRGB uint8 (the lit
   texture keeps every seen texel's photo colour exactly: `keep_seen`).
`Bake.observed` and `Bake.texel_weight` (step 2, kept on request) are what a fusion of several
photos combines before calling `complete.complete_texture` itself; `observe_photo` (a baker's
`observe`) stops after step 2 and gives them as an `Observation` (with the lighting), not
completing a texture that a fusion would throw away.

Memory: the per-texel work runs over TEXEL_CHUNK texels at a time and the UV layout is rasterized
in bands of RASTER_BAND_ROWS rows, so a job's peak grows with the texture (its float32 colour
buffer and the cached texel map) and not with the per-texel temporaries: see `bake_peak_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import cv2
import numpy as np

from ..geometry import Camera, sample_bilinear, uv_to_texture_px, vertex_normals
from ..models.topology import MeshTopology
from ..render.rasterize import rasterize
from ..render.shade import srgb_to_linear
from .lighting import MIN_SHADING, Lighting, fit_lighting

if TYPE_CHECKING:
    import torch

MIN_FACING_COS = 0.15          # surface seen at more than ~81 degrees off its normal is not used
FULL_FACING_COS = 0.5          # ... and counts fully from 60 degrees on
CLIP_START, CLIP_END = 0.92, 0.98      # sRGB of the brightest channel: weight falls from 1 to 0 (clipped light)
SHADOW_SHADING = 0.35          # shading (mean 1) under which a texel's weight falls linearly to 0
DEPTH_TOLERANCE_M = 0.005      # a point this far behind the z-buffer still counts as seen
TEXEL_CHUNK = 1 << 21          # texels interpolated, tested and sampled at once (~100 MB of temporaries)
RASTER_BAND_ROWS = 2048        # texture rows rasterized at once when the texel map is built
CACHED_TEXEL_MAP_SIZE = 4096   # texel maps up to this size stay in memory between jobs


@dataclass(frozen=True)
class TexelMap:
    """Covered texels of (a band of rows of) a UV layout at `size`: flat texel indices (N,) int32
    into the size x size texture, and per texel its triangle's corners (3, N) int32 and
    barycentrics (3, N) float32, which map per-vertex attributes to the texel."""

    size: int
    texel: np.ndarray
    corners: np.ndarray
    bary: np.ndarray

    def interpolate(self, attributes: np.ndarray) -> np.ndarray:
        """(V, C) per-vertex attributes -> (N, C) per covered texel, float32 (gathered one channel
        at a time: contiguous, ~3x faster than gathering rows)."""
        channels = np.ascontiguousarray(attributes.T, dtype=np.float32)
        out = np.empty((len(channels), self.corners.shape[1]), np.float32)
        c0, c1, c2 = self.corners
        b0, b1, b2 = self.bary
        for channel, values in zip(out, channels):
            channel[:] = values[c0] * b0 + values[c1] * b1 + values[c2] * b2
        return out.T

    def part(self, start: int, stop: int) -> TexelMap:
        """Texels start..stop of this map (views, no copies)."""
        return TexelMap(self.size, self.texel[start:stop], self.corners[:, start:stop], self.bary[:, start:stop])


@dataclass(frozen=True)
class Bake:
    """One face's bake. texture: (size, size, 3) uint8 sRGB, complete; seen_fraction /
    mirrored_fraction: shares of the covered texels that the photo saw / that took their mirror
    texel's colour; lighting: the photo's light on the face (lighting.py);
    observed: (size, size, 3) float32 **linear** RGB per texel as the photo showed it, de-lit
    (divided by the lighting's shading) unless the lit texture was asked for, 0 where
    texel_weight is 0 (undefined there); texel_weight: (size, size) float32 in [0, 1], 0 = not
    seen or rejected, higher = seen better (view angle, skin probability, not clipped, not in
    shadow; the lit texture's: the view angle only). observed and texel_weight are None unless
    the baker was asked to keep them."""

    texture: np.ndarray
    seen_fraction: float
    mirrored_fraction: float
    lighting: Lighting = field(default_factory=Lighting.flat)
    observed: np.ndarray | None = None
    texel_weight: np.ndarray | None = None


def texel_maps(topology: MeshTopology, size: int) -> Iterator[TexelMap]:
    """The UV layout's covered texels at `size`, a band of RASTER_BAND_ROWS rows at a time: kept
    for every later photo up to CACHED_TEXEL_MAP_SIZE (4096² of the built-in mesh: ~250 MB),
    rasterized per job above it (8192²: ~1 GB, which a worker should not hold between jobs), one
    band in memory at a time."""
    if size <= CACHED_TEXEL_MAP_SIZE:
        yield from _cached_texel_maps(topology, size)
    else:
        for top in range(0, size, RASTER_BAND_ROWS):
            yield texel_band(topology, size, top)


@lru_cache(maxsize=8)
def _cached_texel_maps(topology: MeshTopology, size: int) -> tuple[TexelMap, ...]:
    return tuple(texel_band(topology, size, top) for top in range(0, size, RASTER_BAND_ROWS))


def texel_band(topology: MeshTopology, size: int, top: int) -> TexelMap:
    """Rasterize rows top .. top + RASTER_BAND_ROWS of the UV layout at `size`."""
    uv_px = uv_to_texture_px(topology.uvs, size) - [0.0, top]
    raster = rasterize(uv_px, np.zeros(len(uv_px)), topology.triangles, size, min(RASTER_BAND_ROWS, size - top))
    covered = np.flatnonzero(raster.covered.ravel())
    corners = topology.triangles[raster.triangle.ravel()[covered]].astype(np.int32)
    return TexelMap(size, (covered + top * size).astype(np.int32), np.ascontiguousarray(corners.T),
                    np.ascontiguousarray(raster.bary.reshape(-1, 3)[covered].T))


def pull_push_fill(image: np.ndarray, known: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Fill unknown pixels of a float32 (H, W, C) image from known ones, coarse to fine; known
    pixels keep their values exactly. The unknown pixels of `image` must hold 0. weights: (H, W)
    float32 >= 0, how much each known pixel counts in the coarser levels (default: 1). Returns a
    new float32 (H, W, C) array; `image` is not changed."""
    height, width = known.shape
    weight: np.ndarray = known.astype(np.float32) if weights is None else weights.astype(np.float32)
    colour: np.ndarray = image if weights is None else image * weight[..., None]   # unknown pixels are 0
    levels = []
    while min(weight.shape) > 1:
        h, w = (weight.shape[0] + 1) // 2, (weight.shape[1] + 1) // 2
        colour = cv2.resize(colour, (w, h), interpolation=cv2.INTER_AREA)
        weight = cv2.resize(weight, (w, h), interpolation=cv2.INTER_AREA)
        levels.append((colour, weight))
    filled = levels[-1][0] / np.maximum(levels[-1][1], 1e-8)[..., None]
    for colour, weight in reversed(levels[:-1]):
        h, w = weight.shape
        upsampled = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
        alpha = np.minimum(weight, 1.0)[..., None]
        filled = colour / np.maximum(weight, 1e-8)[..., None] * alpha + upsampled * (1 - alpha)
    upsampled = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR).reshape(image.shape)
    upsampled[known] = image[known]
    return upsampled


def ramp(values: np.ndarray, start: float, end: float) -> np.ndarray:
    """0 at `start`, 1 at `end`, linear between, clipped (either direction)."""
    return np.clip((values - start) / (end - start), 0.0, 1.0)


def vertex_areas(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(V,) a third of the area (m²) of the triangles around each vertex."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    area = np.linalg.norm(np.cross(b - a, c - a), axis=1) / 6.0
    return sum((np.bincount(triangles[:, k], area, len(vertices)) for k in range(3)), np.zeros(len(vertices)))


LINEAR_OF_SRGB8 = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)     # uint8 sRGB -> linear
CLIP_START_LINEAR, CLIP_END_LINEAR = (float(v) for v in srgb_to_linear(np.array([CLIP_START, CLIP_END])))


def linear_photo(photo_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W, 3) float32 linear RGB (the bake samples in linear light)."""
    return LINEAR_OF_SRGB8[photo_rgb]


def channel_max(values: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...) the largest channel (numpy reduces a 3-long last axis slowly: .max(-1) is slower)."""
    return np.maximum(np.maximum(values[..., 0], values[..., 1]), values[..., 2])


def channel_min(values: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(values[..., 0], values[..., 1]), values[..., 2])


def facing_cosines(vertices: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(V,) cosine between each unit normal and the ray from its camera-frame vertex to the camera."""
    return np.einsum("nc,nc->n", normals, -vertices) / np.maximum(np.linalg.norm(vertices, axis=1), 1e-12)


def lighting_from_vertices(photo_linear: np.ndarray, skin: np.ndarray | None, vertices: np.ndarray,
                           normals: np.ndarray, triangles: np.ndarray, zbuffer: np.ndarray, camera: Camera
                           ) -> Lighting:
    """Step 1: `fit_lighting` on the texture vertices the photo sees, each weighted by its area,
    view angle, skin probability and clipping (the texel rule of the module docstring, at the vertex).
    photo_linear: (H, W, 3) float32 linear RGB."""
    xy = camera.project(vertices)
    facing = facing_cosines(vertices, normals)
    col = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, camera.width - 1)
    row = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, camera.height - 1)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] < camera.height)
    seen = inside & (facing > MIN_FACING_COS) & (-vertices[:, 2] <= zbuffer[row, col] + DEPTH_TOLERANCE_M)
    colour = sample_bilinear(photo_linear, xy.astype(np.float32))
    weight = vertex_areas(vertices, triangles) * seen * ramp(facing, MIN_FACING_COS, FULL_FACING_COS)
    weight *= ramp(channel_max(colour), CLIP_END_LINEAR, CLIP_START_LINEAR)
    if skin is not None:
        weight *= sample_bilinear(skin, xy.astype(np.float32))[:, 0] / 255.0
    return fit_lighting(colour, normals, weight)


def observe_texels(texels: TexelMap, attributes: np.ndarray, zbuffer: np.ndarray, camera: Camera,
                   photo_linear: np.ndarray, skin: np.ndarray | None, delit: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 for some texels: (N, 3) float32 linear colours (de-lit if `delit`; 0 where unseen)
    and (N,) float32 weights (the lit texture, `delit` False, weighs by the view angle only: it is
    the photo as it shows the face, its light, hair and glasses included).
    attributes: (V, 7) per texture vertex: photo x, y; camera-frame
    depth (-z, metres); the cosine between its normal and the ray to the camera; the lighting's
    shading there (3; interpolated: the light is smooth)."""
    per_texel = texels.interpolate(attributes)                             # (N, 7)
    xy, depth, facing, shading = per_texel[:, :2], per_texel[:, 2], per_texel[:, 3], per_texel[:, 4:7]
    col = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, camera.width - 1)
    row = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, camera.height - 1)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] < camera.height)
    seen = inside & (facing > MIN_FACING_COS) & (depth <= zbuffer[row, col] + DEPTH_TOLERANCE_M)
    colour = sample_bilinear(photo_linear, xy)
    weight = ramp(facing, MIN_FACING_COS, FULL_FACING_COS).astype(np.float32)
    weight *= seen
    if delit:
        weight *= ramp(channel_max(colour), CLIP_END_LINEAR, CLIP_START_LINEAR)
        weight *= ramp(channel_min(shading), 0.0, SHADOW_SHADING)
        if skin is not None:
            weight *= sample_bilinear(skin, xy)[:, 0] * np.float32(1 / 255)
        colour /= np.maximum(shading, MIN_SHADING)
    colour[weight <= 0] = 0.0
    return colour, weight


@dataclass(frozen=True)
class Observation:
    """One photo's steps 1 and 2 without the completion (`observe_photo`; what a fusion of several
    photos combines, fuse.py): observed (size, size, 3) float32 linear RGB and texel_weight (size,
    size) float32, as `Bake.observed` / `Bake.texel_weight`: numpy arrays, or tensors on a GPU
    baker's device (`GpuBaker.observe`); lighting: the photo's light."""

    observed: np.ndarray | torch.Tensor
    texel_weight: np.ndarray | torch.Tensor
    lighting: Lighting = field(default_factory=Lighting.flat)


def observe_photo(photo_rgb: np.ndarray, vertices: np.ndarray, topology: MeshTopology, camera: Camera, size: int,
                  skin: np.ndarray | None = None, delit: bool = True) -> Observation:
    """Steps 1 and 2 of `bake_texture` (same arguments): the photo's lighting and its observation."""
    return _observe(photo_rgb, vertices, topology, camera, size, skin, delit)[0]


def _observe(photo_rgb: np.ndarray, vertices: np.ndarray, topology: MeshTopology, camera: Camera, size: int,
             skin: np.ndarray | None, delit: bool) -> tuple[Observation, np.ndarray]:
    """`observe_photo`, and the (size, size) bool map of the covered texels."""
    triangles = topology.triangles
    screen = camera.project(vertices)
    distance = -vertices[:, 2]
    zbuffer = rasterize(screen, distance, triangles, camera.width, camera.height).depth
    normals = vertex_normals(vertices, triangles)
    photo_linear = linear_photo(photo_rgb)
    lighting = lighting_from_vertices(photo_linear, skin, vertices, normals, triangles, zbuffer, camera)
    attributes = np.concatenate([screen, distance[:, None], facing_cosines(vertices, normals)[:, None],
                                 lighting.shading(normals)], axis=1)

    observed = np.zeros((size * size, 3), np.float32)
    weight = np.zeros(size * size, np.float32)
    covered = np.zeros(size * size, bool)
    for band in texel_maps(topology, size):
        covered[band.texel] = True
        for start in range(0, len(band.texel), TEXEL_CHUNK):
            part = band.part(start, start + TEXEL_CHUNK)
            observed[part.texel], weight[part.texel] = observe_texels(
                part, attributes, zbuffer, camera, photo_linear, skin, delit)
    return (Observation(observed.reshape(size, size, 3), weight.reshape(size, size), lighting),
            covered.reshape(size, size))


def bake_texture(photo_rgb: np.ndarray, vertices: np.ndarray, topology: MeshTopology, camera: Camera, size: int,
                 skin: np.ndarray | None = None, delit: bool = True, keep_observation: bool = False) -> Bake:
    """photo_rgb: (H, W, 3) uint8; vertices: (V, 3) camera-frame metres of `topology`'s mesh;
    skin: (H, W) uint8 skin probability (segment.SkinMap), None = all skin; delit: divide the
    light out; keep_observation: keep `observed` and `texel_weight` in the Bake."""
    from .complete import complete_texture, mirrored_fraction
    observation, covered = _observe(photo_rgb, vertices, topology, camera, size, skin, delit)
    observed_2d, weight_2d = np.asarray(observation.observed), np.asarray(observation.texel_weight)
    covered_count = max(int(covered.sum()), 1)
    seen_fraction = float((weight_2d > 0).sum()) / covered_count
    mirrored = mirrored_fraction(weight_2d, covered, topology.uv_mirror_symmetric)
    del covered
    texture = complete_texture(observed_2d, weight_2d, topology.uv_mirror_symmetric, keep_seen=not delit)
    if not keep_observation:
        return Bake(texture, seen_fraction, mirrored, observation.lighting)
    return Bake(texture, seen_fraction, mirrored, observation.lighting, observed_2d, weight_2d)


def covered_texels(topology: MeshTopology, size: int) -> np.ndarray:
    """(size, size) bool: the texels inside the UV islands; kept up to CACHED_TEXEL_MAP_SIZE, as
    the texel maps, so the caller must not write to it."""
    return _cached_covered(topology, size) if size <= CACHED_TEXEL_MAP_SIZE else _covered(topology, size)


@lru_cache(maxsize=8)
def _cached_covered(topology: MeshTopology, size: int) -> np.ndarray:
    return _covered(topology, size)


def _covered(topology: MeshTopology, size: int) -> np.ndarray:
    covered = np.zeros(size * size, bool)
    for band in texel_maps(topology, size):
        covered[band.texel] = True
    return covered.reshape(size, size)


def seen_texels(texels: TexelMap, attributes: np.ndarray, zbuffer: np.ndarray, camera: Camera
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per texel its photo position (N, 2) pixels, and whether the photo sees it (N,) bool: its
    surface point projects inside the photo, faces the camera and is not behind the z-buffer.
    attributes: (V, 8) per texture vertex: photo x, y; camera-frame point; normal."""
    per_texel = texels.interpolate(attributes)                             # (N, 8)
    xy, point, normal = per_texel[:, :2], per_texel[:, 2:5], per_texel[:, 5:8]
    facing = np.einsum("nc,nc->n", normal, -point) / np.sqrt(np.maximum(
        np.einsum("nc,nc->n", normal, normal) * np.einsum("nc,nc->n", point, point), 1e-24))
    col = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, camera.width - 1)
    row = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, camera.height - 1)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] < camera.height)
    seen = inside & (facing > MIN_FACING_COS) & (-point[:, 2] <= zbuffer[row, col] + DEPTH_TOLERANCE_M)
    return xy, seen


class Baker(Protocol):
    """Bakes many faces' textures on one device. photos: (H, W, 3) uint8 each; vertices: (V, 3)
    camera-frame metres of `topology`'s texture vertices, one per photo; targets: optional
    (size, size, 3) uint8 arrays that receive the textures (the Bakes then hold them); skins:
    optional (H, W) uint8 skin probabilities, one per photo (segment.SkinMap; None: all skin);
    delit: divide the light out; keep_observation: keep `observed` and `texel_weight`.
    For several photos of one person (fuse.py): `observe` is steps 1 and 2 alone (an `Observation`
    per photo, as `observe_photo`; its arrays stay on the baker's device), `complete` step 3 alone
    on this device for observations fused there (`complete.complete_texture`'s arguments, numpy
    arrays or tensors on this device, and its result)."""

    def warm_up(self, topology: MeshTopology, size: int) -> None: ...

    def bake(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
             topology: MeshTopology, size: int, targets: Sequence[np.ndarray] | None = None,
             skins: Sequence[np.ndarray | None] | None = None, delit: bool = True,
             keep_observation: bool = False) -> list[Bake]: ...

    def observe(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
                topology: MeshTopology, size: int, skins: Sequence[np.ndarray | None] | None = None,
                delit: bool = True) -> list[Observation]: ...

    def complete(self, observed: np.ndarray | torch.Tensor, texel_weight: np.ndarray | torch.Tensor,
                 mirror_symmetric: bool, keep_seen: bool = False) -> np.ndarray: ...


class CpuBaker:
    """`bake_texture`, one face after another, on this process's CPU."""

    def warm_up(self, topology: MeshTopology, size: int) -> None:
        if size <= CACHED_TEXEL_MAP_SIZE:
            _cached_texel_maps(topology, size)

    def bake(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
             topology: MeshTopology, size: int, targets: Sequence[np.ndarray] | None = None,
             skins: Sequence[np.ndarray | None] | None = None, delit: bool = True,
             keep_observation: bool = False) -> list[Bake]:
        skins = skins if skins is not None else [None] * len(photos)
        bakes = [bake_texture(photo, v, topology, camera, size, skin, delit, keep_observation)
                 for photo, v, camera, skin in zip(photos, vertices, cameras, skins)]
        if targets is None:
            return bakes
        for bake, target in zip(bakes, targets):
            target[...] = bake.texture
        return [replace(bake, texture=target) for bake, target in zip(bakes, targets)]

    def observe(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
                topology: MeshTopology, size: int, skins: Sequence[np.ndarray | None] | None = None,
                delit: bool = True) -> list[Observation]:
        skins = skins if skins is not None else [None] * len(photos)
        return [observe_photo(photo, v, topology, camera, size, skin, delit)
                for photo, v, camera, skin in zip(photos, vertices, cameras, skins)]

    def complete(self, observed: np.ndarray | torch.Tensor, texel_weight: np.ndarray | torch.Tensor,
                 mirror_symmetric: bool, keep_seen: bool = False) -> np.ndarray:
        from .complete import complete_texture
        return complete_texture(np.asarray(observed), np.asarray(texel_weight), mirror_symmetric, keep_seen)


def baker_for(device: str) -> Baker:
    """The baker of a device: cpu, or cuda:N (nvdiffrast)."""
    if device == "cpu":
        return CpuBaker()
    from .bake_gpu import GpuBaker
    return GpuBaker(device)
