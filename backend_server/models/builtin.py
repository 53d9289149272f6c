"""The built-in face model: MediaPipe's 468-vertex face-mesh topology with the project's own UVs.

It has no shape or expression basis: every photo gives its own per-vertex geometry. The face is
assumed to have the reference face's size (63 mm between the iris centres). A similarity
(Procrustes) fit of the reference shape to the landmarks gives the head rotation and the
pixels-per-metre scale, hence the distance (depth = focal_px / scale); every landmark is then
lifted to its own 3D point on its camera ray at its own depth, so the mesh reprojects onto the
landmarks exactly. The mesh exported and baked is that one after `subdivision` Loop steps.
Fixed data lives in `data/builtin_topology.json` (made by `python -m backend_server.cli.build_builtin_topology`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..geometry import Camera, Pose, rigid_fit, similarity_fit, vertex_normals
from .face_model import FaceFit, FaceModel, HeadMesh, MeshLayout, ModelFacts, Part, PersonFit
from .topology import MeshTopology, SparseRows

if TYPE_CHECKING:
    from .calibration import ShapeCorrection

DATA_FILE = Path(__file__).parent / "data" / "builtin_topology.json"
NAME = "builtin"
PERSON_MISMATCH_LIMIT_M = 0.010   # a photo's shape farther than this (RMS over its well-seen points,
                                  # metres) from the others' combined shape is left out


@dataclass(frozen=True)
class BuiltinModel:
    reference_vertices: np.ndarray   # (468, 3) metres, head frame (+X face's left, +Y up, +Z out)
    triangles: np.ndarray            # (852, 3)
    uvs: np.ndarray                  # (468, 2)
    mirror: np.ndarray               # (468,) left/right twin of each vertex
    ibug68: list[list[int]]          # iBUG-68 point k = mean of these vertices

    def ibug68_points(self, points: np.ndarray) -> np.ndarray:
        """(≥468, C) per-landmark values -> (68, C) iBUG-68 points."""
        return np.stack([points[ids].mean(axis=0) for ids in self.ibug68])


@lru_cache(maxsize=1)
def load_builtin() -> BuiltinModel:
    data = json.loads(DATA_FILE.read_text())
    return BuiltinModel(np.array(data["reference_vertices_m"]), np.array(data["triangles"], np.int64),
                        np.array(data["uvs"]), np.array(data["mirror"], np.int64), data["ibug68"])


def _edges(triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges (E, 2) and, per triangle side k (edge v[k] -> v[k+1]), its edge id."""
    sides = np.stack([triangles, np.roll(triangles, -1, axis=1)], axis=2).reshape(-1, 2)
    edges, side_edge = np.unique(np.sort(sides, axis=1), axis=0, return_inverse=True)
    return edges, side_edge.reshape(-1, 3)


