"""Stage 4, fit: each face's landmarks -> its model's fit, and the fitted surface in the camera
frame that the bake textures (`FaceModel.fit` and `FaceModel.texture_vertices`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..geometry import Camera
from ..models.face_model import FaceFit, FaceModel


@dataclass(frozen=True)
class FittedFace:
    """fit: the model's fit of one face; texture_vertices: (model.topology.vertex_count, 3)
    camera-frame metres, float64."""

    fit: FaceFit
    texture_vertices: np.ndarray


def fit_faces(model: FaceModel, landmarks: Sequence[np.ndarray], cameras: Sequence[Camera],
              device: str = "cpu") -> list[FittedFace]:
    """landmarks: (478, 3) photo pixels per face; cameras: one per face; all faces in one batch."""
    fits = model.fit(landmarks, cameras, device)
    return [FittedFace(fit, vertices) for fit, vertices in zip(fits, model.texture_vertices(fits, device))]
