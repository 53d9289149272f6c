"""Reading the backend's result files: a Wavefront OBJ subset and its MTL (no bpy here).

Positions stay as written (the OBJ's frame: metres, +Y up, face toward +Z); the conversion to
Blender's frame happens in `blender_import`. Indices become 0-based.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MtlMaterial:
    """One MTL material: its texture file (map_Kd) or None, and its diffuse colour (Kd, linear RGB)."""

    texture: str | None = None
    diffuse: tuple[float, float, float] = (0.8, 0.8, 0.8)


@dataclass
class ObjMesh:
    """One OBJ object: positions (metres), UVs (origin bottom-left), per-face corner indices, and
    per-face material index into `materials` (the `usemtl` names in order of appearance)."""

    name: str
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    uvs: list[tuple[float, float]] = field(default_factory=list)
    faces: list[tuple[int, ...]] = field(default_factory=list)        # position index per corner
    face_uvs: list[tuple[int, ...]] = field(default_factory=list)     # UV index per corner
    face_materials: list[int] = field(default_factory=list)
    materials: list[str] = field(default_factory=list)
    material_library: str | None = None


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
    material = 0
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
                    mesh.face_materials.append(material)
                    if all(len(c) > 1 and c[1] for c in corners):
                        mesh.face_uvs.append(tuple(_index(c[1], len(mesh.uvs), path, number) for c in corners))
                elif key == "mtllib":
                    mesh.material_library = line.split(None, 1)[1].strip()
                elif key == "usemtl":
                    name = line.split(None, 1)[1].strip()
                    if name not in mesh.materials:
                        mesh.materials.append(name)
                    material = mesh.materials.index(name)
                elif key == "o":
                    mesh.name = line.split(None, 1)[1].strip()
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path.name} line {number}: cannot read {key!r} ({exc})") from None
    if not mesh.faces:
        raise ValueError(f"{path.name} holds no faces")
    if mesh.face_uvs and len(mesh.face_uvs) != len(mesh.faces):
        raise ValueError(f"{path.name}: some faces have UVs and some do not")
    if not mesh.materials:
        mesh.materials.append(mesh.name)
    return mesh


def read_obj_positions(path: Path) -> list[tuple[float, float, float]]:
    """Only the `v` lines of an OBJ (a neutral mesh whose faces are those of the posed one)."""
    with open(path, encoding="utf-8") as lines:
        rows = (line.split() for line in lines if line.startswith("v "))
        return [(float(p[1]), float(p[2]), float(p[3])) for p in rows]


def read_mtl(path: Path) -> dict[str, MtlMaterial]:
    """Every material of an MTL file: name -> texture file and diffuse colour."""
    materials: dict[str, MtlMaterial] = {}
    current: MtlMaterial | None = None
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            parts = line.split(None, 1)
            if len(parts) < 2:
                continue
            key, value = parts[0], parts[1].strip()
            if key == "newmtl":
                current = materials.setdefault(value, MtlMaterial())
            elif current is not None and key == "map_Kd":
                current.texture = value
            elif current is not None and key == "Kd":
                try:
                    red, green, blue = (float(v) for v in value.split()[:3])
                    current.diffuse = (red, green, blue)
                except ValueError:
                    raise ValueError(f"{path.name} line {number}: bad Kd {value!r}") from None
    return materials
