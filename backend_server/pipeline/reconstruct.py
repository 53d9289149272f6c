"""The whole pipeline for one photo: decode -> detect -> landmarks -> fit -> bake -> export.

A `Reconstructor` loads its models once (one per worker process) and runs photos one at a time.
`on_stage(stage, fraction)` is called as each stage starts; it may raise (e.g. ProtocolError
CANCELLED) to stop the job at that stage boundary.
"""
from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from shared_protocol import ErrorCode, ProtocolError, ReconstructOptions, ResultFile
from shared_protocol.shape_keys import NEUTRAL_SUFFIX, SUFFIX as SHAPE_KEYS_SUFFIX, ShapeKey, encode_shape_keys
from .. import __version__
from ..models import store
from ..models.builtin import NAME as BUILTIN_NAME, builtin_topology, load_builtin
from ..models.morphable import MorphableModel, texture_topology
from ..models.topology import MeshTopology
from ..geometry import Camera, vertex_normals
from .bake import Bake, bake_texture, texel_map
from .decode import Photo, decode_photo
from .detect import FaceBox, FaceDetector, select_faces
from .export import mtl_bytes, obj_bytes, png_bytes, polygon_lines, safe_stem, uv_lines
from .fit import Fit, fit_builtin
from .fit_model import ModelFit, ModelFitter
from .landmarks import LandmarkDetector

StageCallback = Callable[[str, float], None]
SHAPE_KEY_MIN_OFFSET_M = 1e-5       # a vertex moved less than this by an expression is left out of its key


@lru_cache(maxsize=4)
def model_texture_topology(name: str) -> MeshTopology:
    """The textured surface of an installed model (cached; worker processes rebuild it by name)."""
    return texture_topology(store.load_model(name), (model_texture_topology, (name,)))


def output_topology(options: ReconstructOptions) -> MeshTopology:
    """The topology the bake works on for these options."""
    if options.model == BUILTIN_NAME:
        return builtin_topology(options.subdivision)
    return model_texture_topology(options.model)


@dataclass
class ModelShape:
    """A face in a morphable model's topology: posed and neutral (expression zero) vertices (V, 3),
    metres, in the model's head frame."""

    model: MorphableModel
    posed: np.ndarray
    neutral: np.ndarray


@dataclass
class FaceReconstruction:
    """One reconstructed face: its inputs, geometry, texture and the files made of them."""

    index: int
    box: FaceBox
    landmarks: np.ndarray          # (478, 3) photo pixels
    fit: Fit | ModelFit | None     # None only while a morphable model's fit is deferred
    topology: MeshTopology
    vertices: np.ndarray | None    # (V, 3) camera-frame metres of the topology's (texture) vertices
    bake: Bake | None
    facts: dict[str, Any]
    files: list[ResultFile] = field(default_factory=list)
    shape: ModelShape | None = None        # morphable models only


