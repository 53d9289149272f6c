"""The sidebar panel (3D View > Sidebar > Face): photo, options, Reconstruct, progress, outcome."""
from __future__ import annotations

import bpy

from . import properties
from .properties import photo_preview


class FACERECON_PT_panel(bpy.types.Panel):
    bl_label = "FaceRecon"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Face"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        assert layout is not None                 # Blender sets it before calling draw()
        settings = properties.settings(context)
        state = properties.state(context)
        if len(settings.person_photos):
            header = layout.row(align=True)
            header.label(text=f"{len(settings.person_photos)} photos of one person", icon="COMMUNITY")
            header.operator("facerecon.clear_photos", text="", icon="X")
            grid = layout.grid_flow(columns=3, even_columns=True, align=True)
            for photo in settings.person_photos:
                cell = grid.column(align=True)
                preview = photo_preview(bpy.path.abspath(photo.path))
                if preview is not None and preview.icon_id:   # icon ids exist only with a UI
                    cell.template_icon(icon_value=preview.icon_id, scale=3.0)
                cell.label(text=bpy.path.basename(photo.path))
        else:
            layout.prop(settings, "photo_path", text="")
            preview = photo_preview(bpy.path.abspath(settings.photo_path))
            if preview is not None and preview.icon_id:      # icon ids exist only with a UI
                layout.template_icon(icon_value=preview.icon_id, scale=6.0)
        layout.operator("facerecon.pick_photos", icon="FILEBROWSER")
        options = layout.column(align=True)
        options.enabled = not state.running
        row = options.row(align=True)
        row.prop(settings, "face_index")
        row.prop(settings, "all_faces", toggle=True)
        options.prop(settings, "texture_size")
        options.prop(settings, "model")
        options.prop(settings, "lit_texture")

        if state.running:
            layout.progress(factor=state.progress, type="BAR", text=state.stage.capitalize())
            layout.operator("facerecon.cancel", icon="CANCEL")
        else:
            layout.operator("facerecon.reconstruct", icon="USER")
        if state.message:
            box = layout.box()
            box.alert = state.message_is_error
            for n, line in enumerate(_wrap(state.message, 48)):
                box.label(text=line, icon="ERROR" if state.message_is_error and n == 0 else "NONE")

        layout.separator()
        layout.operator("facerecon.test_connection", icon="LINKED")
        if state.status_text:
            box = layout.box()
            box.alert = state.status_is_error
            for line in state.status_text.splitlines():
                for part in _wrap(line, 48):
                    box.label(text=part)


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current] if current else lines


CLASSES = (FACERECON_PT_panel,)
