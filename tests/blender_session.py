"""Runs inside a fresh Python process with bpy 5.0.1 (Blender as a module): installs the built
add-on zip like a user would, drives it like the panel's button does, prints facts as JSON.

    python tests/blender_session.py SCENARIO ZIP BACKEND_ADDRESS WORK_DIR [PHOTO...]

BLENDER_USER_RESOURCES must point into WORK_DIR so nothing touches the real user profile.
Scenarios: `import` (reconstruct twice, save, reload), `model` (reconstruct with the backend's
ICT-FaceKit model: shape keys, materials), `errors` (one reconstruct per photo, each expected to
fail) and `person` (several photos picked at once, one head). The last stdout line is `RESULT <json>`.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import bpy

ADDON = "bl_ext.user_default.facerecon"


def install(zip_path: str, address: str, output: Path) -> None:
    bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.backend_address = address
    prefs.output_folder = str(output)
    prefs.timeout_s = 120.0


def reconstruct(photo: str) -> dict:
    """Press the button (the operator's execute path) and run the add-on's timer until it stops."""
    operators = sys.modules[f"{ADDON}.operators"]
    bpy.context.scene.facerecon.photo_path = photo
    try:
        started = bpy.ops.facerecon.reconstruct()
    except RuntimeError as report:            # an ERROR report raises when called from a script
        started = {"CANCELLED", f"report: {report}"}
    state = bpy.context.window_manager.facerecon
    polls, end = 0, time.monotonic() + 180
    if started == {"FINISHED"}:
        while operators.tick_job() is not None and time.monotonic() < end:
            polls += 1
            time.sleep(0.05)
    return {"operator": sorted(started), "running": state.running, "message": state.message,
            "error": state.message_is_error, "polls": polls}


def describe_objects() -> list[dict]:
    facts = []
    for obj in bpy.data.objects:
        if obj.type != "MESH":
            continue
        mesh = obj.data
        material = mesh.materials[0] if mesh.materials else None
        images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE"] if material else []
        base_color_links = [link.from_node.type for link in material.node_tree.links
                            if link.to_socket.name == "Base Color"] if material else []
        zs = [v.co.z for v in mesh.vertices]
        ys = [v.co.y for v in mesh.vertices]
        nose = max(mesh.vertices, key=lambda v: -v.co.y)           # the point furthest toward -Y
        facts.append({
            "name": obj.name, "vertices": len(mesh.vertices), "polygons": len(mesh.polygons),
            "uv_layers": [layer.name for layer in mesh.uv_layers],
            "smooth": all(p.use_smooth for p in mesh.polygons),
            "location": list(obj.location), "selected": obj.select_get(),
            "active": bpy.context.view_layer.objects.active == obj,
            "height_m": max(zs) - min(zs), "depth_m": max(ys) - min(ys),
            "nose_y_minus_centre": nose.co.y - sum(ys) / len(ys),
            "material": material.name if material else None, "base_color_from": base_color_links,
            "images": [{"size": list(i.size), "filepath": bpy.path.abspath(i.filepath),
                        "packed": i.packed_file is not None, "mean_rgb": mean_rgb(i)} for i in images],
            "properties": sorted(k for k in obj.keys() if k.startswith("facerecon_")),
            "photo_property": obj.get("facerecon_photo"),
            "yaw_deg": obj["facerecon_pose"]["yaw_deg"] if "facerecon_pose" in obj else None,
            "result_folder": obj.get("facerecon_result_folder"),
        })
    return facts


def mean_rgb(image: bpy.types.Image) -> list[float]:
    """Mean of the image's R, G, B in 0..255 (Blender decodes the PNG: proves the pixels loaded)."""
    import numpy as np
    pixels = np.empty(image.size[0] * image.size[1] * image.channels, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    # float64 sums: a float32 column sum over 4M pixels drifts by more than a level
    return (pixels.reshape(-1, image.channels)[:, :3].mean(axis=0, dtype=np.float64) * 255).tolist()


def counts() -> dict:
    return {"objects": len(bpy.data.objects), "meshes": len(bpy.data.meshes),
            "materials": len(bpy.data.materials), "images": len(bpy.data.images)}


class LayoutRecorder:
    """Stands in for a UI layout headless: records what the panel draws (labels, operators, props)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.log.append((name, [a for a in args if isinstance(a, str)],
                             {k: v for k, v in kwargs.items() if isinstance(v, (str, float, int))}))
            return LayoutRecorder(self.log)
        return call


def draw_panel() -> list:
    log: list = []
    stand_in = type("PanelStandIn", (), {"layout": LayoutRecorder(log)})()
    bpy.types.FACERECON_PT_panel.draw(stand_in, bpy.context)
    return [entry for entry in log if entry[0] in ("operator", "label", "progress", "prop", "template_icon")]


def test_connection() -> str:
    operators = sys.modules[f"{ADDON}.operators"]
    bpy.ops.facerecon.test_connection()
    end = time.monotonic() + 30
    while operators.tick_check() is not None and time.monotonic() < end:
        time.sleep(0.05)
    return bpy.context.window_manager.facerecon.status_text


def model_menu() -> dict:
    """The panel's model menu: what it offers and what is selected."""
    settings = bpy.context.scene.facerecon
    offered = [item.identifier for item in settings.bl_rna.properties["model"].enum_items_static] or \
        [item[0] for item in sys.modules[f"{ADDON}.properties"]._model_items]
    return {"offered": offered, "selected": settings.model}


def scenario_import(zip_path: str, address: str, work: Path, photos: list[str]) -> dict:
    install(zip_path, address, work / "results")
    status_text = test_connection()
    models = model_menu()
    bpy.context.scene.facerecon.model = "builtin"          # this scenario is about the built-in face
    bpy.context.scene.facerecon.photo_path = photos[0]
    panel_before = draw_panel()
    thumbnail = list(sys.modules[f"{ADDON}.properties"].photo_preview(photos[0]).image_size)
    bpy.context.scene.cursor.location = (1.0, 2.0, 0.5)
    before = counts()
    first = reconstruct(photos[0])
    second = reconstruct(photos[0])
    after = counts()
    objects = describe_objects()
    panel_after = draw_panel()
    bpy.ops.ed.undo()                                   # one step removes the second import only
    after_undo = sorted(o.name for o in bpy.data.objects)
    bpy.ops.ed.redo()
    blend = work / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    reloaded = describe_objects()
    return {"before": before, "after": after, "runs": [first, second], "objects": objects,
            "after_undo": after_undo, "status_text": status_text, "thumbnail": thumbnail, "panel_before": panel_before,
            "panel_after": panel_after, "category": bpy.types.FACERECON_PT_panel.bl_category, "models": models,
            "reloaded": reloaded, "folders": sorted(p.name for p in (work / "results").iterdir())}


def scenario_model(zip_path: str, address: str, work: Path, photos: list[str]) -> dict:
    install(zip_path, address, work / "results")
    test_connection()                                      # fills the model list from the backend
    menu = {"first": model_menu()}                         # the best model selected by itself
    bpy.context.scene.facerecon.model = "builtin"          # the artist picks one: a new status keeps it
    test_connection()
    menu["after_pick"] = model_menu()
    bpy.context.scene.facerecon.model = "ict-facekit"
    run = reconstruct(photos[0])
    obj = bpy.context.view_layer.objects.active
    keys = obj.data.shape_keys.key_blocks if obj and obj.data.shape_keys else []
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
    shown = [list(v.co) for v in evaluated.vertices]
    obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh_clear()
    materials = obj.data.materials
    facts = {"materials": [{"name": m.name, "textured": any(n.type == "TEX_IMAGE" for n in m.node_tree.nodes),
                            "colour": list(m.diffuse_color)[:3]} for m in materials]}
    # A result whose shape keys are damaged: the import fails with a clear error and adds nothing.
    folder = Path(obj["facerecon_result_folder"])
    broken = folder.with_name(folder.name + "_broken")
    shutil.copytree(folder, broken)
    next(broken.glob("*_shape_keys.bin")).write_bytes(b"FRSK")
    before_broken = counts()
    try:
        sys.modules[f"{ADDON}.blender_import"].import_result(broken, photos[0], bpy.context.scene,
                                                            bpy.context.view_layer, False)
        broken_error = None
    except ValueError as exc:
        broken_error = str(exc)
    return {"run": run, "broken_error": broken_error, "broken_added": counts() != before_broken, "menu": menu,
            **facts, "name": obj.name, "vertices": len(obj.data.vertices), "polygons": len(obj.data.polygons),
            "keys": [{"name": k.name, "value": k.value, "relative_to": k.relative_key.name} for k in keys],
            "basis": [list(v.co) for v in keys[0].data] if keys else [], "shown": shown,
            "material_use": sorted({p.material_index for p in obj.data.polygons}),
            "result_folder": obj.get("facerecon_result_folder"), "model_property": obj.get("facerecon_model")}


def scenario_person(zip_path: str, address: str, work: Path, photos: list[str]) -> dict:
    """Pick several photos in one file browser call (the operator's execute, as the browser ends),
    draw the panel, press Reconstruct Face once."""
    install(zip_path, address, work / "results")
    folder = str(Path(photos[0]).parent)
    picked = bpy.ops.facerecon.pick_photos(directory=folder, files=[{"name": Path(p).name} for p in photos])
    settings = bpy.context.scene.facerecon
    listed = [p.path for p in settings.person_photos]
    previews = sys.modules[f"{ADDON}.properties"].photo_preview
    thumbnails = [list(previews(p).image_size) for p in listed]
    panel = draw_panel()
    before = counts()
    run = reconstruct("")
    objects = describe_objects()
    try:
        too_many = bpy.ops.facerecon.pick_photos(directory=folder, files=[{"name": f"p{k}.jpg"} for k in range(9)])
    except RuntimeError as report:
        too_many = {"CANCELLED", f"report: {report}"}
    return {"picked": sorted(picked), "listed": listed, "thumbnails": thumbnails, "panel": panel, "run": run,
            "before": before, "after": counts(), "objects": objects, "too_many": sorted(too_many),
            "still_listed": [p.path for p in settings.person_photos]}


def scenario_errors(zip_path: str, address: str, work: Path, photos: list[str]) -> dict:
    install(zip_path, address, work / "results")
    before = counts()
    runs = [reconstruct(photo) for photo in photos]
    return {"before": before, "after": counts(), "runs": runs}


if __name__ == "__main__":
    scenario, zip_arg, address_arg, work_arg, *photo_args = sys.argv[1:]
    run = {"import": scenario_import, "model": scenario_model, "errors": scenario_errors,
           "person": scenario_person}[scenario]
    print("RESULT " + json.dumps(run(zip_arg, address_arg, Path(work_arg), photo_args)))
