"""The reference renderer of synthetic heads: Cycles through bpy (Blender as a Python module, CPU).

Needs `bpy` (the test extra); import this module only in a process that may load Blender (the
benchmarks run it in a subprocess). The scene reproduces `render.shade`'s conventions with real
light transport on top (cast shadows, interreflection, a specular lobe):
- Blender's world frame is the model's head frame (so Blender's "up" is +Y here); each view's
  camera sits at the inverse of its pose (Blender cameras look down their -Z with +Y up: the
  project's camera frame), lens = focal_px * 36 mm / width on a 36 mm sensor;
- the light's SH part becomes an equirectangular environment of the incoming radiance
  (`Light.radiance_sh`, negative radiance clipped), each sun a Sun lamp of strength pi * colour and
  its `angle_deg`; the world is transparent in the picture (film transparent), and the picture is
  composited over the sample's flat background colour afterwards;
- materials: Principled BSDF (roughness SKIN_ROUGHNESS); the textured parts read the albedo
  texture (sRGB), the others the per-vertex albedo (a colour attribute);
- colour management: "Standard" view transform, exposure 0 (sRGB out, clipped).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..models.morphable import MorphableModel
from ..render.shade import Light, sh_basis, srgb_to_linear
from .sampling import View

SKIN_ROUGHNESS = 0.5
ENVIRONMENT_SIZE = (128, 64)         # equirectangular width x height


def _bpy() -> Any:
    """Blender's module, typed loosely: scene building here uses bpy's dynamic API (node sockets,
    ID subtypes) that its stubs type as unions."""
    import bpy
    return bpy


def equirectangular_directions(width: int, height: int) -> np.ndarray:
    """(height, width, 3) the unit direction (Blender world frame) of each pixel of an
    equirectangular environment image as Cycles reads it (row 0 at the bottom):
    u = 0.5 - atan2(y, x) / 2 pi, v = 0.5 + asin(z) / pi."""
    u = (np.arange(width) + 0.5) / width
    v = (np.arange(height) + 0.5) / height
    azimuth = (0.5 - u[None, :]) * 2 * np.pi
    elevation = (v[:, None] - 0.5) * np.pi
    return np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                     np.sin(elevation) * np.ones_like(azimuth)], axis=-1)


def environment_pixels(light: Light, width: int, height: int) -> np.ndarray:
    """(height, width, 3) linear radiance of the light's SH part, clipped at 0."""
    radiance = sh_basis(equirectangular_directions(width, height)) @ light.radiance_sh().T
    return np.maximum(radiance, 0.0)


def _look_rotation(direction: np.ndarray) -> np.ndarray:
    """A rotation whose +Z column is `direction` (a lamp shines along its -Z)."""
    z = direction / np.linalg.norm(direction)
    helper = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


def _matrix(rotation: np.ndarray, translation: np.ndarray) -> Any:
    import mathutils
    m = np.identity(4)
    m[:3, :3], m[:3, 3] = rotation, translation
    return mathutils.Matrix(m.tolist())


def _material(name: str, roughness: float, specular: float, colour_source: Any) -> Any:
    bpy = _bpy()
    material = bpy.data.materials.new(name)
    if material.node_tree is None:
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = roughness
    bsdf.inputs["Specular IOR Level"].default_value = specular
    node = colour_source(nodes)
    links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    return material


