"""The built-in face model: MediaPipe's 468-vertex face-mesh topology with the project's own UVs.

It has no shape or expression basis: every photo gives its own per-vertex geometry (see fit.py).
Fixed data lives in `data/builtin_topology.json` (made by build_builtin_topology.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .topology import MeshTopology, SparseRows

DATA_FILE = Path(__file__).parent / "data" / "builtin_topology.json"
NAME = "builtin"


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
    opposite = [[] for _ in range(count)]
    for k in range(3):
        for edge, vertex in zip(side_edge[:, k], triangles[:, (k + 2) % 3]):
            opposite[edge].append(vertex)
    boundary = np.array([len(o) == 1 for o in opposite])

    rows, cols, vals = [], [], []
    lin_rows, lin_cols, lin_vals = [], [], []
    for e, (a, b) in enumerate(edges):
        row = vertex_count + e
        lin_rows += [row, row]; lin_cols += [a, b]; lin_vals += [0.5, 0.5]
        if boundary[e]:
            rows += [row, row]; cols += [a, b]; vals += [0.5, 0.5]
        else:
            c, d = opposite[e]
            rows += [row] * 4; cols += [a, b, c, d]; vals += [0.375, 0.375, 0.125, 0.125]

    neighbours = [set() for _ in range(vertex_count)]
    boundary_neighbours = [[] for _ in range(vertex_count)]
    for e, (a, b) in enumerate(edges):
        neighbours[a].add(b); neighbours[b].add(a)
        if boundary[e]:
            boundary_neighbours[a].append(b); boundary_neighbours[b].append(a)
    for v in range(vertex_count):
        lin_rows.append(v); lin_cols.append(v); lin_vals.append(1.0)
        if boundary_neighbours[v]:
            ring = boundary_neighbours[v]
            rows += [v] + [v] * len(ring); cols += [v] + ring
            vals += [0.75] + [0.25 / len(ring)] * len(ring)
        elif neighbours[v]:
            n = len(neighbours[v])
            beta = 3 / 16 if n == 3 else 3 / (8 * n)
            rows += [v] * (n + 1); cols += [v] + sorted(neighbours[v]); vals += [1 - n * beta] + [beta] * n
        else:
            rows.append(v); cols.append(v); vals.append(1.0)

    shape = (vertex_count + count, vertex_count)
    smooth = SparseRows(np.array(rows), np.array(cols), np.array(vals), shape)
    linear = SparseRows(np.array(lin_rows), np.array(lin_cols), np.array(lin_vals), shape)
    m = vertex_count + side_edge                      # new vertex id of each side's midpoint
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    ab, bc, ca = m[:, 0], m[:, 1], m[:, 2]
    new_triangles = np.concatenate([np.stack(t, axis=1) for t in
                                    ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
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
