"""Texture fusion: one UV texture from several photos of one person (the bake of each photo, then
this), and the completion of the texels no photo saw.

The contract with the bake (issue 17's `Bake` exposes the same two arrays before completion):
per photo an `Observation`:
    observed      (S, S, 3) float32  the photo's colour per texel, sRGB levels 0..255 (finite; any value
                                     where texel_weight is 0)
    texel_weight  (S, S) float32     0 where the photo did not see the texel; else in (0, 1], higher
                                     for a better view (facing the camera, more photo pixels)
Texture frame: that of bake.py (row 0 at the top; UV origin bottom-left).

`fuse_observations` (per texel):
1. colours equalised between photos: each photo's colours are scaled per channel so that, over
   the texels two photos both saw well, their weighted means match (least squares over every such
   pair; the reference photo, the one the head is posed as, keeps its colours: exposure and white
   balance differ between photos, the face's colour does not);
2. blended: each photo's weight sharpened (w ** SHARPNESS, so the photo that saw a texel best
   dominates it) and feathered (ramped to 0 over FEATHER_TEXELS toward the border of what that
   photo saw, so no photo's edge shows as a seam), then the weighted mean;
3. the fused weight: the best photo's weight (0 where no photo saw the texel).
`complete_texture` then fills the rest: the mirror texel's colour where only the mirror was seen
(symmetric layouts), pull-push inpainting everywhere else (today's fill of bake.py).
`observe` makes an Observation from today's bake rule (seen mask x cos(view angle) x resolution):
the adapter the lead swaps for issue 17's `Bake.observed` / `Bake.texel_weight` at merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from ..geometry import Camera, sample_bilinear, vertex_normals
from ..models.topology import MeshTopology
from ..render.rasterize import rasterize
from .bake import DEPTH_TOLERANCE_M, MIN_FACING_COS, TEXEL_CHUNK, pull_push_fill, texel_maps

SHARPNESS = 4.0                 # blend weight = texel_weight ** SHARPNESS
FEATHER_TEXELS = 0.02           # ramp of a photo's weight toward its seen border, as a fraction of S
EQUALISE_MIN_WEIGHT = 0.3       # texels both photos saw at least this well set the colour gains
EQUALISE_GAIN_RANGE = (0.5, 2.0)
APPEARANCE_LIMIT = 0.06       # skin chroma distance (see `appearance_mismatch`) over which a photo may be
                              # another person's; synthetic heads (benchmarks/quality/multiview.py): the same
                              # head's front and ±60° views 0.00-0.23 apart, another head's nearest 0.02-0.41
                              # (median 0.20): no limit separates them, so see `odd_photo_out`
APPEARANCE_RATIO = 1.5        # ... and the photo farthest from the others must be this much farther than the next
APPEARANCE_PAIR_LIMIT = 4.0   # of two photos, the second is left out only this far over the limit
APPEARANCE_TEXELS = 256       # the skin's chroma is compared on a 256² sample of the texels
CLIPPED_LEVEL = 240.0         # sRGB level: clipped highlights change a texel's chroma
SHADOW_LEVEL = 12.0           # and so does deep shadow (noise)
FULL_RESOLUTION_PX_PER_M = 3000.0   # a surface imaged at this many photo pixels per metre (or more)
                                    # is fully resolved: weight factor 1 (a 16 cm face over 480 px)


@dataclass(frozen=True)
class Observation:
    """One photo's colours in the UV layout before completion (see the module's docstring)."""

    observed: np.ndarray        # (S, S, 3) float32, sRGB 0..255
    texel_weight: np.ndarray    # (S, S) float32 in [0, 1]


@dataclass(frozen=True)
class FusedTexture:
    """observed/texel_weight: the fused Observation's arrays; covered (S, S) bool: texels inside
    the UV islands; contribution (P,): each photo's share of the seen texels (its normalised blend
    weight summed over them, over their count; sums to 1 where any texel was seen); seen_fraction
    (P,): covered texels each photo saw alone; gains (P, 3): the per-channel colour gains applied."""

    observed: np.ndarray
    texel_weight: np.ndarray
    covered: np.ndarray
    contribution: np.ndarray
    seen_fraction: np.ndarray
    gains: np.ndarray


@dataclass(frozen=True)
class CompletedTexture:
    """texture (S, S, 3) uint8 sRGB; seen/mirrored fractions of the covered texels."""

    texture: np.ndarray
    seen_fraction: float
    mirrored_fraction: float


def covered_texels(topology: MeshTopology, size: int) -> np.ndarray:
    """(S, S) bool: texels inside the UV islands."""
    covered = np.zeros(size * size, bool)
    for band in texel_maps(topology, size):
        covered[band.texel] = True
    return covered.reshape(size, size)


def observe(photo_rgb: np.ndarray, vertices: np.ndarray, topology: MeshTopology, camera: Camera, size: int
            ) -> Observation:
    """Today's bake rule as an Observation: a texel is seen where bake.seen_texels says so (inside
    the photo, facing the camera, not behind the z-buffer); its weight is the cosine of its view
    angle times min(1, photo pixels per metre there / FULL_RESOLUTION_PX_PER_M).
    photo_rgb: (H, W, 3) uint8; vertices: (V, 3) camera-frame metres of `topology`'s mesh."""
    triangles = topology.triangles
    screen = camera.project(vertices)
    zbuffer = rasterize(screen, -vertices[:, 2], triangles, camera.width, camera.height).depth
    attributes = np.concatenate([screen, vertices, vertex_normals(vertices, triangles)], axis=1)
    observed = np.zeros((size * size, 3), np.float32)
    weight = np.zeros(size * size, np.float32)
    for band in texel_maps(topology, size):
        for start in range(0, len(band.texel), TEXEL_CHUNK):
            part = band.part(start, start + TEXEL_CHUNK)
            per_texel = part.interpolate(attributes)
            xy, point, normal = per_texel[:, :2], per_texel[:, 2:5], per_texel[:, 5:8]
            distance = np.sqrt(np.maximum(np.einsum("nc,nc->n", point, point), 1e-24))
            facing = np.einsum("nc,nc->n", normal, -point) / (
                np.sqrt(np.maximum(np.einsum("nc,nc->n", normal, normal), 1e-24)) * distance)
            col = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, camera.width - 1)
            row = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, camera.height - 1)
            inside = (xy[:, 0] >= 0) & (xy[:, 0] < camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] < camera.height)
            seen = inside & (facing > MIN_FACING_COS) & (-point[:, 2] <= zbuffer[row, col] + DEPTH_TOLERANCE_M)
            resolution = np.minimum(1.0, camera.focal_px / distance / FULL_RESOLUTION_PX_PER_M)
            texel = part.texel[seen]
            observed[texel] = sample_bilinear(photo_rgb, xy[seen])
            weight[texel] = (facing * resolution)[seen]
    return Observation(observed.reshape(size, size, 3), weight.reshape(size, size))