def loop_subdivide_matrices(triangles: np.ndarray, vertex_count: int
                            ) -> tuple[np.ndarray, SparseRows, SparseRows]:
    """One Loop subdivision step: (new triangles, smooth matrix, linear matrix), each matrix of
    shape (V + E, V). The smooth one applies Loop's masks (Warren's weights; boundary edges and
    vertices use the 1/2-1/2 and 1/8-3/4-1/8 curve masks); the linear one places edge midpoints
    (for UVs, which must stay a flat, overlap-free layout)."""
    edges, side_edge = _edges(triangles)
    count = len(edges)
    opposite: list[list[int]] = [[] for _ in range(count)]
    for k in range(3):
        for edge, vertex in zip(side_edge[:, k], triangles[:, (k + 2) % 3]):
            opposite[edge].append(vertex)
    boundary = np.array([len(o) == 1 for o in opposite])

    smooth_entries: tuple[list, list, list] = ([], [], [])       # rows, columns, weights
    linear_entries: tuple[list, list, list] = ([], [], [])

    def put(entries: tuple[list, list, list], row: int, columns: list, weights: list[float]) -> None:
        entries[0].extend([row] * len(columns))
        entries[1].extend(columns)
        entries[2].extend(weights)

    for e, (a, b) in enumerate(edges):
        row = vertex_count + e
        put(linear_entries, row, [a, b], [0.5, 0.5])
        if boundary[e]:
            put(smooth_entries, row, [a, b], [0.5, 0.5])
        else:
            c, d = opposite[e]
            put(smooth_entries, row, [a, b, c, d], [0.375, 0.375, 0.125, 0.125])

    neighbours: list[set[int]] = [set() for _ in range(vertex_count)]
    boundary_neighbours: list[list[int]] = [[] for _ in range(vertex_count)]
    for e, (a, b) in enumerate(edges):
        neighbours[a].add(b)
        neighbours[b].add(a)
        if boundary[e]:
            boundary_neighbours[a].append(b)
            boundary_neighbours[b].append(a)
    for v in range(vertex_count):
        put(linear_entries, v, [v], [1.0])
        ring = boundary_neighbours[v]
        if ring:
            put(smooth_entries, v, [v] + ring, [0.75] + [0.25 / len(ring)] * len(ring))
        elif neighbours[v]:
            n = len(neighbours[v])
            beta = 3 / 16 if n == 3 else 3 / (8 * n)
            put(smooth_entries, v, [v] + sorted(neighbours[v]), [1 - n * beta] + [beta] * n)
        else:
            put(smooth_entries, v, [v], [1.0])

    shape = (vertex_count + count, vertex_count)
    smooth = SparseRows(np.array(smooth_entries[0]), np.array(smooth_entries[1]), np.array(smooth_entries[2]), shape)
    linear = SparseRows(np.array(linear_entries[0]), np.array(linear_entries[1]), np.array(linear_entries[2]), shape)
    m = vertex_count + side_edge                      # new vertex id of each side's midpoint
    v0, v1, v2 = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    m01, m12, m20 = m[:, 0], m[:, 1], m[:, 2]
    new_triangles = np.concatenate([np.stack(t, axis=1) for t in
                                    ((v0, m01, m20), (m01, v1, m12), (m20, m12, v2), (m01, m12, m20))])
    return new_triangles, smooth, linear


@lru_cache(maxsize=4)
def builtin_topology(subdivision: int) -> MeshTopology:
    """The built-in mesh after `subdivision` Loop steps (0: the 468-vertex face mesh)."""
    model = load_builtin()
    triangles, uvs = model.triangles, model.uvs
    refine = np.identity(len(uvs))
    for _ in range(subdivision):
        triangles_next, smooth, linear = loop_subdivide_matrices(triangles, len(uvs))
        refine = smooth @ refine
        uvs = linear @ uvs
        triangles = triangles_next
    return MeshTopology(triangles, uvs, refine, (builtin_topology, (subdivision,)))


@dataclass(frozen=True)
class LandmarkFit(FaceFit):
    """The built-in model's fit: `landmark_points` (468, 3) camera-frame metres are the mesh
    itself; rigid_rms_px: how far the rigid reference shape (before per-vertex lifting) lies from
    the landmarks, in pixels."""

    rigid_rms_px: float


def fit_landmarks(landmarks: np.ndarray, reference: np.ndarray, camera: Camera) -> LandmarkFit:
    """landmarks: (478, 3) photo pixels (x, y down, z MediaPipe depth); reference: (468, 3) metres."""
    mesh = landmarks[:len(reference)]
    # Landmarks in a Y-up, Z-toward-viewer frame centred on the principal point (pixels).
    observed = np.stack([mesh[:, 0] - camera.cx, camera.cy - mesh[:, 1], -mesh[:, 2]], axis=1)
    scale, rotation, shift = similarity_fit(reference, observed)         # pixels per metre
    rigid = scale * reference @ rotation.T + shift
    rigid_rms = float(np.sqrt(((rigid[:, :2] - observed[:, :2]) ** 2).sum(1).mean()))
    distance = camera.focal_px / scale                                   # metres to the head origin
    depth = distance - (observed[:, 2] - shift[2]) / scale               # per-vertex distance
    vertices = np.stack([observed[:, 0] * depth / camera.focal_px,
                         observed[:, 1] * depth / camera.focal_px, -depth], axis=1)
    translation = np.array([shift[0] * distance / camera.focal_px, shift[1] * distance / camera.focal_px,
                            -distance])
    return LandmarkFit(Pose(rotation, translation), camera, vertices, rigid_rms)


