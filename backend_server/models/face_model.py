"""The one interface every face model implements, and the types it hands to the pipeline.

A `FaceModel` turns MediaPipe's landmarks into a fitted head and says everything the later stages
need about it, so that the pipeline, the batch paths and the command line never ask which kind
of model they hold:

    fits = model.fit(landmarks, cameras, device)          # a batch of faces, one FaceFit each
    person = model.fit_person(landmarks, cameras, device) # several photos of one person: one shape
    vertices = model.texture_vertices(fits, device)       # camera frame, for the bake
    mesh = model.head_mesh(fit)                           # head frame, for export
    facts = model.facts(fit, name)                        # coefficients and mesh facts for the JSON
    points = model.ibug68(fit, landmarks)                 # iBUG-68 points in the photo

Frames (see backend_server.geometry): landmarks in photo pixels; `texture_vertices` in the camera
frame; `HeadMesh` in the head frame (metres, +Y up, the face toward +Z); a fit's `pose` maps the
head frame to the camera frame. Implementations: `builtin.BuiltinFaceModel` (MediaPipe's own
mesh, geometry per vertex) and `morphable_face.MorphableFaceModel` (any `MorphableModel`);
`registry.face_model(name)` returns the one a request names.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, Sequence, TypeVar

import numpy as np

from ..geometry import Camera, Pose
from .topology import MeshTopology


@dataclass(frozen=True)
class Part:
    """A material group of a mesh: `textured` parts take the baked photo texture; the others a
    plain colour (linear 0..1 RGB), or the face's skin colour where `skin` is set. `eye` ("left",
    "right") marks the parts of that eyeball (models/eyes.py): they turn to the gaze, and the
    visible one takes that eye's texture."""

    name: str
    colour: tuple[float, float, float] = (0.6, 0.6, 0.6)
    textured: bool = False
    skin: bool = False
    eye: str = ""


@dataclass(frozen=True)
class FaceFit:
    """What every model's fit of one face says. pose: head frame -> camera frame (metres);
    landmark_points: (468, 3) camera-frame metres, the fitted surface at MediaPipe's 468 points."""

    pose: Pose
    camera: Camera
    landmark_points: np.ndarray


FitT = TypeVar("FitT", bound=FaceFit)


def triangulate(polygons: np.ndarray) -> np.ndarray:
    """(F, 4) polygons (-1 padded triangles) -> (T, 3) fan triangles: every polygon's first
    triangle, then the quads' second ones (the same order for vertex ids and UV ids)."""
    return np.concatenate([polygons[:, :3], polygons[polygons[:, 3] >= 0][:, [0, 2, 3]]])


@dataclass(frozen=True, eq=False)           # hashed by identity: exporters cache per layout
class MeshLayout:
    """The fixed part of every head a model exports.

    polygons (F, 4) vertex ids, counter-clockwise seen from outside, -1 pads a triangle;
    polygon_uvs (F, 4) ids into `uvs` (U, 2), origin bottom-left; polygon_part (F,) index into
    `parts`; expression_basis (K, V, 3) metres per unit weight, one per `expression_names` entry
    (K = 0: the model has no expressions).
    """

    polygons: np.ndarray
    polygon_uvs: np.ndarray
    uvs: np.ndarray
    polygon_part: np.ndarray
    parts: tuple[Part, ...]
    expression_names: tuple[str, ...] = ()
    expression_basis: np.ndarray | None = None

    @cached_property
    def triangles(self) -> np.ndarray:
        """(T, 3) the polygons fanned into triangles (see `triangulate`)."""
        return triangulate(self.polygons)


@dataclass(frozen=True)
class HeadMesh:
    """One fitted head in its model's layout, head frame, metres. posed: (V, 3) with the fitted
    expression; neutral: (V, 3) with every expression weight 0, None for a model without a neutral
    shape; expression: (K,) the fitted weights of `layout.expression_names`."""

    layout: MeshLayout
    posed: np.ndarray
    neutral: np.ndarray | None
    expression: np.ndarray


@dataclass(frozen=True)
class ModelFacts:
    """What the JSON output says about a fit beyond pose and camera: `coefficients` (named),
    `mesh` (counts, files), `quality` (figures only this model has)."""

    coefficients: dict[str, Any]
    mesh: dict[str, Any]
    quality: dict[str, float]


@dataclass(frozen=True)
class PersonFit(Generic[FitT]):
    """Several photos of one person fitted together: one shape (identity) for all of them, a pose
    and an expression per photo. fits: one per photo given, in order, None for a photo left out;
    left_out: photo index -> why, in words; mismatch: per photo, how far its face lies from the
    shape the others agree on, over the limit that leaves a photo out (1.0 = the limit; NaN where
    not measured: a single photo, or one with no face)."""

    fits: tuple[FitT | None, ...]
    left_out: dict[int, str]
    mismatch: tuple[float, ...]

    @property
    def kept(self) -> list[int]:
        """Indices of the photos in the joint fit, in order."""
        return [k for k, fit in enumerate(self.fits) if fit is not None]


class FaceModel(ABC, Generic[FitT]):
    """A face model: fitted to landmarks, baked through `topology`, exported as `HeadMesh`es."""

    name: str
    topology: MeshTopology      # the textured surface over texture vertices: what the bake rasterizes

    @abstractmethod
    def fit(self, landmarks: Sequence[np.ndarray], cameras: Sequence[Camera], device: str = "cpu") -> list[FitT]:
        """One fit per face. landmarks: (478, 3) photo pixels each (x right, y down, z MediaPipe's
        relative depth in pixels); cameras: one per face; device: where batched work runs (cpu,
        cuda:N). The fits depend only on their own face, not on the batch."""

    @abstractmethod
    def fit_person(self, landmarks: Sequence[np.ndarray | None], cameras: Sequence[Camera], device: str = "cpu"
                   ) -> PersonFit[FitT]:
        """Several photos of one person: one shape for all, a pose (and expression) per photo.
        landmarks: (478, 3) photo pixels per photo, None for a photo without a face (it is left
        out); cameras: one per photo. A photo whose face does not fit the others' shape (another
        person, a failed detection) is left out with the reason; the first usable photo is the
        reference when two photos disagree and no third decides. At least one photo must have
        landmarks."""

    @abstractmethod
    def texture_vertices(self, fits: Sequence[FitT], device: str = "cpu") -> list[np.ndarray]:
        """(topology.vertex_count, 3) camera-frame metres per fit, float64 numpy."""

    @abstractmethod
    def head_mesh(self, fit: FitT) -> HeadMesh:
        """The head to export, head frame."""

    @abstractmethod
    def facts(self, fit: FitT, name: str) -> ModelFacts:
        """Named coefficients and mesh facts of a fit exported under the file stem `name`."""

    @abstractmethod
    def ibug68(self, fit: FitT, landmarks: np.ndarray) -> np.ndarray:
        """(68, 2) photo pixels of the iBUG-68 points (NaN rows where the model has no point);
        landmarks: the fit's (478, 3) input."""

    def part_textures(self, iris_srgb: tuple[int, int, int] | None) -> dict[int, tuple[str, np.ndarray]]:
        """Textures of parts other than the face's, by part index: (file-name suffix, (S, S, 3)
        uint8 sRGB image in that part's UV layout). iris_srgb: the photo's iris colour, if measured."""
        return {}

    def warm_up(self, device: str = "cpu") -> None:
        """Build whatever the first fit on `device` would otherwise build."""
