"""The whole pipeline for one photo: decode -> detect -> landmarks -> fit -> bake -> export.

A `Reconstructor` loads its models once (one per worker process) and runs photos one at a time.
`on_stage(stage, fraction)` is called as each stage starts; it may raise (e.g. ProtocolError
CANCELLED) to stop the job at that stage boundary.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shared_protocol import ErrorCode, ProtocolError, ReconstructOptions, ResultFile
from .. import __version__
from ..models.builtin import NAME as BUILTIN_NAME, MeshTopology, builtin_topology, load_builtin
from .bake import Bake, bake_texture, texel_map, vertex_normals
from .decode import Photo, decode_photo
from .detect import FaceBox, FaceDetector, select_faces
from .export import mtl_bytes, obj_bytes, png_bytes, safe_stem
from .fit import Camera, Fit, fit_builtin
from .landmarks import LandmarkDetector

StageCallback = Callable[[str, float], None]
AVAILABLE_MODELS = (BUILTIN_NAME,)


@dataclass
class FaceReconstruction:
    """One reconstructed face: its inputs, geometry, texture and the files made of them."""

    index: int
    box: FaceBox
    landmarks: np.ndarray          # (478, 3) photo pixels
    fit: Fit
    topology: MeshTopology
    vertices: np.ndarray           # (V, 3) camera-frame metres of the output mesh
    bake: Bake | None
    facts: dict[str, Any]
    files: list[ResultFile] = field(default_factory=list)


@dataclass
class PhotoReconstruction:
    photo: Photo
    faces: list[FaceReconstruction]
    timings_ms: dict[str, float]

    @property
    def files(self) -> list[ResultFile]:
        return [f for face in self.faces for f in face.files]


class _StageClock:
    def __init__(self, on_stage: StageCallback | None) -> None:
        self.on_stage = on_stage
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def enter(self, stage: str, fraction: float) -> None:
        self.stop()
        if self.on_stage:
            self.on_stage(stage, fraction)
        self._current = (stage, time.perf_counter())

    def stop(self) -> None:
        if self._current:
            stage, start = self._current
            self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000
            self._current = None


@dataclass
class PreparedPhoto:
    """A photo after decode, detect, landmarks and fit: everything bake needs, per face."""

    photo: Photo
    faces: list[FaceReconstruction]          # bake still None until baked
    names: list[str]                         # output file stem per face
    camera: Camera
    clock: _StageClock


class Reconstructor:
    """Holds the detectors, the model and (for a CUDA device) the GPU baker; one per worker.

    `run` = `prepare` (decode, detect, landmarks, fit; CPU) + `bake` + `finish` (export). The GPU
    batch path calls the three apart so that many photos share one GPU bake.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.detector = FaceDetector()
        self.landmarker = LandmarkDetector()
        self.model = load_builtin()
        self.gpu_baker = None
        if device != "cpu":
            from .bake_gpu import GpuBaker
            self.gpu_baker = GpuBaker(device)

    def close(self) -> None:
        self.detector.close()
        self.landmarker.close()

    def warm_up(self, texture_size: int, subdivision: int = 1) -> None:
        """Build the cached UV rasterization so the first job is as fast as the rest."""
        if self.gpu_baker is not None:
            self.gpu_baker.warm_up(builtin_topology(subdivision), texture_size)
        else:
            texel_map(builtin_topology(subdivision), texture_size)

    def run(self, data: bytes, photo_name: str, options: ReconstructOptions = ReconstructOptions(),
            on_stage: StageCallback | None = None) -> PhotoReconstruction:
        prepared = self.prepare(data, photo_name, options, on_stage)
        prepared.clock.enter("bake", 0.4)
        self.bake(prepared, options)
        return self.finish(prepared, options)

    def prepare(self, data: bytes, photo_name: str, options: ReconstructOptions = ReconstructOptions(),
                on_stage: StageCallback | None = None) -> PreparedPhoto:
        if options.model not in AVAILABLE_MODELS:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL, f"model {options.model!r} is not installed; "
                                f"available: {', '.join(AVAILABLE_MODELS)}")
        clock = _StageClock(on_stage)
        clock.enter("decode", 0.0)
        photo = decode_photo(data, photo_name)
        clock.enter("detect", 0.1)
        chosen = select_faces(self.detector(photo.rgb), options.face, photo_name)
        topology = builtin_topology(options.subdivision)
        camera = Camera.for_photo(*photo.size)
        faces = []
        for n, (index, box) in enumerate(chosen):
            clock.enter("landmarks", 0.2)
            landmarks = self.landmarker(photo.rgb, box, photo_name)
            clock.enter("fit", 0.3)
            fit = fit_builtin(landmarks, self.model.reference_vertices, camera)
            vertices = topology.refine @ fit.vertices
            faces.append(FaceReconstruction(index, box, landmarks, fit, topology, vertices, None, {}))
        stem = safe_stem(photo_name)
        names = [stem if options.face != -1 else f"{stem}_face{face.index}" for face in faces]
        clock.stop()
        return PreparedPhoto(photo, faces, names, camera, clock)

    def bake(self, prepared: PreparedPhoto, options: ReconstructOptions) -> None:
        """Texture every face of one photo (on the GPU when this worker has one)."""
        if self.gpu_baker is not None:
            bakes = self.gpu_baker.bake([prepared.photo.rgb] * len(prepared.faces),
                                        [face.vertices for face in prepared.faces],
                                        [prepared.camera] * len(prepared.faces),
                                        prepared.faces[0].topology, options.texture_size)
        else:
            bakes = [bake_texture(prepared.photo.rgb, face.vertices, face.topology, prepared.camera,
                                  options.texture_size) for face in prepared.faces]
        for face, bake in zip(prepared.faces, bakes):
            face.bake = bake

    def finish(self, prepared: PreparedPhoto, options: ReconstructOptions) -> PhotoReconstruction:
        return export_faces(prepared, options)


