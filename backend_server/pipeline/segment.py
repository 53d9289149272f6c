"""Stage 3b, segment: where in the photo the faces' skin is, so that the bake samples only skin.

Two cues, multiplied:
- person: MediaPipe's selfie segmentation (`mp.solutions.selfie_segmentation`, the general
  256x256 model shipped in the wheel), 1 on a person (hair and clothes included), 0 on background;
- skin colour, learnt per face from the photo itself: pixels in small discs around landmarks of the
  inner face (cheeks, nose, the brow ridge between the eyes, the lower forehead) give a robust
  mean and spread (median, MAD) of (log r/g, log b/g, log luminance) in linear RGB; a pixel's
  probability falls from 1 to 0 as its normalised distance from that model goes from
  SKIN_NEAR to SKIN_FAR. Hair, caps, glasses frames and clothes differ from the face's own skin
  in chroma or (hair, shadows of a cap) in luminance, and are rejected; the luminance spread
  has a wide floor because the light darkens turned skin.
The hull of the brows, eyes and lips counts as skin (the face's own features stay in the texture).
Each face's skin model is evaluated in a window around its landmarks (the head, ears and neck);
the photo's map is the maximum over its faces. Output frame: photo pixels, the photo's size.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from ..render.shade import srgb_to_linear

SKIN_LANDMARKS = (
    9, 8, 168, 6, 197, 195, 5, 4,                                # between the brows, down the nose
    151, 108, 337, 109, 338, 107, 336,                           # lower forehead
    50, 101, 36, 205, 187, 123, 117, 118, 100, 142, 147, 213,    # right cheek (the photo's left)
    280, 330, 266, 425, 411, 352, 346, 347, 329, 371, 376, 433)  # left cheek
DISC_RADIUS = 0.025             # of the face's width (landmarks 234 to 454)
WINDOW_SIDES = 0.6              # the window reaches this many face widths beyond the landmarks left and right
WINDOW_TOP, WINDOW_BOTTOM = 0.6, 1.0      # ... above and below, in face heights
CHROMA_FLOOR = 0.06             # smallest spread of log r/g, log b/g
LUMINANCE_FLOOR = 0.35          # smallest spread of log luminance
SKIN_NEAR, SKIN_FAR = 2.5, 4.5  # normalised distances where the probability is 1 and 0
MIN_SKIN_PIXELS = 30
FEATURE_LANDMARKS = (70, 63, 105, 66, 107, 336, 296, 334, 293, 300, 33, 263, 61, 291, 17, 0, 4)   # brows, eyes, lips


@dataclass(frozen=True)
class SkinMap:
    """probability: (H, W) uint8, photo pixels, 255 = skin of one of the photo's faces, 0 =
    background, hair, clothes, glasses or anything else the bake must not sample."""

    probability: np.ndarray


LUMINANCE_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], np.float32)
SKIN_LINEAR_OF_SRGB8 = (srgb_to_linear(np.arange(256) / 255.0) + 1e-3).astype(np.float32)   # + 1e-3 before any log
LOG_LINEAR_LUT = np.repeat(np.log(SKIN_LINEAR_OF_SRGB8)[None, :, None], 3, axis=2)      # (1, 256, 3) for cv2.LUT
LUMINANCE_LUT = (SKIN_LINEAR_OF_SRGB8[None, :, None] * LUMINANCE_WEIGHTS).astype(np.float32)   # (1, 256, 3)


def skin_features(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> (..., 3) float32 (log r/g, log b/g, log luminance), linear light."""
    linear = SKIN_LINEAR_OF_SRGB8[rgb]
    g = linear[..., 1]
    return np.stack([np.log(linear[..., 0] / g), np.log(linear[..., 2] / g),
                     np.log(linear @ LUMINANCE_WEIGHTS)], axis=-1)


