"""Operators (thin) and the timer that drives a job: Blender's UI never waits on the network.

`bpy.app.timers` calls `tick_job` every 0.1 s; it polls the socket without blocking, updates the
panel, and on the result writes the files and imports them on the main thread. The Reconstruct
button's modal handler only listens for Esc (cancel) and reports the outcome when the job ends.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import bpy

from . import preferences, properties
from .blender_import import import_result
from .properties import FACERECON_PG_settings, offer_default_model, set_models
from .protocol import ReconstructOptions, limits
from .result_files import write_result
from .transport import ReconstructJob, StatusCheck, best_model, describe_status

if TYPE_CHECKING:                                 # a type alias of the stubs only
    from bpy.stub_internal.rna_enums import OperatorReturnItems

TICK_S = 0.1
MAX_PERSON_PHOTOS = limits.MAX_PERSON_PHOTOS
_job: ReconstructJob | None = None
_job_scene = ""
_check: StatusCheck | None = None


def _window_manager() -> bpy.types.WindowManager:
    window_manager = bpy.context.window_manager
    assert window_manager is not None             # Blender always has one, in background mode too
    return window_manager


def _redraw() -> None:
    for window in _window_manager().windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


def _show(message: str, error: bool) -> None:
    state = properties.state(bpy.context)
    state.message, state.message_is_error = message, error


def job_options(settings: FACERECON_PG_settings) -> ReconstructOptions:
    several = len(settings.person_photos) > 1                 # one head per person: never every face
    return ReconstructOptions(face=-1 if settings.all_faces and not several else settings.face_index,
                              texture_size=int(settings.texture_size), model=settings.model or "builtin",
                              lit_texture=bool(settings.lit_texture))


def job_photos(settings: FACERECON_PG_settings) -> tuple[str, tuple[str, ...]]:
    """(the first photo, the further photos of the same person): Pick Photos' list, else the photo."""
    paths = [bpy.path.abspath(p.path) for p in settings.person_photos]
    if paths:
        return paths[0], tuple(paths[1:])
    return bpy.path.abspath(settings.photo_path), ()


def start_job(context: bpy.types.Context) -> str | None:
    """Send the scene's photo to the backend; returns an error message, or None when started."""
    global _job, _job_scene
    if job_running():
        return "a reconstruction is already running; cancel it first"
    settings = properties.settings(context)
    first, more = job_photos(settings)
    job = ReconstructJob(preferences.connection(context), first, job_options(settings), more)
    job.start()
    if job.finished:
        _show(job.error, True)
        return job.error
    assert context.scene is not None              # properties.settings(context) found one
    _job, _job_scene = job, context.scene.name
    state = properties.state(context)
    state.running, state.stage, state.progress = True, "connecting", 0.0
    what = Path(job.photo_path).name + (f" and {len(more)} more photo(s)" if more else "")
    _show(f"Sending {what} to {job.connection.address}", False)
    if not bpy.app.timers.is_registered(tick_job):
        bpy.app.timers.register(tick_job, first_interval=TICK_S)
    return None


def job_running() -> bool:
    return _job is not None and not _job.finished


def cancel_job() -> None:
    if _job is not None:
        _job.cancel()


def tick_job() -> float | None:
    """The timer function: advance the job; returns the next interval, None when the job ended."""
    global _job
    if _job is None:
        return None
    _job.poll()
    state = properties.state(bpy.context)
    state.stage, state.progress = _job.stage, _job.fraction
    if _job.state == "queued" and _job.queue_position:
        state.stage = f"queued ({_job.queue_position} ahead)"
    if _job.finished:
        job, _job = _job, None
        finish_job(job)
        state.running = False
    _redraw()
    return None if state.running is False else TICK_S


def finish_job(job: ReconstructJob) -> None:
    """Write and import a result, or show why there is none. Runs on the main thread (timer)."""
    if job.state == "cancelled":
        return _show("Cancelled", False)
    if job.state == "failed":
        return _show(f"{job.error} [{job.error_code}]", True)
    result = job.result
    assert result is not None                     # a job is "done" with its result
    context = bpy.context
    scene = bpy.data.scenes.get(_job_scene) or context.scene
    assert scene is not None                      # Blender always has a scene
    view_layer = context.view_layer if context.scene == scene else scene.view_layers[0]
    assert view_layer is not None                 # the context's scene has a view layer
    parent, temporary = preferences.output_folder(context)
    stem = Path(job.photo_path).stem or "face"
    try:
        folder = write_result(Path(parent), stem, result.files)
        objects = import_result(folder, job.photo_path, scene, view_layer, pack_texture=temporary)
    except Exception as exc:                      # disk full, unreadable result: say so, add nothing
        traceback.print_exc()
        return _show(f"the result could not be imported: {exc}", True)
    _push_undo("Reconstruct Face")
    faces = result.summary.get("faces", len(objects))
    mesh = objects[0].data
    assert isinstance(mesh, bpy.types.Mesh)       # import_result makes mesh objects
    left_out = result.summary.get("left_out") or {}
    person = (f", {len(result.summary.get('used_photos', []))} of {result.summary['photos']} photos"
              if "photos" in result.summary else "")
    _show(f"Imported {', '.join(o.name for o in objects)} ({faces} face{'s' * (faces != 1)}{person}, "
          f"{len(mesh.vertices)} vertices) from {folder}"
          + "".join(f". Left out {name}: {why}" for name, why in left_out.items()), False)


