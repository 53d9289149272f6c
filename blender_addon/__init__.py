"""FaceRecon for Blender: pick a photo, click Reconstruct Face, get the textured face in the scene.

UI (panel, operators, preferences), transport (the shared protocol over ZeroMQ) and import only;
the reconstruction runs in the FaceRecon backend (`facerecon-backend serve`). The bpy-facing
modules are imported in register(), so the format modules (obj_format, result_files, transport)
can be imported and tested without Blender.
"""


def _classes() -> tuple:
    from . import operators, panel, preferences, properties
    return (*preferences.CLASSES, *properties.CLASSES, *operators.CLASSES, *panel.CLASSES)


def register() -> None:
    import bpy
    from . import properties
    for cls in _classes():
        bpy.utils.register_class(cls)
    properties.register()


def unregister() -> None:
    import bpy
    from . import operators, properties
    operators.unregister()
    properties.unregister()
    for cls in reversed(_classes()):
        bpy.utils.unregister_class(cls)