def corrected_fit(landmarks: np.ndarray, reference: np.ndarray, camera: Camera,
                  correction: ShapeCorrection | None) -> LandmarkFit:
    """`fit_landmarks`, its mesh replaced by the correction's prediction (models/calibration.py),
    placed by the same pose, where there is a correction."""
    fit = fit_landmarks(landmarks, reference, camera)
    if correction is None:
        return fit
    return replace(fit, landmark_points=fit.pose.apply(correction.predict(landmarks, reference, camera)))


def seen_weights(fit: LandmarkFit, triangles: np.ndarray) -> np.ndarray:
    """(468,) how well a photo saw each vertex: cos² of the angle between its normal and the ray to
    the camera (0 where it faces away). MediaPipe's depth is weakest where the surface turns away."""
    points = fit.landmark_points
    normals = vertex_normals(points, triangles)
    facing = np.einsum("nc,nc->n", normals, -points) / np.maximum(np.linalg.norm(points, axis=1), 1e-12)
    return np.clip(facing, 0.0, 1.0) ** 2 + 1e-3


def combine_shapes(shapes: list[np.ndarray], weights: list[np.ndarray], rounds: int = 2) -> np.ndarray:
    """(468, 3) head-frame shapes of one face from several photos -> their per-vertex weighted mean,
    each shape rigidly aligned to the mean first (their head frames come from separate fits)."""
    total = np.sum(weights, axis=0)[:, None]
    mean = np.sum([w[:, None] * s for s, w in zip(shapes, weights)], axis=0) / total
    for _ in range(rounds):
        aligned = [rigid_fit(s, mean).apply(s) for s in shapes]
        mean = np.sum([w[:, None] * s for s, w in zip(aligned, weights)], axis=0) / total
    return mean


def person_fit(landmarks: list[np.ndarray | None], cameras: list[Camera], reference: np.ndarray,
               triangles: np.ndarray, correction: ShapeCorrection | None = None) -> PersonFit[LandmarkFit]:
    """The built-in model's fit of several photos of one person: each photo's own per-vertex shape
    (`fit_landmarks`, head frame; with a `correction` its prediction, as `BuiltinFaceModel.fit`
    makes it), combined per vertex weighted by how frontally each photo saw it
    (`seen_weights`); a photo whose shape lies farther than PERSON_MISMATCH_LIMIT_M from the others'
    combination is left out (of two that disagree, the second). Each kept photo's fit is the
    combined shape, placed by a similarity fit to its landmarks (scale: the reference's size)."""
    count = len(landmarks)
    left_out = {k: "no face was found in it" for k, marks in enumerate(landmarks) if marks is None}
    mismatch = [float("nan")] * count
    singles = {k: corrected_fit(marks, reference, cameras[k], correction)
               for k, marks in enumerate(landmarks) if marks is not None}
    shapes = {k: fit.pose.head_frame(fit.landmark_points) for k, fit in singles.items()}
    weights = {k: seen_weights(fit, triangles) for k, fit in singles.items()}
    kept = list(singles)
    while len(kept) > 1:
        for k in kept:
            others = combine_shapes([shapes[j] for j in kept if j != k], [weights[j] for j in kept if j != k])
            aligned = rigid_fit(shapes[k], others).apply(shapes[k])
            w = weights[k]
            rms = float(np.sqrt((w * ((aligned - others) ** 2).sum(1)).sum() / w.sum()))
            mismatch[k] = rms / PERSON_MISMATCH_LIMIT_M
        worst = max(kept, key=lambda k: mismatch[k])
        if mismatch[worst] <= 1.0:
            break
        drop = kept[1] if len(kept) == 2 else worst
        left_out[drop] = (f"its face does not fit the others' shape (mismatch {mismatch[drop]:.1f}, limit 1): "
                          "another person, or landmarks that missed the face")
        kept.remove(drop)
    fits: list[LandmarkFit | None] = [None] * count
    if not kept:
        return PersonFit(tuple(fits), left_out, tuple(mismatch))
    shape = combine_shapes([shapes[k] for k in kept], [weights[k] for k in kept])
    for k in kept:
        placed = fit_landmarks(landmarks[k], shape, cameras[k])          # type: ignore[arg-type]
        fits[k] = LandmarkFit(placed.pose, cameras[k], placed.pose.apply(shape), placed.rigid_rms_px)
    return PersonFit(tuple(fits), left_out, tuple(mismatch))


