"""Models in the eos library's format (the Surrey Face Model; BFM 2009/2017 converted with eos's
scripts) read through the `eos-py` package (needed only to install a model, not to run it).

eos models are in millimetres (+Y up, face toward +Z). The identity basis is eos's rescaled PCA
basis (eigenvectors times the square roots of the eigenvalues), so coefficients have the prior
N(0, 1). Blendshapes (eos's expression model for the SFM) are offsets with weights in [0, 1].
eos texture coordinates have their origin top-left; here v is flipped to the OBJ convention.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .face_model import Part
from .morphable import MorphableModel

MM = 0.001
SFM_NAME = "sfm"
SFM_SHAPE = "sfm_shape_3448.bin"
SFM_BLENDSHAPES = "expression_blendshapes_3448.bin"
SFM_IBUG_MAPPING = "ibug_to_sfm.txt"
SFM_SOURCE = "https://github.com/patrikhuber/eos (share/: the Surrey Face Model, non-commercial licence)"


def read_ibug_mapping(path: Path) -> dict[int, int]:
    """eos's `ibug_to_*.txt` (TOML `[landmark_mappings]`, `ibug = vertex`) -> {ibug 1-68: vertex id}."""
    mapping = {}
    for line in Path(path).read_text().splitlines():
        match = re.match(r"\s*(\d+)\s*=\s*(\d+)", line)
        if match:
            mapping[int(match.group(1))] = int(match.group(2))
    return mapping


def load_eos_model(name: str, shape_file: Path, blendshapes_file: Path | None = None,
                   ibug_mapping_file: Path | None = None, unit_m: float = MM, source: str = "") -> MorphableModel:
    try:
        import eos
    except ImportError as exc:
        raise ImportError("reading eos-format models needs the eos-py package: pip install eos-py") from exc
    try:
        model = eos.morphablemodel.load_model(str(shape_file))
        blendshapes = eos.morphablemodel.load_blendshapes(str(blendshapes_file)) if blendshapes_file else []
    except RuntimeError as exc:                          # eos's way of saying "not a model file"
        files = ", ".join(str(f) for f in (shape_file, blendshapes_file) if f)
        raise ValueError(f"{files}: not an eos model file ({exc})") from None
    shape = model.get_shape_model()
    mean = np.asarray(shape.get_mean(), np.float64).reshape(-1, 3) * unit_m
    basis = np.asarray(shape.get_rescaled_pca_basis(), np.float64)                 # (3V, K)
    identity = (basis.T.reshape(basis.shape[1], -1, 3) * unit_m).astype(np.float32)
    names: tuple[str, ...] = ()
    expression = np.zeros((0,) + mean.shape, np.float32)
    if blendshapes:
        names = tuple(b.name for b in blendshapes)
        expression = np.stack([np.asarray(b.deformation, np.float64).reshape(-1, 3) * unit_m
                               for b in blendshapes]).astype(np.float32)
    texcoords = np.asarray(model.get_texture_coordinates(), np.float64)
    if len(texcoords) != len(mean):
        raise ValueError(f"{shape_file}: the model has no per-vertex texture coordinates, which the "
                         "texture bake needs")
    uvs = np.stack([texcoords[:, 0], 1.0 - texcoords[:, 1]], axis=1)
    triangles = np.asarray(shape.get_triangle_list(), np.int64)
    polygons = np.concatenate([triangles, np.full((len(triangles), 1), -1)], axis=1)
    landmarks68 = np.full(68, -1, np.int64)
    if ibug_mapping_file is not None:
        for ibug, vertex in read_ibug_mapping(ibug_mapping_file).items():
            landmarks68[ibug - 1] = vertex
    return MorphableModel(
        name, mean.astype(np.float32), identity, expression, names, polygons, polygons.copy(), uvs,
        np.zeros(len(polygons), np.int64), (Part("face", textured=True),), landmarks68,
        np.arange(len(mean)),
        info={"title": name, "source": source or str(shape_file), "units_in_source": "mm",
              "identity_components": int(identity.shape[0]), "expressions": list(names)})


def sfm_files(folder: Path) -> list[Path]:
    """The Surrey Face Model's shape model, blendshapes and iBUG mapping in `folder`."""
    return [Path(folder) / name for name in (SFM_SHAPE, SFM_BLENDSHAPES, SFM_IBUG_MAPPING)]


def load_sfm(folder: Path) -> MorphableModel:
    """The Surrey Face Model (3448 vertices, 63 shape components, 6 expression blendshapes) from
    the eos `share/` folder."""
    files = sfm_files(folder)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; get the files from {SFM_SOURCE}")
    shape, blendshapes, mapping = files
    return load_eos_model(SFM_NAME, shape, blendshapes, mapping, source=SFM_SOURCE)
