"""Mesh topologies that the bake and the re-render work on, and a numpy-only sparse matrix.

A `MeshTopology` is the textured surface of a model as triangles over *texture vertices*: one per
distinct (model vertex, UV) pair, so a vertex on a UV seam appears once per side. `refine` maps the
fitted points (the model's vertices, or the 468 landmark vertices of the built-in model) to the
texture vertices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class SparseRows:
    """A sparse matrix of `shape` as (row, column, value) triplets; `matrix @ dense` sums
    value * dense[column] into each row (numpy only: no scipy at run time)."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    shape: tuple[int, int]

    def __matmul__(self, dense: np.ndarray) -> np.ndarray:
        out = np.zeros((self.shape[0],) + dense.shape[1:])
        np.add.at(out, self.rows, self.vals.reshape((-1,) + (1,) * (dense.ndim - 1)) * dense[self.cols])
        return out

    def row_sums(self) -> np.ndarray:
        return np.bincount(self.rows, self.vals, self.shape[0])

    @classmethod
    def selection(cls, columns: np.ndarray, column_count: int) -> SparseRows:
        """Row i picks column columns[i] (weight 1)."""
        count = len(columns)
        return cls(np.arange(count), np.asarray(columns, np.int64), np.ones(count), (count, column_count))

    def selected_columns(self) -> np.ndarray:
        """(rows,) the column each row picks, for a matrix made by `selection`; ValueError otherwise."""
        if not (np.array_equal(self.rows, np.arange(self.shape[0])) and np.all(self.vals == 1.0)):
            raise ValueError("not a selection matrix: a row mixes columns or weights them")
        return self.cols


@dataclass(frozen=True, eq=False)      # hashed by identity: UV rasters are cached per instance
class MeshTopology:
    """Triangles (F, 3) counter-clockwise seen from outside, per-texture-vertex UVs (V, 2) in the
    texture's [0, 1] square with the origin bottom-left, and `refine` (V, V0), dense or SparseRows,
    from the fitted points to the texture vertices. `uv_mirror_symmetric`: the layout is left/right
    symmetric (u of a vertex's twin is 1 - u), so the bake may fill a hidden texel from its mirror.
    `recipe` (function, args) rebuilds it: worker processes receive the recipe, not the arrays."""

    triangles: np.ndarray
    uvs: np.ndarray
    refine: Any
    recipe: tuple[Callable[..., "MeshTopology"], tuple]
    uv_mirror_symmetric: bool = True

    @property
    def vertex_count(self) -> int:
        return self.uvs.shape[0]

    def __reduce__(self) -> tuple:
        return self.recipe
