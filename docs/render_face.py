"""Render a reconstructed face as imported by the add-on (headless Cycles, bpy 5.0.1) for the docs.

    .venv/bin/facerecon reconstruct --demo -o out
    .venv/bin/python docs/render_face.py out/grace_hopper.obj docs/images/addon_import.png

Imports the OBJ with the add-on's own importer (blender_addon.blender_import), the way the
Reconstruct Face button does, then renders it from the front and from 40 degrees to the side.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import bpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blender_addon.blender_import import import_result  # noqa: E402


def render(obj_path: Path, output: Path, size: int = 360) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    [face] = import_result(obj_path.parent, str(obj_path), scene, bpy.context.view_layer, pack_texture=False)
    for other in list(scene.collection.objects):
        if other is not face and other.type == "MESH":
            bpy.data.objects.remove(other)
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.data.lens = 140
    scene.collection.objects.link(camera)
    scene.camera = camera
    light = bpy.data.objects.new("Key", bpy.data.lights.new("Key", "AREA"))
    light.data.energy, light.data.size = 30, 0.5
    light.location = (0.4, -0.6, 0.4)
    light.rotation_euler = (math.radians(60), 0, math.radians(35))
    scene.collection.objects.link(light)
    scene.world = bpy.data.worlds.new("World")
    scene.world.color = (0.3, 0.3, 0.3)
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 24
    scene.render.resolution_x = scene.render.resolution_y = size
    frames = []
    for angle in (0, 40):
        radians = math.radians(angle)
        camera.location = (0.75 * math.sin(radians), -0.75 * math.cos(radians), 0.0)
        camera.rotation_euler = (math.radians(90), 0, radians)
        path = output.with_name(f"{output.stem}_{angle}.png")
        scene.render.filepath = str(path)
        bpy.ops.render.render(write_still=True)
        frames.append(path)
    side_by_side(frames, output)


def side_by_side(frames: list[Path], output: Path) -> None:
    from PIL import Image
    images = [Image.open(p) for p in frames]
    canvas = Image.new("RGB", (sum(i.width for i in images), images[0].height))
    x = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (x, 0))
        x += image.width
    canvas.save(output)
    for path in frames:
        path.unlink()


if __name__ == "__main__":
    render(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
