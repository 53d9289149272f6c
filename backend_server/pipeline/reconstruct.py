"""The whole pipeline for one photo: decode -> detect -> landmarks -> fit -> bake -> export; and
for several photos of one person (`run_person`): decode, detect and landmarks per photo, one joint
fit (`FaceModel.fit_person`), a bake per photo fused into one texture (fuse.py), one head exported.

A `Reconstructor` holds one process's detectors and its baker (CPU, or a CUDA device) and runs
photos one at a time (`run`). The batch paths call its stages apart: `locate` (decode, detect,
landmarks) in a pool of CPU processes, fit and bake in a GPU process, `export_photo` in the pool
again (batch_gpu.py). Every model is a `FaceModel` (models/face_model.py), found by name once per
process (models/registry.py): nothing here asks which kind of model it holds.
"""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from shared_protocol import ErrorCode, PersonPhoto, ProtocolError, ReconstructOptions, ResultFile
from ..geometry import Camera
from ..models import registry
from ..models.face_model import FaceFit, FaceModel, PersonFit
from .bake import Bake, Observation, baker_for, covered_texels
from .decode import Photo, PhotoInfo, decode_photo
from .detect import FaceBox, FaceDetector, select_faces
from .export import export_person, export_photo, safe_stem
from .fuse import CompletedTexture, FusedTexture, appearance_mismatch, completed, fuse_observations, odd_photo_out
from .fit import fit_faces
from .landmarks import LandmarkDetector, LocatedFace, iris_colour
from .lighting import Lighting
from .progress import StageCallback, StageClock
from .segment import SkinMap, SkinSegmenter

FIT_DEVICE = "cpu"      # a single job's faces fit on the CPU (launch-bound on a GPU); batches fit on their GPU,
                        # and so does a person's joint fit (`Reconstructor.person_fit_device`)
LOCATE_THREADS = 4      # a person's photos located at a time (each thread with its own MediaPipe graphs)
LEFT_OUT_CODES = (ErrorCode.NO_FACE, ErrorCode.FACE_INDEX_OUT_OF_RANGE)   # a person's photo without its face
                                                                           # is left out, not an error
PersonStageCallback = Callable[[str, float, "int | None"], None]   # stage, fraction, photo index (None: all)


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


@dataclass(frozen=True)
class PersonReconstruction:
    """One head from several photos of one person. photos: every photo given (None where it could
    not be decoded is impossible: that is an error); located: per photo its face, None where none
    was found; fit: the joint fit (one FaceFit per kept photo); reference: the photo the head is
    posed as (the first kept one); texture_vertices: (model.topology.vertex_count, 3) camera-frame
    metres of the reference photo; lightings: each kept photo's light (its bake's, in `kept`
    order); fused / completed: the texture before and after completion; files / facts: the one
    head's result files and JSON."""

    photos: tuple[PhotoInfo, ...]
    located: tuple[LocatedFace | None, ...]
    model: FaceModel
    fit: PersonFit
    reference: int
    texture_vertices: np.ndarray
    lightings: tuple[Lighting, ...]
    fused: FusedTexture
    completed: CompletedTexture
    files: tuple[ResultFile, ...]
    facts: dict[str, Any]
    timings_ms: dict[str, float]

    @property
    def kept(self) -> list[int]:
        return self.fit.kept


class Locator:
    """Stages 1-3 of a photo (decode, detect, landmarks, with the skin map) on its own MediaPipe
    graphs: one thread at a time uses a Locator."""

    def __init__(self) -> None:
        self.detector = FaceDetector()
        self.landmarker = LandmarkDetector()
        self.segmenter = SkinSegmenter()

    def close(self) -> None:
        self.detector.close()
        self.landmarker.close()
        self.segmenter.close()

    def locate(self, data: bytes, photo_name: str, options: ReconstructOptions, clock: StageClock
               ) -> tuple[Photo, LocatedPhoto, SkinMap]:
        """Decode, detect and landmarks, with the skin map (segment.py; timed with the landmarks:
        the protocol's stage names stay as they are)."""
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


