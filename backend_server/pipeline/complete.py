"""Stage 5b, complete: what the photo contributed per texel -> a whole, seamless UV texture.

Input (`bake.Bake.observed` / `texel_weight`, or a fusion of several photos' observations):
observed (S, S, 3) float32 linear RGB (any finite value where the weight is 0), texel_weight (S, S)
float32 in [0, 1]. Texture frame of `bake.py` (row 0 at the top, UV origin bottom-left). S a power
of two >= 256.

Two frequency bands (a two-level Laplacian blend) so that colour and fine texture both continue:
1. low: the weighted observation averaged into LOW_CELLS x LOW_CELLS cells, pull-push filled
   (`bake.pull_push_fill`, weighted) and bilinearly upsampled: the skin tone everywhere, equal to
   the observation's local mean where it was seen and continuing it smoothly where not;
2. mirror (left/right symmetric layouts only): an unseen texel whose mirror texel (u -> 1 - u) was
   seen takes the mirror's colour plus a colour-equalising offset: the low band's difference
   between here and there, measured on the cells both sides saw and pull-push extended (smooth);
3. detail elsewhere: the fine texture (observation minus low band) of the best-seen patch
   (DETAIL_PATCH of the texture's side), tiled with alternate flips, added to the low band;
4. blend: observed x a + fill x (1 - a), a = min(1, weight / FULL_WEIGHT) feathered to 0 over
   FEATHER of the side at the border of the seen texels (and likewise the mirror source), so the
   border between seen and filled texels has no step in colour nor in texture (`keep_seen`,
   for the lit texture: a = 1 wherever the weight is > 0, the photo kept exactly).
Output: (S, S, 3) uint8 sRGB. The GPU twin (`bake_gpu.complete_texture_gpu`) does the same maths
on batches with torch (box filters, area averages and bilinear resizes equal to OpenCV's).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..render.shade import srgb8_of_linear
from .bake import pull_push_fill

LOW_CELLS = 64                  # low band cells across the texture (32 texels each at 2048²)
FULL_WEIGHT = 0.5               # weights at or above this count fully
FEATHER_FRACTION = 128          # feather width: the side / this (box filter; 16 texels at 2048²)
DETAIL_PATCH_FRACTION = 16      # detail patch side: the side / this
BAND_ROWS = 512                 # rows blended at once (bounds the temporaries at 8192²)
DETAIL_GAIN = 0.8               # fine texture added to the filled texels, of the patch's own amplitude


def coarse_band(observed: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weighted observation's means over LOW_CELLS x LOW_CELLS cells, pull-push filled
    ((C, C, 3) float32), and the cells' mean weights ((C, C) float32)."""
    cells = min(LOW_CELLS, weight.shape[0])
    colour = cv2.resize(observed * weight[..., None], (cells, cells), interpolation=cv2.INTER_AREA)
    cell_weight = cv2.resize(weight, (cells, cells), interpolation=cv2.INTER_AREA)
    return pull_push_fill(colour / np.maximum(cell_weight, 1e-8)[..., None], cell_weight > 0, cell_weight), cell_weight


def upsampled(coarse: np.ndarray, size: int) -> np.ndarray:
    """(C, C, 3) -> (size, size, 3) float32, bilinear (half-pixel centres)."""
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, 3)


