"""Runs inside a fresh Python process with bpy 5.0.1: imports one .glb with Blender's own glTF
importer (`bpy.ops.import_scene.gltf`, as File > Import > glTF 2.0 does) and reports what Blender
made of it.

    python tests/blender_gltf_import.py FILE.glb OUT.npz

The last stdout line is `RESULT <json>` (objects, vertices, materials, images, shape keys);
OUT.npz holds the mesh's vertex positions (Blender's frame: +Z up) as the Basis shape key has them
and as shown, with every shape key at the value Blender set, and each image's pixels as Blender
holds them (`image:<name>`: (H, W, 4) float32 0..1, bottom row first).
"""
from __future__ import annotations

import json
import sys

import bpy
import numpy as np


def main(glb: str, arrays: str) -> dict:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    before = len(bpy.data.objects)
    result = bpy.ops.import_scene.gltf(filepath=glb)
    meshes = [o for o in bpy.data.objects if o.type == "MESH"]
    obj = meshes[0]
    mesh = obj.data
    keys = mesh.shape_keys.key_blocks if mesh.shape_keys else []
    basis = np.empty(len(mesh.vertices) * 3, np.float32)
    (keys[0].data if keys else mesh.vertices).foreach_get("co", basis)
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
    shown = np.empty(len(evaluated.vertices) * 3, np.float32)
    evaluated.vertices.foreach_get("co", shown)
    obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh_clear()
    images = [i for i in bpy.data.images if i.type == "IMAGE"]
    pixels = {}
    for image in images:
        flat = np.empty(image.size[0] * image.size[1] * image.channels, np.float32)
        image.pixels.foreach_get(flat)
        pixels[f"image:{image.name}"] = flat.reshape(image.size[1], image.size[0], image.channels)
    np.savez(arrays, basis=basis.reshape(-1, 3), shown=shown.reshape(-1, 3), **pixels)
    materials = []
    for material in mesh.materials:
        nodes = material.node_tree.nodes
        bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
        base = bsdf.inputs["Base Color"]
        linked = [link.from_node for link in base.links]
        materials.append({"name": material.name,
                          "base_color_from": [n.type for n in linked],
                          "image": linked[0].image.name if linked and linked[0].type == "TEX_IMAGE" else None,
                          "colour": list(base.default_value)[:3]})
    return {"operator": sorted(result), "objects_added": len(bpy.data.objects) - before, "meshes": len(meshes),
            "name": obj.name, "vertices": len(mesh.vertices), "polygons": len(mesh.polygons),
            "uv_layers": [layer.name for layer in mesh.uv_layers], "materials": materials,
            "material_use": sorted({p.material_index for p in mesh.polygons}),
            "images": [{"name": i.name, "size": list(i.size), "packed": i.packed_file is not None,
                        "colour_space": i.colorspace_settings.name} for i in images],
            "keys": [{"name": k.name, "value": k.value, "relative_to": k.relative_key.name} for k in keys]}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])))
