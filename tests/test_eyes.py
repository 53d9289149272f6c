"""Eyes of a morphable model (ICT-FaceKit): the eyeball's geometry, the painted eye texture, the
gaze measured from the irises, and the iris colour measured in a photo."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from backend_server.geometry import Camera
from backend_server.models import eyes as eye_model
from backend_server.pipeline.landmarks import EYE_CONTOURS, iris_colour


def delta_e(srgb_a, srgb_b) -> float:
    from skimage.color import rgb2lab
    lab = rgb2lab(np.array([[srgb_a, srgb_b]], np.float64) / 255.0)[0]
    return float(np.linalg.norm(lab[0] - lab[1]))


def test_ict_eyes_are_found_and_their_texture_puts_the_iris_in_front(ict_model):
    eyes = eye_model.find_eyes(ict_model)
    assert [e.side for e in eyes] == ["left", "right"]
    for eye in eyes:
        assert (eye.centre_m[0] > 0) == (eye.side == "left")
        assert 0.010 < eye.radius_m < 0.020 and math.radians(22) < eye.iris_angle_rad < math.radians(40)
        layout = eye_model.eye_texture_layout(ict_model, eye)
        texture = eye_model.paint_eye(layout, (70, 110, 150))
        part = ict_model.polygon_part == eye.part
        front = max(eye.surface_ids, key=lambda v: ict_model.mean[v, 2])       # the most forward vertex
        corner = np.argwhere(ict_model.polygons[part] == front)[0]
        u, v = ict_model.uvs[ict_model.polygon_uvs[part][tuple(corner)]]
        pupil = texture[int((1 - v) * layout.size), int(u * layout.size)]
        assert pupil.max() < 40, pupil                                          # the pupil faces forward
        iris = texture[(layout.iris_radius > 0.5) & (layout.iris_radius < 0.85)].astype(float).mean(0)
        assert delta_e(iris, (70, 110, 150)) < 15                               # the iris has the colour
        sclera = texture[layout.iris_radius > 1.5].astype(float).mean(0)
        assert sclera.min() > 190                                               # the rest is white


@pytest.mark.parametrize("gaze", [(0.0, 0.0), (15.0, -8.0), (-20.0, 10.0)])
def test_gaze_is_recovered_from_the_irises(ict_model, gaze):
    from backend_server.models.morphable_fit import ideal_landmarks
    from backend_server.models.registry import face_model
    model = face_model("ict-facekit")
    rng = np.random.default_rng(3)
    camera = Camera.for_photo(1024, 1024)
    head = ict_model.vertices(rng.normal(size=100) * 0.5)
    centres = [head[eye.surface_ids].mean(0) + eye.centre_offset_m for eye in model.eyes]
    turned = eye_model.turn_eyes(head, model.eyes, gaze, centres)
    truth = turned + np.array([0.0, 0.0, -0.6])
    marks = ideal_landmarks(ict_model, truth, camera)
    for eye, centre, iris_id in zip(model.eyes, centres, (473, 468)):      # the iris: the eye's front
        front = centre + eye_model.gaze_rotation(*gaze) @ np.array([0, 0, eye.radius_m])
        marks[iris_id, :2] = camera.project((front + [0.0, 0.0, -0.6])[None])[0]
    [fit] = model.fit([marks], [camera])
    assert fit.gaze_deg == pytest.approx(gaze, abs=3.0)
    moved = np.linalg.norm(model.head_mesh(fit).posed - model.head_mesh(replace(fit, gaze_deg=(0.0, 0.0))).posed,
                           axis=1)
    in_eyes = np.zeros(len(moved), bool)
    in_eyes[np.concatenate([eye.vertex_ids for eye in model.eyes])] = True
    assert moved[~in_eyes].max() == 0                                   # only the eyeballs turn
    assert (moved[in_eyes].max() > 0.002) == (gaze != (0.0, 0.0))


def test_iris_colour_is_measured_inside_the_eye_opening():
    """A grey photo with two blue irises whose upper half is hidden by skin-coloured lids."""
    rgb = np.full((400, 400, 3), 128, np.uint8)
    marks = np.zeros((478, 3))
    for centre_id, contour, cx in ((468, EYE_CONTOURS[0], 130.0), (473, EYE_CONTOURS[1], 270.0)):
        yy, xx = np.mgrid[0:400, 0:400]
        disc = np.hypot(xx - cx, yy - 200) < 20
        rgb[disc] = (60, 100, 170)
        rgb[(yy < 195) & (np.abs(xx - cx) < 40)] = (200, 150, 130)             # the upper lid
        marks[centre_id, :2] = (cx, 200)
        for k, angle in enumerate((0, 90, 180, 270)):
            rim = math.radians(angle)
            marks[centre_id + 1 + k, :2] = (cx + 20 * math.cos(rim), 200 + 20 * math.sin(rim))
        for k, vertex in enumerate(contour):                                     # an opening below y=195
            angle = 2 * math.pi * k / len(contour)
            marks[vertex, :2] = (cx + 38 * math.cos(angle), 205 + 10 * math.sin(angle))
    measured = iris_colour(rgb, marks)
    assert measured is not None and delta_e(measured, (60, 100, 170)) < 5, measured
    marks[[*EYE_CONTOURS[0], *EYE_CONTOURS[1]], 1] = 180                     # eyes shut: nothing to measure
    assert iris_colour(rgb, marks) is None
