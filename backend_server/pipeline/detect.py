"""Stage 2, detect: faces in a photo as pixel boxes, largest first (MediaPipe face detection)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from shared_protocol import ErrorCode, ProtocolError


@dataclass(frozen=True)
class FaceBox:
    """A detected face: box in photo pixels (x0, y0 top-left; width, height) and detector score."""

    x0: float
    y0: float
    width: float
    height: float
    score: float

    @property
    def area(self) -> float:
        return self.width * self.height


def box_iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes (0..1)."""
    w = min(a.x0 + a.width, b.x0 + b.width) - max(a.x0, b.x0)
    h = min(a.y0 + a.height, b.y0 + b.height) - max(a.y0, b.y0)
    inter = max(0.0, w) * max(0.0, h)
    return inter / (a.area + b.area - inter) if inter > 0 else 0.0


class FaceDetector:
    """MediaPipe BlazeFace, both models shipped in mediapipe 0.10.21: short range (close-ups,
    faces filling the photo) and full range (small faces, groups); results merged by IoU."""

    def __init__(self, min_score: float = 0.5, merge_iou: float = 0.3) -> None:
        import mediapipe as mp
        self._detectors = [mp.solutions.face_detection.FaceDetection(
            model_selection=model, min_detection_confidence=min_score) for model in (0, 1)]
        self._merge_iou = merge_iou
        self._lock = threading.Lock()

    def close(self) -> None:
        for detector in self._detectors:
            detector.close()

    def __call__(self, rgb: np.ndarray) -> list[FaceBox]:
        """rgb: (H, W, 3) uint8 -> faces sorted by box area, largest first (may be empty)."""
        rgb = np.ascontiguousarray(rgb)
        candidates = self._candidates(rgb)
        if not candidates:          # a dark photo or a turned head: brightened, then mirrored too
            from .landmarks import brighten
            bright = brighten(rgb)
            candidates = self._candidates(bright) or self._candidates(np.ascontiguousarray(bright[:, ::-1]), True)
        kept: list[FaceBox] = []
        for box in sorted(candidates, key=lambda b: b.score, reverse=True):
            if all(box_iou(box, other) < self._merge_iou for other in kept):
                kept.append(box)
        return sorted(kept, key=lambda b: b.area, reverse=True)

    def _candidates(self, rgb: np.ndarray, mirrored: bool = False) -> list[FaceBox]:
        height, width = rgb.shape[:2]
        found = []
        with self._lock:
            for detector in self._detectors:
                for detection in detector.process(rgb).detections or []:
                    rel = detection.location_data.relative_bounding_box
                    x0 = (1.0 - rel.xmin - rel.width) if mirrored else rel.xmin
                    found.append(FaceBox(x0 * width, rel.ymin * height, rel.width * width,
                                         rel.height * height, float(detection.score[0])))
        return found


def select_faces(boxes: list[FaceBox], face: int, photo_name: str) -> list[tuple[int, FaceBox]]:
    """(index, box) pairs for the request: face >= 0 picks one (largest first), face == -1 all."""
    if not boxes:
        raise ProtocolError(ErrorCode.NO_FACE, f"{photo_name}: no face found; use a photo where a face "
                            "is clearly visible, at least about 64 pixels wide")
    if face == -1:
        return list(enumerate(boxes))
    if face >= len(boxes):
        raise ProtocolError(ErrorCode.FACE_INDEX_OUT_OF_RANGE, f"{photo_name}: face {face} asked for, "
                            f"but {len(boxes)} face(s) found (indices 0..{len(boxes) - 1}, largest first)")
    return [(face, boxes[face])]