def border_kernel(size: int, fraction: int) -> int:
    """The odd box-filter side of `seen_border` (and its torch twin) for a side of `size` texels."""
    return 2 * max(1, size // fraction // 2) + 1


def seen_border(weight: np.ndarray, fraction: int = FEATHER_FRACTION) -> np.ndarray:
    """(S, S) float32: 1 inside the seen texels (weight > 0), falling to 0 over about the side /
    `fraction` / 2 texels toward their border (a box filter of the side / `fraction`), 0 outside."""
    kernel = border_kernel(weight.shape[0], fraction)
    inside: np.ndarray = cv2.blur((weight > 0).astype(np.float32), (kernel, kernel),
                                  borderType=cv2.BORDER_REFLECT_101)
    return np.clip(2 * inside - 1, 0, 1)


def seen_border_torch(weight: torch.Tensor, fraction: int = FEATHER_FRACTION) -> torch.Tensor:
    """`seen_border` of (B, S, S) float32 weights on their device -> (B, S, S) float32: on the CPU
    `seen_border` itself (OpenCV's box filter: 10x faster than torch's there at 3 x 2048²), on a GPU
    the same box filter (BORDER_REFLECT_101) as a row pass and a column pass."""
    if weight.device.type == "cpu":
        return torch.from_numpy(np.stack([seen_border(w, fraction) for w in weight.numpy()]))
    kernel = border_kernel(weight.shape[-1], fraction)
    radius = kernel // 2
    seen = (weight > 0).float()[:, None]
    rows = F.avg_pool2d(F.pad(seen, (radius, radius, 0, 0), mode="reflect"), (1, kernel), stride=1)
    inside = F.avg_pool2d(F.pad(rows, (0, 0, radius, radius), mode="reflect"), (kernel, 1), stride=1)[:, 0]
    return (2 * inside - 1).clamp(0, 1)


def feathered(weight: np.ndarray) -> np.ndarray:
    """(S, S) float32 blend factor: min(1, weight / FULL_WEIGHT), falling to 0 at the seen border."""
    return np.clip(weight / FULL_WEIGHT, 0, 1) * seen_border(weight)


def detail_origin(weight: np.ndarray) -> tuple[int, int]:
    """(row, column) of the top-left corner of the best-seen detail patch: the patch-sized cell
    with the highest mean feathered weight (first in row-major order among equals)."""
    size = weight.shape[0]
    patch = size // DETAIL_PATCH_FRACTION
    cells = cv2.resize(weight, (DETAIL_PATCH_FRACTION, DETAIL_PATCH_FRACTION), interpolation=cv2.INTER_AREA)
    best = int(np.argmax(np.round(cells, 4)))
    return (best // DETAIL_PATCH_FRACTION) * patch, (best % DETAIL_PATCH_FRACTION) * patch


def tiled(patch: np.ndarray, size: int) -> np.ndarray:
    """(P, P, C) patch -> (size, size, C): tiles flipped alternately so neighbours meet mirrored."""
    block = np.concatenate([np.concatenate([patch, patch[:, ::-1]], 1),
                            np.concatenate([patch[::-1], patch[::-1, ::-1]], 1)], 0)
    reps = -(-size // block.shape[0])
    return np.tile(block, (reps, reps, 1))[:size, :size]


def complete_texture(observed: np.ndarray, texel_weight: np.ndarray, mirror_symmetric: bool,
                     keep_seen: bool = False) -> np.ndarray:
    """observed: (S, S, 3) float32 linear RGB, any finite value where texel_weight is 0; texel_weight:
    (S, S) float32 0..1; mirror_symmetric: the UV layout is left/right symmetric (the topology's
    `uv_mirror_symmetric`); keep_seen: every texel with weight > 0 keeps its observation exactly
    (blend factor 1, no feathering: the lit texture, which must reproduce the photo), only unseen
    texels are completed. Returns the (S, S, 3) uint8 sRGB texture (see the module docstring).
    Memory: three (S, S, 3) float32 arrays besides the inputs; the blends run in row bands."""
    size = texel_weight.shape[0]
    weight = np.ascontiguousarray(texel_weight, np.float32)
    coarse, cell_weight = coarse_band(observed, weight)
    offset: np.ndarray | None = None
    mirrored: np.ndarray | None = None
    if mirror_symmetric:
        both = np.minimum(cell_weight, cell_weight[:, ::-1])
        if both.any():
            difference = np.ascontiguousarray(coarse - coarse[:, ::-1])
            offset = upsampled(pull_push_fill(difference * (both > 0)[..., None], both > 0, both), size)
        mirrored = feathered(np.ascontiguousarray(weight[:, ::-1]))
    low = upsampled(coarse, size)
    seen = feathered(weight)
    row, col = detail_origin(seen)
    if keep_seen:
        seen = (weight > 0).astype(np.float32)
    patch = size // DETAIL_PATCH_FRACTION
    detail = DETAIL_GAIN * (observed[row:row + patch, col:col + patch] - low[row:row + patch, col:col + patch]) \
        * (weight[row:row + patch, col:col + patch, None] > 0)
    fill = low                                                  # the low band becomes the fill, in place
    block = tiled(detail, 2 * patch)
    for top in range(0, size, 2 * patch):
        for left in range(0, size, 2 * patch):
            fill[top:top + 2 * patch, left:left + 2 * patch] += block[:size - top, :size - left]
    texture = np.empty((size, size, 3), np.uint8)
    for top in range(0, size, BAND_ROWS):
        rows = slice(top, top + BAND_ROWS)
        band = fill[rows]                                       # a view: fill is not needed afterwards
        if mirrored is not None:
            step = observed[rows, ::-1] - band
            if offset is not None:
                step += offset[rows]
            step *= mirrored[rows, :, None]
            band += step
        step = observed[rows] - band
        step *= seen[rows, :, None]
        band += step
        texture[rows] = srgb8_of_linear(band)
    return texture


def mirrored_fraction(texel_weight: np.ndarray | torch.Tensor, covered: np.ndarray | torch.Tensor,
                      mirror_symmetric: bool) -> float:
    """Share of the covered texels that the photo did not see and whose mirror texel it did.
    texel_weight (S, S) float32, covered (S, S) bool: numpy arrays or tensors (on texel_weight's device)."""
    if not mirror_symmetric:
        return 0.0
    seen = torch.as_tensor(texel_weight) > 0
    inside = torch.as_tensor(covered, device=seen.device)
    return float((inside & ~seen & seen.flip(1)).sum()) / max(int(inside.sum()), 1)
