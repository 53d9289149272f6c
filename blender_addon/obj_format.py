"""Reading the backend's result files: a Wavefront OBJ subset and its MTL (no bpy here).

Positions stay as written (the OBJ's frame: metres, +Y up, face toward +Z); the conversion to
Blender's frame happens in `blender_import`. Indices become 0-based.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ObjMesh:
    """One OBJ object: positions (metres), UVs (origin bottom-left), and per-face corner indices."""

    name: str
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    uvs: list[tuple[float, float]] = field(default_factory=list)
    faces: list[tuple[int, ...]] = field(default_factory=list)        # position index per corner
    face_uvs: list[tuple[int, ...]] = field(default_factory=list)     # UV index per corner
    material_library: str | None = None
    material: str | None = None


def _index(token: str, count: int, path: Path, number: int) -> int:
    value = int(token)
    index = value - 1 if value > 0 else count + value            # OBJ allows negative (relative)
    if not 0 <= index < count:
        raise ValueError(f"{path.name} line {number}: index {value} out of range")
    return index


def read_obj(path: Path) -> ObjMesh:
    """Parse v, vt, f (v, v/vt, v/vt/vn, v//vn), mtllib, usemtl, o; other lines are ignored."""
    path = Path(path)
    mesh = ObjMesh(name=path.stem)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            key = parts[0]
            try:
                if key == "v":
                    mesh.positions.append((float(parts[1]), float(parts[2]), float(parts[3])))
                elif key == "vt":
                    mesh.uvs.append((float(parts[1]), float(parts[2])))
                elif key == "f":
                    corners = [c.split("/") for c in parts[1:]]
                    if len(corners) < 3:
                        raise ValueError("a face needs three corners")
                    mesh.faces.append(tuple(_index(c[0], len(mesh.positions), path, number) for c in corners))
                    if all(len(c) > 1 and c[1] for c in corners):
                        mesh.face_uvs.append(tuple(_index(c[1], len(mesh.uvs), path, number) for c in corners))
                elif key == "mtllib":
                    mesh.material_library = line.split(None, 1)[1].strip()
                elif key == "usemtl":
                    mesh.material = line.split(None, 1)[1].strip()
                elif key == "o":
                    mesh.name = line.split(None, 1)[1].strip()
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path.name} line {number}: cannot read {key!r} ({exc})") from None
    if not mesh.faces:
        raise ValueError(f"{path.name} holds no faces")
    if mesh.face_uvs and len(mesh.face_uvs) != len(mesh.faces):
        raise ValueError(f"{path.name}: some faces have UVs and some do not")
    return mesh


def read_mtl_texture(path: Path) -> str | None:
    """The first `map_Kd` file name in an MTL file, or None."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0] == "map_Kd":
                return parts[1].strip()
    return None
