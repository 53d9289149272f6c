"""ICT-FaceKit (MIT licence) read from its original `FaceXModel/` folder of OBJ files.

The folder holds `generic_neutral_mesh.obj`, `identity000.obj` … `identity099.obj`, one OBJ per
ARKit expression (`jawOpen.obj`, …) and `vertex_indices.json`. Every OBJ has the same 26719
vertices in centimetres (+Y up, face toward +Z); a shape's offset is its vertices minus the neutral
mesh's. Identity weights have the prior N(0, 1), expression weights lie in [0, 1].

Kept: face (textured, UV tile 0), back of the head and neck (skin colour), gums and tongue, teeth,
eyeballs (own plain materials). Left out: lacrimal fluid, eye blend, eye occlusion and eyelashes,
overlay surfaces that need transparent materials. Their vertices are the last ones, so the kept
vertex ids are the original ids 0 … 24590.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .face_model import Part
from .morphable import MorphableModel, keep_parts

NAME = "ict-facekit"
CM = 0.01
SOURCE_URL = "https://github.com/ICT-VGL/ICT-FaceKit"
NEUTRAL = "generic_neutral_mesh.obj"
NARROW_FACE_VERTICES = 6706          # ids 0-6705: the face area without ears and neck (upstream docs)
PARTS = {                            # OBJ material -> Part (colours: linear RGB); None: left out
    "M_Face": Part("face", textured=True),
    "M_BackHead": Part("head", skin=True),
    "M_GumsTongue": Part("gums_tongue", (0.35, 0.08, 0.08)),
    "M_Teeth": Part("teeth", (0.75, 0.72, 0.62)),
    "M_ScleraLeft": Part("eye_white_left", (0.75, 0.72, 0.68), eye="left"),     # the visible eyeball
    "M_IrisLeft": Part("iris_left", (0.06, 0.03, 0.015), eye="left"),           # a shell inside it
    "M_ScleraRight": Part("eye_white_right", (0.75, 0.72, 0.68), eye="right"),
    "M_IrisRight": Part("iris_right", (0.06, 0.03, 0.015), eye="right"),
    "M_LacrimalFluid": None, "M_EyeBlend": None, "M_EyeOcclusion": None, "M_EyeLashes": None,
}


class MissingModelFiles(FileNotFoundError):
    pass


def source_files(folder: Path) -> list[Path]:
    """Every file the loader reads, in a fixed order (also the cache's fingerprint input)."""
    folder = Path(folder)
    expressions = json.loads((folder / "vertex_indices.json").read_text())["expressions"]
    identities = sorted(folder.glob("identity[0-9][0-9][0-9].obj"))
    return ([folder / "vertex_indices.json", folder / NEUTRAL] + identities
            + [folder / f"{name}.obj" for name in expressions])


def check_folder(folder: Path) -> None:
    folder = Path(folder)
    if not (folder / NEUTRAL).is_file() or not (folder / "vertex_indices.json").is_file():
        raise MissingModelFiles(
            f"{folder} is not an ICT-FaceKit FaceXModel folder (no {NEUTRAL} or vertex_indices.json). "
            f"Get the folder from {SOURCE_URL} (FaceXModel/, MIT licence) and pass it with --from.")
    missing = [p.name for p in source_files(folder) if not p.is_file()]
    if missing or not list(folder.glob("identity[0-9][0-9][0-9].obj")):
        raise MissingModelFiles(f"{folder} lacks {', '.join(missing[:5]) or 'identity*.obj'}"
                                f"{' …' if len(missing) > 5 else ''}")


def read_obj_positions(path: Path) -> np.ndarray:
    """(V, 3) the `v` lines of an OBJ (float64, file units)."""
    lines = [line[2:] for line in path.read_bytes().split(b"\n") if line.startswith(b"v ")]
    return np.array(b" ".join(lines).split(), np.float64).reshape(-1, 3)


def read_obj_faces(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """UVs (U, 2), polygons (F, 4) and their UV ids (-1 padded, 0-based), and the material of each
    polygon (from `usemtl`)."""
    uvs, polygons, polygon_uvs, materials = [], [], [], []
    material = ""
    for line in path.read_text().splitlines():
        if line.startswith("vt "):
            uvs.append(line.split()[1:3])
        elif line.startswith("f "):
            corners = [corner.split("/") for corner in line.split()[1:]]
            if not 3 <= len(corners) <= 4:
                raise ValueError(f"{path.name}: a face with {len(corners)} corners")
            ids = [int(c[0]) - 1 for c in corners] + [-1] * (4 - len(corners))
            uv_ids = [int(c[1]) - 1 for c in corners] + [-1] * (4 - len(corners))
            polygons.append(ids)
            polygon_uvs.append(uv_ids)
            materials.append(material)
        elif line.startswith("usemtl "):
            material = line.split(None, 1)[1].strip()
    return np.array(uvs, np.float64), np.array(polygons, np.int64), np.array(polygon_uvs, np.int64), materials


def load_ict_facekit(folder: Path) -> MorphableModel:
    """The model from the original OBJ folder (~10 s: 150 OBJs); `store.install` caches it."""
    folder = Path(folder)
    check_folder(folder)
    indices = json.loads((folder / "vertex_indices.json").read_text())
    neutral = read_obj_positions(folder / NEUTRAL)
    uvs, polygons, polygon_uvs, materials = read_obj_faces(folder / NEUTRAL)
    unknown = sorted(set(materials) - set(PARTS))
    if unknown:
        raise ValueError(f"{NEUTRAL}: unknown materials {unknown}")

    def offsets(paths: list[Path]) -> np.ndarray:
        shapes = np.empty((len(paths),) + neutral.shape, np.float32)
        for k, path in enumerate(paths):
            shape = read_obj_positions(path)
            if shape.shape != neutral.shape:
                raise ValueError(f"{path.name}: {len(shape)} vertices, the neutral mesh has {len(neutral)}")
            shapes[k] = (shape - neutral) * CM
        return shapes

    identity = offsets(sorted(folder.glob("identity[0-9][0-9][0-9].obj")))
    names = tuple(indices["expressions"])
    expression = offsets([folder / f"{name}.obj" for name in names])

    parts = tuple(part for part in PARTS.values() if part is not None)
    keep = np.array([PARTS[m] is not None for m in PARTS])
    all_materials = list(PARTS)
    part_of_polygon = np.array([all_materials.index(m) for m in materials])
    polygon_uvs = polygon_uvs[keep[part_of_polygon]]
    mean, (identity, expression), polygons, part_of_polygon, kept = keep_parts(
        (neutral * CM).astype(np.float32), [identity, expression], polygons, part_of_polygon, keep)
    renumber = np.cumsum(keep) - 1                 # old part index -> index among the kept parts
    part_of_polygon = renumber[part_of_polygon]
    old_to_new = np.full(len(neutral), -1, np.int64)
    old_to_new[kept] = np.arange(len(kept))
    landmarks68 = old_to_new[np.array(indices["idx_to_landmark_verts"])]
    face_region = old_to_new[np.arange(NARROW_FACE_VERTICES)]
    return MorphableModel(
        NAME, mean, identity, expression, names, polygons, polygon_uvs, uvs, part_of_polygon, parts,
        landmarks68, face_region[face_region >= 0],
        info={"title": "ICT-FaceKit", "licence": "MIT", "source": SOURCE_URL, "units_in_source": "cm",
              "identity_components": int(len(identity)), "expressions": "ARKit blendshape names",
              "kept_vertex_ids": "original ids 0-24590 (lacrimal fluid, eye blend, occlusion, lashes left out)"})
