"""Stage 5 on a CUDA GPU: the same bake as `bake.bake_texture`, batched over faces, with nvdiffrast.

Per batch: the UV layout's raster (cached per topology and size), one z-buffer render of every
face in its own photo's camera, per-texel surface attributes, bilinear photo samples, mirror fill
and pull-push inpainting, all as torch operations on the GPU; only the uint8 textures come back.
Frames and conventions are those of `bake.py`. Precision: float32 throughout (float16 photo
samples moved the texture by up to 1 level, and the bake is not the bottleneck).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.topology import MeshTopology
from ..render.rasterize_cuda import rasterize_batch
from ..geometry import Camera, uv_to_texture_px, vertex_normals
from .bake import DEPTH_TOLERANCE_M, MIN_FACING_COS, Bake

FACES_PER_PASS = 4          # faces baked together: bounds GPU memory (~250 MB a face at 2048²)


@dataclass(frozen=True)
class UvMap:
    """Covered texels of a UV layout on the GPU: flat indices (N,), mirror texels (N,), each
    texel's triangle corners (N, 3) and barycentrics (N, 3)."""

    size: int
    texel: torch.Tensor
    mirror: torch.Tensor
    corners: torch.Tensor
    bary: torch.Tensor


class GpuBaker:
    """Bakes textures on one CUDA device; keeps UV rasters and triangle buffers per topology."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        self._uv_maps: dict[tuple[int, int], UvMap] = {}
        self._triangles: dict[int, torch.Tensor] = {}

    def warm_up(self, topology: MeshTopology, size: int) -> None:
        self.uv_map(topology, size)
        torch.cuda.synchronize(self.device)

    def triangles(self, topology: MeshTopology) -> torch.Tensor:
        key = id(topology)
        if key not in self._triangles:
            self._triangles[key] = torch.as_tensor(topology.triangles, dtype=torch.int32, device=self.device)
        return self._triangles[key]

    def uv_map(self, topology: MeshTopology, size: int) -> UvMap:
        key = (id(topology), size)
        if key not in self._uv_maps:
            uv_px = torch.as_tensor(uv_to_texture_px(topology.uvs, size), dtype=torch.float32,
                                    device=self.device)[None]
            raster = rasterize_batch(uv_px, torch.zeros(uv_px.shape[:2], device=self.device),
                                     self.triangles(topology), size, size)
            texel = torch.nonzero(raster.covered.reshape(-1)).squeeze(1)
            rows, cols = texel // size, texel % size
            corners = self.triangles(topology).long()[raster.triangle.reshape(-1)[texel]]
            self._uv_maps[key] = UvMap(size, texel, rows * size + (size - 1 - cols), corners,
                                       raster.bary.reshape(-1, 3)[texel])
        return self._uv_maps[key]

    def bake(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
             topology: MeshTopology, size: int, targets: Sequence[np.ndarray] | None = None) -> list[Bake]:
        """photos: (H, W, 3) uint8 each; vertices: (V, 3) camera-frame metres of `topology`'s mesh.

        targets: optional (size, size, 3) uint8 arrays (e.g. shared-memory slots) that receive the
        textures straight from the GPU; the returned Bakes then hold those arrays.
        """
        targets = targets or [np.empty((size, size, 3), np.uint8) for _ in photos]
        bakes: list[Bake] = []
        for start in range(0, len(photos), FACES_PER_PASS):
            stop = start + FACES_PER_PASS
            bakes += self._bake_pass(photos[start:stop], vertices[start:stop], cameras[start:stop],
                                     topology, size, targets[start:stop])
        return bakes

    @torch.inference_mode()
    def _bake_pass(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
                   topology: MeshTopology, size: int, targets: Sequence[np.ndarray]) -> list[Bake]:
        device, count = self.device, len(photos)
        uv = self.uv_map(topology, size)
        height = -(-max(c.height for c in cameras) // 8) * 8
        width = -(-max(c.width for c in cameras) // 8) * 8
        attributes = np.stack([np.concatenate([c.project(v), v, vertex_normals(v, topology.triangles)], axis=1)
                               for v, c in zip(vertices, cameras)]).astype(np.float32)     # (B, V, 8)
        attributes = torch.as_tensor(attributes, device=device)
        screen, points = attributes[..., :2], attributes[..., 2:5]
        zbuffer = rasterize_batch(screen, -points[..., 2], self.triangles(topology), width, height).depth

        per_texel = (attributes[:, uv.corners[:, 0]] * uv.bary[None, :, 0, None]
                     + attributes[:, uv.corners[:, 1]] * uv.bary[None, :, 1, None]
                     + attributes[:, uv.corners[:, 2]] * uv.bary[None, :, 2, None])
        xy, point, normal = per_texel[..., :2], per_texel[..., 2:5], per_texel[..., 5:8]
        facing = (normal * -point).sum(-1) / torch.sqrt(
            ((normal * normal).sum(-1) * (point * point).sum(-1)).clamp_min(1e-24))
        limits = torch.tensor([[c.width, c.height] for c in cameras], dtype=torch.float32, device=device)
        inside = ((xy >= 0) & (xy < limits[:, None])).all(-1)
        col = xy[..., 0].floor().long().clamp(0, width - 1)
        row = xy[..., 1].floor().long().clamp(0, height - 1)
        depth_there = zbuffer.reshape(count, -1).gather(1, row * width + col)
        seen = inside & (facing > MIN_FACING_COS) & (-point[..., 2] <= depth_there + DEPTH_TOLERANCE_M)

        photo_batch = torch.stack([_padded_photo(p, height, width, device) for p in photos])  # (B, 3, H, W)
        grid = torch.stack([2.0 * xy[..., 0] / width - 1.0, 2.0 * xy[..., 1] / height - 1.0], -1)
        colours = F.grid_sample(photo_batch, grid[:, None], mode="bilinear", padding_mode="border",
                                align_corners=False)[:, :, 0].transpose(1, 2)              # (B, N, 3)

        flat = torch.zeros((count, size * size, 3), dtype=torch.float32, device=device)
        known = torch.zeros((count, size * size), dtype=torch.bool, device=device)
        texel = uv.texel.expand(count, -1)
        flat.scatter_(1, texel[..., None].expand(-1, -1, 3), torch.where(seen[..., None], colours, 0.0))
        known.scatter_(1, texel, seen)
        use_mirror = ~known.gather(1, texel) & known.gather(1, uv.mirror.expand(count, -1))
        use_mirror &= topology.uv_mirror_symmetric
        mirrored = flat.gather(1, uv.mirror.expand(count, -1)[..., None].expand(-1, -1, 3))
        current = flat.gather(1, texel[..., None].expand(-1, -1, 3))
        flat.scatter_(1, texel[..., None].expand(-1, -1, 3), torch.where(use_mirror[..., None], mirrored, current))
        known.scatter_(1, texel, known.gather(1, texel) | use_mirror)

        image = flat.reshape(count, size, size, 3).permute(0, 3, 1, 2)
        filled = pull_push_fill_gpu(image, known.reshape(count, 1, size, size))
        textures = filled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        for texture, target in zip(textures, targets):
            torch.from_numpy(target).copy_(texture)
        covered = max(int(uv.texel.numel()), 1)
        seen_fraction = (seen.sum(1).float() / covered).tolist()
        mirrored_fraction = (use_mirror.sum(1).float() / covered).tolist()
        return [Bake(targets[k], seen_fraction[k], mirrored_fraction[k]) for k in range(count)]


def _padded_photo(rgb: np.ndarray, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, height, width) float32 on the GPU, edge pixels repeated right and down."""
    photo = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(device).permute(2, 0, 1)[None].float()
    return F.pad(photo, (0, width - rgb.shape[1], 0, height - rgb.shape[0]), mode="replicate")[0]


def pull_push_fill_gpu(image: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """`bake.pull_push_fill` for (B, C, S, S) images, S a power of two: known pixels keep their values.

    Pull: 2x2 area averages of colour*weight and weight (cv2 INTER_AREA halving); push: bilinear
    upsampling with half-pixel centres (cv2 INTER_LINEAR), blended by the level's weight.
    """
    weight = known.float()
    colour = image * weight
    levels = []
    while min(weight.shape[-2:]) > 1:
        colour, weight = F.avg_pool2d(colour, 2), F.avg_pool2d(weight, 2)
        levels.append((colour, weight))
    filled = levels[-1][0] / levels[-1][1].clamp_min(1e-8)
    for colour, weight in reversed(levels[:-1]):
        upsampled = F.interpolate(filled, size=weight.shape[-2:], mode="bilinear", align_corners=False)
        alpha = weight.clamp(max=1.0)
        filled = colour / weight.clamp_min(1e-8) * alpha + upsampled * (1 - alpha)
    upsampled = F.interpolate(filled, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return torch.where(known, image, upsampled)