def export_faces(prepared: PreparedPhoto, options: ReconstructOptions) -> PhotoReconstruction:
    """Stage 6 for every baked face of a photo: OBJ/MTL/PNG files, then the JSON with all timings."""
    clock = prepared.clock
    clock.enter("export", 0.9)
    for name, face in zip(prepared.names, prepared.faces):
        face.files = mesh_and_texture_files(name, face, options)
    clock.stop()
    for name, face in zip(prepared.names, prepared.faces):   # last: the JSON carries every stage's time
        face.facts = face_facts(prepared.photo, face, options, clock.timings, len(prepared.faces))
        if "json" in options.outputs:
            face.files.append(ResultFile(f"{name}.json", "json", json_bytes(face.facts)))
    return PhotoReconstruction(prepared.photo, prepared.faces, clock.timings)


def json_bytes(facts: dict[str, Any]) -> bytes:
    return json.dumps(facts, indent=1).encode("utf-8")


def mesh_and_texture_files(name: str, face: FaceReconstruction, options: ReconstructOptions
                           ) -> list[ResultFile]:
    files = []
    if "obj" in options.outputs:
        head = face.fit.head_frame(face.vertices)
        normals = vertex_normals(head, face.topology.triangles)
        files.append(ResultFile(f"{name}.obj", "obj", obj_bytes(head, normals, face.topology.uvs,
                                                                  face.topology.triangles, f"{name}.mtl", name)))
    if "mtl" in options.outputs:
        files.append(ResultFile(f"{name}.mtl", "mtl", mtl_bytes(name, f"{name}.png")))
    if "png" in options.outputs:
        files.append(ResultFile(f"{name}.png", "png", png_bytes(face.bake.texture)))
    return files


def face_facts(photo: Photo, face: FaceReconstruction, options: ReconstructOptions,
               timings_ms: dict[str, float], face_count: int) -> dict[str, Any]:
    """Everything the JSON output says about one face (units in the key names)."""
    fit = face.fit
    projected = fit.camera.project(face.vertices[:len(fit.vertices)])
    reprojection = np.linalg.norm(projected - face.landmarks[:len(projected), :2], axis=1)
    return {
        "format": "facerecon-face/1",
        "backend_version": __version__,
        "model": options.model,
        "coefficients": {
            "shape": None, "expression": None,
            "note": "the built-in model has no shape or expression basis; its geometry is per vertex"},
        "mesh": {"vertices": int(face.topology.vertex_count), "triangles": int(len(face.topology.triangles)),
                 "subdivision": options.subdivision,
                 "frame": "head frame: metres, +Y up, face toward +Z; camera = pose applied"},
        "texture": {"size_px": options.texture_size, "uv_origin": "bottom-left", "colour_space": "sRGB"},
        "photo": {"name": photo.name, "width_px": photo.size[0], "height_px": photo.size[1],
                  "original_width_px": photo.original_size[0], "original_height_px": photo.original_size[1],
                  "scale": photo.scale},
        "face": {"index": face.index, "of": face_count,
                 "box_px": [face.box.x0, face.box.y0, face.box.width, face.box.height],
                 "detector_score": face.box.score},
        "camera": fit.camera.to_json(),
        "pose": {**fit.pose.to_json(), "frame": "x_camera = rotation @ x_head + translation_m; "
                 "camera: metres, +X right, +Y up, +Z toward the viewer"},
        "landmarks_px": np.round(face.landmarks, 3).tolist(),
        "quality": {
            "texture_seen_fraction": face.bake.seen_fraction,
            "texture_mirrored_fraction": face.bake.mirrored_fraction,
            "landmark_reprojection_rms_px": float(np.sqrt((reprojection ** 2).mean())),
            "rigid_fit_rms_px": fit.rigid_rms_px,
        },
        "timings_ms": dict(timings_ms),
    }
