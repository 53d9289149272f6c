"""Morphable models: loaders from the original files, the installed cache, the MediaPipe
correspondence, batched fitting, and whole reconstructions in a model's topology."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from backend_process import ROOT, BackendProcess
from conftest import shared_photo
from shared_protocol import ErrorCode, ProtocolError, ReconstructOptions
from shared_protocol.client import Client
from shared_protocol.shape_keys import decode_shape_keys

ARKIT_SAMPLE = {"jawOpen", "eyeBlink_L", "eyeBlink_R", "mouthSmile_L", "browInnerUp_R", "cheekPuff_L"}


def obj_positions(data: bytes) -> np.ndarray:
    return np.array([line.split()[1:4] for line in data.decode().splitlines() if line.startswith("v ")], float)


def test_ict_facekit_loads_from_its_original_folder(ict_folder):
    from backend_server.models.ict_facekit import load_ict_facekit
    model = load_ict_facekit(ict_folder)
    assert model.vertex_count == 24591                       # 26719 less the eye overlays and lashes
    assert model.identity_basis.shape == (100, 24591, 3) and model.expression_basis.shape == (53, 24591, 3)
    assert len(model.expression_names) == 53 and ARKIT_SAMPLE <= set(model.expression_names)
    height = model.mean[:, 1].max() - model.mean[:, 1].min()
    assert 0.25 < height < 0.40                              # a head with neck, in metres
    chin = model.landmarks68[8]
    jaw_open = model.expression_basis[model.expression_names.index("jawOpen")]
    assert jaw_open[chin, 1] < -0.005                        # opening the jaw lowers the chin by > 5 mm
    assert [p.name for p in model.parts][:2] == ["face", "head"] and model.parts[0].textured


def test_sfm_loads_through_eos(sfm_folder):
    from backend_server.models.eos_format import load_sfm
    model = load_sfm(sfm_folder)
    assert model.vertex_count == 3448 and model.identity_basis.shape[0] == 63
    assert model.expression_names == ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
    assert 0.12 < model.mean[:, 1].max() - model.mean[:, 1].min() < 0.25       # a face, metres
    assert (model.landmarks68[17:] >= 0).sum() >= 45 and (model.landmarks68[:8] == -1).all()  # no fixed contour


def test_install_caches_and_rebuilds_when_the_source_changes(tmp_path, sfm_folder):
    from backend_server.models import store
    source = tmp_path / "sfm"
    shutil.copytree(sfm_folder, source)
    manifest = store.install("sfm", {"folder": source}, tmp_path / "models")
    assert store.installed_models(tmp_path / "models") == ["sfm"]
    assert store.is_stale(manifest) is None
    first = store.load_model("sfm", tmp_path / "models")
    blendshapes = source / "expression_blendshapes_3448.bin"
    os.utime(blendshapes, ns=(blendshapes.stat().st_atime_ns, blendshapes.stat().st_mtime_ns + 10**9))
    assert store.is_stale(store.read_manifest("sfm", tmp_path / "models")) == "its source files changed"
    store.load_model.cache_clear()
    rebuilt = store.load_model("sfm", tmp_path / "models")
    assert store.is_stale(store.read_manifest("sfm", tmp_path / "models")) is None
    assert np.array_equal(rebuilt.mean, first.mean)
    shutil.rmtree(source)                                 # a source that is gone leaves the cache usable
    store.load_model.cache_clear()
    assert store.load_model("sfm", tmp_path / "models").vertex_count == 3448
    cache = tmp_path / "models" / "sfm" / "model.npz"
    cache.write_bytes(cache.read_bytes()[:100_000])       # a damaged cache says what to do
    store.load_model.cache_clear()
    with pytest.raises(ValueError, match="damaged.*install the model again"):
        store.load_model("sfm", tmp_path / "models")


def test_install_command_explains_where_to_get_a_model(tmp_path):
    done = subprocess.run([sys.executable, "-m", "backend_server.cli.backend", "models", "install", "sfm",
                           "--models-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "github.com/patrikhuber/eos" in done.stderr and "--from" in done.stderr
    # (ict-facekit without --from downloads its pinned archive: tests/test_model_download.py, from 127.0.0.1)
    done = subprocess.run([sys.executable, "-m", "backend_server.cli.backend", "models", "install", "ict-facekit",
                           "--from", str(tmp_path), "--models-dir", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 1 and "not an ICT-FaceKit FaceXModel folder" in done.stderr
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    done = subprocess.run([sys.executable, "-m", "backend_server.cli.backend", "models", "install", "eos",
                           "--name", "junk", "--from", str(junk), "--models-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "not an eos model file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["ict-facekit", "sfm"])
def test_correspondence_puts_mediapipe_points_on_the_right_features(installed_models, name):
    """The iBUG points that MediaPipe's points stand for, carried onto the model through the
    computed correspondence, land within a few mm of the model's own iBUG vertices."""
    from backend_server.models import store
    from backend_server.models.builtin import load_builtin
    model = store.load_model(name)
    corr = model.mediapipe
    assert corr.valid.sum() >= 440
    on_model = np.einsum("nk,nkc->nc", corr.bary, model.mean[corr.corners])
    via_mediapipe = load_builtin().ibug68_points(on_model)
    inner = [k for k in range(17, 68) if model.landmarks68[k] >= 0]
    distance_mm = 1000 * np.linalg.norm(via_mediapipe[inner] - model.mean[model.landmarks68[inner]], axis=1)
    assert np.median(distance_mm) < 4.0 and distance_mm.max() < 15.0, distance_mm.round(1)


