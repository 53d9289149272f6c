"""Dense correspondence between MediaPipe's 468 face-mesh points and a morphable model's surface.

Computed once per model (at install) from the built-in reference face (MediaPipe's points on a
real face, metres, head frame):
1. a similarity transform maps the reference's inner iBUG points (17-67: brows, eyes, nose, mouth)
   onto the model's own iBUG vertices, only to start from;
2. then, alternately, every reference point is projected onto the closest point of the model's
   textured surface, the model's identity and expression are fitted to those points (ridge, prior
   N(0, 1) for identity, expression weights clipped to [0, 1]) and the similarity is refitted to
   the fitted surface, a few rounds. Fitting the expression too keeps the reference face's own
   expression out of the correspondence (else every later fit would inherit it as a bias);
3. the last projection is the correspondence: a triangle's corners and barycentrics per MediaPipe point, so it
   holds for any identity and expression. Points farther than `MAX_DISTANCE_M` from the surface
   (outside the model's face) are marked invalid.
"""
from __future__ import annotations

import numpy as np

from ..geometry import similarity_fit
from .builtin import load_builtin
from .face_model import triangulate
from .morphable import Correspondence, MorphableModel

ROUNDS = 6
NEAREST_VERTICES = 12
SHAPE_NOISE_M = 0.002           # expected misfit of a reference point, for the identity's ridge weight
MAX_DISTANCE_M = 0.006


def closest_surface_points(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (N, 3) points: the nearest point on the triangles incident to each point's
    NEAREST_VERTICES nearest vertices -> triangle ids (N,), barycentrics (N, 3), distances (N,)."""
    used = np.unique(triangles)
    nearest = used[np.argsort(((points[:, None, :] - vertices[None, used, :]) ** 2).sum(2), axis=1)
                   [:, :NEAREST_VERTICES]]
    incident: list[list[int]] = [[] for _ in range(len(vertices))]
    for t, corners in enumerate(triangles.tolist()):
        for v in corners:
            incident[v].append(t)
    best_triangle = np.zeros(len(points), np.int64)
    best_bary = np.zeros((len(points), 3))
    best_distance = np.full(len(points), np.inf)
    for n, point in enumerate(points):
        candidates = np.unique(np.concatenate([incident[v] for v in nearest[n]]).astype(np.int64))
        bary = clamped_barycentrics(point, vertices[triangles[candidates]])
        on_surface = np.einsum("tk,tkc->tc", bary, vertices[triangles[candidates]])
        distance = np.linalg.norm(on_surface - point, axis=1)
        k = int(np.argmin(distance))
        best_triangle[n], best_bary[n], best_distance[n] = candidates[k], bary[k], distance[k]
    return best_triangle, best_bary, best_distance


def clamped_barycentrics(point: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Barycentrics (T, 3) of `point` projected onto each triangle's plane, clamped into the
    triangle (negative weights set to 0, then renormalised): close to the exact nearest point."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    v0, v1, v2 = b - a, c - a, point - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    denominator = np.maximum(d00 * d11 - d01 * d01, 1e-30)
    w1 = (d11 * d20 - d01 * d21) / denominator
    w2 = (d00 * d21 - d01 * d20) / denominator
    bary = np.clip(np.stack([1 - w1 - w2, w1, w2], axis=1), 0, None)
    return bary / np.maximum(bary.sum(1, keepdims=True), 1e-12)


def surface_points(basis: np.ndarray, triangles: np.ndarray, triangle: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """(..., V, 3) per-vertex values -> (..., N, 3) at the surface points (triangle, bary)."""
    corners = triangles[triangle]                                    # (N, 3)
    return np.einsum("nk,...nkc->...nc", bary, basis[..., corners, :])


def compute_correspondence(model: MorphableModel) -> Correspondence:
    builtin = load_builtin()
    reference = builtin.reference_vertices
    inner = [k for k in range(17, 68) if model.landmarks68[k] >= 0]
    if len(inner) < 10:
        raise ValueError(f"model {model.name!r} defines only {len(inner)} inner iBUG-68 vertices; "
                         "at least 10 are needed to place MediaPipe's points on it")
    scale, rotation, shift = similarity_fit(builtin.ibug68_points(reference)[inner],
                                            model.mean[model.landmarks68[inner]].astype(np.float64))
    triangles = triangulate(model.polygons[model.textured_polygons])
    identity = model.identity_basis.astype(np.float64)
    bases = np.concatenate([identity, model.expression_basis.astype(np.float64)])
    k_identity = len(identity)
    mean = model.mean.astype(np.float64)
    surface = mean
    for _ in range(ROUNDS):
        target = scale * reference @ rotation.T + shift
        triangle, bary, distance = closest_surface_points(target, surface, triangles)
        near = distance < 3 * MAX_DISTANCE_M
        design = surface_points(bases, triangles, triangle[near], bary[near]).reshape(len(bases), -1).T
        residual = (target[near] - surface_points(mean, triangles, triangle[near], bary[near])).ravel()
        coefficients = np.linalg.solve(design.T @ design + SHAPE_NOISE_M ** 2 * np.identity(len(bases)),
                                       design.T @ residual)
        coefficients[k_identity:] = np.clip(coefficients[k_identity:], 0.0, 1.0)
        surface = mean + np.tensordot(coefficients, bases, axes=1)
        fitted = surface_points(surface, triangles, triangle[near], bary[near])
        scale, rotation, shift = similarity_fit(reference[near], fitted)
    target = scale * reference @ rotation.T + shift
    triangle, bary, distance = closest_surface_points(target, surface, triangles)
    return Correspondence(triangles[triangle], bary, distance < MAX_DISTANCE_M, distance)
