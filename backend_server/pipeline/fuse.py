"""Texture fusion: one UV texture from several photos of one person, from each photo's bake.

Input per photo: its bake's steps 1 and 2 (`bake.Observation`, from a baker's `observe`: the
arrays a bake keeps as `Bake.observed` / `Bake.texel_weight`), with that photo's skin map and
lighting:
    observed      (S, S, 3) float32  linear RGB per texel, de-lit (divided by that photo's
                                     lighting) unless the lit texture was asked for; 0 where
                                     texel_weight is 0
    texel_weight  (S, S) float32     in [0, 1]: 0 not seen or rejected, else the view angle's ramp x
                                     skin probability x not clipped x not in shadow (the lit
                                     texture's: the view angle only)
Texture frame: that of bake.py (row 0 at the top; UV origin bottom-left).

`fuse_observations` (per texel):
1. colours equalised between photos: each photo's linear colours are scaled per channel so that,
   over the texels two photos both saw well, their weighted means match (least squares over every
   such pair; the reference photo, the one the head is posed as, keeps its colours: exposure and
   white balance differ between photos, and the de-lit albedo keeps each photo's mean skin colour
   (lighting.py), the face's colour does not change);
2. blended: each photo's weight sharpened (w ** SHARPNESS, so a photo that saw a texel better
   dominates it) and ramped to 0 toward the border of what that photo saw
   (`complete.seen_border_torch`, over the side / FEATHER_FRACTION: no photo's edge shows as a seam),
   then the weighted mean of the equalised colours;
3. the fused weight: the best photo's texel_weight (0 where no photo saw the texel).
The completion is then the single photo's (`complete.complete_texture`, or its GPU twin, through
the baker's `complete`), with the lit texture's `keep_seen` likewise; `completed` reports its
fractions.

`appearance_mismatch` / `odd_photo_out`: another person's photo, told by its skin's chroma on the
texels it shares with the others (in sRGB levels of the observations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..render.shade import linear_to_srgb
from .bake import Observation, channel_max, channel_min
from .complete import mirrored_fraction, seen_border_torch

SHARPNESS = 4.0                 # blend weight = texel_weight ** SHARPNESS
FEATHER_FRACTION = 64           # a photo's blend weight ramps to 0 at its seen border over ~side/128 texels
EQUALISE_MIN_WEIGHT = 0.3       # texels both photos saw at least this well set the colour gains
EQUALISE_GAIN_RANGE = (0.25, 4.0)   # linear RGB (about 0.5-2 in sRGB levels)
APPEARANCE_LIMIT = 0.06       # skin chroma distance (see `appearance_mismatch`) over which a photo may be
                              # another person's; synthetic heads (benchmarks/quality/multiview.py): the same
                              # head's views and another head's overlap (docs/quality.md), so see `odd_photo_out`
APPEARANCE_RATIO = 1.5        # ... and the photo farthest from the others must be this much farther than the next
APPEARANCE_PAIR_LIMIT = 4.0   # of two photos, the second is left out only this far over the limit
APPEARANCE_TEXELS = 256       # the skin's chroma is compared on a 256² sample of the texels
CLIPPED_LEVEL = 240.0         # sRGB level: clipped highlights change a texel's chroma
SHADOW_LEVEL = 12.0           # and so does deep shadow (noise)


@dataclass(frozen=True)
class FusedTexture:
    """observed (S, S, 3) float32 linear RGB / texel_weight (S, S) float32: the fused Observation's
    arrays (a baker's `complete` input), numpy arrays or tensors on the device, as the observations
    were; covered (S, S) bool: texels inside the UV islands, as given;
    contribution (P,): each photo's share of the seen texels (its normalised blend weight summed
    over them, over their count; sums to 1 where any texel was seen); seen_fraction (P,): covered
    texels each photo saw alone; gains (P, 3): the per-channel linear colour gains applied."""

    observed: np.ndarray | torch.Tensor
    texel_weight: np.ndarray | torch.Tensor
    covered: np.ndarray | torch.Tensor
    contribution: np.ndarray
    seen_fraction: np.ndarray
    gains: np.ndarray


@dataclass(frozen=True)
class CompletedTexture:
    """texture (S, S, 3) uint8 sRGB; seen/mirrored fractions of the covered texels."""

    texture: np.ndarray
    seen_fraction: float
    mirrored_fraction: float


def completed(texture: np.ndarray, fused: FusedTexture, mirror_symmetric: bool) -> CompletedTexture:
    """The completed fused texture (`Baker.complete` of `fused`) with its seen and mirrored shares."""
    weight = torch.as_tensor(fused.texel_weight)
    inside = torch.as_tensor(fused.covered, device=weight.device)
    seen = float(((weight > 0) & inside).sum()) / max(int(inside.sum()), 1)
    return CompletedTexture(texture, seen, mirrored_fraction(weight, inside, mirror_symmetric))


def _on_host(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else array


class _Sample(NamedTuple):
    observed: np.ndarray          # (s, s, 3) float32
    texel_weight: np.ndarray      # (s, s) float32


def _sampled(observations: Sequence[Observation]) -> list[_Sample]:
    """Every photo's arrays on a APPEARANCE_TEXELS² grid, as numpy arrays (means and medians: a
    sample will do)."""
    step = max(1, observations[0].texel_weight.shape[0] // APPEARANCE_TEXELS)
    return [_Sample(np.ascontiguousarray(_on_host(o.observed[::step, ::step])),
                    np.ascontiguousarray(_on_host(o.texel_weight[::step, ::step]))) for o in observations]


def colour_gains(observations: Sequence[Observation], reference: int) -> np.ndarray:
    """(P, 3) per-channel linear gains that bring every photo's colours to the reference photo's:
    for each pair of photos that both saw at least 16 texels of a 256² sample at least
    EQUALISE_MIN_WEIGHT, the ratio of their weighted mean colours there; the gains (log) fitted to
    every such pair at once by least squares, weighted by the shared texels, the reference's fixed at
    1 (so two side photos that do not overlap are equalised through the front one). A photo that
    shares too little: gain 1."""
    count = len(observations)
    sampled = _sampled(observations)
    rows, targets, weights = [], [], []
    for a in range(count):
        for b in range(a + 1, count):
            both = ((sampled[a].texel_weight >= EQUALISE_MIN_WEIGHT) & (sampled[b].texel_weight >= EQUALISE_MIN_WEIGHT))
            if both.sum() < 16:
                continue
            w = np.minimum(sampled[a].texel_weight, sampled[b].texel_weight)[both][:, None]
            mean_a = (sampled[a].observed[both] * w).sum(0)
            mean_b = (sampled[b].observed[both] * w).sum(0)
            row = np.zeros(count)
            row[a], row[b] = 1.0, -1.0                       # log g_a - log g_b = log(mean_b / mean_a)
            rows.append(row)
            targets.append(np.log(np.maximum(mean_b, 1e-9) / np.maximum(mean_a, 1e-9)))
            weights.append(np.sqrt(float(both.sum())))
    gains = np.ones((count, 3), np.float32)
    if not rows:
        return gains
    fixed = np.zeros(count)
    fixed[reference] = 1.0
    system = np.vstack([np.array(rows) * np.array(weights)[:, None], 1e3 * fixed])
    rhs = np.vstack([np.array(targets) * np.array(weights)[:, None], np.zeros(3)])
    linked = np.abs(np.array(rows)).sum(0) > 0
    log_gain, *_ = np.linalg.lstsq(system, rhs, rcond=None)
    gains[linked] = np.clip(np.exp(log_gain[linked]), *EQUALISE_GAIN_RANGE)
    return gains


@torch.inference_mode()
def fuse_observations(observations: Sequence[Observation], covered: np.ndarray, reference: int = 0
                      ) -> FusedTexture:
    """Several photos' Observations of one UV layout -> one (see the module's docstring); colours
    are equalised to photo `reference`'s (the photo the head is posed as). The arrays are fused
    with torch where they are (numpy arrays on the CPU, the GPU baker's tensors on its device);
    the fused arrays are of the observations' kind. covered: (S, S) bool, numpy or tensor."""
    gains = colour_gains(observations, reference)
    weights = torch.stack([torch.as_tensor(o.texel_weight) for o in observations])          # (P, S, S)
    device = weights.device
    best = weights.amax(0)
    seen = best > 0
    sharp = _sharpened(weights)
    blend = sharp * seen_border_torch(weights, FEATHER_FRACTION)
    # A texel seen only at the ramped border of every photo that saw it keeps their plain weights.
    blend = torch.where(seen & (blend.sum(0) <= 1e-12), sharp, blend)
    share = blend / blend.sum(0).clamp_min(1e-30)               # 0 where a photo did not see the texel
    del sharp, blend
    gain = torch.as_tensor(gains, device=device)
    colour = torch.zeros_like(torch.as_tensor(observations[0].observed))
    for k, observation in enumerate(observations):
        colour += torch.as_tensor(observation.observed) * (share[k, ..., None] * gain[k])
    inside = torch.as_tensor(covered, device=device)
    contribution = share.sum((1, 2), dtype=torch.float64) / seen.sum().clamp_min(1)
    seen_fraction = ((weights > 0) & inside).sum((1, 2), dtype=torch.float64) / inside.sum().clamp_min(1)
    on_host = isinstance(observations[0].texel_weight, np.ndarray)
    return FusedTexture(colour.numpy() if on_host else colour, best.numpy() if on_host else best, covered,
                        contribution.cpu().numpy(), seen_fraction.cpu().numpy(), gains)


def _sharpened(weight: torch.Tensor) -> torch.Tensor:
    """weight ** SHARPNESS (SHARPNESS = 4: two squarings, ~10x faster than a float power)."""
    if SHARPNESS == 4.0:
        squared = weight * weight
        return squared * squared
    return weight ** SHARPNESS


def _log_chroma(levels: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB levels -> (..., 3) log ratio of each channel to the texel's mean (brightness
    and exposure cancel; the skin's hue and saturation stay): a photo's skin chroma is its median."""
    levels = np.maximum(levels, 1.0)
    red, green, blue = np.moveaxis(levels, -1, 0)     # numpy reduces a 3-long last axis slowly
    return np.log(levels / ((red + green + blue) / 3.0)[..., None])


def _usable(levels: np.ndarray, texel_weight: np.ndarray) -> np.ndarray:
    """(S, S) texels whose colour says something about the skin: seen at least EQUALISE_MIN_WEIGHT,
    neither clipped (a channel at CLIPPED_LEVEL or more: highlights) nor in deep shadow.
    levels: (S, S, 3) sRGB levels 0..255."""
    return ((texel_weight >= EQUALISE_MIN_WEIGHT) & (channel_max(levels) < CLIPPED_LEVEL)
            & (channel_min(levels) > SHADOW_LEVEL))


def appearance_mismatch(observations: Sequence[Observation]) -> np.ndarray:
    """(P,) per photo: the skin chroma distance (sum over channels of |difference of the medians of `_log_chroma`|,
    sRGB levels, over the texels both photos saw at least EQUALISE_MIN_WEIGHT) to the photo it
    resembles most, over APPEARANCE_LIMIT. A photo of another person is far from every other photo;
    NaN where a photo shares too few texels with any other."""
    count = len(observations)
    sampled = _sampled(observations)
    levels = [255.0 * linear_to_srgb(np.clip(o.observed, 0.0, 1.0)) for o in sampled]
    usable = [_usable(c, o.texel_weight) for c, o in zip(levels, sampled)]
    chroma = [_log_chroma(c) for c in levels]
    distance = np.full((count, count), np.nan)
    for a in range(count):
        for b in range(a + 1, count):
            both = usable[a] & usable[b]
            if both.sum() >= 64:
                difference = np.median(chroma[a][both], 0) - np.median(chroma[b][both], 0)
                distance[a, b] = distance[b, a] = float(np.abs(difference).sum())
    with np.errstate(all="ignore"):
        nearest = np.array([np.nanmin(row) if np.isfinite(row).any() else np.nan for row in distance])
    return nearest / APPEARANCE_LIMIT


def odd_photo_out(mismatch: np.ndarray) -> int | None:
    """Which photo (index into `mismatch`, `appearance_mismatch`'s result) is another person's, or
    None. Of three or more: the one farthest from the others when it is over the limit and
    APPEARANCE_RATIO times farther than the next (the others match each other, it matches none); of
    two, which one is odd cannot be told: the second, only when APPEARANCE_PAIR_LIMIT over."""
    if len(mismatch) < 2 or not np.isfinite(mismatch).any():
        return None
    distance = np.where(np.isfinite(mismatch), mismatch, 0.0)
    if len(distance) == 2:
        return 1 if distance[1] > APPEARANCE_PAIR_LIMIT else None
    order = np.argsort(distance)[::-1]
    worst, next_worst = distance[order[0]], distance[order[1]]
    return int(order[0]) if worst > 1.0 and worst >= APPEARANCE_RATIO * next_worst else None
