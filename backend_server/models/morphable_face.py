"""Any `MorphableModel` as a `FaceModel`: fitted by `morphable_fit.ModelFitter`, baked through its
textured parts (`morphable.texture_topology`), exported in its own topology with a neutral mesh
and, with expressions, shape keys."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from ..geometry import Camera
from .builtin import load_builtin
from .face_model import FaceModel, HeadMesh, MeshLayout, ModelFacts
from .morphable import MorphableModel, texture_topology
from .morphable_fit import ModelFitter, ModelFit

MESH_MEMO_SIZE = 32        # head meshes kept per model: a CPU job asks for each face's mesh 2-3 times


class MorphableFaceModel(FaceModel[ModelFit]):
    def __init__(self, model: MorphableModel) -> None:
        from .registry import model_topology
        self.name = model.name
        self.model = model
        self.topology = texture_topology(model, (model_topology, (model.name,)))
        self.texture_vertex_ids = self.topology.refine.selected_columns()     # texture vertex -> model vertex
        self.layout = MeshLayout(model.polygons, model.polygon_uvs, model.uvs, model.polygon_part, model.parts,
                                 model.expression_names, model.expression_basis)
        self.reference = load_builtin().reference_vertices                  # the fit's starting pose
        self._fitters: dict[str, ModelFitter] = {}
        self._meshes: OrderedDict[int, tuple[ModelFit, HeadMesh]] = OrderedDict()

    def fitter(self, device: str) -> ModelFitter:
        if device not in self._fitters:
            self._fitters[device] = ModelFitter(self.model, device)
        return self._fitters[device]

    def warm_up(self, device: str = "cpu") -> None:
        self.fitter(device)

    def fit(self, landmarks: Sequence[np.ndarray], cameras: Sequence[Camera], device: str = "cpu") -> list[ModelFit]:
        """Batched Levenberg-Marquardt on `device`. One photo's faces are launch-bound on a GPU (109
        ms on an H100 against 55 ms on its CPU): single jobs fit on the CPU, batches of many faces
        on the GPU."""
        return self.fitter(device).fit(list(landmarks), list(cameras), self.reference)

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
        mesh = HeadMesh(self.layout, neutral + np.tensordot(fit.expression, self.model.expression_basis, axes=1),
                        neutral, fit.expression)
        self._meshes[id(fit)] = (fit, mesh)
        while len(self._meshes) > MESH_MEMO_SIZE:
            self._meshes.popitem(last=False)
        return mesh

    def facts(self, fit: ModelFit, name: str) -> ModelFacts:
        model = self.model
        return ModelFacts(
            {"identity": np.round(fit.identity, 5).tolist(),
             "expression": {n: round(float(v), 5) for n, v in zip(model.expression_names, fit.expression)},
             "note": "identity: prior N(0, 1) per component; expression weights in [0, 1]"},
            {"vertices": model.vertex_count, "polygons": int(len(model.polygons)),
             "parts": [part.name for part in model.parts]},
            {})

    def ibug68(self, fit: ModelFit, landmarks: np.ndarray) -> np.ndarray:
        """The model's own iBUG vertices on the posed mesh, projected (NaN where it has none)."""
        ids = self.model.landmarks68
        points = fit.pose.apply(self.head_mesh(fit).posed[np.maximum(ids, 0)])
        return np.where((ids >= 0)[:, None], fit.camera.project(points), np.nan)

    def __reduce__(self) -> tuple:
        """Pickled by name: another process loads the installed model (never MBs through a pipe)."""
        from .registry import face_model
        return (face_model, (self.name,))