class Reconstructor:
    """One per worker process: a Locator (the face and landmark detectors, the skin segmenter; more
    made when a person's photos are located in parallel) and a baker for `device`."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.locator = Locator()
        self._spare_locators: list[Locator] = []       # a person's other photos, one thread each
        self.baker = baker_for(device)
        # Several photos' joint fit (B·(6 + K_exp) + K_id parameters) runs on the worker's device:
        # ICT-FaceKit, three photos on an H100 122 ms against 442 ms on the CPU (benchmarks/person_profile.py).
        self.person_fit_device = device

    def close(self) -> None:
        for locator in [self.locator, *self._spare_locators]:
            locator.close()

    def warm_up(self, texture_size: int, subdivision: int = 1, models: tuple[str, ...] = ("builtin",)) -> None:
        """Load the models and build the cached UV rasterizations so the first job is as fast as the rest."""
        for name in models:
            model = face_model(ReconstructOptions(model=name, subdivision=subdivision))
            for fit_device in dict.fromkeys((FIT_DEVICE, self.person_fit_device)):
                model.warm_up(fit_device)
            self.baker.warm_up(model.topology, texture_size)

    def locate(self, data: bytes, photo_name: str, options: ReconstructOptions, clock: StageClock
               ) -> tuple[Photo, LocatedPhoto, SkinMap]:
        """Stages 1-3 of one photo (`Locator.locate`)."""
        return self.locator.locate(data, photo_name, options, clock)

    def _locate_all(self, photos: Sequence[PersonPhoto], options: ReconstructOptions, clock: StageClock,
                    on_stage: PersonStageCallback | None) -> list[tuple[Photo, LocatedPhoto, SkinMap] | ProtocolError]:
        """Stages 1-3 of a person's photos, up to LOCATE_THREADS at a time (each thread its own
        Locator; MediaPipe's graphs run outside the GIL: three photos 124 -> 86 ms on 2 cores).
        Progress is told from this thread as each photo's stage starts, its fraction the share of
        stages started so far (of the first 0.3 of the job); each stage's time is summed over the
        photos into `clock`. Per photo: its result, or the ProtocolError it raised."""
        count = len(photos)
        while len(self._spare_locators) < min(count, LOCATE_THREADS) - 1:
            self._spare_locators.append(Locator())
        free: queue.SimpleQueue[Locator] = queue.SimpleQueue()
        for locator in [self.locator, *self._spare_locators]:
            free.put(locator)
        started: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()

        def teller(k: int) -> StageCallback:
            return lambda stage, _: started.put((stage, k))

        clocks = [StageClock(teller(k)) for k in range(count)]

        def locate(k: int) -> tuple[Photo, LocatedPhoto, SkinMap] | ProtocolError:
            locator = free.get()
            try:
                return locator.locate(photos[k].data, photos[k].name, options, clocks[k])
            except ProtocolError as exc:
                return exc
            finally:
                clocks[k].stop()
                free.put(locator)

        told = 0
        with ThreadPoolExecutor(min(count, LOCATE_THREADS)) as pool:
            futures = [pool.submit(locate, k) for k in range(count)]
            try:
                while not all(future.done() for future in futures) or not started.empty():
                    try:
                        stage, k = started.get(timeout=0.005)
                    except queue.Empty:
                        continue
                    if on_stage is not None:
                        on_stage(stage, 0.3 * told / (3 * count), k)        # may raise: cancelled
                    told += 1
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            outcomes = [future.result() for future in futures]
        for photo_clock in clocks:
            for stage, ms in photo_clock.timings.items():
                clock.timings[stage] = clock.timings.get(stage, 0.0) + ms
        return outcomes

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

    def run_person(self, photos: Sequence[PersonPhoto], options: ReconstructOptions | None = None,
                   on_stage: PersonStageCallback | None = None, name: str | None = None) -> PersonReconstruction:
        """Several photos of one person -> one head, its files named `name` (default: the first
        photo's stem). A photo that cannot be decoded (or is too
        small or large) is an error naming it; one without a face, or whose face does not fit the
        others', is left out (its reason in the JSON); none left: ProtocolError NO_USABLE_PHOTO.
        Each kept photo is observed as a single photo's bake observes it (`Baker.observe`: its skin
        map, its lighting; de-lit unless options.lit_texture); fuse.py combines them and the baker
        completes the fused texture (`Baker.complete`, keep_seen for the lit texture)."""
        options = options or ReconstructOptions()
        model = face_model(options)
        count = len(photos)
        current: list[int | None] = [None]
        span = [0.0, 1.0]            # the running stage's share of the job: photo k's part of it

        def tell(stage: str, fraction: float) -> None:
            if on_stage is not None:
                on_stage(stage, min(1.0, span[0] + fraction * span[1]), current[0])

        clock = StageClock(tell)
        infos: list[PhotoInfo] = []
        pixels: list[np.ndarray] = []
        skins: list[np.ndarray | None] = []
        located: list[LocatedFace | None] = []
        cameras: list[Camera] = []
        reasons: dict[int, str] = {}
        for k, (item, outcome) in enumerate(zip(photos, self._locate_all(photos, options, clock, on_stage))):
            if isinstance(outcome, ProtocolError):
                if outcome.code not in LEFT_OUT_CODES:
                    raise ProtocolError(outcome.code, f"photo {k + 1} of {count} ({item.name}): {outcome.message}",
                                        item.name) from None
                reasons[k] = outcome.message
                located.append(None)
                cameras.append(Camera.for_photo(64, 64))          # unused: the photo has no face
                infos.append(PhotoInfo(item.name, (0, 0), (0, 0), 1.0))
                pixels.append(np.zeros((1, 1, 3), np.uint8))
                skins.append(None)
                continue
            photo, where, skin = outcome
            infos.append(photo.info())
            pixels.append(photo.rgb)
            skins.append(skin.probability)
            located.append(where.faces[0])
            cameras.append(where.camera)
        if all(face is None for face in located):
            raise ProtocolError(ErrorCode.NO_USABLE_PHOTO, "no photo of the person gave a face: " + "; ".join(
                f"photo {k + 1} ({photos[k].name}): {why}" for k, why in reasons.items()))
        landmarks: list[np.ndarray | None] = [f.landmarks if f is not None else None for f in located]
        size = options.texture_size
        while True:
            current[0], span[:] = None, [0.0, 1.0]
            clock.enter("fit", 0.3)
            person = model.fit_person(landmarks, cameras, self.person_fit_device)
            kept = person.kept
            fits = [person.fits[k] for k in kept]
            vertices = model.texture_vertices(fits, self.person_fit_device)
            observations: list[Observation] = []
            for n, (k, v) in enumerate(zip(kept, vertices)):     # one photo at a time: progress names it
                current[0], span[:] = k, [0.4 + 0.4 * n / len(kept), 1.0]
                clock.enter("bake", 0.0)
                observations += self.baker.observe([pixels[k]], [v], [cameras[k]], model.topology, size,
                                                   skins=[skins[k]], delit=not options.lit_texture)
            # Another person's skin: left out, and the rest fitted again without it.
            appearance = appearance_mismatch(observations)
            odd = odd_photo_out(appearance)
            if odd is None:
                break
            reasons[kept[odd]] = (f"its skin colour does not match the other photos' (mismatch "
                                  f"{appearance[odd]:.1f}, limit 1): another person?")
            landmarks[kept[odd]] = None
        left_out = {**person.left_out, **reasons}
        person = PersonFit(person.fits, dict(sorted(left_out.items())), person.mismatch)
        current[0], span[:] = None, [0.0, 1.0]
        clock.enter("bake", 0.8)
        fused = fuse_observations(observations, covered_texels(model.topology, size))
        lightings = tuple(observation.lighting for observation in observations)
        del observations                            # the per-photo arrays: the fused ones replace them
        symmetric = model.topology.uv_mirror_symmetric
        texture = completed(self.baker.complete(fused.observed, fused.texel_weight, symmetric,
                                                keep_seen=options.lit_texture), fused, symmetric)
        reference = kept[0]
        export = export_person(infos, located, person, reference, model, fused, texture, lightings, options,
                               name or safe_stem(photos[0].name), clock)
        return PersonReconstruction(tuple(infos), tuple(located), model, person, reference, vertices[0], lightings,
                                    fused, texture, export.files, export.facts, clock.timings)
