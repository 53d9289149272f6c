"""CUDA triangle rasterizer (nvdiffrast), batched; same contract as `rasterize.rasterize` on the CPU.

Screen frame: pixels, x right, y down, origin top-left, pixel (row r, column c) sampled at its
centre (c + 0.5, r + 0.5); barycentrics linear in screen space; smaller depth is nearer. The
screen maps to nvdiffrast's clip space with w = 1: x_clip = 2x/W - 1, y_clip = 2y/H - 1 (so
output row 0 is screen row 0), z_clip = 2 depth/DEPTH_RANGE_M - 1 (fixed, so that a face rasterizes
the same whatever else shares its batch).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .rasterize import Raster

DEPTH_RANGE_M = 100.0        # depths (metres, or any unit) from 0 to this map to z_clip -1..1
_contexts: dict[int, object] = {}


@lru_cache(maxsize=1)
def load_nvdiffrast():
    """Import nvdiffrast.torch, once per process (its CUDA plugin compiles on first use, ~35 s, and is
    cached on disk). With torch 2.11 nvdiffrast 0.3.3 builds the plugin but then cannot import it, because the build
    folder is not on sys.path; putting it there first fixes that.
    """
    import nvdiffrast
    import nvdiffrast.torch as dr
    from torch.utils import cpp_extension
    from nvdiffrast.torch.ops import sanitize_name
    plugin = sanitize_name(f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
    build_dir = cpp_extension._get_build_directory(plugin, False)
    if build_dir not in sys.path:
        sys.path.insert(0, build_dir)
    return dr


def build_plugin() -> None:
    """Compile (or load from the disk cache) nvdiffrast's CUDA plugin in this process; call it in a
    parent before starting GPU worker processes so they do not all compile it at once."""
    load_nvdiffrast().ops._get_plugin()


def context(device: torch.device):
    """One nvdiffrast CUDA rasterizer context per device, created on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _contexts:
        _contexts[index] = load_nvdiffrast().RasterizeCudaContext(device=device)
    return _contexts[index]


@dataclass(frozen=True)
class RasterBatch:
    """Per image and pixel: nearest triangle (-1: none), barycentrics of its 3 vertices and depth
    (inf where empty). Tensors on the rasterizing device."""

    triangle: torch.Tensor   # (B, H, W) int64
    bary: torch.Tensor       # (B, H, W, 3) float32
    depth: torch.Tensor      # (B, H, W) float32

    @property
    def covered(self) -> torch.Tensor:
        return self.triangle >= 0


def rasterize_batch(xy: torch.Tensor, depth: torch.Tensor, triangles: torch.Tensor, width: int,
                    height: int) -> RasterBatch:
    """xy: (B, V, 2) screen pixels; depth: (B, V) in [0, DEPTH_RANGE_M); triangles: (F, 3) int32 on the
    same CUDA device.

    Images of different sizes share one batch: pass the largest width/height and keep each image's
    pixels in its top-left corner.
    """
    dr = load_nvdiffrast()
    batch = xy.shape[0]
    depth_range = DEPTH_RANGE_M
    clip = torch.empty((batch, xy.shape[1], 4), dtype=torch.float32, device=xy.device)
    clip[..., 0] = 2.0 * xy[..., 0] / width - 1.0
    clip[..., 1] = 2.0 * xy[..., 1] / height - 1.0
    clip[..., 2] = 2.0 * depth / depth_range - 1.0
    clip[..., 3] = 1.0
    raster, _ = dr.rasterize(context(xy.device), clip.contiguous(), triangles, resolution=[height, width])
    u, v, z, tri = raster.unbind(-1)
    triangle = tri.to(torch.int64) - 1
    covered = triangle >= 0
    bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * covered[..., None]
    metres = torch.where(covered, (z + 1.0) * 0.5 * depth_range, torch.full_like(z, float("inf")))
    return RasterBatch(triangle, bary, metres)


def rasterize_on(device: str, xy: np.ndarray, depth: np.ndarray, triangles: np.ndarray, width: int,
                 height: int) -> Raster:
    """One image rasterized on a CUDA device, returned as the CPU rasterizer's `Raster` (numpy)."""
    target = torch.device(device)
    raster = rasterize_batch(torch.as_tensor(xy, dtype=torch.float32, device=target)[None],
                             torch.as_tensor(depth, dtype=torch.float32, device=target)[None],
                             torch.as_tensor(triangles, dtype=torch.int32, device=target), width, height)
    return Raster(raster.triangle[0].to(torch.int32).cpu().numpy(), raster.bary[0].cpu().numpy(),
                  raster.depth[0].cpu().numpy())
