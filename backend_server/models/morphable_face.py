"""Any `MorphableModel` as a `FaceModel`: fitted by `morphable_fit.ModelFitter`, baked through its
textured parts (`morphable.texture_topology`), exported in its own topology with a neutral mesh
and, with expressions, shape keys."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from functools import cached_property
from typing import Sequence

import numpy as np

from ..geometry import Camera
from . import eyes as eye_model
from .builtin import load_builtin
from .face_model import FaceModel, HeadMesh, MeshLayout, ModelFacts, PersonFit
from . import joint_fit
from .morphable import MorphableModel, texture_topology
from .morphable_fit import ModelFit, ModelFitter, Weighting
from .calibration import Calibration

MESH_MEMO_SIZE = 32        # head meshes kept per model: a CPU job asks for each face's mesh 2-3 times


class MorphableFaceModel(FaceModel[ModelFit]):
    def __init__(self, model: MorphableModel, calibration: Calibration | None = None) -> None:
        from .registry import model_topology
        self.name = model.name
        self.model = model
        self.weighting = Weighting.for_model(model, calibration)
        self.topology = texture_topology(model, (model_topology, (model.name,)))
        self.texture_vertex_ids = self.topology.refine.selected_columns()     # texture vertex -> model vertex
        self.layout = MeshLayout(model.polygons, model.polygon_uvs, model.uvs, model.polygon_part, model.parts,
                                 model.expression_names, model.expression_basis)
        self.reference = load_builtin().reference_vertices                  # the fit's starting pose
        self._fitters: dict[str, ModelFitter] = {}
        self._meshes: OrderedDict[int, tuple[ModelFit, HeadMesh]] = OrderedDict()

    def fitter(self, device: str) -> ModelFitter:
        if device not in self._fitters:
            self._fitters[device] = ModelFitter(self.model, device, self.weighting)
        return self._fitters[device]

    def warm_up(self, device: str = "cpu") -> None:
        self.fitter(device)

    def fit(self, landmarks: Sequence[np.ndarray], cameras: Sequence[Camera], device: str = "cpu") -> list[ModelFit]:
        """Batched Levenberg-Marquardt on `device`, then each face's gaze from its irises. One photo's
        faces are launch-bound on a GPU (109 ms on an H100 against 55 ms on its CPU): single jobs
        fit on the CPU, batches of many faces on the GPU."""
        fits = self.fitter(device).fit(list(landmarks), list(cameras), self.reference)
        return self._with_gaze(fits, landmarks, device)

    def fit_person(self, landmarks: Sequence[np.ndarray | None], cameras: Sequence[Camera], device: str = "cpu"
                   ) -> PersonFit[ModelFit]:
        """One identity, a pose and expression per photo (models/joint_fit.py), then each photo's gaze."""
        fits, left_out, mismatch = joint_fit.fit_person(self.fitter(device), list(landmarks), list(cameras),
                                                        self.reference)
        kept = [k for k, fit in enumerate(fits) if fit is not None]
        gazed = self._with_gaze([fits[k] for k in kept], [landmarks[k] for k in kept], device)  # type: ignore[misc]
        for k, fit in zip(kept, gazed):
            fits[k] = fit
        return PersonFit(tuple(fits), left_out, tuple(mismatch))

    def _with_gaze(self, fits: list[ModelFit], landmarks: Sequence[np.ndarray], device: str) -> list[ModelFit]:
        if not self.eyes or not fits:
            return fits
        surfaces = self.fitter(device).camera_points(fits, self.eye_surface_ids)
        return [replace(fit, gaze_deg=self.gaze(fit, marks, points)) for fit, marks, points in
                zip(fits, landmarks, surfaces)]

    @cached_property
    def eyes(self) -> tuple[eye_model.Eye, ...]:
        return eye_model.find_eyes(self.model)

    @cached_property
    def eye_surface_ids(self) -> np.ndarray:
        """The visible eye surfaces' vertex ids, every eye's in turn."""
        return np.concatenate([eye.surface_ids for eye in self.eyes])

    def gaze(self, fit: ModelFit, landmarks: np.ndarray, surface_points: np.ndarray) -> tuple[float, float]:
        """(yaw, pitch) degrees, head frame: the mean over both eyes of the direction from the
        eyeball's centre to where the camera's ray through the iris centre (MediaPipe's 468, 473;
        each eye takes the one nearest its projected centre) meets the eyeball."""
        directions = []
        start = 0
        for eye in self.eyes:
            points = surface_points[start:start + len(eye.surface_ids)]
            start += len(eye.surface_ids)
            centre = points.mean(0) + fit.pose.rotation @ eye.centre_offset_m                 # camera frame
            pixel = fit.camera.project(centre[None])[0]
            iris = min((landmarks[k, :2] for k in (468, 473)), key=lambda p: float(np.linalg.norm(p - pixel)))
            camera = fit.camera
            ray = np.array([(iris[0] - camera.cx) / camera.focal_px, -(iris[1] - camera.cy) / camera.focal_px, -1.0])
            hit = eye_model.ray_sphere_point(ray, centre, eye.radius_m)
            direction = fit.pose.rotation.T @ (hit - centre)                                  # head frame
            directions.append(direction / np.linalg.norm(direction))
        return eye_model.gaze_of(np.mean(directions, axis=0))

    def texture_vertices(self, fits: Sequence[ModelFit], device: str = "cpu") -> list[np.ndarray]:
        """On the CPU from each fit's head mesh (float64; the export needs that mesh too, and it is
        computed once); on a GPU from the bases at the texture vertices only (float32), without the
        whole mesh, for a batch at a time."""
        if device == "cpu":
            return [self.topology.refine @ fit.pose.apply(self.head_mesh(fit).posed) for fit in fits]
        return self.fitter(device).camera_points(list(fits), self.texture_vertex_ids)

    def head_mesh(self, fit: ModelFit) -> HeadMesh:
        """Posed and neutral meshes (73 ms for ICT-FaceKit's 24591 vertices), kept for the last
        MESH_MEMO_SIZE fits so that the bake, the export and the iBUG points share one."""
        memo = self._meshes.get(id(fit))
        if memo is not None and memo[0] is fit:
            return memo[1]
        neutral = self.model.vertices(fit.identity)
        posed = neutral + np.tensordot(fit.expression, self.model.expression_basis, axes=1)
        centres = [neutral[eye.surface_ids].mean(0) + eye.centre_offset_m for eye in self.eyes]
        mesh = HeadMesh(self.layout, eye_model.turn_eyes(posed, self.eyes, fit.gaze_deg, centres),
                        eye_model.turn_eyes(neutral, self.eyes, fit.gaze_deg, centres), fit.expression)
        self._meshes[id(fit)] = (fit, mesh)
        while len(self._meshes) > MESH_MEMO_SIZE:
            self._meshes.popitem(last=False)
        return mesh

    def facts(self, fit: ModelFit, name: str) -> ModelFacts:
        model = self.model
        coefficients = {
            "identity": np.round(fit.identity, 5).tolist(),
            "expression": {n: round(float(v), 5) for n, v in zip(model.expression_names, fit.expression)},
            "note": "identity: prior N(0, 1) per component; expression weights in [0, 1]"}
        if self.eyes:
            coefficients["gaze_deg"] = {"yaw": round(fit.gaze_deg[0], 2), "pitch": round(fit.gaze_deg[1], 2),
                                        "note": "eyeballs turned about their centres; yaw toward the face's "
                                                "left, pitch up"}
        return ModelFacts(
            coefficients,
            {"vertices": model.vertex_count, "polygons": int(len(model.polygons)),
             "parts": [part.name for part in model.parts]},
            {})

    @cached_property
    def eye_texture_layouts(self) -> list[eye_model.EyeTextureLayout]:
        return [eye_model.eye_texture_layout(self.model, eye) for eye in self.eyes]

    def part_textures(self, iris_srgb: tuple[int, int, int] | None) -> dict[int, tuple[str, np.ndarray]]:
        """Each eye's texture (iris of the measured colour, or brown) on its visible part."""
        colour = iris_srgb or eye_model.DEFAULT_IRIS_SRGB
        return {eye.part: (f"eye_{eye.side}", eye_model.paint_eye(layout, colour))
                for eye, layout in zip(self.eyes, self.eye_texture_layouts)}

    def ibug68(self, fit: ModelFit, landmarks: np.ndarray) -> np.ndarray:
        """The model's own iBUG vertices on the posed mesh, projected (NaN where it has none)."""
        ids = self.model.landmarks68
        points = fit.pose.apply(self.head_mesh(fit).posed[np.maximum(ids, 0)])
        return np.where((ids >= 0)[:, None], fit.camera.project(points), np.nan)

    def __reduce__(self) -> tuple:
        """Pickled by name: another process loads the installed model (never MBs through a pipe)."""
        from .registry import face_model
        return (face_model, (self.name,))
