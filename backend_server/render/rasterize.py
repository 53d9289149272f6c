"""CPU triangle rasterizer (vectorized numpy), the project's own; same contract as the CUDA one.

Screen frame: pixels, x right, y down, origin at the top-left corner, pixel (row r, column c)
sampled at its centre (c + 0.5, r + 0.5). Barycentrics are linear in screen space.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_SAMPLES = 1 << 22      # candidate pixels evaluated at once (bounds memory to ~200 MB)


@dataclass(frozen=True)
class Raster:
    """Per pixel: the nearest triangle (-1: none), its barycentrics (weights of its 3 vertices,
    float32, summing to 1) and the interpolated depth (inf where empty)."""

    triangle: np.ndarray     # (H, W) int32
    bary: np.ndarray         # (H, W, 3) float32
    depth: np.ndarray        # (H, W) float32

    @property
    def covered(self) -> np.ndarray:
        return self.triangle >= 0

    def interpolate(self, attributes: np.ndarray, triangles: np.ndarray) -> np.ndarray:
        """Per-vertex attributes (V, C) -> (H, W, C) at covered pixels (zeros elsewhere)."""
        out = np.zeros(self.triangle.shape + (attributes.shape[1],), np.float32)
        mask = self.covered
        corners = attributes[triangles[self.triangle[mask]]]                 # (N, 3, C)
        out[mask] = np.einsum("nk,nkc->nc", self.bary[mask], corners)
        return out


def rasterize(xy: np.ndarray, depth: np.ndarray, triangles: np.ndarray, width: int, height: int) -> Raster:
    """xy: (V, 2) screen positions in pixels; depth: (V,), smaller is nearer; triangles: (F, 3).

    Every pixel whose centre lies inside a triangle (edges included) takes the nearest one.
    Triangles with zero area are skipped; winding does not matter (no culling).
    """
    xy = np.asarray(xy, np.float64)
    corners = xy[triangles]                                                   # (F, 3, 2)
    col0 = np.maximum(np.ceil(corners[..., 0].min(1) - 0.5), 0).astype(np.int64)
    col1 = np.minimum(np.floor(corners[..., 0].max(1) - 0.5), width - 1).astype(np.int64)
    row0 = np.maximum(np.ceil(corners[..., 1].min(1) - 0.5), 0).astype(np.int64)
    row1 = np.minimum(np.floor(corners[..., 1].max(1) - 0.5), height - 1).astype(np.int64)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    live = (col1 >= col0) & (row1 >= row0) & (np.abs(area) > 1e-12)
    # Barycentric weight of vertex k as an affine function of the pixel centre: A*x + B*y + C.
    coeffs = np.zeros((len(triangles), 3, 3))
    safe = np.where(live, area, 1.0)
    for k, (p, q) in enumerate(((b, c), (c, a), (a, b))):
        coeffs[:, k, 0] = (p[:, 1] - q[:, 1]) / safe
        coeffs[:, k, 1] = (q[:, 0] - p[:, 0]) / safe
        coeffs[:, k, 2] = (p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1]) / safe
    tri_depth = np.asarray(depth, np.float64)[triangles]

    widths, heights = col1 - col0 + 1, row1 - row0 + 1
    bucket_w = 1 << np.ceil(np.log2(np.maximum(widths, 1))).astype(np.int64)
    bucket_h = 1 << np.ceil(np.log2(np.maximum(heights, 1))).astype(np.int64)
    found_pixel, found_tri, found_depth, found_bary = [], [], [], []
    live_ids = np.flatnonzero(live)
    for bw, bh in set(zip(bucket_w[live_ids].tolist(), bucket_h[live_ids].tolist())):
        ids = live_ids[(bucket_w[live_ids] == bw) & (bucket_h[live_ids] == bh)]
        step = max(1, CHUNK_SAMPLES // (bw * bh))
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            cols = col0[chunk, None, None] + np.arange(bw)[None, None, :]
            rows = row0[chunk, None, None] + np.arange(bh)[None, :, None]
            px, py = cols + 0.5, rows + 0.5
            weights = [coeffs[chunk, k, 0, None, None] * px + coeffs[chunk, k, 1, None, None] * py
                       + coeffs[chunk, k, 2, None, None] for k in range(3)]
            inside = ((weights[0] >= -1e-9) & (weights[1] >= -1e-9) & (weights[2] >= -1e-9)
                      & (cols <= col1[chunk, None, None]) & (rows <= row1[chunk, None, None]))
            n, r, q = np.nonzero(inside)
            w = np.stack([weights[k][n, r, q] for k in range(3)], axis=1)
            tri = chunk[n]
            found_pixel.append(rows[n, r, 0] * width + cols[n, 0, q])
            found_tri.append(tri)
            found_bary.append(w)
            found_depth.append(np.einsum("nk,nk->n", w, tri_depth[tri]))

    triangle = np.full(height * width, -1, np.int32)
    bary = np.zeros((height * width, 3), np.float32)
    zbuf = np.full(height * width, np.inf, np.float32)
    if found_pixel:
        pixel = np.concatenate(found_pixel)
        z = np.concatenate(found_depth)
        order = np.lexsort((z, pixel))                    # by pixel, nearest first
        first = order[np.unique(pixel[order], return_index=True)[1]]
        triangle[pixel[first]] = np.concatenate(found_tri)[first]
        bary[pixel[first]] = np.concatenate(found_bary)[first]
        zbuf[pixel[first]] = z[first]
    return Raster(triangle.reshape(height, width), bary.reshape(height, width, 3),
                  zbuf.reshape(height, width))
