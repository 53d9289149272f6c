"""Stage 3, landmarks: 478 MediaPipe face-mesh points (468 mesh + 10 iris) for one detected face.

Output frame: photo pixels. Column 0 x (right), 1 y (down), 2 z: relative depth in the same pixel
units, MediaPipe's sign (smaller = closer to the camera), origin near the head centre.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

from shared_protocol import ErrorCode, ProtocolError
from .detect import FaceBox

LANDMARK_COUNT = 478
MESH_VERTEX_COUNT = 468
CROP_MARGIN = 1.9          # crop side = this x the larger box side
MIN_CROP_SIDE = 256        # small faces are upscaled to at least this many pixels


@dataclass(frozen=True)
class LocatedFace:
    """A face found in a photo: `index` among the photo's faces (largest first), its detector box
    and its (478, 3) landmarks (photo pixels; see the module docstring)."""

    index: int
    box: FaceBox
    landmarks: np.ndarray


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
        """(478, 3) float64 landmarks in photo pixels for the face in `box`."""
        side = max(box.width, box.height) * CROP_MARGIN
        cx, cy = box.x0 + box.width / 2, box.y0 + box.height / 2
        zoom = max(1.0, MIN_CROP_SIDE / side)
        out_side = int(round(side * zoom))
        # Affine crop: photo pixel (x, y) -> crop pixel ((x - x0) * zoom, (y - y0) * zoom), border replicated.
        x0, y0 = cx - side / 2, cy - side / 2
        to_crop = np.array([[zoom, 0, -x0 * zoom], [0, zoom, -y0 * zoom]], dtype=np.float64)
        crop = cv2.warpAffine(rgb, to_crop, (out_side, out_side), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        with self._lock:
            result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            raise ProtocolError(ErrorCode.NO_FACE, f"{photo_name}: a face was detected but its landmarks "
                                "could not be placed (face too turned, blurred or covered?)")
        points = np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], np.float64)
        points *= out_side                         # normalized crop units -> crop pixels (z too)
        points /= zoom                             # crop pixels -> photo pixels
        points[:, 0] += x0
        points[:, 1] += y0
        return points
