"""Which `FaceModel` a request's model name means: the built-in model, or an installed one.

The one place that tells the built-in model from the installed ones; everything else holds a
`FaceModel`. Models are built once per process (their fitters, UV rasters and caches hang on them).
"""
from __future__ import annotations

from functools import lru_cache

from . import store
from .builtin import NAME as BUILTIN_NAME, BuiltinFaceModel
from .calibration import Calibration
from .face_model import FaceModel
from .morphable import MorphableModel
from .morphable_face import MorphableFaceModel
from .topology import MeshTopology


def face_model(name: str, subdivision: int = 1) -> FaceModel:
    """The model `name` (the built-in one at `subdivision` Loop steps; morphable models ignore it).
    KeyError naming the installed models if `name` is not installed; ValueError if its cache is
    damaged."""
    if name == BUILTIN_NAME:
        return _builtin(subdivision)
    return _morphable(store.load_model(name), store.load_calibration(name))


def model_topology(name: str) -> MeshTopology:
    """An installed model's texture topology (the recipe worker processes rebuild it from)."""
    return face_model(name).topology


def available_models() -> tuple[str, ...]:
    """What a request may name: the built-in model, then the installed ones."""
    return store.available_models()


@lru_cache(maxsize=4)
def _builtin(subdivision: int) -> BuiltinFaceModel:
    return BuiltinFaceModel(subdivision, store.load_shape_correction())


@lru_cache(maxsize=8)
def _morphable(model: MorphableModel, calibration: Calibration | None) -> MorphableFaceModel:
    """Per loaded model and calibration (a reinstalled or recalibrated model is a new object, so a
    new FaceModel)."""
    return MorphableFaceModel(model, calibration)
