"""Stage 5, bake: photo colours -> UV texture through the fitted mesh.

Texture frame: `size` x `size` pixels, row 0 at the top; UV (u, v) has its origin bottom-left, so
texel (row r, column c) sits at u = (c + 0.5) / size, v = 1 - (r + 0.5) / size. sRGB uint8.

A texel takes the photo's colour where its surface point faces the camera and passes the z-buffer
test (nothing nearer covers it). Texels not seen take the colour of their mirror texel
(u -> 1 - u) when that one was seen and the UV layout is left/right symmetric; everything else,
inside the islands and around them, is filled by pull-push inpainting, which also pads the
islands so no seams show at coarse mip levels.

Memory: the per-texel work runs over TEXEL_CHUNK texels at a time and the UV layout is rasterized
in bands of RASTER_BAND_ROWS rows, so a job's peak grows with the texture (its float32 colour
buffer and the cached texel map) and not with the per-texel temporaries: see `bake_peak_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Protocol, Sequence

import cv2
import numpy as np

from ..geometry import Camera, sample_bilinear, uv_to_texture_px, vertex_normals
from ..models.topology import MeshTopology
from ..render.rasterize import rasterize

MIN_FACING_COS = 0.15          # surface seen at more than ~81 degrees off its normal is not used
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
    texture: np.ndarray         # (size, size, 3) uint8
    seen_fraction: float        # covered texels coloured from the photo directly
    mirrored_fraction: float    # covered texels coloured from their mirror texel


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


def pull_push_fill(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown pixels of a float32 (H, W, C) image from known ones, coarse to fine; known
    pixels keep their values exactly. The unknown pixels of `image` must hold 0. Returns a new
    float32 (H, W, C) array; `image` is not changed."""
    height, width = known.shape
    weight: np.ndarray = known.astype(np.float32)
    colour: np.ndarray = image                  # = image * weight, unknown pixels being 0
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


def bake_texture(photo_rgb: np.ndarray, vertices: np.ndarray, topology: MeshTopology,
                 camera: Camera, size: int) -> Bake:
    """photo_rgb: (H, W, 3) uint8; vertices: (V, 3) camera-frame metres of `topology`'s mesh."""
    triangles = topology.triangles
    screen = camera.project(vertices)
    distance = -vertices[:, 2]
    zbuffer = rasterize(screen, distance, triangles, camera.width, camera.height).depth
    attributes = np.concatenate([screen, vertices, vertex_normals(vertices, triangles)], axis=1)

    flat = np.zeros((size * size, 3), np.float32)
    known = np.zeros(size * size, bool)
    covered = np.zeros(size * size, bool)
    seen_count = 0
    for band in texel_maps(topology, size):
        covered[band.texel] = True
        for start in range(0, len(band.texel), TEXEL_CHUNK):
            part = band.part(start, start + TEXEL_CHUNK)
            xy, seen = seen_texels(part, attributes, zbuffer, camera)
            flat[part.texel[seen]] = sample_bilinear(photo_rgb, xy[seen])
            known[part.texel[seen]] = True
            seen_count += int(seen.sum())
    # Mirror fill: a texel not seen takes its mirror texel's colour (row r, column c -> row r,
    # column size - 1 - c) where that one was seen.
    known_2d, image = known.reshape(size, size), flat.reshape(size, size, 3)
    use_mirror = covered.reshape(size, size) & ~known_2d & known_2d[:, ::-1] & topology.uv_mirror_symmetric
    image[use_mirror] = image[:, ::-1][use_mirror]
    known_2d |= use_mirror
    covered_count = max(int(covered.sum()), 1)
    del covered

    filled = pull_push_fill(image, known_2d)
    del flat, image
    np.rint(filled, out=filled)
    texture = np.clip(filled, 0, 255, out=filled).astype(np.uint8)
    return Bake(texture, seen_count / covered_count, float(use_mirror.sum()) / covered_count)


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
    (size, size, 3) uint8 arrays that receive the textures (the Bakes then hold them)."""

    def warm_up(self, topology: MeshTopology, size: int) -> None: ...

    def bake(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
             topology: MeshTopology, size: int, targets: Sequence[np.ndarray] | None = None) -> list[Bake]: ...


class CpuBaker:
    """`bake_texture`, one face after another, on this process's CPU."""

    def warm_up(self, topology: MeshTopology, size: int) -> None:
        if size <= CACHED_TEXEL_MAP_SIZE:
            _cached_texel_maps(topology, size)

    def bake(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
             topology: MeshTopology, size: int, targets: Sequence[np.ndarray] | None = None) -> list[Bake]:
        bakes = [bake_texture(photo, v, topology, camera, size) for photo, v, camera in zip(photos, vertices, cameras)]
        if targets is None:
            return bakes
        for bake, target in zip(bakes, targets):
            target[...] = bake.texture
        return [Bake(target, bake.seen_fraction, bake.mirrored_fraction) for bake, target in zip(bakes, targets)]


def baker_for(device: str) -> Baker:
    """The baker of a device: cpu, or cuda:N (nvdiffrast)."""
    if device == "cpu":
        return CpuBaker()
    from .bake_gpu import GpuBaker
    return GpuBaker(device)
