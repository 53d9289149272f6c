"""Add-on preferences: where the backend is, the CURVE key files, the output folder, the timeout."""
from __future__ import annotations

from typing import cast

import bpy

from .transport import Connection, default_output_folder


class FACERECON_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend_address: bpy.props.StringProperty(
        name="Backend address", default="tcp://127.0.0.1:5555",
        description="ZeroMQ address of `facerecon-backend serve`, e.g. tcp://gpu-box.studio:5555")
    server_key_file: bpy.props.StringProperty(
        name="Server key", subtype="FILE_PATH",
        description="The server's public key file (server.key) when the backend uses CURVE keys")
    client_key_file: bpy.props.StringProperty(
        name="Client key", subtype="FILE_PATH",
        description="Your secret key file (NAME.key_secret) given to you with server.key")
    output_folder: bpy.props.StringProperty(
        name="Output folder", subtype="DIR_PATH",
        description="Where result files are written. Empty: a folder beside the saved .blend "
                    "(<name>_facerecon), or a temporary folder for an unsaved file")
    timeout_s: bpy.props.FloatProperty(
        name="Timeout (s)", default=300.0, min=5.0, max=3600.0,
        description="Longest a reconstruction may take, waiting in the backend's queue included")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "backend_address")
        column = layout.column(heading="Authentication (optional)")
        column.prop(self, "server_key_file")
        column.prop(self, "client_key_file")
        layout.prop(self, "output_folder")
        layout.prop(self, "timeout_s")


def preferences(context: bpy.types.Context) -> FACERECON_AP_preferences:
    blender = context.preferences
    assert blender is not None                # Blender's preferences exist in background mode too
    ours = blender.addons[__package__].preferences
    assert ours is not None                   # an add-on with an AddonPreferences class has them
    return cast(FACERECON_AP_preferences, ours)


def connection(context: bpy.types.Context) -> Connection:
    prefs = preferences(context)
    return Connection(prefs.backend_address.strip(), bpy.path.abspath(prefs.server_key_file),
                      bpy.path.abspath(prefs.client_key_file), job_timeout_s=prefs.timeout_s)


def output_folder(context: bpy.types.Context) -> tuple[str, bool]:
    """(folder, is_temporary): the preference, else beside the .blend, else a temp folder."""
    chosen = preferences(context).output_folder
    if chosen:
        return bpy.path.abspath(chosen), False
    return default_output_folder(bpy.data.filepath), not bpy.data.filepath


CLASSES = (FACERECON_AP_preferences,)
