"""The one place where the benchmark touches the reconstruction pipeline (today's `Reconstructor.run`).

Everything else in benchmarks/quality works on `Reconstruction`, defined here; when the pipeline's
result types change, only `reconstruct` and `write_result_files` below change with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend_server.geometry import Camera, Pose
from backend_server.models import store
from backend_server.models.builtin import NAME as BUILTIN
from backend_server.models.topology import SparseRows

from .texels import texel_map, visible_texels


@dataclass
class Reconstruction:
    """One face reconstructed from one photo (or made by a baseline or a peer), in the terms the
    benchmark measures. Frames: camera frame and head frame of `backend_server.geometry` (metres).

    method: the row's name (e.g. "ict-facekit", "ict-facekit mean face", "eos (sfm)");
    model: the topology's model name ("builtin", "ict-facekit", "sfm");
    vertices (V, 3): posed, camera frame, the model's own topology (built-in: its subdivided mesh);
    triangles (F, 3) over vertices, every part (rendering and surface distances);
    neutral (V, 3) or None: head frame, the same face with every expression weight 0 (None for the
        built-in model, which has no expression model);
    pose: head frame -> camera frame; camera: the photo's intrinsics;
    points468 (468, 3): MediaPipe's points on the reconstruction (camera frame), points468_valid (468,);
    face_region (n,): vertex ids of the model's face area;
    texture (S, S, 3) uint8 sRGB in the model's UV layout; texel_seen (S, S) bool: texels the
        photo (any of the photos) sees: in view, facing it, not hidden (the bake's rule), whether or
        not the bake then trusted their colour; texel_covered (S, S) bool: texels inside the UV islands;
    uv_triangles (T, 3) over texture vertices, uvs (R, 2) (origin bottom-left), uv_vertex (R,) the
        vertex of each texture vertex;
    identity, expression: coefficients (None for the built-in model);
    landmarks (478, 3): MediaPipe's landmarks in photo pixels; ibug68_px (68, 2): the iBUG-68 points
        of the reconstruction in photo pixels (NaN where the model has none);
    photo_vertices (V, 3) or None: camera-frame vertices that reproject as the method's own camera
        does (eos: scaled orthographic), for re-rendering into the photo; None: `vertices`;
    texel_used (S, S) bool or None: texels whose colour came from a photo (the bake's weight above 0:
        skin, not clipped, not in deep shadow); None where not known.
    """

    method: str
    model: str
    vertices: np.ndarray
    triangles: np.ndarray
    neutral: np.ndarray | None
    pose: Pose
    camera: Camera
    points468: np.ndarray
    points468_valid: np.ndarray
    face_region: np.ndarray
    texture: np.ndarray
    texel_seen: np.ndarray
    texel_covered: np.ndarray
    uv_triangles: np.ndarray
    uvs: np.ndarray
    uv_vertex: np.ndarray
    identity: np.ndarray | None
    expression: np.ndarray | None
    landmarks: np.ndarray
    ibug68_px: np.ndarray
    photo_vertices: np.ndarray | None = None
    texel_used: np.ndarray | None = None

    @property
    def head_vertices(self) -> np.ndarray:
        """(V, 3) the posed reconstruction in its head frame."""
        return self.pose.head_frame(self.vertices)


def _bake_rule() -> tuple[float, float]:
    """The bake's visibility thresholds (facing cosine, depth tolerance in metres)."""
    from backend_server.pipeline.bake import DEPTH_TOLERANCE_M, MIN_FACING_COS
    return MIN_FACING_COS, DEPTH_TOLERANCE_M


class Pipeline:
    """One `Reconstructor` (detectors and models loaded once) for many photos."""

    def __init__(self, device: str = "cpu") -> None:
        from backend_server.pipeline.reconstruct import Reconstructor
        self.reconstructor = Reconstructor(device)

    def close(self) -> None:
        self.reconstructor.close()

    def reconstruct(self, photo: bytes, name: str, model: str, texture_size: int = 512,
                    subdivision: int = 1) -> tuple[Reconstruction, np.ndarray]:
        """(the largest face's Reconstruction, the decoded photo (H, W, 3) uint8 it was made from).
        Raises ProtocolError (shared_protocol) when no face is found."""
        from shared_protocol import ReconstructOptions
        result = self.reconstructor.run(photo, name, ReconstructOptions(
            model=model, texture_size=texture_size, outputs=("json",), subdivision=subdivision))
        face = result.faces[0]
        return self._reconstruction(result.model, model, face.fit, face.texture_vertices, face.bake.texture,
                                    face.landmarks), result.photo.rgb

    def reconstruct_person(self, photos: list[tuple[bytes, str]], model: str, texture_size: int = 512,
                           subdivision: int = 1) -> tuple[Reconstruction | None, object]:
        """Several photos of one person (`Reconstructor.run_person`): (the head as a Reconstruction
        of its reference photo, or None when that is not the first photo, and the
        PersonReconstruction itself). Seen texels: those any used photo sees, by the rule a single
        photo's are (`_visible`); used texels: those the fusion took a colour for."""
        from shared_protocol import PersonPhoto, ReconstructOptions
        person = self.reconstructor.run_person([PersonPhoto(name, data) for data, name in photos], ReconstructOptions(
            model=model, texture_size=texture_size, outputs=("json",), subdivision=subdivision))
        if person.reference != 0:
            return None, person
        face = person.located[0]
        assert face is not None
        size = texture_size
        kept = [person.fit.fits[k] for k in person.kept]
        seen = np.zeros((size, size), bool)
        for fit, vertices in zip(kept, person.model.texture_vertices(kept)):
            seen |= self._visible(person.model, fit, vertices, size)
        recon = self._reconstruction(person.model, person.model.name, person.fit.fits[0], person.texture_vertices,
                                     person.completed.texture, face.landmarks, seen)
        recon.texel_used = np.asarray(person.fused.texel_weight) > 0
        return recon, person

    def _reconstruction(self, model_, name: str, fit, texture_vertices: np.ndarray,  # type: ignore[no-untyped-def]
                        texture: np.ndarray, landmarks: np.ndarray, seen: np.ndarray | None = None) -> Reconstruction:
        """One fitted face as a Reconstruction; seen: the texels the photos saw (None: those this
        fit's camera sees, by the bake's own facing and depth rule)."""
        topology = model_.topology
        mesh = model_.head_mesh(fit)
        ibug68 = model_.ibug68(fit, landmarks)
        if mesh.neutral is None:
            vertices = np.asarray(texture_vertices)
            uv_vertex = np.arange(len(vertices))
            neutral, identity, expression = None, None, None
            face_region = np.arange(len(vertices))
            points468, valid = fit.landmark_points, np.ones(468, bool)
            triangles = topology.triangles
        else:
            morphable = model_.model
            vertices = fit.pose.apply(mesh.posed)
            refine = topology.refine
            uv_vertex = refine.cols if isinstance(refine, SparseRows) else np.arange(len(vertices))
            neutral, identity, expression = mesh.neutral, fit.identity, fit.expression
            face_region = morphable.face_region
            points468, valid = fit.landmark_points, morphable.mediapipe.valid
            triangles = morphable.triangles
        size = texture.shape[0]
        if seen is None:
            seen = self._visible(model_, fit, texture_vertices, size)
        return Reconstruction(
            name, name, vertices, triangles, neutral, fit.pose, fit.camera, np.asarray(points468),
            np.asarray(valid), face_region, texture, seen, texel_map(topology.triangles, topology.uvs, size).covered(),
            topology.triangles, topology.uvs, uv_vertex, identity, expression, landmarks, ibug68)

    @staticmethod
    def _visible(model_, fit, texture_vertices: np.ndarray, size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
        """(size, size) bool: the texels one fitted photo sees by the bake's facing and depth rule.
        texture_vertices: (topology.vertex_count, 3) camera-frame metres (`FaceModel.texture_vertices`)."""
        facing, tolerance = _bake_rule()
        return visible_texels(model_.topology.triangles, model_.topology.uvs, np.asarray(texture_vertices),
                              fit.camera, size, facing, tolerance)

    def write_result_files(self, photo: bytes, name: str, model: str, folder: Path, texture_size: int = 1024) -> Path:
        """Reconstruct and write every output file (obj, mtl, png, json, neutral, shape keys) into
        `folder`, as the add-on receives them; returns the .obj's path."""
        from shared_protocol import ReconstructOptions
        result = self.reconstructor.run(photo, name, ReconstructOptions(model=model, texture_size=texture_size))
        folder.mkdir(parents=True, exist_ok=True)
        obj = None
        for file in result.files:
            (folder / file.name).write_bytes(file.data)
            if file.name.endswith(".obj") and not file.name.endswith("_neutral.obj"):
                obj = folder / file.name
        if obj is None:
            raise RuntimeError(f"{name}: the pipeline wrote no .obj")
        return obj


def model_ibug68(landmarks68: np.ndarray, vertices: np.ndarray, camera: Camera) -> np.ndarray:
    """(68, 2) photo pixels of a model's iBUG-68 vertices (NaN where the model has none)."""
    out = np.full((68, 2), np.nan)
    known = landmarks68 >= 0
    out[known] = camera.project(vertices[landmarks68[known]])
    return out


def installed(name: str) -> bool:
    return name == BUILTIN or name in store.installed_models()
