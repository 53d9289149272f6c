"""Result files -> Blender data: mesh, material, object; only through bpy.data (no menu operators).

Frames: the OBJ is in metres with +Y up and the face toward +Z; Blender is Z-up, so a point
(x, y, z) becomes (x, -z, y): the face looks toward -Y, +Z is up, 1 unit = 1 m. The object is
placed at the 3D cursor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bpy

from .obj_format import ObjMesh, read_mtl_texture, read_obj

PROPERTY_PREFIX = "facerecon_"


def obj_to_blender(point: tuple[float, float, float]) -> tuple[float, float, float]:
    """OBJ head frame (+Y up, face toward +Z) -> Blender (+Z up, face toward -Y); metres both."""
    x, y, z = point
    return (x, -z, y)


def create_mesh(name: str, source: ObjMesh) -> bpy.types.Mesh:
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata([obj_to_blender(p) for p in source.positions], [], source.faces)
    if source.face_uvs:
        layer = mesh.uv_layers.new(name="UVMap")
        flat = [c for face in source.face_uvs for index in face for c in source.uvs[index]]
        layer.data.foreach_set("uv", flat)
    mesh.polygons.foreach_set("use_smooth", [True] * len(mesh.polygons))
    mesh.validate()
    mesh.update()
    return mesh


def create_material(name: str, texture_path: Path | None, pack: bool) -> bpy.types.Material:
    """A Principled BSDF whose Base Color is the texture (sRGB); packed into the .blend if asked."""
    material = bpy.data.materials.new(name)
    if material.node_tree is None:          # Blender 4.x; 5.0 always gives materials a node tree
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.6
    if texture_path is not None and texture_path.is_file():
        image = bpy.data.images.load(str(texture_path), check_existing=False)
        image.colorspace_settings.name = "sRGB"
        if pack:
            image.pack()
        texture = nodes.new("ShaderNodeTexImage")
        texture.image = image
        texture.location = (bsdf.location.x - 350, bsdf.location.y)
        links.new(texture.outputs["Color"], bsdf.inputs["Base Color"])
    return material


def flat_numbers(value: Any) -> list[float]:
    """Nested lists of numbers -> one flat list (ID properties hold 1-D arrays)."""
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in flat_numbers(item)]
    return [float(value)]


def store_facts(obj: bpy.types.Object, facts: dict[str, Any], photo_path: str, folder: Path) -> None:
    """Custom properties: source photo, result folder, model, pose, coefficients, the full JSON."""
    obj[PROPERTY_PREFIX + "photo"] = photo_path
    obj[PROPERTY_PREFIX + "result_folder"] = str(folder)
    obj[PROPERTY_PREFIX + "model"] = str(facts.get("model", ""))
    pose = facts.get("pose") or {}
    obj[PROPERTY_PREFIX + "pose"] = {
        "rotation_row_major": flat_numbers(pose.get("rotation", [])),
        "translation_m": flat_numbers(pose.get("translation_m", [])),
        **{k: float(v) for k, v in pose.items() if k.endswith("_deg")}}
    coefficients = facts.get("coefficients") or {}
    obj[PROPERTY_PREFIX + "coefficients"] = {
        k: flat_numbers(v) for k, v in coefficients.items() if isinstance(v, (list, tuple))}
    slim = {k: v for k, v in facts.items() if k != "landmarks_px"}
    obj[PROPERTY_PREFIX + "json"] = json.dumps(slim)


def import_face(obj_path: Path, photo_path: str, collection: bpy.types.Collection,
                location: Any, pack_texture: bool) -> bpy.types.Object:
    """One OBJ (+ its MTL, PNG and JSON beside it) -> a new object linked into `collection`."""
    source = read_obj(obj_path)
    name = obj_path.stem
    texture = None
    if source.material_library and (obj_path.parent / source.material_library).is_file():
        texture_name = read_mtl_texture(obj_path.parent / source.material_library)
        texture = obj_path.parent / texture_name if texture_name else None
    mesh = create_mesh(name, source)
    mesh.materials.append(create_material(name, texture, pack_texture))
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    facts_path = obj_path.with_suffix(".json")
    store_facts(obj, json.loads(facts_path.read_text()) if facts_path.is_file() else {}, photo_path,
                obj_path.parent)
    collection.objects.link(obj)
    return obj


def import_result(folder: Path, photo_path: str, scene: bpy.types.Scene,
                  view_layer: bpy.types.ViewLayer, pack_texture: bool) -> list[bpy.types.Object]:
    """Every face in a result folder, at the 3D cursor, selected, the first one active.

    All-or-nothing: if any face fails to import, what was made so far is removed again.
    """
    made: list[bpy.types.Object] = []
    try:
        for obj_path in sorted(folder.glob("*.obj")):
            made.append(import_face(obj_path, photo_path, scene.collection, scene.cursor.location.copy(),
                                    pack_texture))
    except Exception:
        remove_objects(made)
        raise
    if not made:
        raise ValueError(f"the result in {folder} holds no mesh (.obj)")
    for obj in view_layer.objects:
        obj.select_set(False)
    for obj in made:
        obj.select_set(True, view_layer=view_layer)
    view_layer.objects.active = made[0]
    return made


def remove_objects(objects: list[bpy.types.Object]) -> None:
    """Delete objects with their meshes, materials and images (undo a half-made import)."""
    for obj in objects:
        mesh = obj.data
        materials = [m for m in mesh.materials if m is not None]
        bpy.data.objects.remove(obj)
        bpy.data.meshes.remove(mesh)
        for material in materials:
            images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image]
            bpy.data.materials.remove(material)
            for image in images:
                bpy.data.images.remove(image)
