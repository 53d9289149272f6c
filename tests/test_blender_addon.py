"""The Blender add-on for real: the built zip installed into bpy 5.0.1 (headless, in a subprocess)
talking to a real `facerecon-backend serve`; plus its bpy-free parts (OBJ reading, result folders)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend_process import ROOT, BackendProcess, free_port

pytest.importorskip("bpy", reason="bpy 5.0.1 (Blender as a Python module) is in the test extra")


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, str(ROOT / "build_addon.py"), "--no-wheels", "--output", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated by Blender's validator" in done.stdout
    return out / "facerecon_blender-0.1.0.zip"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    server = BackendProcess(tmp_path_factory.mktemp("backend") / "serve.log", workers=1).start()
    yield server
    assert server.stop() == 0


def run_blender(scenario: str, addon_zip: Path, address: str, work: Path, *photos: str) -> dict:
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(work / "blender_user")}
    done = subprocess.run([sys.executable, str(ROOT / "tests/blender_session.py"), scenario, str(addon_zip),
                           address, str(work), *photos], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_built_zip_holds_addon_protocol_and_a_valid_manifest(addon_zip):
    with zipfile.ZipFile(addon_zip) as zf:
        names = set(zf.namelist())
        manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
    assert {"__init__.py", "operators.py", "transport.py", "shared_protocol/messages.py",
            "shared_protocol/client.py"} <= names
    assert not any(n.startswith("backend_server") for n in names)            # no reconstruction code
    assert manifest["blender_version_min"] == "4.2.0" and manifest["type"] == "add-on"
    assert set(manifest["permissions"]) == {"network", "files"}
    sys.path.insert(0, str(ROOT))
    from build_addon import check_manifest
    assert check_manifest(manifest) == []
    assert check_manifest({**manifest, "permissions": {"network": ""}, "type": "theme"}) == [
        "type must be 'add-on'", "permission 'network' needs a reason", "permission 'files' needs a reason"]


def test_reconstruct_face_imports_a_textured_face_at_the_cursor(addon_zip, backend, tmp_path, grace_hopper_bytes):
    photo = tmp_path / "grace_hopper.jpg"
    photo.write_bytes(grace_hopper_bytes)
    facts = run_blender("import", addon_zip, backend.address, tmp_path, str(photo))

    assert [r["error"] for r in facts["runs"]] == [False, False], facts["runs"]
    assert all(r["operator"] == ["FINISHED"] and not r["running"] and r["polls"] > 0 for r in facts["runs"])
    assert facts["after"]["objects"] == facts["before"]["objects"] + 2
    assert facts["folders"] == ["grace_hopper", "grace_hopper_2"]              # never overwritten
    faces = [o for o in facts["objects"] if o["name"].startswith("grace_hopper")]
    assert [o["name"] for o in faces] == ["grace_hopper", "grace_hopper.001"]
    for face, folder in zip(faces, facts["folders"]):
        assert face["vertices"] == 1790 and face["polygons"] == 3408           # built-in model, 1 subdivision
        assert face["uv_layers"] == ["UVMap"] and face["smooth"]
        assert face["location"] == pytest.approx([1.0, 2.0, 0.5])              # the 3D cursor
        assert 0.10 < face["height_m"] < 0.25 and face["nose_y_minus_centre"] < -0.01   # metres, faces -Y
        assert face["base_color_from"] == ["TEX_IMAGE"]
        [image] = face["images"]
        png = tmp_path / "results" / folder / "grace_hopper.png"
        assert image["size"] == [2048, 2048] and Path(image["filepath"]) == png
        expected = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
        assert image["mean_rgb"] == pytest.approx(expected.tolist(), abs=1.0)
        assert {"facerecon_photo", "facerecon_pose", "facerecon_coefficients", "facerecon_json",
                "facerecon_model", "facerecon_result_folder"} <= set(face["properties"])
        assert face["photo_property"] == str(photo) and abs(face["yaw_deg"]) < 15
    assert [o["selected"] for o in faces] == [False, True] and faces[1]["active"]
    assert "grace_hopper.001" not in facts["after_undo"] and "grace_hopper" in facts["after_undo"]
    assert facts["reloaded"] == facts["objects"]                               # saved and found again

    assert facts["status_text"].startswith("backend 0.1.0") and "workers: 1" in facts["status_text"]
    from blender_addon.transport import best_model
    assert facts["models"]["offered"][0] == "builtin"
    assert facts["models"]["selected"] == best_model(facts["models"]["offered"])   # what this server has
    assert facts["category"] == "Face"
    drawn = [(kind, args) for kind, args, _ in facts["panel_before"]]
    assert ("operator", ["facerecon.reconstruct"]) in drawn and ("operator", ["facerecon.test_connection"]) in drawn
    assert facts["thumbnail"][0] / facts["thumbnail"][1] == pytest.approx(512 / 600, abs=0.01)  # photo preview
    labels = " ".join(" ".join(args) for kind, args, kwargs in facts["panel_after"] if kind == "label") + " ".join(
        kwargs.get("text", "") for kind, args, kwargs in facts["panel_after"] if kind == "label")
    assert "Imported grace_hopper.001" in labels


def obj_positions_blender(path: Path) -> np.ndarray:
    """An OBJ's positions in Blender's frame: (x, y, z) -> (x, -z, y)."""
    points = np.array([line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")], float)
    return np.stack([points[:, 0], -points[:, 2], points[:, 1]], axis=1)


def test_a_model_with_expressions_imports_with_arkit_shape_keys(addon_zip, installed_models, tmp_path):
    from conftest import shared_photo
    photo = shared_photo("deca_exp1.jpg")
    server = BackendProcess(tmp_path / "serve.log", "--models-dir", str(installed_models), workers=1).start()
    try:
        facts = run_blender("model", addon_zip, server.address, tmp_path, str(photo))
    finally:
        assert server.stop() == 0
    assert not facts["run"]["error"], facts["run"]
    assert facts["vertices"] == 24591 and facts["model_property"] == "ict-facekit"
    menu = facts["menu"]                                  # the model menu defaults to the best installed model
    assert menu["first"] == {"offered": ["builtin", "ict-facekit", "sfm"], "selected": "ict-facekit"}
    assert menu["after_pick"]["selected"] == "builtin"    # but keeps the artist's own pick
    folder = Path(facts["result_folder"])
    expression = json.loads((folder / "deca_exp1.json").read_text())["coefficients"]["expression"]
    keys = facts["keys"]
    assert keys[0]["name"] == "Basis" and [k["name"] for k in keys[1:]] == list(expression)   # ARKit names
    assert [k["value"] for k in keys[1:]] == pytest.approx(list(expression.values()), abs=1e-5)
    assert all(k["relative_to"] == "Basis" for k in keys)
    basis, shown = np.array(facts["basis"]), np.array(facts["shown"])
    assert np.abs(basis - obj_positions_blender(folder / "deca_exp1_neutral.obj")).max() < 1e-5   # Basis = neutral
    assert np.abs(shown - obj_positions_blender(folder / "deca_exp1.obj")).max() < 1e-4            # values = posed
    materials = facts["materials"]
    textured = [m["name"] for m in materials if m["textured"]]             # the face's and each eye's texture
    assert len(materials) == 8 and textured == ["deca_exp1", "deca_exp1_eye_white_left", "deca_exp1_eye_white_right"]
    assert facts["material_use"] == list(range(8))
    skin = materials[1]["colour"]                             # the head takes the face's skin colour
    assert skin[0] > skin[2] and 0.05 < skin[0] < 0.9
    assert "shape-keys file" in facts["broken_error"] and not facts["broken_added"]


def test_failures_report_clearly_and_add_nothing(addon_zip, backend, tmp_path):
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(blank)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    facts = run_blender("errors", addon_zip, backend.address, tmp_path, str(blank), str(text),
                        str(tmp_path / "missing.jpg"))
    messages = [r["message"] for r in facts["runs"]]
    assert all(r["error"] and not r["running"] for r in facts["runs"]), facts["runs"]
    assert "[no_face]" in messages[0] and "wall.png" in messages[0]
    assert "[bad_image]" in messages[1] and "notes.jpg" in messages[1]
    assert "does not exist" in messages[2] and "CANCELLED" in facts["runs"][2]["operator"]
    assert "does not exist" in facts["runs"][2]["operator"][1]               # and self.report said so
    assert facts["after"] == facts["before"]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_backend_down_is_reported_and_blender_stays_usable(addon_zip, tmp_path, grace_hopper_bytes):
    photo = tmp_path / "grace_hopper.jpg"
    photo.write_bytes(grace_hopper_bytes)
    facts = run_blender("errors", addon_zip, f"tcp://127.0.0.1:{free_port()}", tmp_path, str(photo))
    [run] = facts["runs"]
    assert run["error"] and "[unreachable]" in run["message"] and "facerecon-backend serve" in run["message"]
    assert facts["after"] == facts["before"]


def test_obj_reader_and_unique_result_folders(tmp_path, reconstructor, grace_hopper_bytes):
    from blender_addon.obj_format import read_mtl, read_obj
    from blender_addon.result_files import write_result
    files = reconstructor.run(grace_hopper_bytes, "g.jpg").files
    folders = [write_result(tmp_path, "g", files) for _ in range(3)]
    assert [f.name for f in folders] == ["g", "g_2", "g_3"]
    mesh = read_obj(folders[0] / "g.obj")
    assert len(mesh.positions) == 1790 and len(mesh.faces) == 3408 and len(mesh.face_uvs) == 3408
    assert mesh.material_library == "g.mtl" and read_mtl(folders[0] / "g.mtl")["g"].texture == "g.png"
    assert mesh.materials == ["g"] and set(mesh.face_materials) == {0}
    broken = tmp_path / "broken.obj"
    broken.write_text("v 0 0 0\nv 1 0 0\nf 1 2 7\n")
    with pytest.raises(ValueError, match="line 3"):
        read_obj(broken)


def test_several_photos_picked_at_once_make_one_head(addon_zip, backend, tmp_path):
    from conftest import shared_photo
    me = Image.open(shared_photo("d3d_000006.jpg")).convert("RGB")
    photos = tmp_path / "photos"
    photos.mkdir()
    me.save(photos / "a_front.jpg")
    me.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "b_mirrored.png")
    (photos / "c_other.jpg").write_bytes(shared_photo("deca_exp1.jpg").read_bytes())
    paths = [str(p) for p in sorted(photos.iterdir())]
    facts = run_blender("person", addon_zip, backend.address, tmp_path, *paths)
    assert facts["picked"] == ["FINISHED"] and facts["listed"] == paths
    assert [t[0] > 0 for t in facts["thumbnails"]] == [True] * 3                # a thumbnail of each photo
    labels = [args for kind, args, kwargs in facts["panel"] if kind == "label"]
    drawn = [(kind, kwargs.get("text", "")) for kind, args, kwargs in facts["panel"] if kind == "label"]
    assert ("label", "3 photos of one person") in drawn, drawn
    assert all(("label", Path(p).name) in drawn for p in paths), labels
    run = facts["run"]
    assert run["operator"] == ["FINISHED"] and not run["error"], run
    assert facts["after"]["objects"] == facts["before"]["objects"] + 1          # one head
    [head] = [o for o in facts["objects"] if o["name"].startswith("a_front")]
    assert "3 photos" in run["message"]
    facts_json = json.loads((Path(head["result_folder"]) / "a_front.json").read_text())
    assert [p["name"] for p in facts_json["person"]["photos"]] == [Path(p).name for p in paths]
    assert facts_json["person"]["photos"][1]["used"]
    assert "CANCELLED" in facts["too_many"] and facts["still_listed"] == paths
