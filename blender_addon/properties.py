"""Panel inputs (saved with the scene) and the running job's display state (window manager, not saved)."""
from __future__ import annotations

import os
from typing import cast

import bpy

PROPERTY = "facerecon"                 # Scene.facerecon and WindowManager.facerecon, added in register()

_previews = None                       # bpy.utils.previews collection for the photo thumbnail
_model_items: list[tuple[str, str, str]] = [("builtin", "Built-in", "MediaPipe topology, any face")]


def photo_preview(path: str) -> "bpy.types.ImagePreview | None":
    """A thumbnail of the photo at `path`, loaded once (None if there is no such file)."""
    if _previews is None or not path or not os.path.isfile(path):
        return None
    if path not in _previews:
        _previews.load(path, path, "IMAGE")
    return _previews[path]


def set_models(names: list[str]) -> None:
    """Model choices offered by the backend (from the last status)."""
    _model_items[:] = [(n, n.replace("_", " ").replace("-", " ").title(), f"face model '{n}'") for n in names]


def _models(self, context):
    return _model_items


_choosing_default = False              # True while the add-on itself sets the model (not the artist)


def _model_picked(self, context) -> None:
    if not _choosing_default:
        self.model_chosen = True


def offer_default_model(settings: "FACERECON_PG_settings", best: str) -> None:
    """Select `best` (the best model the server has) unless the artist picked a model that the
    server still offers."""
    global _choosing_default
    offered = [item[0] for item in _model_items]
    if settings.model_chosen and settings.model in offered:
        return
    _choosing_default = True
    try:
        settings.model = best
    finally:
        _choosing_default = False


class FACERECON_PG_photo(bpy.types.PropertyGroup):
    """One of several photos of one person (Pick Photos)."""

    path: bpy.props.StringProperty(name="Photo", subtype="FILE_PATH")


class FACERECON_PG_settings(bpy.types.PropertyGroup):
    """What the artist picks in the panel (per scene). `person_photos`: several photos of one person
    (Pick Photos): when there are any, Reconstruct Face makes one head from all of them."""

    photo_path: bpy.props.StringProperty(name="Photo", subtype="FILE_PATH",
                                         description="A photo with a face (JPEG, PNG, WebP, BMP, TIFF)")
    person_photos: bpy.props.CollectionProperty(type=FACERECON_PG_photo)
    face_index: bpy.props.IntProperty(name="Face", default=0, min=0, max=63,
                                      description="Which face: 0 is the largest in the photo")
    all_faces: bpy.props.BoolProperty(name="All faces", default=False,
                                      description="Reconstruct every face in the photo, one object each")
    texture_size: bpy.props.EnumProperty(
        name="Texture", default="2048", description="UV texture size in pixels",
        items=[("1024", "1024²", ""), ("2048", "2048²", ""), ("4096", "4096²", "")])
    model: bpy.props.EnumProperty(name="Model", items=_models, update=_model_picked,
                                  description="Face model on the backend (Test Connection lists the server's; "
                                  "the best one is selected until you pick one)")
    model_chosen: bpy.props.BoolProperty(default=False, options={"HIDDEN"},
                                         description="The artist picked the model (the add-on leaves it)")
    lit_texture: bpy.props.BoolProperty(
        name="Keep photo lighting", default=False,
        description="The photo as it is on the face: its light and shadows, hair and glasses kept "
                    "(default: an albedo, the light divided out, only skin sampled)")


class FACERECON_PG_state(bpy.types.PropertyGroup):
    """What the panel shows about the running job and the last outcome (not saved)."""

    running: bpy.props.BoolProperty(default=False)
    stage: bpy.props.StringProperty(default="")
    progress: bpy.props.FloatProperty(default=0.0, min=0.0, max=1.0)
    message: bpy.props.StringProperty(default="")
    message_is_error: bpy.props.BoolProperty(default=False)
    checking: bpy.props.BoolProperty(default=False)
    status_text: bpy.props.StringProperty(default="")
    status_is_error: bpy.props.BoolProperty(default=False)


CLASSES = (FACERECON_PG_photo, FACERECON_PG_settings, FACERECON_PG_state)


def settings(context: bpy.types.Context) -> FACERECON_PG_settings:
    """The scene's panel inputs (Scene.facerecon)."""
    scene = context.scene
    assert scene is not None                  # the add-on's UI and timers always run with a scene
    return cast(FACERECON_PG_settings, getattr(scene, PROPERTY))


def state(context: bpy.types.Context) -> FACERECON_PG_state:
    """The running job's display state (WindowManager.facerecon)."""
    window_manager = context.window_manager
    assert window_manager is not None         # Blender always has one, in background mode too
    return cast(FACERECON_PG_state, getattr(window_manager, PROPERTY))


def register() -> None:
    global _previews
    import bpy.utils.previews
    _previews = bpy.utils.previews.new()
    setattr(bpy.types.Scene, PROPERTY, bpy.props.PointerProperty(type=FACERECON_PG_settings))
    setattr(bpy.types.WindowManager, PROPERTY, bpy.props.PointerProperty(type=FACERECON_PG_state))


def unregister() -> None:
    global _previews
    delattr(bpy.types.WindowManager, PROPERTY)
    delattr(bpy.types.Scene, PROPERTY)
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
