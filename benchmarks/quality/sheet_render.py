"""Render add-on imports for the picture sheets, in Blender (run by sheets.py in its own process):

    python benchmarks/quality/sheet_render.py JOBS.json

JOBS.json: [{"folder": result folder, "photo": photo path, "out": [front.png, 45.png, 90.png]}].
Each result is imported with the add-on's own importer (`blender_addon.blender_import.import_result`,
the Reconstruct Face button's code path) into an empty scene and rendered by Cycles (CPU) from the
front, 45 degrees and 90 degrees to the face's left, framed on the mesh's bounding box (tight), with a key
light that turns with the camera and a grey world.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import bpy
from mathutils import Vector

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from blender_addon.blender_import import import_result  # noqa: E402

ANGLES_DEG = (0, 45, 90)
SIZE_PX = 200
LENS_MM = 85.0


def scene_for_sheets() -> bpy.types.Scene:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = True
    scene.render.resolution_x = scene.render.resolution_y = SIZE_PX
    scene.view_settings.view_transform = "Standard"
    scene.world = bpy.data.worlds.new("world")
    scene.world.color = (0.25, 0.25, 0.25)
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.lens = LENS_MM
    scene.collection.objects.link(camera)
    scene.camera = camera
    light = bpy.data.objects.new("key", bpy.data.lights.new("key", "AREA"))
    light.data.energy, light.data.size = 40.0, 0.6
    scene.collection.objects.link(light)
    return scene


def render_job(job: dict) -> None:
    scene = scene_for_sheets()
    [face] = import_result(Path(job["folder"]), job["photo"], scene, bpy.context.view_layer, pack_texture=False)
    corners = [face.matrix_world @ Vector(c) for c in face.bound_box]
    centre = sum(corners, Vector()) / 8
    low, high = (Vector([f(c[k] for c in corners) for k in range(3)]) for f in (min, max))
    half = max((high.z - low.z) / 2, math.hypot(high.x - low.x, high.y - low.y) / 2)   # any turn about Z
    distance = half / (18.0 / LENS_MM) * 1.15 + max(high.y - low.y, high.x - low.x) / 2
    camera = scene.camera
    light = scene.objects["key"]
    for angle, out in zip(ANGLES_DEG, job["out"]):
        a = math.radians(angle)
        direction = Vector((math.sin(a), -math.cos(a), 0.0))          # the face looks toward -Y
        camera.location = centre + distance * direction
        camera.rotation_euler = (math.radians(90), 0.0, a)
        side = Vector((math.cos(a), math.sin(a), 0.0))
        light.location = centre + 1.2 * direction - 0.8 * side + Vector((0, 0, 0.6))
        light.rotation_euler = (centre - light.location).to_track_quat("-Z", "Y").to_euler()
        scene.render.filepath = out
        bpy.ops.render.render(write_still=True)


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        render_job(job)
