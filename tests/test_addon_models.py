"""The add-on's model menu default, without Blender: the best model a server offers."""
from __future__ import annotations

from blender_addon.transport import best_model


def test_the_best_installed_model_comes_first():
    assert best_model(("builtin",)) == "builtin"
    assert best_model(("builtin", "sfm")) == "sfm"
    assert best_model(("builtin", "ict-facekit", "sfm")) == "ict-facekit"
    assert best_model(("builtin", "sfm", "ict-facekit")) == "ict-facekit"
    assert best_model(("builtin", "bfm2017")) == "bfm2017"                 # any installed model over the built-in
    assert best_model(("builtin", "bfm2017", "sfm")) == "sfm"
    assert best_model(()) == "builtin"
