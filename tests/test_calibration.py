"""Calibrating a morphable model to MediaPipe on synthetic renders of itself (backend_server/
calibration.py, models/calibration.py), the built-in model's learnt geometry, and the landmark
retries that place turned heads."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def calibrated_sfm(installed_models, tmp_path_factory):
    """The session's SFM copied into a fresh models dir and calibrated there on 40 renders."""
    from backend_server.calibration import calibrate
    from backend_server.models import store
    folder = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(installed_models / "sfm", folder / "sfm")
    calibration = calibrate(store.load_model("sfm"), renders=40, seed=5, workers=2)
    store.save_calibration("sfm", calibration, folder)
    return folder, calibration


def test_calibration_beats_the_uncalibrated_fit_and_the_mean_face_on_held_out_renders(calibrated_sfm):
    _, calibration = calibrated_sfm
    facts = calibration.facts
    assert facts["renders"] == 40 and facts["detected_renders"] >= 36
    errors = facts["held_out_vertex_error_mm"]
    assert errors["calibrated"] < errors["uncalibrated"]
    assert errors["calibrated"] < errors["mean_face"]
    assert calibration.noise.shape == (468, 3) and np.all(calibration.noise > 0)
    builtin = calibration.shape_correction.facts["held_out_points_error_mm"]
    assert builtin["corrected"] < builtin["mediapipe"]
    views = calibration.views                     # 20 more heads, each at 0 and about ±55 degrees
    assert views is not None and views.facts["heads"] >= 16
    from backend_server.models import store
    assert views.weights.shape == (3 * 1404, len(store.load_model("sfm").identity_basis))
    assert set(views.facts["held_out_neutral_error_mm"]) == {"three_views", "mean_of_one_view_predictions",
                                                             "front_view_prediction", "mean_face"}


def test_the_stored_calibration_is_what_the_fit_uses_until_the_model_changes(calibrated_sfm, caplog):
    from backend_server.models import store
    from backend_server.models.morphable_face import MorphableFaceModel
    folder, calibration = calibrated_sfm
    store.load_calibration.cache_clear()
    loaded = store.load_calibration("sfm", folder)
    assert loaded is not None and np.array_equal(loaded.prior_weights, calibration.prior_weights)
    assert loaded.views is not None and np.array_equal(loaded.views.weights, calibration.views.weights)
    assert loaded.views.facts == calibration.views.facts and "views" not in loaded.facts
    model = store.load_model("sfm")
    face = MorphableFaceModel(model, loaded)
    assert face.weighting.calibration is loaded
    assert face.weighting.noise_scale == calibration.facts["noise_scale"]

    manifest = folder / "sfm" / "manifest.json"
    facts = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**facts, "identity_components": 1}))   # another model
    store.load_calibration.cache_clear()
    with caplog.at_level(logging.WARNING, logger="facerecon.models"):
        assert store.load_calibration("sfm", folder) is None
    assert "facerecon-backend models calibrate sfm" in caplog.text
    manifest.write_text(json.dumps(facts))
    store.load_calibration.cache_clear()


def test_the_built_in_model_takes_the_learnt_geometry(calibrated_sfm, grace_hopper_bytes):
    from backend_server.geometry import Camera
    from backend_server.models import store
    from backend_server.models.builtin import BuiltinFaceModel
    from backend_server.pipeline.decode import decode_photo
    from backend_server.pipeline.detect import FaceDetector
    from backend_server.pipeline.landmarks import LandmarkDetector
    folder, _ = calibrated_sfm
    store.load_shape_correction.cache_clear()
    correction = store.load_shape_correction(folder)
    assert correction is not None and correction.facts["learnt_from"] == "sfm"
    photo = decode_photo(grace_hopper_bytes, "grace_hopper.jpg")
    box = FaceDetector()(photo.rgb)[0]
    marks = LandmarkDetector()(photo.rgb, box, "grace_hopper.jpg")
    camera = Camera.for_photo(*photo.size)
    [plain] = BuiltinFaceModel(0).fit([marks], [camera])
    [learnt] = BuiltinFaceModel(0, correction).fit([marks], [camera])
    moved_mm = 1000 * np.linalg.norm(learnt.landmark_points - plain.landmark_points, axis=1)
    assert np.median(moved_mm) > 0.5                            # the geometry changed ...
    off_px = np.linalg.norm(camera.project(learnt.landmark_points) - marks[:468, :2], axis=1)
    assert np.median(off_px) < 0.05 * box.width                 # ... and still sits on the face