def attach_model_fit(face: FaceReconstruction, model: MorphableModel, fit: ModelFit) -> None:
    """Give a face its model fit: the posed and neutral meshes, and its texture vertices in the
    camera frame."""
    face.fit = fit
    neutral = model.vertices(fit.identity)
    face.shape = ModelShape(model, neutral + np.tensordot(fit.expression, model.expression_basis, axes=1), neutral)
    face.vertices = face.topology.refine @ fit.pose.apply(face.shape.posed)


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
        self.fitters: dict[str, ModelFitter] = {}
        self.gpu_baker = None
        if device != "cpu":
            from .bake_gpu import GpuBaker
            self.gpu_baker = GpuBaker(device)

    def close(self) -> None:
        self.detector.close()
        self.landmarker.close()

    def warm_up(self, texture_size: int, subdivision: int = 1, models: tuple[str, ...] = ()) -> None:
        """Load the models and build the cached UV rasterizations so the first job is as fast as the rest."""
        topologies = [builtin_topology(subdivision)]
        for name in models:
            if name == BUILTIN_NAME:
                continue
            self.fitter(name)
            topologies.append(model_texture_topology(name))
        for topology in topologies:
            if self.gpu_baker is not None:
                self.gpu_baker.warm_up(topology, texture_size)
            else:
                texel_map(topology, texture_size)

    def fitter(self, name: str) -> ModelFitter:
        """The fitter of an installed model (CPU); UNKNOWN_MODEL if not installed."""
        if name not in self.fitters:
            try:
                model = store.load_model(name)
            except KeyError:
                raise ProtocolError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} is not installed; available: "
                                    f"{', '.join(store.available_models())}") from None
            except ValueError as exc:                    # a damaged cache
                raise ProtocolError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} cannot be loaded: {exc}") from None
            # One photo's faces per solve: launch-bound on a GPU (109 ms on an H100 against 55 ms on
            # its CPU), so this fitter is on the CPU; the GPU batch path fits batches on the GPU.
            self.fitters[name] = ModelFitter(model, "cpu")
        return self.fitters[name]

    def run(self, data: bytes, photo_name: str, options: ReconstructOptions = ReconstructOptions(),
            on_stage: StageCallback | None = None) -> PhotoReconstruction:
        prepared = self.prepare(data, photo_name, options, on_stage)
        prepared.clock.enter("bake", 0.4)
        self.bake(prepared, options)
        return self.finish(prepared, options)

    def prepare(self, data: bytes, photo_name: str, options: ReconstructOptions = ReconstructOptions(),
                on_stage: StageCallback | None = None, defer_model_fit: bool = False) -> PreparedPhoto:
        """Decode, detect, landmarks and fit. `defer_model_fit`: a morphable model's faces are left
        unfitted (fit, vertices and shape None) for a batched fit elsewhere (`attach_model_fit`)."""
        fitter = None if options.model == BUILTIN_NAME else self.fitter(options.model)
        clock = _StageClock(on_stage)
        clock.enter("decode", 0.0)
        photo = decode_photo(data, photo_name)
        clock.enter("detect", 0.1)
        chosen = select_faces(self.detector(photo.rgb), options.face, photo_name)
        topology = output_topology(options)
        camera = Camera.for_photo(*photo.size)
        clock.enter("landmarks", 0.2)
        landmarks = [self.landmarker(photo.rgb, box, photo_name) for _, box in chosen]
        faces = [FaceReconstruction(index, box, marks, None, topology, None, None, {})
                 for (index, box), marks in zip(chosen, landmarks)]
        if fitter is None:
            clock.enter("fit", 0.3)
            for face in faces:
                face.fit = fit_builtin(face.landmarks, self.model.reference_vertices, camera)
                face.vertices = topology.refine @ face.fit.vertices
        elif not defer_model_fit:
            clock.enter("fit", 0.3)
            for face, fit in zip(faces, fitter.fit(landmarks, [camera] * len(landmarks), self.model.reference_vertices)):
                attach_model_fit(face, fitter.model, fit)
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
        face.facts = face_facts(prepared.photo, face, options, clock.timings, len(prepared.faces), name)
        if "json" in options.outputs:
            face.files.append(ResultFile(f"{name}.json", "json", json_bytes(face.facts)))
    return PhotoReconstruction(prepared.photo, prepared.faces, clock.timings)


def json_bytes(facts: dict[str, Any]) -> bytes:
    return json.dumps(facts, indent=1).encode("utf-8")


def mesh_and_texture_files(name: str, face: FaceReconstruction, options: ReconstructOptions
                           ) -> list[ResultFile]:
    if face.shape is not None:
        return model_files(name, face, options)
    files = []
    if "obj" in options.outputs:
        head = face.fit.head_frame(face.vertices)
        triangles = face.topology.triangles
        corners = np.concatenate([triangles, np.full((len(triangles), 1), -1)], axis=1)   # one UV per vertex
        files.append(ResultFile(f"{name}.obj", "obj", obj_bytes(
            head, vertex_normals(head, triangles), uv_lines(face.topology.uvs),
            [(name, polygon_lines(corners, corners))], f"{name}.mtl", name)))
    if "mtl" in options.outputs:
        files.append(ResultFile(f"{name}.mtl", "mtl", mtl_bytes([(name, f"{name}.png", (1.0, 1.0, 1.0))])))
    if "png" in options.outputs:
        files.append(ResultFile(f"{name}.png", "png", png_bytes(face.bake.texture)))
    return files


def skin_colour(texture: np.ndarray) -> tuple[float, float, float]:
    """Median colour of a baked face texture (sRGB uint8), as linear RGB 0..1 for a plain material."""
    small = texture[::32, ::32].reshape(-1, 3).astype(np.float64) / 255.0
    srgb = np.median(small, axis=0)
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    return tuple(float(c) for c in linear)


@dataclass(frozen=True)
class ModelExportParts:
    """What every export of one model shares: triangles (for normals), the OBJ's UV lines and face
    lines per part, and per expression its moved vertex ids and their offsets (float32 bytes)."""

    triangles: np.ndarray
    uv_block: str
    part_faces: list[str]
    shape_keys: list[tuple[str, bytes, bytes]]