class BuiltinFaceModel(FaceModel[LandmarkFit]):
    """The built-in model as a FaceModel: no coefficients, one textured part, no expressions."""

    def __init__(self, subdivision: int, correction: ShapeCorrection | None = None) -> None:
        self.name = NAME
        self.subdivision = subdivision
        self.correction = correction
        self.data = load_builtin()
        self.topology = builtin_topology(subdivision)
        triangles = np.concatenate([self.topology.triangles, np.full((len(self.topology.triangles), 1), -1)],
                                   axis=1)                              # one UV per vertex: same ids
        self.layout = MeshLayout(triangles, triangles, self.topology.uvs, np.zeros(len(triangles), np.int64),
                                 (Part("face", textured=True),))

    def fit(self, landmarks: Sequence[np.ndarray], cameras: Sequence[Camera], device: str = "cpu"
            ) -> list[LandmarkFit]:
        """Closed form, numpy, a face at a time (about 0.5 ms each): `device` is not needed. With a
        `correction` (models/calibration.py) the mesh is its prediction, placed by the same pose."""
        reference = self.data.reference_vertices
        fits = [fit_landmarks(marks, reference, camera) for marks, camera in zip(landmarks, cameras)]
        if self.correction is None:
            return fits
        predicted = self.correction.predict_many(landmarks, reference, cameras)
        return [replace(fit, landmark_points=fit.pose.apply(points)) for fit, points in zip(fits, predicted)]

    def fit_person(self, landmarks: Sequence[np.ndarray | None], cameras: Sequence[Camera], device: str = "cpu"
                   ) -> PersonFit[LandmarkFit]:
        """One per-vertex shape from all photos (`person_fit`, with this model's `correction`), numpy:
        `device` is not needed."""
        return person_fit(list(landmarks), list(cameras), self.data.reference_vertices, self.data.triangles,
                          self.correction)

    def texture_vertices(self, fits: Sequence[LandmarkFit], device: str = "cpu") -> list[np.ndarray]:
        return [self.topology.refine @ fit.landmark_points for fit in fits]

    def head_mesh(self, fit: LandmarkFit) -> HeadMesh:
        [vertices] = self.texture_vertices([fit])
        return HeadMesh(self.layout, fit.pose.head_frame(vertices), None, np.zeros(0))

    def facts(self, fit: LandmarkFit, name: str) -> ModelFacts:
        return ModelFacts(
            {"identity": None, "expression": None,
             "note": "the built-in model has no shape or expression basis; its geometry is per vertex"},
            {"vertices": int(self.topology.vertex_count), "triangles": int(len(self.topology.triangles)),
             "subdivision": self.subdivision},
            {"rigid_fit_rms_px": fit.rigid_rms_px})

    def ibug68(self, fit: LandmarkFit, landmarks: np.ndarray) -> np.ndarray:
        return self.data.ibug68_points(landmarks[:, :2])

    def __reduce__(self) -> tuple:
        """Pickled by its recipe: another process builds (or reuses) its own."""
        from .registry import face_model
        return (face_model, (NAME, self.subdivision))