def test_render_and_detect_is_deterministic(sfm_model):
    from backend_server.calibration import render_and_detect
    first = render_and_detect(sfm_model, 6, seed=11, workers=1)
    again = render_and_detect(sfm_model, 6, seed=11, workers=1)
    assert [s.yaw_deg for s in first] == [s.yaw_deg for s in again]
    for a, b in zip(first, again):
        assert np.array_equal(a.identity, b.identity)
        assert (a.landmarks is None) == (b.landmarks is None)
        if a.landmarks is not None:
            assert np.array_equal(a.landmarks, b.landmarks) and np.array_equal(a.hit_corners, b.hit_corners)


def test_calibrate_command_names_the_installed_models_when_the_model_is_missing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "backend_server.cli.backend", "models", "calibrate", "nosuch",
                           "--models-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "no installed model 'nosuch'" in done.stderr and "models install" in done.stderr


def test_a_mirrored_attempt_gives_each_point_its_own_index(grace_hopper_bytes):
    from backend_server.pipeline.decode import decode_photo
    from backend_server.pipeline.detect import FaceDetector
    from backend_server.pipeline.landmarks import CropAttempt, LandmarkDetector, mirror_permutation
    permutation = mirror_permutation()
    assert np.array_equal(permutation[permutation], np.arange(478))
    photo = decode_photo(grace_hopper_bytes, "grace_hopper.jpg")
    box = FaceDetector()(photo.rgb)[0]
    detector = LandmarkDetector()
    plain = detector._attempt(photo.rgb, box, CropAttempt())
    mirrored = detector._attempt(photo.rgb, box, CropAttempt(mirror=True))
    distance = np.linalg.norm(plain[:, :2] - mirrored[:, :2], axis=1)
    assert np.median(distance) < 0.02 * box.width and distance[468:].max() < 0.03 * box.width


def test_every_head_turned_up_to_65_degrees_gets_landmarks(ict_model, monkeypatch):
    """24 ICT-FaceKit renders at 55-65 degrees of yaw, either way (before the retries, 3 of these
    failed with 'landmarks could not be placed')."""
    from backend_server import calibration
    from backend_server.pipeline.detect import FaceDetector
    from backend_server.pipeline.landmarks import LandmarkDetector
    monkeypatch.setattr(calibration, "yaws", lambda rng: tuple(
        float(v) for v in rng.choice([-1.0, 1.0], 2) * rng.uniform(55.0, 65.0, 2)))
    renders = [r for batch in calibration._render_batches(ict_model, 24, 99, "cpu") for r in batch]
    detector, landmarker = FaceDetector(), LandmarkDetector()
    for render in renders:
        boxes = detector(render.rgb)
        assert boxes, f"no face found at yaw {render.yaw_deg:.1f}"
        assert landmarker(render.rgb, boxes[0], "render").shape == (478, 3)


def test_the_three_view_heads_default_to_half_the_renders_and_never_go_below_zero():
    from backend_server.calibration import view_heads_for
    assert view_heads_for(4000, None) == 2000 and view_heads_for(41, None) == 20
    assert view_heads_for(4000, 1200) == 1200 and view_heads_for(4000, 0) == 0
    assert view_heads_for(4000, -5) == 0                    # --view-heads -5: skipped, as 0


def test_a_calibration_from_before_the_three_view_read_out_still_loads(calibrated_sfm, tmp_path):
    from dataclasses import replace
    from backend_server.models.calibration import Calibration
    _, calibration = calibrated_sfm
    path = tmp_path / "calibration.npz"
    replace(calibration, views=None).save(path)            # as written before ViewsPrior existed
    loaded = Calibration.load(path)
    assert loaded.views is None and np.array_equal(loaded.prior_weights, calibration.prior_weights)
