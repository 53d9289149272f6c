"""A head sample turned into what the renderers need: vertices, a `RenderMesh`, textures, lights.

`SyntheticScene` holds the truth of one head at one moment: its neutral and posed vertices in the
head frame, the albedo texture (model UV layout) and per-vertex albedo (untextured parts), the light
(head frame) and the views; `render_fast` renders a view with `render.shade`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..models.morphable import MorphableModel, triangulate
from ..render.shade import Light, Rendering, RenderMesh, render_batch
from .albedo import albedo_texture, vertex_albedo
from .sampling import HeadSample, View


@lru_cache(maxsize=4)
def model_render_topology(model: MorphableModel) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every part of a model as render vertices (distinct (vertex, UV) pairs): triangles (F, 3),
    UVs (R, 2), vertex id per render vertex (R,), textured flag per triangle (F,)."""
    corners = triangulate(model.polygons)
    corner_uvs = triangulate(model.polygon_uvs)
    part = np.concatenate([model.polygon_part, model.polygon_part[model.polygons[:, 3] >= 0]])
    pairs, render_vertex = np.unique(np.stack([corners.ravel(), corner_uvs.ravel()], axis=1), axis=0,
                                     return_inverse=True)
    textured = np.array([p.textured for p in model.parts])[part]
    return render_vertex.reshape(-1, 3), model.uvs[pairs[:, 1]], pairs[:, 0], textured


def model_render_mesh(model: MorphableModel, colours: np.ndarray) -> RenderMesh:
    """The whole model (every part) to render: textured parts take the albedo texture, the others
    `colours` (V, 3) sRGB 0..1 per vertex."""
    triangles, uvs, vertex_of, textured = model_render_topology(model)
    return RenderMesh(triangles, uvs, vertex_of, np.asarray(colours, np.float32)[vertex_of], textured)


@dataclass(frozen=True)
class SyntheticScene:
    """The truth of one head: neutral (V, 3) and posed (V, 3) vertices in the head frame (metres),
    albedo texture (S, S, 3) uint8 sRGB in the model's UV layout, per-vertex albedo (V, 3) sRGB 0..1
    (the untextured parts), and the sample (coefficients, views, head-frame light)."""

    model: MorphableModel
    sample: HeadSample
    neutral: np.ndarray
    posed: np.ndarray
    texture: np.ndarray
    vertex_colours: np.ndarray

    @classmethod
    def build(cls, model: MorphableModel, sample: HeadSample, texture_size: int = 1024) -> SyntheticScene:
        neutral = model.vertices(sample.identity)
        posed = model.vertices(sample.identity, sample.expression)
        return cls(model, sample, neutral, posed, albedo_texture(model, sample.albedo, texture_size),
                   vertex_albedo(model, sample.albedo))

    def in_view(self, view: View) -> np.ndarray:
        """(V, 3) the posed head in that view's camera frame."""
        return view.pose.apply(self.posed)

    def light_in_view(self, view: View) -> Light:
        return self.sample.light.rotated(view.pose.rotation)

    def render_fast(self, views: tuple[View, ...] | None = None, device: str = "cpu",
                    supersample: int = 2) -> list[Rendering]:
        """Every view (default: all) with the fast renderer, in one batch."""
        views = self.sample.views if views is None else views
        mesh = model_render_mesh(self.model, self.vertex_colours)
        return render_batch(mesh, np.stack([self.in_view(v) for v in views]), [v.camera for v in views],
                            self.texture, [self.light_in_view(v) for v in views], self.sample.background_srgb,
                            device, supersample)
