"""Stage 5, bake: photo colours -> UV texture through the fitted mesh.

Texture frame: `size` x `size` pixels, row 0 at the top; UV (u, v) has its origin bottom-left, so
texel (row r, column c) sits at u = (c + 0.5) / size, v = 1 - (r + 0.5) / size. sRGB uint8.

A texel takes the photo's colour where its surface point faces the camera and passes the z-buffer
test (nothing nearer covers it). Texels not seen take the colour of their mirror texel
(u -> 1 - u) when that one was seen and the UV layout is left/right symmetric; everything else,
inside the islands and around them, is filled by pull-push inpainting, which also pads the
islands so no seams show at coarse mip levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import cv2
import numpy as np

from ..geometry import Camera, sample_bilinear, uv_to_texture_px, vertex_normals
from ..models.topology import MeshTopology
from ..render.rasterize import rasterize

MIN_FACING_COS = 0.15          # surface seen at more than ~81 degrees off its normal is not used
DEPTH_TOLERANCE_M = 0.005      # a point this far behind the z-buffer still counts as seen


@dataclass(frozen=True)
class TexelMap:
    """Covered texels of a UV layout: flat texel indices (N,), their mirror texels (N,; row r,
    column c -> row r, column size - 1 - c), and per texel its triangle's corners (3, N) and
    barycentrics (3, N), which map per-vertex attributes to the texel."""

    size: int
    texel: np.ndarray
    mirror: np.ndarray
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


@dataclass(frozen=True)
class Bake:
    texture: np.ndarray         # (size, size, 3) uint8
    seen_fraction: float        # covered texels coloured from the photo directly
    mirrored_fraction: float    # covered texels coloured from their mirror texel


@lru_cache(maxsize=8)
def texel_map(topology: MeshTopology, size: int) -> TexelMap:
    """Rasterize the UV layout once per (topology, size); workers keep it for every later photo."""
    uv_px = uv_to_texture_px(topology.uvs, size)
    raster = rasterize(uv_px, np.zeros(len(uv_px)), topology.triangles, size, size)
    texel = np.flatnonzero(raster.covered.ravel())
    rows, cols = np.divmod(texel, size)
    corners = topology.triangles[raster.triangle.ravel()[texel]]
    return TexelMap(size, texel, rows * size + (size - 1 - cols), np.ascontiguousarray(corners.T, dtype=np.intp),
                    np.ascontiguousarray(raster.bary.reshape(-1, 3)[texel].T))


def pull_push_fill(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown pixels of a float32 (H, W, C) image from known ones, coarse to fine; known
    pixels keep their values exactly."""
    height, width = known.shape
    weight: np.ndarray = known.astype(np.float32)
    colour: np.ndarray = image * weight[..., None]
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
    return np.where(known[..., None], image, upsampled)


def bake_texture(photo_rgb: np.ndarray, vertices: np.ndarray, topology: MeshTopology,
                 camera: Camera, size: int) -> Bake:
    """photo_rgb: (H, W, 3) uint8; vertices: (V, 3) camera-frame metres of `topology`'s mesh."""
    texels = texel_map(topology, size)
    triangles = topology.triangles
    screen = camera.project(vertices)
    distance = -vertices[:, 2]
    zbuffer = rasterize(screen, distance, triangles, camera.width, camera.height).depth

    attributes = np.concatenate([screen, vertices, vertex_normals(vertices, triangles)], axis=1)
    per_texel = texels.interpolate(attributes)                             # (N, 8)
    xy, point, normal = per_texel[:, :2], per_texel[:, 2:5], per_texel[:, 5:8]
    facing = np.einsum("nc,nc->n", normal, -point) / np.sqrt(np.maximum(
        np.einsum("nc,nc->n", normal, normal) * np.einsum("nc,nc->n", point, point), 1e-24))
    col = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, camera.width - 1)
    row = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, camera.height - 1)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] < camera.height)
    seen = inside & (facing > MIN_FACING_COS) & (-point[:, 2] <= zbuffer[row, col] + DEPTH_TOLERANCE_M)

    colours = sample_bilinear(photo_rgb, xy)

    flat = np.zeros((size * size, 3), np.float32)
    known = np.zeros(size * size, bool)
    flat[texels.texel[seen]] = colours[seen]
    known[texels.texel[seen]] = True
    # Mirror fill: a texel not seen takes its mirror texel's colour where that one was seen.
    mirror = texels.mirror
    use_mirror = ~known[texels.texel] & known[mirror] & topology.uv_mirror_symmetric
    flat[texels.texel[use_mirror]] = flat[mirror[use_mirror]]
    known[texels.texel[use_mirror]] = True

    filled = pull_push_fill(flat.reshape(size, size, 3), known.reshape(size, size))
    texture = np.clip(np.rint(filled), 0, 255).astype(np.uint8)
    covered = max(len(texels.texel), 1)
    return Bake(texture, float(seen.sum()) / covered, float(use_mirror.sum()) / covered)


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
        texel_map(topology, size)

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