def test_fit_recovers_a_known_ict_face_and_is_batch_independent(installed_models):
    from backend_server.models import store
    from backend_server.models.builtin import load_builtin
    from backend_server.geometry import Camera, rigid_fit
    from backend_server.models.morphable_fit import ModelFitter, ideal_landmarks, rodrigues
    import torch
    model = store.load_model("ict-facekit")
    rng = np.random.default_rng(7)
    camera = Camera.for_photo(1024, 1024)
    faces = []
    for yaw in (0.0, 0.5):                                    # frontal and ~29 degrees turned
        identity = rng.normal(size=100) * 0.7
        expression = np.zeros(53)
        expression[model.expression_names.index("jawOpen")] = 0.6
        rotation = rodrigues(torch.tensor([[0.1, yaw, 0.0]], dtype=torch.float64))[0].numpy()
        truth = model.vertices(identity, expression) @ rotation.T + np.array([0.01, 0.0, -0.6])
        faces.append((ideal_landmarks(model, truth, camera), truth, expression))
    fitter = ModelFitter(model)
    reference = load_builtin().reference_vertices
    fits = fitter.fit([m for m, _, _ in faces], [camera, camera], reference)
    region = model.face_region
    for fit, (_, truth, _) in zip(fits, faces):
        # (the prior is set for MediaPipe's correlated errors, so even ideal landmarks keep a few px
        # of residual; and they hold the jaw points fixed on the model where the fit follows the
        # silhouette, as a real detector's do)
        assert fit.reprojection_rms_px < 4.0
        posed = fit.pose.apply(model.vertices(fit.identity, fit.expression)[region])
        aligned = rigid_fit(posed, truth[region]).apply(posed)        # a photo does not fix the distance
        error_mm = 1000 * np.linalg.norm(aligned - truth[region], axis=1)
        assert np.median(error_mm) < 3.0, np.median(error_mm)
        assert fit.expression[model.expression_names.index("jawOpen")] == pytest.approx(0.6, abs=0.3)
    alone = fitter.fit([faces[1][0]], [camera], reference)[0]
    assert np.allclose(alone.identity, fits[1].identity, atol=1e-3)


def test_reconstruct_in_ict_topology_gives_meshes_texture_shape_keys_and_named_coefficients(
        installed_models, reconstructor):
    from backend_server.pipeline.evaluate import photo_metrics
    photo = shared_photo("deca_exp1.jpg")
    # The re-render check below compares with the photo as lit: the lit texture.
    result = reconstructor.run(photo.read_bytes(), photo.name,
                               ReconstructOptions(model="ict-facekit", lit_texture=True))
    files = {f.kind: f for f in result.files}
    assert set(files) == {"obj", "neutral_obj", "mtl", "png", "json", "shape_keys"}
    posed, neutral = obj_positions(files["obj"].data), obj_positions(files["neutral_obj"].data)
    assert posed.shape == neutral.shape == (24591, 3)
    facts = json.loads(files["json"].data)
    expression = facts["coefficients"]["expression"]
    assert len(facts["coefficients"]["identity"]) == 100 and len(expression) == 53
    vertex_count, keys = decode_shape_keys(files["shape_keys"].data)
    assert vertex_count == 24591 and [k.name for k in keys] == list(expression)
    assert [k.value for k in keys] == pytest.approx(list(expression.values()), abs=1e-5)
    rebuilt = neutral.copy()
    for key in keys:
        rebuilt[np.array(key.vertex_ids)] += key.value * np.array(key.offsets).reshape(-1, 3)
    assert np.abs(rebuilt - posed).max() < 1e-4                      # neutral + weights x keys = posed
    mtl = files["mtl"].data.decode()
    assert mtl.count("newmtl") == 8 and "map_Kd deca_exp1.png" in mtl
    names = {f.name for f in result.files}                              # each eye has its own texture
    assert {"deca_exp1_eye_left.png", "deca_exp1_eye_right.png"} <= names
    assert "map_Kd deca_exp1_eye_left.png" in mtl and "map_Kd deca_exp1_eye_right.png" in mtl
    assert set(facts["coefficients"]["gaze_deg"]) == {"yaw", "pitch", "note"}
    face = result.faces[0]
    metrics = photo_metrics(result.photo.rgb, face.texture_vertices, result.model.topology, face.bake.texture,
                            face.fit.camera)
    assert metrics["psnr_db"] > 22 and metrics["face_pixels"] > 5000   # the texture holds the face where it is
    assert facts["quality"]["landmark_reprojection_rms_px"] < 6


def test_sfm_reconstruction_and_an_unknown_model(installed_models, reconstructor, grace_hopper_bytes):
    result = reconstructor.run(grace_hopper_bytes, "g.jpg", ReconstructOptions(model="sfm"))
    files = {f.kind: f for f in result.files}
    assert obj_positions(files["obj"].data).shape == (3448, 3)
    assert list(json.loads(files["json"].data)["coefficients"]["expression"]) == [
        "anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    with pytest.raises(ProtocolError) as error:
        reconstructor.run(grace_hopper_bytes, "g.jpg", ReconstructOptions(model="bfm"))
    assert error.value.code == ErrorCode.UNKNOWN_MODEL and "ict-facekit" in error.value.message


def test_server_lists_installed_models_and_serves_a_model_request(installed_models, tmp_path, grace_hopper_bytes):
    server = BackendProcess(tmp_path / "serve.log", "--models-dir", str(installed_models), workers=1).start()
    try:
        assert server.status().models == ("builtin", "ict-facekit", "sfm")
        with Client(server.address) as client:
            result = client.reconstruct(grace_hopper_bytes, "g.jpg", ReconstructOptions(model="sfm"), timeout_s=120)
        assert {f.kind for f in result.files} == {"obj", "neutral_obj", "mtl", "png", "json", "shape_keys"}
    finally:
        assert server.stop() == 0
