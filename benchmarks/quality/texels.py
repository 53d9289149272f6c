"""Texels of a UV layout and where they lie on a mesh: shared by the adapter, the peer and the metrics.

Texture frame as the bake's: `size` x `size`, row 0 at the top, UV origin bottom-left.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend_server.geometry import Camera, uv_to_texture_px, vertex_normals
from backend_server.render.rasterize import rasterize


@dataclass(frozen=True)
class TexelMap:
    """The covered texels of a UV layout: flat ids (N,) into size², their triangle (N,) and
    barycentrics (N, 3)."""

    size: int
    texel: np.ndarray
    triangle: np.ndarray
    bary: np.ndarray

    def covered(self) -> np.ndarray:
        out = np.zeros(self.size * self.size, bool)
        out[self.texel] = True
        return out.reshape(self.size, self.size)

    def points(self, uv_triangles: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(N, C) per-texture-vertex values (R, C) interpolated at the texels."""
        return np.einsum("nk,nkc->nc", self.bary, positions[uv_triangles[self.triangle]])


_CACHE: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, TexelMap]] = {}


def texel_map(uv_triangles: np.ndarray, uvs: np.ndarray, size: int) -> TexelMap:
    """The texel map of a UV layout, cached per (arrays, size): a model's layout is rasterized
    once for every view that uses it."""
    key = (id(uv_triangles), id(uvs), size)
    cached = _CACHE.get(key)
    if cached is not None and cached[0] is uv_triangles and cached[1] is uvs:
        return cached[2]
    texels = _rasterize_layout(uv_triangles, uvs, size)
    _CACHE[key] = (uv_triangles, uvs, texels)
    return texels


def _rasterize_layout(uv_triangles: np.ndarray, uvs: np.ndarray, size: int) -> TexelMap:
    raster = rasterize(uv_to_texture_px(uvs, size), np.zeros(len(uvs)), uv_triangles, size, size)
    texel = np.flatnonzero(raster.covered.ravel())
    return TexelMap(size, texel, raster.triangle.ravel()[texel].astype(np.int64),
                    raster.bary.reshape(-1, 3)[texel].astype(np.float64))


def visible_texels(uv_triangles: np.ndarray, uvs: np.ndarray, positions: np.ndarray, camera: Camera, size: int,
                   min_facing_cos: float, depth_tolerance_m: float) -> np.ndarray:
    """(size, size) bool: texels whose surface point (texture-vertex positions (R, 3), camera frame)
    faces the camera by more than `min_facing_cos` and passes the z-buffer of the same mesh within
    `depth_tolerance_m`: the bake's rule for a texel sampled from the photo."""
    texels = texel_map(uv_triangles, uvs, size)
    zbuffer = rasterize(camera.project(positions), -positions[:, 2], uv_triangles, camera.width, camera.height).depth
    point = texels.points(uv_triangles, positions)
    normal = texels.points(uv_triangles, vertex_normals(positions, uv_triangles))
    xy = camera.project(point)
    facing = np.einsum("nc,nc->n", normal, -point) / np.maximum(
        np.linalg.norm(normal, axis=1) * np.linalg.norm(point, axis=1), 1e-12)
    col = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, camera.width - 1)
    row = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, camera.height - 1)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] < camera.height)
    seen = inside & (facing > min_facing_cos) & (-point[:, 2] <= zbuffer[row, col] + depth_tolerance_m)
    out = np.zeros(size * size, bool)
    out[texels.texel[seen]] = True
    return out.reshape(size, size)
