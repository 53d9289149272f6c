"""The whole pipeline for one photo: decode -> detect -> landmarks -> fit -> bake -> export.

A `Reconstructor` holds one process's detectors and its baker (CPU, or a CUDA device) and runs
photos one at a time (`run`). The batch paths call its stages apart: `locate` (decode, detect,
landmarks) in a pool of CPU processes, fit and bake in a GPU process, `export_photo` in the pool
again (batch_gpu.py). Every model is a `FaceModel` (models/face_model.py), found by name once per
process (models/registry.py): nothing here asks which kind of model it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_protocol import ErrorCode, ProtocolError, ReconstructOptions, ResultFile
from ..geometry import Camera
from ..models import registry
from ..models.face_model import FaceFit, FaceModel
from .bake import Bake, baker_for
from .decode import Photo, PhotoInfo, decode_photo
from .detect import FaceBox, FaceDetector, select_faces
from .export import export_photo, safe_stem
from .fit import fit_faces
from .landmarks import LandmarkDetector, LocatedFace, iris_colour
from .progress import StageCallback, StageClock
from .segment import SkinMap, SkinSegmenter

FIT_DEVICE = "cpu"      # a single job's faces fit on the CPU (launch-bound on a GPU); batches fit on their GPU


def face_model(options: ReconstructOptions) -> FaceModel:
    """The model a request names; ProtocolError UNKNOWN_MODEL if it is not installed or damaged."""
    try:
        return registry.face_model(options.model, options.subdivision)
    except KeyError:
        raise ProtocolError(ErrorCode.UNKNOWN_MODEL, f"model {options.model!r} is not installed; available: "
                            f"{', '.join(registry.available_models())}") from None
    except ValueError as exc:                            # a damaged cache
        raise ProtocolError(ErrorCode.UNKNOWN_MODEL, f"model {options.model!r} cannot be loaded: {exc}") from None


@dataclass(frozen=True)
class LocatedPhoto:
    """A photo after decode, detect and landmarks: everything the fit needs. names: the output file
    stem per face; timings_ms: the stages so far."""

    photo: PhotoInfo
    faces: tuple[LocatedFace, ...]
    names: tuple[str, ...]
    camera: Camera
    timings_ms: dict[str, float]


@dataclass(frozen=True)
class ReconstructedFace:
    """One face through every stage. texture_vertices: (model.topology.vertex_count, 3)
    camera-frame metres; files: its result files; facts: what its JSON says."""

    located: LocatedFace
    name: str
    fit: FaceFit
    texture_vertices: np.ndarray
    bake: Bake
    files: tuple[ResultFile, ...]
    facts: dict[str, Any]

    @property
    def index(self) -> int:
        return self.located.index

    @property
    def box(self) -> FaceBox:
        return self.located.box

    @property
    def landmarks(self) -> np.ndarray:
        """(478, 3) photo pixels."""
        return self.located.landmarks


@dataclass(frozen=True)
class PhotoReconstruction:
    photo: Photo
    model: FaceModel
    faces: tuple[ReconstructedFace, ...]
    timings_ms: dict[str, float]

    @property
    def files(self) -> list[ResultFile]:
        return [f for face in self.faces for f in face.files]


class Reconstructor:
    """One per worker process: the face detector, the landmark detector and a baker for `device`."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.detector = FaceDetector()
        self.landmarker = LandmarkDetector()
        self.segmenter = SkinSegmenter()
        self.baker = baker_for(device)

    def close(self) -> None:
        self.detector.close()
        self.landmarker.close()
        self.segmenter.close()

    def warm_up(self, texture_size: int, subdivision: int = 1, models: tuple[str, ...] = ("builtin",)) -> None:
        """Load the models and build the cached UV rasterizations so the first job is as fast as the rest."""
        for name in models:
            model = face_model(ReconstructOptions(model=name, subdivision=subdivision))
            model.warm_up(FIT_DEVICE)
            self.baker.warm_up(model.topology, texture_size)

    def locate(self, data: bytes, photo_name: str, options: ReconstructOptions, clock: StageClock
               ) -> tuple[Photo, LocatedPhoto, SkinMap]:
        """Stages 1-3: decode, detect and landmarks, with the skin map (segment.py; timed with the
        landmarks: the protocol's stage names stay as they are)."""
        clock.enter("decode", 0.0)
        photo = decode_photo(data, photo_name)
        clock.enter("detect", 0.1)
        chosen = select_faces(self.detector(photo.rgb), options.face, photo_name)
        clock.enter("landmarks", 0.2)
        marks = [self.landmarker(photo.rgb, box, photo_name) for _, box in chosen]
        faces = tuple(LocatedFace(index, box, points, iris_colour(photo.rgb, points))
                      for (index, box), points in zip(chosen, marks))
        skin = self.segmenter(photo.rgb, marks)
        clock.stop()
        stem = safe_stem(photo_name)
        names = tuple(stem if options.face != -1 else f"{stem}_face{face.index}" for face in faces)
        camera = Camera.for_photo(*photo.size)
        return photo, LocatedPhoto(photo.info(), faces, names, camera, dict(clock.timings)), skin

    def run(self, data: bytes, photo_name: str, options: ReconstructOptions | None = None,
            on_stage: StageCallback | None = None) -> PhotoReconstruction:
        options = options or ReconstructOptions()
        model = face_model(options)                  # an unknown model fails before any work
        clock = StageClock(on_stage)
        photo, located, skin = self.locate(data, photo_name, options, clock)
        count = len(located.faces)
        clock.enter("fit", 0.3)
        fitted = fit_faces(model, [face.landmarks for face in located.faces], [located.camera] * count, FIT_DEVICE)
        clock.enter("bake", 0.4)
        bakes = self.baker.bake([photo.rgb] * count, [f.texture_vertices for f in fitted], [located.camera] * count,
                                model.topology, options.texture_size, skins=[skin.probability] * count,
                                delit=not options.lit_texture)
        exports = export_photo(located.photo, located.faces, located.names, [f.fit for f in fitted], bakes, model,
                               options, clock)
        faces = tuple(ReconstructedFace(face, name, f.fit, f.texture_vertices, bake, export.files, export.facts)
                      for face, name, f, bake, export in zip(located.faces, located.names, fitted, bakes, exports))
        return PhotoReconstruction(photo, model, faces, clock.timings)