def _feather(weight: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """weight ramped to 0 toward the covered texels this photo did not see (UV island borders, where
    the neighbour is outside every island, are not a seam and keep their weight)."""
    ramp = max(FEATHER_TEXELS * weight.shape[0], 1.0)
    unseen = covered & (weight <= 0)
    if not unseen.any():
        return weight
    distance = cv2.distanceTransform((~unseen).astype(np.uint8), cv2.DIST_L2, 3)
    return weight * np.clip(distance / ramp, 0.0, 1.0).astype(np.float32)


def colour_gains(observations: Sequence[Observation], reference: int) -> np.ndarray:
    """(P, 3) per-channel gains that bring every photo's colours to the reference photo's: for each
    pair of photos that both saw at least 16 texels of a 256² sample at least EQUALISE_MIN_WEIGHT, the ratio of their
    weighted mean colours there; the gains (log) fitted to every such pair at once by least squares,
    weighted by the shared texels, the reference's fixed at 1 (so two side photos that do not
    overlap are equalised through the front one). A photo that shares too little: gain 1."""
    count = len(observations)
    step = max(1, observations[0].texel_weight.shape[0] // APPEARANCE_TEXELS)      # means: a sample will do
    observations = [Observation(o.observed[::step, ::step], o.texel_weight[::step, ::step]) for o in observations]
    rows, targets, weights = [], [], []
    for a in range(count):
        for b in range(a + 1, count):
            both = ((observations[a].texel_weight >= EQUALISE_MIN_WEIGHT)
                    & (observations[b].texel_weight >= EQUALISE_MIN_WEIGHT))
            if both.sum() < 16:
                continue
            w = np.minimum(observations[a].texel_weight, observations[b].texel_weight)[both][:, None]
            mean_a = (observations[a].observed[both] * w).sum(0)
            mean_b = (observations[b].observed[both] * w).sum(0)
            row = np.zeros(count)
            row[a], row[b] = 1.0, -1.0                       # log g_a - log g_b = log(mean_b / mean_a)
            rows.append(row)
            targets.append(np.log(np.maximum(mean_b, 1e-6) / np.maximum(mean_a, 1e-6)))
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


def fuse_observations(observations: Sequence[Observation], covered: np.ndarray, reference: int = 0
                      ) -> FusedTexture:
    """Several photos' Observations of one UV layout -> one (see the module's docstring); colours
    are equalised to photo `reference`'s (the photo the head is posed as)."""
    gains = colour_gains(observations, reference)
    weights = [o.texel_weight for o in observations]
    best = np.maximum.reduce(weights)
    seen = best > 0
    blend = [_sharpened(_feather(w, covered)) for w in weights]
    total = np.add.reduce(blend)
    # A texel seen only at the feathered border of every photo that saw it keeps their plain weights.
    fallback = seen & (total <= 1e-12)
    if fallback.any():
        for b, w in zip(blend, weights):
            b[fallback] = _sharpened(w[fallback])
        total = np.add.reduce(blend)
    inverse = 1.0 / np.maximum(total, 1e-30)
    size = weights[0].shape[0]
    colour = np.zeros((size, size, 3), np.float32)
    seen_count = max(int(seen.sum()), 1)
    contribution = []
    for b, obs, gain in zip(blend, observations, gains):
        share = b * inverse                                   # 0 where this photo did not see the texel
        contribution.append(float(share.sum()) / seen_count)
        colour += obs.observed * cv2.merge([share * gain[0], share * gain[1], share * gain[2]])
    np.clip(colour, 0, 255, out=colour)
    covered_count = max(int(covered.sum()), 1)
    seen_fraction = np.array([float((w[covered] > 0).sum()) / covered_count for w in weights])
    return FusedTexture(colour, best.astype(np.float32), covered, np.array(contribution), seen_fraction, gains)


def _sharpened(weight: np.ndarray) -> np.ndarray:
    """weight ** SHARPNESS (SHARPNESS = 4: two squarings, ~10x faster than a float power)."""
    if SHARPNESS == 4.0:
        squared = weight * weight
        return squared * squared
    return weight ** SHARPNESS


def _chroma(colours: np.ndarray) -> np.ndarray:
    """(N, 3) sRGB levels -> (3,) median log ratio of each channel to the texel's mean (brightness
    and exposure cancel; the skin's hue and saturation stay)."""
    colours = np.maximum(colours, 1.0)
    return np.median(np.log(colours / colours.mean(1, keepdims=True)), axis=0)


def _usable(observation: Observation) -> np.ndarray:
    """(S, S) texels whose colour says something about the skin: seen at least EQUALISE_MIN_WEIGHT,
    neither clipped (a channel at CLIPPED_LEVEL or more: highlights) nor in deep shadow."""
    colour = observation.observed
    return ((observation.texel_weight >= EQUALISE_MIN_WEIGHT) & (colour.max(-1) < CLIPPED_LEVEL)
            & (colour.min(-1) > SHADOW_LEVEL))


def appearance_mismatch(observations: Sequence[Observation]) -> np.ndarray:
    """(P,) per photo: the skin chroma distance (sum over channels of |difference of `_chroma`|,
    over the texels both photos saw at least EQUALISE_MIN_WEIGHT) to the photo it resembles most,
    over APPEARANCE_LIMIT. A photo of another person is far from every other photo; NaN where a
    photo shares too few texels with any other."""
    count = len(observations)
    step = max(1, observations[0].texel_weight.shape[0] // APPEARANCE_TEXELS)     # medians: a sample will do
    sampled = [Observation(o.observed[::step, ::step], o.texel_weight[::step, ::step]) for o in observations]
    usable = [_usable(o) for o in sampled]
    distance = np.full((count, count), np.nan)
    for a in range(count):
        for b in range(a + 1, count):
            both = usable[a] & usable[b]
            if both.sum() >= 64:
                distance[a, b] = distance[b, a] = float(np.abs(
                    _chroma(sampled[a].observed[both]) - _chroma(sampled[b].observed[both])).sum())
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


def complete_texture(observed: np.ndarray, texel_weight: np.ndarray, covered: np.ndarray,
                     mirror_symmetric: bool) -> CompletedTexture:
    """Today's completion (bake.py): a texel nobody saw takes its mirror texel's colour (row r,
    column S - 1 - c) where that one was seen and the layout is left/right symmetric; pull-push
    inpainting fills the rest and pads the islands."""
    known = texel_weight > 0
    image = np.where(known[..., None], observed, 0.0).astype(np.float32)
    use_mirror = covered & ~known & known[:, ::-1] & mirror_symmetric
    image[use_mirror] = image[:, ::-1][use_mirror]
    filled = pull_push_fill(image, known | use_mirror)
    texture = np.clip(np.rint(filled), 0, 255).astype(np.uint8)
    count = max(int(covered.sum()), 1)
    return CompletedTexture(texture, float((known & covered).sum()) / count, float(use_mirror.sum()) / count)
