"""Baselines made from a reconstruction: the model's mean face, and its mean identity with the
fitted expression, each rigidly placed onto the fitted face (its face area, camera frame) and
wearing the fit's own texture. What a fit must beat to show that it recovered anything.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from backend_server.geometry import Pose, rigid_fit
from backend_server.models.builtin import builtin_topology, load_builtin
from backend_server.models.morphable import MorphableModel

from .reconstruction import Reconstruction, model_ibug68

MEAN_FACE = "mean face"
MEAN_IDENTITY = "mean id + fitted expr"


def _placed(recon: Reconstruction, head: np.ndarray, region: np.ndarray) -> tuple[Pose, np.ndarray]:
    """The rigid pose moving head-frame `head` (V, 3) onto the reconstruction over `region`."""
    pose = rigid_fit(head[region], recon.vertices[region])
    return pose, pose.apply(head)


def morphable_baseline(recon: Reconstruction, model: MorphableModel, keep_expression: bool) -> Reconstruction:
    """The mean face (identity and expression 0), or the mean identity with the fit's expression."""
    expression = recon.expression if keep_expression and recon.expression is not None else None
    head = model.vertices(None, expression)
    pose, vertices = _placed(recon, head, model.face_region)
    c = model.mediapipe
    points = np.einsum("nk,nkc->nc", c.bary, vertices[c.corners])
    return replace(recon, method=f"{recon.method} {MEAN_IDENTITY if keep_expression else MEAN_FACE}",
                   vertices=vertices, neutral=model.vertices(), pose=pose, points468=points,
                   identity=np.zeros(len(model.identity_basis)),
                   expression=expression if expression is not None else np.zeros(len(model.expression_basis)),
                   ibug68_px=model_ibug68(model.landmarks68, vertices, recon.camera), photo_vertices=None)


def builtin_baseline(recon: Reconstruction) -> Reconstruction:
    """The built-in model's reference face (MediaPipe's points on a real face), subdivided like
    the reconstruction, rigidly placed onto it."""
    builtin = load_builtin()
    topology = next(builtin_topology(s) for s in (0, 1, 2) if builtin_topology(s).vertex_count == len(recon.vertices))
    head = np.asarray(topology.refine @ builtin.reference_vertices)
    pose, vertices = _placed(recon, head, np.arange(len(head)))
    points = pose.apply(builtin.reference_vertices)
    return replace(recon, method=f"{recon.method} {MEAN_FACE}", vertices=vertices, pose=pose, points468=points,
                   ibug68_px=builtin.ibug68_points(recon.camera.project(points)), photo_vertices=None)


def baselines(recon: Reconstruction, model: MorphableModel | None) -> list[Reconstruction]:
    """The baselines of a fit: the built-in model's reference face, or a morphable model's mean face
    and mean identity with the fitted expression."""
    if model is None:
        return [builtin_baseline(recon)]
    return [morphable_baseline(recon, model, False), morphable_baseline(recon, model, True)]
