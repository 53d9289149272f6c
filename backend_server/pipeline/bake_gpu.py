"""Stage 5 on a CUDA GPU: the same bake as `bake.bake_texture`, batched over faces, with nvdiffrast.

Per batch: the UV layout's raster (cached per topology and size), one z-buffer render of every
face in its own photo's camera, per-vertex photo samples for the lighting fit
(`lighting.fit_lighting_torch`, the batched twin of the CPU's fit), per-texel observation and
weight, and the completion (`complete_texture_gpu`, the torch twin of `complete.complete_texture`),
all as torch operations on the GPU with no host synchronisation before the end; only the uint8
textures, the lightings and the seen shares (and, on request, the observations) come back.
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
from ..geometry import Camera, uv_to_texture_px
from ..render.shade import SRGB8_OF_LINEAR, SRGB_LUT_SIZE, sh_basis_torch
from .bake import (CLIP_END_LINEAR, CLIP_START_LINEAR, DEPTH_TOLERANCE_M, FULL_FACING_COS, LINEAR_OF_SRGB8,
                   MIN_FACING_COS, SHADOW_SHADING, Bake, Observation)
from .complete import DETAIL_GAIN, DETAIL_PATCH_FRACTION, FULL_WEIGHT, LOW_CELLS, seen_border_torch
from .lighting import MIN_SHADING, Lighting, fit_lighting_torch

FACES_PER_PASS = 8          # faces baked together: ~250 MB of GPU memory a face at 2048²; a pass launches
                            # ~700 kernels whatever its size, so larger passes keep the GPU fed


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

    def __init__(self, device: str, faces_per_pass: int = FACES_PER_PASS) -> None:
        self.device = torch.device(device)
        self.faces_per_pass = faces_per_pass
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
             topology: MeshTopology, size: int, targets: Sequence[np.ndarray] | None = None,
             skins: Sequence[np.ndarray | None] | None = None, delit: bool = True,
             keep_observation: bool = False) -> list[Bake]:
        """photos: (H, W, 3) uint8 each; vertices: (V, 3) camera-frame metres of `topology`'s mesh.

        targets: optional (size, size, 3) uint8 arrays (e.g. shared-memory slots) that receive the
        textures straight from the GPU; the returned Bakes then hold those arrays.
        """
        targets = targets or [np.empty((size, size, 3), np.uint8) for _ in photos]
        skins = skins if skins is not None else [None] * len(photos)
        bakes: list[Bake] = []
        for start in range(0, len(photos), self.faces_per_pass):
            stop = start + self.faces_per_pass
            bakes += self._bake_pass(photos[start:stop], vertices[start:stop], cameras[start:stop],
                                     topology, size, targets[start:stop], skins[start:stop], delit, keep_observation)
        return bakes

    @torch.inference_mode()
    def observe(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
                topology: MeshTopology, size: int, skins: Sequence[np.ndarray | None] | None = None,
                delit: bool = True) -> list[Observation]:
        """Steps 1 and 2, not completed; the Observations' arrays stay on this device as tensors
        (fuse.py fuses them there): observed (size, size, 3) and texel_weight (size, size) float32."""
        skins = skins if skins is not None else [None] * len(photos)
        out: list[Observation] = []
        for start in range(0, len(photos), self.faces_per_pass):
            stop = start + self.faces_per_pass
            observed, texel_weight, light = self._observe_pass(
                photos[start:stop], vertices[start:stop], cameras[start:stop], topology, size, skins[start:stop], delit)
            out += [Observation(o.reshape(size, size, 3), w.reshape(size, size), lighting)
                    for o, w, lighting in zip(observed, texel_weight, _lightings(light))]
        return out

    @torch.inference_mode()
    def complete(self, observed: np.ndarray | torch.Tensor, texel_weight: np.ndarray | torch.Tensor,
                 mirror_symmetric: bool, keep_seen: bool = False) -> np.ndarray:
        """`complete.complete_texture` on this device (`complete_texture_gpu`): observed (S, S, 3)
        float32 linear RGB, texel_weight (S, S) float32 (numpy, or tensors already here) -> (S, S, 3)
        uint8 sRGB."""
        observed_t = torch.as_tensor(observed, dtype=torch.float32, device=self.device)
        weight_t = torch.as_tensor(texel_weight, dtype=torch.float32, device=self.device)
        texture = complete_texture_gpu(observed_t.permute(2, 0, 1)[None], weight_t[None, None], mirror_symmetric,
                                       keep_seen)
        return texture[0].cpu().numpy()

    @torch.inference_mode()
    def _bake_pass(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
                   topology: MeshTopology, size: int, targets: Sequence[np.ndarray],
                   skins: Sequence[np.ndarray | None], delit: bool, keep_observation: bool) -> list[Bake]:
        """Everything on the GPU with no host synchronisation until the textures come back."""
        device, count, uv = self.device, len(photos), self.uv_map(topology, size)
        observed, texel_weight, light = self._observe_pass(photos, vertices, cameras, topology, size, skins, delit)
        texel = uv.texel.expand(count, -1)

        # Step 3: complete; then the one wait for the GPU, as the textures come back.
        observed_image = observed.reshape(count, size, size, 3).permute(0, 3, 1, 2)
        weight_image = texel_weight.reshape(count, 1, size, size)
        textures = complete_texture_gpu(observed_image, weight_image, topology.uv_mirror_symmetric,
                                        keep_seen=not delit)
        covered = max(int(uv.texel.numel()), 1)
        known = texel_weight > 0
        fractions = [known.sum(1).float() / covered]
        if topology.uv_mirror_symmetric:
            unseen_with_mirror = ~known.gather(1, texel) & known.gather(1, uv.mirror.expand(count, -1))
            fractions.append(unseen_with_mirror.sum(1).float() / covered)
        else:
            fractions.append(torch.zeros(count, device=device))
        for texture, target in zip(textures, targets):
            torch.from_numpy(target).copy_(texture)
        seen_fraction, mirrored_fraction = torch.stack(fractions).cpu().tolist()
        lightings = _lightings(light)
        out = []
        for k in range(count):
            kept = ((observed[k].reshape(size, size, 3).cpu().numpy(),
                     texel_weight[k].reshape(size, size).cpu().numpy()) if keep_observation else (None, None))
            out.append(Bake(targets[k], seen_fraction[k], mirrored_fraction[k], lightings[k], *kept))
        return out

    def _observe_pass(self, photos: Sequence[np.ndarray], vertices: Sequence[np.ndarray], cameras: Sequence[Camera],
                      topology: MeshTopology, size: int, skins: Sequence[np.ndarray | None], delit: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Steps 1 and 2 for up to faces_per_pass faces, queued on this device with no wait:
        observed (B, size², 3) and texel_weight (B, size²) float32, and the lighting fit's tensors
        (`_lightings` makes them Lightings)."""
        device, count = self.device, len(photos)
        uv = self.uv_map(topology, size)
        height = -(-max(c.height for c in cameras) // 8) * 8
        width = -(-max(c.width for c in cameras) // 8) * 8
        mesh = torch.as_tensor(np.stack(vertices), dtype=torch.float32, device=device)                  # (B, V, 3)
        camera = torch.tensor([[c.focal_px, c.cx, c.cy] for c in cameras], dtype=torch.float32, device=device)
        normals, areas = _normals_and_areas(mesh, self.triangles(topology).long())
        depth = -mesh[..., 2]                                                                            # (B, V)
        screen = torch.stack([camera[:, 1, None] + camera[:, 0, None] * mesh[..., 0] / depth,
                              camera[:, 2, None] - camera[:, 0, None] * mesh[..., 1] / depth], -1)      # (B, V, 2)
        facing = -(normals * mesh).sum(-1) / mesh.norm(dim=-1).clamp_min(1e-12)
        zbuffer = rasterize_batch(screen, depth, self.triangles(topology), width, height).depth      # (B, H, W)

        lut = torch.as_tensor(LINEAR_OF_SRGB8, device=device)
        photo_batch = torch.stack([lut[_padded_photo(p, height, width, device).long()] for p in photos])  # (B, 3, H, W)
        skin_batch = torch.stack([_padded_skin(k, height, width, device) for k in skins])                # (B, 1, H, W)
        limits = torch.tensor([[c.width, c.height] for c in cameras], dtype=torch.float32, device=device)

        def sample(xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(B, N, 2) photo pixels -> colours (B, N, 3) linear, skin (B, N), inside the z-buffer test's pixel."""
            grid = torch.stack([2.0 * xy[..., 0] / width - 1.0, 2.0 * xy[..., 1] / height - 1.0], -1)[:, None]
            colour = F.grid_sample(photo_batch, grid, mode="bilinear", padding_mode="border",
                                   align_corners=False)[:, :, 0].transpose(1, 2)
            skin = F.grid_sample(skin_batch, grid, mode="bilinear", padding_mode="border",
                                 align_corners=False)[:, 0, 0]
            col = xy[..., 0].floor().long().clamp(0, width - 1)
            row = xy[..., 1].floor().long().clamp(0, height - 1)
            inside = ((xy >= 0) & (xy < limits[:, None])).all(-1)
            depth_there = zbuffer.reshape(count, -1).gather(1, row * width + col)
            return colour, skin, torch.where(inside, depth_there, torch.full_like(depth_there, -1e9))

        # Step 1: the lighting, fitted per face on its vertices (as bake.lighting_from_vertices).
        colour_v, skin_v, depth_there = sample(screen)
        seen_v = (facing > MIN_FACING_COS) & (depth <= depth_there + DEPTH_TOLERANCE_M)
        weight_v = (areas * seen_v * _ramp(facing, MIN_FACING_COS, FULL_FACING_COS)
                    * _ramp(colour_v.amax(-1), CLIP_END_LINEAR, CLIP_START_LINEAR) * skin_v)
        sh, rms, points = fit_lighting_torch(colour_v, normals, weight_v)
        shading = (sh_basis_torch(normals) @ sh.float().transpose(1, 2)).clamp_min(MIN_SHADING)    # (B, V, 3)
        attributes = torch.cat([screen, depth[..., None], facing[..., None], shading], 2)            # (B, V, 7)

        # Step 2: observe every covered texel.
        per_texel = (attributes[:, uv.corners[:, 0]] * uv.bary[None, :, 0, None]
                     + attributes[:, uv.corners[:, 1]] * uv.bary[None, :, 1, None]
                     + attributes[:, uv.corners[:, 2]] * uv.bary[None, :, 2, None])
        xy, texel_depth, texel_facing, texel_shading = (per_texel[..., :2], per_texel[..., 2], per_texel[..., 3],
                                                        per_texel[..., 4:7])
        colours, skin, depth_at = sample(xy)
        seen = (texel_facing > MIN_FACING_COS) & (texel_depth <= depth_at + DEPTH_TOLERANCE_M)
        weight = seen * _ramp(texel_facing, MIN_FACING_COS, FULL_FACING_COS)
        if delit:                   # the lit texture weighs by the view angle only (bake.observe_texels)
            weight = (weight * _ramp(colours.amax(-1), CLIP_END_LINEAR, CLIP_START_LINEAR)
                      * _ramp(texel_shading.amin(-1), 0.0, SHADOW_SHADING) * skin)
            colours = colours / texel_shading.clamp_min(MIN_SHADING)
        colours = torch.where(weight[..., None] > 0, colours, 0.0)
        observed = torch.zeros((count, size * size, 3), dtype=torch.float32, device=device)
        texel_weight = torch.zeros((count, size * size), dtype=torch.float32, device=device)
        texel = uv.texel.expand(count, -1)
        observed.scatter_(1, texel[..., None].expand(-1, -1, 3), colours)
        texel_weight.scatter_(1, texel, weight)
        del per_texel, colours, skin, depth_at
        return observed, texel_weight, (sh, rms, points)


def _lightings(light: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[Lighting]:
    """`_observe_pass`'s lighting tensors (sh, rms, points) -> one Lighting per face (waits for the GPU)."""
    return Lighting.from_arrays(*(part.cpu().numpy() for part in light))


def _normals_and_areas(mesh: torch.Tensor, triangles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V, 3) vertices, (T, 3) int64 triangles -> area-weighted unit normals (B, V, 3) (as
    geometry.vertex_normals) and a third of the area around each vertex (B, V) (bake.vertex_areas)."""
    a, b, c = (mesh[:, triangles[:, k]] for k in range(3))
    face = torch.linalg.cross(b - a, c - a)                                                      # (B, T, 3)
    third_area = face.norm(dim=-1) / 6.0
    normals = torch.zeros_like(mesh)
    areas = torch.zeros(mesh.shape[:2], dtype=mesh.dtype, device=mesh.device)
    for k in range(3):
        normals.index_add_(1, triangles[:, k], face)
        areas.index_add_(1, triangles[:, k], third_area)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12), areas


def _ramp(values: torch.Tensor, start: float, end: float) -> torch.Tensor:
    return ((values - start) / (end - start)).clamp(0.0, 1.0)


def _padded_skin(skin: np.ndarray | None, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W) uint8 skin probability (None: all skin) -> (1, height, width) float32 0..1, edges repeated."""
    if skin is None:
        return torch.ones((1, height, width), dtype=torch.float32, device=device)
    mask = torch.from_numpy(np.ascontiguousarray(skin)).to(device)[None, None].float() / 255.0
    return F.pad(mask, (0, width - skin.shape[1], 0, height - skin.shape[0]), mode="replicate")[0]


def _area_mean(image: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, S / cell, S / cell) means over cell x cell blocks (F.avg_pool2d(image, cell),
    cv2 INTER_AREA for whole cells) as one reduction: avg_pool2d's kernel loops over the cell per
    output and took 8.5 ms for 4 x 2048² at cell 128 on an H100, this 0.05 ms."""
    rows, cols = image.shape[-2] // cell, image.shape[-1] // cell
    return image.unflatten(-1, (cols, cell)).unflatten(-3, (rows, cell)).mean((-1, -3))


def feathered_gpu(weight: torch.Tensor) -> torch.Tensor:
    """complete.feathered for (B, 1, S, S)."""
    return (weight / FULL_WEIGHT).clamp(0, 1) * seen_border_torch(weight[:, 0])[:, None]


def coarse_band_gpu(observed: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """complete.coarse_band for (B, 3, S, S) and (B, 1, S, S)."""
    cell = weight.shape[-1] // min(LOW_CELLS, weight.shape[-1])
    colour = _area_mean(observed * weight, cell)
    cell_weight = _area_mean(weight, cell)
    return pull_push_fill_gpu(colour / cell_weight.clamp_min(1e-8), cell_weight > 0, cell_weight), cell_weight


def _patches(image: torch.Tensor, top: torch.Tensor, left: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, patch, patch): each image's patch at its own (top, left) ((B,) int64
    on the device), gathered without reading the corners back to the host."""
    steps = torch.arange(patch, device=image.device)
    rows, cols = top[:, None] + steps, left[:, None] + steps                                  # (B, patch)
    batch = torch.arange(len(image), device=image.device)[:, None, None]
    return image[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def complete_texture_gpu(observed: torch.Tensor, weight: torch.Tensor, mirror_symmetric: bool,
                         keep_seen: bool = False) -> torch.Tensor:
    """complete.complete_texture on a batch: observed (B, 3, S, S) float32 linear RGB (finite),
    weight (B, 1, S, S) float32 -> (B, S, S, 3) uint8 sRGB; no host synchronisation."""
    size = observed.shape[-1]
    coarse, cell_weight = coarse_band_gpu(observed, weight)
    low = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    seen = feathered_gpu(weight)
    patch = size // DETAIL_PATCH_FRACTION
    cells = torch.round(_area_mean(seen, patch), decimals=4).flatten(1)                 # (B, 16 * 16)
    best = cells.argmax(1)                                                                 # first of equals
    top, left = (best // DETAIL_PATCH_FRACTION) * patch, (best % DETAIL_PATCH_FRACTION) * patch
    detail = DETAIL_GAIN * (_patches(observed, top, left, patch) - _patches(low, top, left, patch)) \
        * (_patches(weight, top, left, patch) > 0)
    block = torch.cat([torch.cat([detail, detail.flip(-1)], -1),
                       torch.cat([detail.flip(-2), detail.flip(-2).flip(-1)], -1)], -2)
    reps = -(-size // block.shape[-1])
    fill = low + block.repeat(1, 1, reps, reps)[..., :size, :size]
    if mirror_symmetric:
        both = torch.minimum(cell_weight, cell_weight.flip(-1))
        mirrored = feathered_gpu(weight.flip(-1))
        offset = pull_push_fill_gpu((coarse - coarse.flip(-1)) * (both > 0), both > 0, both)     # 0 if none both saw
        step = observed.flip(-1) - fill + F.interpolate(offset, size=(size, size), mode="bilinear",
                                                        align_corners=False)
        fill = fill + mirrored * step
    if keep_seen:
        seen = (weight > 0).float()
    texture = fill + seen * (observed - fill)
    lut = torch.as_tensor(SRGB8_OF_LINEAR, device=observed.device)
    index = (texture.clamp(0, 1) * (SRGB_LUT_SIZE - 1) + 0.5).long()
    return lut[index].permute(0, 2, 3, 1).contiguous()


def _padded_photo(rgb: np.ndarray, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, height, width) float32 on the GPU, edge pixels repeated right and down."""
    photo = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(device).permute(2, 0, 1)[None].float()
    return F.pad(photo, (0, width - rgb.shape[1], 0, height - rgb.shape[0]), mode="replicate")[0]


def pull_push_fill_gpu(image: torch.Tensor, known: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """`bake.pull_push_fill` for (B, C, S, S) images, S a power of two: known pixels keep their values;
    weights (B, 1, S, S): how much each known pixel counts in the coarser levels (default 1).

    Pull: 2x2 area averages of colour*weight and weight (cv2 INTER_AREA halving); push: bilinear
    upsampling with half-pixel centres (cv2 INTER_LINEAR), blended by the level's weight.
    """
    weight = known.float() if weights is None else weights.float()
    colour = image * weight
    levels = []
    while min(weight.shape[-2:]) > 1:
        colour, weight = _area_mean(colour, 2), _area_mean(weight, 2)
        levels.append((colour, weight))
    filled = levels[-1][0] / levels[-1][1].clamp_min(1e-8)
    for colour, weight in reversed(levels[:-1]):
        upsampled = F.interpolate(filled, size=weight.shape[-2:], mode="bilinear", align_corners=False)
        alpha = weight.clamp(max=1.0)
        filled = colour / weight.clamp_min(1e-8) * alpha + upsampled * (1 - alpha)
    upsampled = F.interpolate(filled, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return torch.where(known, image, upsampled)
