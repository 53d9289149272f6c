"""Stage 3, landmarks: 478 MediaPipe face-mesh points (468 mesh + 10 iris) for one detected face.

Output frame: photo pixels. Column 0 x (right), 1 y (down), 2 z: relative depth in the same pixel
units, MediaPipe's sign (smaller = closer to the camera), origin near the head centre.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from shared_protocol import ErrorCode, ProtocolError
from .detect import FaceBox

LANDMARK_COUNT = 478
MESH_VERTEX_COUNT = 468
CROP_MARGIN = 1.9          # crop side = this x the larger box side
MIN_CROP_SIDE = 256        # small faces are upscaled to at least this many pixels


IRIS_CENTRES = (468, 473)          # with their four rim points after each: 469-472, 474-477
EYE_CONTOURS = ((33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
                (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466))
MIN_IRIS_PIXELS = 12


@dataclass(frozen=True)
class LocatedFace:
    """A face found in a photo: `index` among the photo's faces (largest first), its detector box,
    its (478, 3) landmarks (photo pixels; see the module docstring) and the colour of its irises
    (sRGB 0-255; None where the eyes are too small, closed or covered to measure)."""

    index: int
    box: FaceBox
    landmarks: np.ndarray
    iris_srgb: tuple[int, int, int] | None = None


def iris_colour(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[int, int, int] | None:
    """The irises' colour: the photo's pixels inside each eye's opening (its eyelid contour) and
    between the pupil (0.45 of the iris radius) and the rim (0.9), less the brightest fifth
    (highlights) and the darkest tenth (lashes, shadow); their median in linear light, as sRGB."""
    height, width = rgb.shape[:2]
    found = []
    for centre_id in IRIS_CENTRES:
        centre = landmarks[centre_id, :2]
        radius = float(np.linalg.norm(landmarks[centre_id + 1:centre_id + 5, :2] - centre, axis=1).mean())
        contour = min(EYE_CONTOURS, key=lambda ids: float(np.linalg.norm(landmarks[list(ids), :2].mean(0) - centre)))
        x0, y0 = (max(0, int(v - radius) - 1) for v in centre)
        x1, y1 = min(width, int(centre[0] + radius) + 2), min(height, int(centre[1] + radius) + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        opening = np.zeros((y1 - y0, x1 - x0), np.uint8)                 # the window around this iris
        cv2.fillPoly(opening, [np.rint(landmarks[list(contour), :2] - (x0, y0)).astype(np.int32)], (1,))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        distance = np.hypot(xx - centre[0], yy - centre[1])
        ring = opening.astype(bool) & (distance >= 0.45 * radius) & (distance <= 0.9 * radius)
        found.append(rgb[y0:y1, x0:x1][ring])
    pixels = np.concatenate(found).astype(np.float64) / 255.0 if found else np.zeros((0, 3))
    if len(pixels) < MIN_IRIS_PIXELS:
        return None
    linear = np.where(pixels <= 0.04045, pixels / 12.92, ((pixels + 0.055) / 1.055) ** 2.4)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722])
    low, high = np.quantile(luminance, [0.1, 0.8])
    kept = linear[(luminance >= low) & (luminance <= high)]
    median = np.median(kept if len(kept) >= MIN_IRIS_PIXELS // 2 else linear, axis=0)
    srgb = np.where(median <= 0.0031308, median * 12.92, 1.055 * median ** (1 / 2.4) - 0.055)
    r, g, b = (int(round(float(c) * 255)) for c in np.clip(srgb, 0, 1))
    return (r, g, b)


class LandmarkDetector:
    """MediaPipe face mesh (refine_landmarks=True) run on a square crop around each FaceBox."""

    def __init__(self) -> None:
        import mediapipe as mp
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.3)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._mesh.close()

    def __call__(self, rgb: np.ndarray, box: FaceBox, photo_name: str) -> np.ndarray:
        """(478, 3) float64 landmarks in photo pixels for the face in `box`.

        Face mesh fails on some heads turned 55-65 degrees (about one in eight of the calibration
        renders there, with either sign) and on dark photos; each retry in CROP_ATTEMPTS
        (brighter, mirrored, tighter, looser) places most of those (tests/test_landmarks.py)."""
        for attempt in CROP_ATTEMPTS:
            points = self._attempt(rgb, box, attempt)
            if points is not None:
                return points
        raise ProtocolError(ErrorCode.NO_FACE, f"{photo_name}: a face was detected but its landmarks "
                            "could not be placed (face too turned, blurred or covered?)")

    def _attempt(self, rgb: np.ndarray, box: FaceBox, attempt: CropAttempt) -> np.ndarray | None:
        side = max(box.width, box.height) * attempt.margin
        centre = (box.x0 + box.width / 2, box.y0 + box.height / 2)
        zoom = max(1.0, MIN_CROP_SIDE / side)
        out_side = int(round(side * zoom))
        # Photo pixel -> crop pixel: rotate by angle_deg about the box centre, scale by zoom, centre
        # in the crop (border replicated); undone for the points below.
        to_crop = np.asarray(cv2.getRotationMatrix2D(centre, attempt.angle_deg, zoom), np.float64)
        to_crop[:, 2] += np.array([side * zoom / 2 - centre[0], side * zoom / 2 - centre[1]])
        crop = cv2.warpAffine(rgb, to_crop, (out_side, out_side), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        if attempt.brighten:
            crop = brighten(crop)
        if attempt.mirror:
            crop = np.ascontiguousarray(crop[:, ::-1])
        with self._lock:
            result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        points = np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], np.float64)
        if attempt.mirror:                         # back to the unmirrored crop, each point's own index
            points[:, 0] = 1.0 - points[:, 0]
            points = points[mirror_permutation()]
        points *= out_side                         # normalized crop units -> crop pixels (z too)
        to_photo = cv2.invertAffineTransform(to_crop)
        points[:, :2] = points[:, :2] @ to_photo[:, :2].T + to_photo[:, 2]
        points[:, 2] /= zoom                       # crop pixels -> photo pixels
        return points


@dataclass(frozen=True)
class CropAttempt:
    """One way to show face mesh the face: crop side = `margin` x the box's larger side, turned by
    `angle_deg` about the box centre, brightened (its 99th percentile to BRIGHT_TARGET, gain at
    most MAX_GAIN) and/or mirrored."""

    margin: float = CROP_MARGIN
    brighten: bool = False
    mirror: bool = False
    angle_deg: float = 0.0


# Face mesh fails on some heads turned 55-65 degrees one way (+yaw: the nose to the right of the
# photo) that it places mirrored, and on some dark ones; BlazeFace's box on a profile is centred on
# the head rather than the face, which a tighter, turned crop helps with.
CROP_ATTEMPTS = (CropAttempt(), CropAttempt(mirror=True), CropAttempt(brighten=True),
                 CropAttempt(brighten=True, mirror=True), CropAttempt(margin=1.5), CropAttempt(margin=2.4),
                 CropAttempt(margin=1.5, mirror=True), CropAttempt(margin=1.5, mirror=True, angle_deg=-20.0),
                 CropAttempt(margin=1.5, mirror=True, angle_deg=20.0), CropAttempt(margin=1.5, angle_deg=-20.0),
                 CropAttempt(margin=1.5, angle_deg=20.0))
BRIGHT_TARGET = 230.0
MAX_GAIN = 4.0


def brighten(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 scaled so its 99th-percentile channel maximum reaches BRIGHT_TARGET."""
    high = float(np.percentile(rgb.max(axis=2), 99))
    gain = min(MAX_GAIN, BRIGHT_TARGET / max(high, 1.0))
    return np.clip(rgb.astype(np.float32) * gain, 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def mirror_permutation() -> np.ndarray:
    """(478,) int: the landmark index that point k becomes in a mirrored image. The 468 mesh points
    from the canonical face's exact left-right symmetry; the iris points swap eyes, and each rim
    point its left and right neighbour (measured on a photo and its mirror image)."""
    from ..models.builtin import load_builtin
    reference = load_builtin().reference_vertices
    distances = np.linalg.norm(reference[:, None, :] - (reference * [-1.0, 1.0, 1.0])[None, :, :], axis=2)
    return np.concatenate([distances.argmin(axis=1), [473, 476, 475, 474, 477, 468, 471, 470, 469, 472]])
