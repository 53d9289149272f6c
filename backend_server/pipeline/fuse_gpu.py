"""`fuse.observe` on a CUDA GPU: several photos' Observations at once with nvdiffrast, through
the GpuBaker's cached UV raster (bake_gpu.py), by the same rule as the CPU adapter (seen: inside the
photo, facing the camera, not behind the z-buffer; weight: cos(view angle) x resolution factor).
Only the arrays come back to the CPU (float32: 48 MiB a photo at 2048²)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import Camera, vertex_normals
from ..models.topology import MeshTopology
from ..render.rasterize_cuda import rasterize_batch
from .bake import DEPTH_TOLERANCE_M, MIN_FACING_COS
from .bake_gpu import FACES_PER_PASS, GpuBaker, _padded_photo
from .fuse import FULL_RESOLUTION_PX_PER_M, Observation


def observe_gpu(baker: GpuBaker, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray],
                cameras: Sequence[Camera], topology: MeshTopology, size: int) -> list[Observation]:
    """photos: (H, W, 3) uint8 each; vertices: (V, 3) camera-frame metres of `topology`'s mesh."""
    observations: list[Observation] = []
    for start in range(0, len(photos), FACES_PER_PASS):
        stop = start + FACES_PER_PASS
        observations += _observe_pass(baker, photos[start:stop], vertices[start:stop], cameras[start:stop],
                                      topology, size)
    return observations


@torch.inference_mode()
def _observe_pass(baker: GpuBaker, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray],
                  cameras: Sequence[Camera], topology: MeshTopology, size: int) -> list[Observation]:
    device, count = baker.device, len(photos)
    uv = baker.uv_map(topology, size)
    height = -(-max(c.height for c in cameras) // 8) * 8
    width = -(-max(c.width for c in cameras) // 8) * 8
    attributes = np.stack([np.concatenate([c.project(v), v, vertex_normals(v, topology.triangles)], axis=1)
                           for v, c in zip(vertices, cameras)]).astype(np.float32)     # (B, V, 8)
    attributes_t = torch.as_tensor(attributes, device=device)
    screen, points = attributes_t[..., :2], attributes_t[..., 2:5]
    zbuffer = rasterize_batch(screen, -points[..., 2], baker.triangles(topology), width, height).depth

    per_texel = (attributes_t[:, uv.corners[:, 0]] * uv.bary[None, :, 0, None]
                 + attributes_t[:, uv.corners[:, 1]] * uv.bary[None, :, 1, None]
                 + attributes_t[:, uv.corners[:, 2]] * uv.bary[None, :, 2, None])
    xy, point, normal = per_texel[..., :2], per_texel[..., 2:5], per_texel[..., 5:8]
    distance = torch.sqrt((point * point).sum(-1).clamp_min(1e-24))
    facing = (normal * -point).sum(-1) / (torch.sqrt((normal * normal).sum(-1).clamp_min(1e-24)) * distance)
    limits = torch.tensor([[c.width, c.height] for c in cameras], dtype=torch.float32, device=device)
    inside = ((xy >= 0) & (xy < limits[:, None])).all(-1)
    col = xy[..., 0].floor().long().clamp(0, width - 1)
    row = xy[..., 1].floor().long().clamp(0, height - 1)
    depth_there = zbuffer.reshape(count, -1).gather(1, row * width + col)
    seen = inside & (facing > MIN_FACING_COS) & (-point[..., 2] <= depth_there + DEPTH_TOLERANCE_M)
    focal = torch.tensor([c.focal_px for c in cameras], dtype=torch.float32, device=device)[:, None]
    weight = torch.where(seen, facing * (focal / distance / FULL_RESOLUTION_PX_PER_M).clamp(max=1.0), 0.0)

    photo_batch = torch.stack([_padded_photo(p, height, width, device) for p in photos])  # (B, 3, H, W)
    grid = torch.stack([2.0 * xy[..., 0] / width - 1.0, 2.0 * xy[..., 1] / height - 1.0], -1)
    colours = F.grid_sample(photo_batch, grid[:, None], mode="bilinear", padding_mode="border",
                            align_corners=False)[:, :, 0].transpose(1, 2)                  # (B, N, 3)
    observed = torch.zeros((count, size * size, 3), dtype=torch.float32, device=device)
    texel_weight = torch.zeros((count, size * size), dtype=torch.float32, device=device)
    texel = uv.texel.expand(count, -1)
    observed.scatter_(1, texel[..., None].expand(-1, -1, 3), torch.where(seen[..., None], colours, 0.0))
    texel_weight.scatter_(1, texel, weight)
    observed_np = observed.reshape(count, size, size, 3).cpu().numpy()
    weight_np = texel_weight.reshape(count, size, size).cpu().numpy()
    return [Observation(observed_np[k], weight_np[k]) for k in range(count)]