def _push_undo(message: str) -> None:
    """One undo step for the whole import (the timer runs outside any operator)."""
    try:
        window = _window_manager().windows[0]
        with bpy.context.temp_override(window=window):
            bpy.ops.ed.undo_push(message=message)
    except (RuntimeError, IndexError):
        pass                                      # no undo stack (background mode)


def tick_check() -> float | None:
    global _check
    if _check is None:
        return None
    _check.poll()
    if not _check.finished:
        return TICK_S
    state = properties.state(bpy.context)
    check, _check = _check, None
    state.checking = False
    if check.status is not None:
        state.status_text, state.status_is_error = "\n".join(describe_status(check.status)), False
        set_models(list(check.status.models))
        offer_default_model(properties.settings(bpy.context), best_model(check.status.models))
    else:
        state.status_text, state.status_is_error = f"{check.error} [{check.error_code}]", True
    _redraw()
    return None


class FACERECON_OT_reconstruct(bpy.types.Operator):
    """Send the photo to the FaceRecon backend and import the textured face at the 3D cursor"""

    bl_idname = "facerecon.reconstruct"
    bl_label = "Reconstruct Face"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return not job_running()

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        error = start_job(context)
        if error is not None:
            self.report({"ERROR"}, error)
            return {"CANCELLED"}
        return {"FINISHED"}

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[OperatorReturnItems]:
        if self.execute(context) != {"FINISHED"} or context.window is None:
            return {"FINISHED"} if job_running() else {"CANCELLED"}
        window_manager = context.window_manager
        assert window_manager is not None
        self._timer = window_manager.event_timer_add(0.25, window=context.window)
        window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[OperatorReturnItems]:
        if job_running():
            if event.type == "ESC" and event.value == "PRESS":
                cancel_job()
                return {"RUNNING_MODAL"}
            return {"PASS_THROUGH"}
        window_manager = context.window_manager
        assert window_manager is not None
        window_manager.event_timer_remove(self._timer)
        state = properties.state(context)
        self.report({"ERROR"} if state.message_is_error else {"INFO"}, state.message)
        return {"FINISHED"}


class FACERECON_OT_pick_photos(bpy.types.Operator):
    """Pick several photos of one person (front and sides): Reconstruct Face makes one head from them"""

    bl_idname = "facerecon.pick_photos"
    bl_label = "Pick Photos of One Person"

    directory: bpy.props.StringProperty(subtype="DIR_PATH")
    files: bpy.props.CollectionProperty(type=bpy.types.OperatorFileListElement)
    filter_image: bpy.props.BoolProperty(default=True, options={"HIDDEN"})

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        names = sorted(f.name for f in self.files if f.name)
        if not 1 <= len(names) <= MAX_PERSON_PHOTOS:
            self.report({"ERROR"}, f"pick 1 to {MAX_PERSON_PHOTOS} photos of one person ({len(names)} picked)")
            return {"CANCELLED"}
        photos = properties.settings(context).person_photos
        photos.clear()
        for name in names:
            photos.add().path = str(Path(self.directory) / name)
        _show(f"{len(names)} photo(s) of one person: Reconstruct Face makes one head from them", False)
        return {"FINISHED"}

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[OperatorReturnItems]:
        window_manager = context.window_manager
        assert window_manager is not None
        window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}


class FACERECON_OT_clear_photos(bpy.types.Operator):
    """Forget the picked photos (back to one photo)"""

    bl_idname = "facerecon.clear_photos"
    bl_label = "Clear Photos"

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        properties.settings(context).person_photos.clear()
        return {"FINISHED"}


class FACERECON_OT_cancel(bpy.types.Operator):
    """Cancel the running reconstruction (queued: at once; running: at the next stage)"""

    bl_idname = "facerecon.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return job_running()

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        cancel_job()
        return {"FINISHED"}


class FACERECON_OT_test_connection(bpy.types.Operator):
    """Ask the backend for its status: version, devices, models, workers, queue"""

    bl_idname = "facerecon.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        global _check
        if _check is not None:
            return {"CANCELLED"}
        check = StatusCheck(preferences.connection(context))
        check.start()
        state = properties.state(context)
        if check.finished:
            state.status_text, state.status_is_error = check.error, True
            self.report({"ERROR"}, check.error)
            return {"CANCELLED"}
        _check, state.checking, state.status_text = check, True, "asking the backend..."
        bpy.app.timers.register(tick_check, first_interval=TICK_S)
        return {"FINISHED"}


CLASSES = (FACERECON_OT_reconstruct, FACERECON_OT_pick_photos, FACERECON_OT_clear_photos, FACERECON_OT_cancel,
           FACERECON_OT_test_connection)


def unregister() -> None:
    """Stop timers and close sockets so that disabling the add-on leaves nothing running."""
    global _job, _check
    for function in (tick_job, tick_check):
        if bpy.app.timers.is_registered(function):
            bpy.app.timers.unregister(function)
    for exchange in (_job, _check):
        if exchange is not None:
            exchange.close()
    _job = _check = None