@lru_cache(maxsize=4)
def model_export_parts(model: MorphableModel) -> ModelExportParts:
    part_faces = [polygon_lines(model.polygons[model.polygon_part == k], model.polygon_uvs[model.polygon_part == k])
                  for k in range(len(model.parts))]
    shape_keys = []
    for key_name, offsets in zip(model.expression_names, model.expression_basis):
        moved = np.flatnonzero(np.abs(offsets).max(axis=1) >= SHAPE_KEY_MIN_OFFSET_M)
        shape_keys.append((key_name, moved.astype(np.uint32).tobytes(), offsets[moved].astype(np.float32).tobytes()))
    return ModelExportParts(model.triangles, uv_lines(model.uvs), part_faces, shape_keys)


def model_files(name: str, face: FaceReconstruction, options: ReconstructOptions) -> list[ResultFile]:
    """A morphable model's face: posed and neutral OBJ (the model's topology, one material per part),
    MTL, texture (the model's UV layout) and, with an expression basis, the shape keys."""
    shape = face.shape
    model = shape.model
    parts = model_export_parts(model)
    materials = [name if part.textured else f"{name}_{part.name}" for part in model.parts]
    blocks = [(material, faces) for material, faces in zip(materials, parts.part_faces) if faces]

    def mesh(vertices: np.ndarray) -> bytes:
        return obj_bytes(vertices, vertex_normals(vertices, parts.triangles), parts.uv_block, blocks,
                         f"{name}.mtl", name)

    files = []
    if "obj" in options.outputs:
        files.append(ResultFile(f"{name}.obj", "obj", mesh(shape.posed)))
    if "neutral_obj" in options.outputs:
        files.append(ResultFile(f"{name}{NEUTRAL_SUFFIX}", "neutral_obj", mesh(shape.neutral)))
    if "mtl" in options.outputs:
        skin = skin_colour(face.bake.texture)
        files.append(ResultFile(f"{name}.mtl", "mtl", mtl_bytes([
            (material, f"{name}.png" if part.textured else None, skin if part.skin else part.colour)
            for material, part in zip(materials, model.parts)])))
    if "png" in options.outputs:
        files.append(ResultFile(f"{name}.png", "png", png_bytes(face.bake.texture)))
    if "shape_keys" in options.outputs and parts.shape_keys:
        keys = [ShapeKey(key_name, float(value), array("I", ids), array("f", offsets))
                for (key_name, ids, offsets), value in zip(parts.shape_keys, face.fit.expression)]
        files.append(ResultFile(f"{name}{SHAPE_KEYS_SUFFIX}", "shape_keys", encode_shape_keys(model.vertex_count, keys)))
    return files


def face_facts(photo: Photo, face: FaceReconstruction, options: ReconstructOptions,
               timings_ms: dict[str, float], face_count: int, name: str) -> dict[str, Any]:
    """Everything the JSON output says about one face (units in the key names)."""
    fit = face.fit
    points = fit.landmark_points
    reprojection = np.linalg.norm(fit.camera.project(points) - face.landmarks[:len(points), :2], axis=1)
    quality = {"texture_seen_fraction": face.bake.seen_fraction,
               "texture_mirrored_fraction": face.bake.mirrored_fraction,
               "landmark_reprojection_rms_px": float(np.sqrt((reprojection ** 2).mean()))}
    if face.shape is None:
        coefficients: dict[str, Any] = {
            "identity": None, "expression": None,
            "note": "the built-in model has no shape or expression basis; its geometry is per vertex"}
        mesh = {"vertices": int(face.topology.vertex_count), "triangles": int(len(face.topology.triangles)),
                "subdivision": options.subdivision}
        quality["rigid_fit_rms_px"] = fit.rigid_rms_px
    else:
        model = face.shape.model
        coefficients = {
            "identity": np.round(fit.identity, 5).tolist(),
            "expression": {n: round(float(v), 5) for n, v in zip(model.expression_names, fit.expression)},
            "note": "identity: prior N(0, 1) per component; expression weights in [0, 1]"}
        mesh = {"vertices": model.vertex_count, "polygons": int(len(model.polygons)),
                "parts": [part.name for part in model.parts], "neutral_file": f"{name}{NEUTRAL_SUFFIX}",
                "shape_keys_file": f"{name}{SHAPE_KEYS_SUFFIX}" if len(model.expression_basis) else None}
    return {
        "format": "facerecon-face/1",
        "backend_version": __version__,
        "model": options.model,
        "coefficients": coefficients,
        "mesh": {**mesh, "frame": "head frame: metres, +Y up, face toward +Z; camera = pose applied"},
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
        "quality": quality,
        "timings_ms": dict(timings_ms),
    }