def skin_distance(rgb: np.ndarray, mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W) float32: each pixel's `skin_features` distance from `mean`
    in units of `spread` (3,). The same numbers as from skin_features, through OpenCV's table
    lookups and channel transforms (about 5x faster than numpy on a photo's face window)."""
    image = np.ascontiguousarray(rgb)
    logs = cv2.LUT(image, LOG_LINEAR_LUT)                                 # log linear R, G, B
    chroma = cv2.transform(logs, np.array([[1.0, -1.0, 0.0, -mean[0]], [0.0, -1.0, 1.0, -mean[1]]])
                           / np.array([[spread[0]], [spread[1]]]))        # (log r/g, log b/g), normalised
    luminance = cv2.transform(cv2.LUT(image, LUMINANCE_LUT), np.ones((1, 3)))
    brightness = (cv2.log(luminance) - mean[2]) / spread[2]
    return np.sqrt(chroma[..., 0] ** 2 + chroma[..., 1] ** 2 + brightness.reshape(chroma.shape[:2]) ** 2)


def skin_model(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean (3,), spread (3,)) of the inner face's skin features; None if too few pixels."""
    height, width = rgb.shape[:2]
    face_width = float(np.linalg.norm(landmarks[234, :2] - landmarks[454, :2]))
    radius = max(1, int(round(DISC_RADIUS * face_width)))
    grid: np.ndarray = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    offsets = np.moveaxis(grid, 0, -1).reshape(-1, 2)
    offsets = offsets[(offsets ** 2).sum(1) <= radius * radius]
    centres = np.rint(landmarks[list(SKIN_LANDMARKS), :2]).astype(np.int64)
    points = (centres[:, None, :] + offsets[None, :, ::-1]).reshape(-1, 2)          # (x, y)
    inside = (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
    if inside.sum() < MIN_SKIN_PIXELS:
        return None
    features = skin_features(rgb[points[inside, 1], points[inside, 0]])
    mean = np.median(features, axis=0)
    spread = 1.4826 * np.median(np.abs(features - mean), axis=0)
    spread = np.maximum(spread, [CHROMA_FLOOR, CHROMA_FLOOR, LUMINANCE_FLOOR]).astype(np.float32)
    return mean.astype(np.float32), spread


def skin_probability(rgb: np.ndarray, landmarks: Sequence[np.ndarray], person: np.ndarray | None) -> SkinMap:
    """rgb: (H, W, 3) uint8; landmarks: (478, 3) photo pixels per face; person: (H, W) float32 0..1
    from the selfie segmentation, or None (no background cue)."""
    height, width = rgb.shape[:2]
    out = np.zeros((height, width), np.float32)
    for points in landmarks:
        model = skin_model(rgb, points)
        if model is None:
            continue
        mean, spread = model
        (x0, y0), (x1, y1) = points[:, :2].min(0), points[:, :2].max(0)
        w, h = x1 - x0, y1 - y0
        c0, c1 = max(0, int(x0 - WINDOW_SIDES * w)), min(width, int(x1 + WINDOW_SIDES * w) + 1)
        r0, r1 = max(0, int(y0 - WINDOW_TOP * h)), min(height, int(y1 + WINDOW_BOTTOM * h) + 1)
        if c1 <= c0 or r1 <= r0:
            continue
        distance = skin_distance(rgb[r0:r1, c0:c1], mean, spread)
        probability = np.clip((SKIN_FAR - distance) / (SKIN_FAR - SKIN_NEAR), 0.0, 1.0)
        np.maximum(out[r0:r1, c0:c1], probability, out=out[r0:r1, c0:c1])
        hull = cv2.convexHull(np.rint(points[list(FEATURE_LANDMARKS), :2]).astype(np.int32))
        cv2.fillConvexPoly(out, hull, (1.0,))                 # brows, eyes and lips are the face's own: kept
    if person is not None:
        out *= np.clip(person, 0.0, 1.0)
    return SkinMap(np.rint(out * 255).astype(np.uint8))


class SkinSegmenter:
    """MediaPipe's selfie segmentation (loaded once per process) and the per-face skin model."""

    def __init__(self) -> None:
        import mediapipe as mp
        self._selfie = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._selfie.close()

    def person(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W) float32 0..1: how likely each pixel shows a person."""
        with self._lock:
            result = self._selfie.process(np.ascontiguousarray(rgb))
        mask = result.segmentation_mask
        if mask is None:
            return np.ones(rgb.shape[:2], np.float32)
        mask = np.asarray(mask, np.float32)
        if mask.shape != rgb.shape[:2]:
            mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
        return mask

    def __call__(self, rgb: np.ndarray, landmarks: Sequence[np.ndarray]) -> SkinMap:
        return skin_probability(rgb, landmarks, self.person(rgb) if len(landmarks) else None)