def build_scene(model: MorphableModel, vertices_head: np.ndarray, texture: np.ndarray, vertex_colours: np.ndarray,
                light: Light, size_px: int, samples: int, texture_path: Path, specular: float = 0.5) -> tuple[Any, Any]:
    """A fresh Blender scene with the head (head-frame vertices (V, 3) metres), its materials,
    the light and one camera; returns (scene, camera object). specular: the Principled BSDF's
    "Specular IOR Level" (0.5 its default, 0 pure Lambert as `render.shade`)."""
    bpy = _bpy()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = True                 # OpenImageDenoise, albedo-guided, fast prefilter
    scene.cycles.denoising_input_passes = "RGB_ALBEDO"
    scene.cycles.denoising_prefilter = "FAST"
    scene.cycles.use_adaptive_sampling = True
    scene.cycles.max_bounces = 4
    scene.render.use_persistent_data = True            # one scene sync for all views
    scene.render.resolution_x = scene.render.resolution_y = size_px
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0

    Image.fromarray(texture).save(texture_path)
    polygons = [[v for v in polygon if v >= 0] for polygon in model.polygons.tolist()]
    mesh = bpy.data.meshes.new("head")
    mesh.from_pydata(vertices_head.tolist(), [], polygons)
    corner_uvs = np.concatenate([model.uvs[[u for u in polygon if u >= 0]] for polygon in model.polygon_uvs.tolist()])
    mesh.uv_layers.new(name="UVMap").data.foreach_set("uv", corner_uvs.ravel())
    colours = mesh.color_attributes.new("albedo", "FLOAT_COLOR", "POINT")
    rgba = np.concatenate([srgb_to_linear(np.asarray(vertex_colours, np.float64)), np.ones((len(vertex_colours), 1))],
                          axis=1)
    colours.data.foreach_set("color", rgba.astype(np.float32).ravel())
    mesh.polygons.foreach_set("use_smooth", [True] * len(polygons))
    textured = np.array([p.textured for p in model.parts])[model.polygon_part]
    mesh.polygons.foreach_set("material_index", np.where(textured, 0, 1).tolist())
    image = bpy.data.images.load(str(texture_path))
    image.colorspace_settings.name = "sRGB"

    def texture_node(nodes: Any) -> Any:
        node = nodes.new("ShaderNodeTexImage")
        node.image = image
        return node

    def attribute_node(nodes: Any) -> Any:
        node = nodes.new("ShaderNodeAttribute")
        node.attribute_name = "albedo"
        return node

    mesh.materials.append(_material("textured", SKIN_ROUGHNESS, specular, texture_node))
    mesh.materials.append(_material("plain", SKIN_ROUGHNESS, specular, attribute_node))
    scene.collection.objects.link(bpy.data.objects.new("head", mesh))

    world = bpy.data.worlds.new("world")
    scene.world = world
    if world.node_tree is None:
        world.use_nodes = True
    width, height = ENVIRONMENT_SIZE
    environment = bpy.data.images.new("environment", width, height, float_buffer=True)
    pixels = np.concatenate([environment_pixels(light, width, height), np.ones((height, width, 1))], axis=-1)
    environment.pixels.foreach_set(pixels.astype(np.float32).ravel())
    node = world.node_tree.nodes.new("ShaderNodeTexEnvironment")
    node.image = environment
    node.interpolation = "Linear"
    background = next(n for n in world.node_tree.nodes if n.type == "BACKGROUND")
    background.inputs["Strength"].default_value = 1.0
    world.node_tree.links.new(node.outputs["Color"], background.inputs["Color"])
    for k, sun in enumerate(light.suns):
        lamp = bpy.data.lights.new(f"sun{k}", "SUN")
        peak = float(np.max(sun.colour))
        lamp.energy = np.pi * peak
        lamp.color = tuple((np.asarray(sun.colour) / max(peak, 1e-9)).tolist())
        lamp.angle = np.radians(sun.angle_deg)
        lamp_object = bpy.data.objects.new(f"sun{k}", lamp)
        lamp_object.matrix_world = _matrix(_look_rotation(np.asarray(sun.direction, np.float64)), np.zeros(3))
        scene.collection.objects.link(lamp_object)

    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.sensor_fit = "HORIZONTAL"
    camera.data.sensor_width = 36.0
    camera.data.clip_start = 0.01
    scene.collection.objects.link(camera)
    scene.camera = camera
    return scene, camera


def render_views(model: MorphableModel, vertices_head: np.ndarray, texture: np.ndarray, vertex_colours: np.ndarray,
                 light: Light, views: tuple[View, ...], background_srgb: tuple[float, float, float],
                 samples: int = 32, specular: float = 0.5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view (square pictures, principal point at the centre): (rgb (H, W, 3) uint8 sRGB over the
    background colour, coverage mask (H, W) bool: alpha at least 0.5)."""
    bpy = _bpy()
    size = views[0].camera.width
    for view in views:
        c = view.camera
        if c.width != size or c.height != size or abs(c.cx - size / 2) > 1e-6 or abs(c.cy - size / 2) > 1e-6:
            raise ValueError("render_views: square pictures of one size, principal point at the centre")
    out = []
    with tempfile.TemporaryDirectory() as folder:
        scene, camera = build_scene(model, vertices_head, texture, vertex_colours, light, size, samples,
                                    Path(folder) / "albedo.png", specular)
        for view in views:
            rotation = view.pose.rotation
            camera.matrix_world = _matrix(rotation.T, -rotation.T @ view.pose.translation)
            camera.data.lens = view.camera.focal_px * 36.0 / size
            path = Path(folder) / f"{view.name}.png"
            scene.render.filepath = str(path)
            bpy.ops.render.render(write_still=True)
            rgba = np.asarray(Image.open(path).convert("RGBA"), np.float32) / 255.0
            alpha = rgba[..., 3:]
            rgb = rgba[..., :3] * alpha + np.asarray(background_srgb, np.float32) * (1 - alpha)
            out.append((np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), alpha[..., 0] >= 0.5))
    return out
