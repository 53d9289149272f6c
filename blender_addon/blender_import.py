"""Result files -> Blender data: mesh, material, object; only through bpy.data (no menu operators).

Frames: the OBJ is in metres with +Y up and the face toward +Z; Blender is Z-up, so a point
(x, y, z) becomes (x, -z, y): the face looks toward -Y, +Z is up, 1 unit = 1 m. The object is
placed at the 3D cursor. One material per OBJ material group (the face's with the texture). A
morphable model's result with expressions gets shape keys: Basis = `<stem>_neutral.obj`, one key
per expression from `<stem>_shape_keys.bin`, values set to the fitted weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import bpy

from .obj_format import MtlMaterial, ObjMesh, read_mtl, read_obj, read_obj_positions
from .protocol import NEUTRAL_SUFFIX, SHAPE_KEYS_SUFFIX, decode_shape_keys

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
        assert layer is not None              # None only past Blender's limit of UV maps; this mesh has none
        flat = [c for face in source.face_uvs for index in face for c in source.uvs[index]]
        layer.data.foreach_set("uv", flat)
    mesh.polygons.foreach_set("use_smooth", [True] * len(mesh.polygons))
    mesh.polygons.foreach_set("material_index", source.face_materials)
    mesh.validate()
    mesh.update()
    return mesh


def create_material(name: str, texture_path: Path | None, pack: bool,
                    colour: tuple[float, float, float] = (0.8, 0.8, 0.8)) -> bpy.types.Material:
    """A Principled BSDF whose Base Color is the texture (sRGB; packed into the .blend if asked),
    or `colour` (linear RGB) without one."""
    material = bpy.data.materials.new(name)
    if material.node_tree is None:          # Blender 4.x; 5.0 always gives materials a node tree
        material.use_nodes = True
    assert material.node_tree is not None   # the default nodes: Principled BSDF -> Material Output
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    cast(bpy.types.NodeSocketFloatFactor, bsdf.inputs["Roughness"]).default_value = 0.6
    base_color = cast(bpy.types.NodeSocketColor, bsdf.inputs["Base Color"])
    # stubs: RNA arrays are typed bpy_prop_array, but Blender assigns any sequence of the right length
    base_color.default_value = (*colour, 1.0)  # type: ignore[assignment]
    material.diffuse_color = (*colour, 1.0)  # type: ignore[assignment]  # the viewport's solid-mode colour
    if texture_path is not None and texture_path.is_file():
        image = bpy.data.images.load(str(texture_path), check_existing=False)
        assert image.colorspace_settings is not None      # every image has colour space settings
        # stubs: the colour spaces come from the OCIO config at runtime; the stubs list only 'NONE'
        image.colorspace_settings.name = "sRGB"  # type: ignore[assignment]
        if pack:
            image.pack()
        texture = cast(bpy.types.ShaderNodeTexImage, nodes.new("ShaderNodeTexImage"))
        texture.image = image
        texture.location = (bsdf.location.x - 350, bsdf.location.y)
        assert texture.outputs is not None                 # a node's sockets always exist
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


def add_shape_keys(obj: bpy.types.Object, neutral_path: Path, shape_keys_path: Path) -> None:
    """Basis = the neutral mesh; one key per expression (offsets from the neutral), its value the
    fitted weight, so the object shows the posed face and every expression can be animated."""
    neutral = read_obj_positions(neutral_path)
    vertex_count, keys = decode_shape_keys(shape_keys_path.read_bytes())
    mesh = obj.data
    assert isinstance(mesh, bpy.types.Mesh)   # import_face made it from an OBJ
    if vertex_count != len(mesh.vertices) or len(neutral) != len(mesh.vertices):
        raise ValueError(f"{shape_keys_path.name}: {vertex_count} vertices and {neutral_path.name}: "
                         f"{len(neutral)}, but the mesh has {len(mesh.vertices)}")
    basis = [c for p in neutral for c in obj_to_blender(p)]
    mesh.vertices.foreach_set("co", basis)
    obj.shape_key_add(name="Basis", from_mix=False)
    for key in keys:
        block = obj.shape_key_add(name=key.name, from_mix=False)
        coordinates = list(basis)
        for n, vertex in enumerate(key.vertex_ids):
            dx, dy, dz = obj_to_blender((key.offsets[3 * n], key.offsets[3 * n + 1], key.offsets[3 * n + 2]))
            coordinates[3 * vertex] += dx
            coordinates[3 * vertex + 1] += dy
            coordinates[3 * vertex + 2] += dz
        block.data.foreach_set("co", coordinates)
        block.slider_min, block.slider_max = 0.0, 1.0
        block.value = min(max(key.value, 0.0), 1.0)
    mesh.update()


def import_face(obj_path: Path, photo_path: str, collection: bpy.types.Collection,
                location: Any, pack_texture: bool) -> bpy.types.Object:
    """One OBJ (+ its MTL, PNG and JSON beside it; with a model's expressions also its neutral OBJ
    and shape keys) -> a new object linked into `collection`."""
    source = read_obj(obj_path)
    name = obj_path.stem
    library: dict[str, MtlMaterial] = {}
    if source.material_library and (obj_path.parent / source.material_library).is_file():
        library = read_mtl(obj_path.parent / source.material_library)
    mesh = create_mesh(name, source)
    obj = bpy.data.objects.new(name, mesh)
    try:                                        # a failure below removes this object's data again
        for material_name in source.materials:
            entry = library.get(material_name, MtlMaterial())
            texture = obj_path.parent / entry.texture if entry.texture else None
            mesh.materials.append(create_material(material_name, texture, pack_texture, entry.diffuse))
        neutral_path = obj_path.with_name(name + NEUTRAL_SUFFIX)
        shape_keys_path = obj_path.with_name(name + SHAPE_KEYS_SUFFIX)
        if neutral_path.is_file() and shape_keys_path.is_file():
            add_shape_keys(obj, neutral_path, shape_keys_path)
        obj.location = location
        facts_path = obj_path.with_suffix(".json")
        store_facts(obj, json.loads(facts_path.read_text()) if facts_path.is_file() else {}, photo_path,
                    obj_path.parent)
        collection.objects.link(obj)
    except Exception:
        remove_objects([obj])
        raise
    return obj


def import_result(folder: Path, photo_path: str, scene: bpy.types.Scene,
                  view_layer: bpy.types.ViewLayer, pack_texture: bool) -> list[bpy.types.Object]:
    """Every face in a result folder, at the 3D cursor, selected, the first one active.

    All-or-nothing: if any face fails to import, what was made so far is removed again.
    """
    made: list[bpy.types.Object] = []
    try:
        for obj_path in sorted(p for p in folder.glob("*.obj") if not p.name.endswith(NEUTRAL_SUFFIX)):
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
        assert isinstance(mesh, bpy.types.Mesh)   # objects made by import_face
        materials = [m for m in mesh.materials if m is not None]
        bpy.data.objects.remove(obj)
        bpy.data.meshes.remove(mesh)
        for material in materials:
            assert material.node_tree is not None  # made by create_material
            images = [n.image for n in material.node_tree.nodes
                      if isinstance(n, bpy.types.ShaderNodeTexImage) and n.image]
            bpy.data.materials.remove(material)
            for image in images:
                bpy.data.images.remove(image)
