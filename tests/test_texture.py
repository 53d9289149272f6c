"""The texture stages: lighting (fit and divide out), skin map, completion; CPU against its torch twin."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend_server.pipeline.bake import bake_texture
from backend_server.pipeline.complete import complete_texture
from backend_server.pipeline.lighting import fit_lighting, fit_lighting_torch
from backend_server.pipeline.progress import StageClock
from backend_server.render.shade import Light, Sun, fibonacci_sphere, sh_basis
from shared_protocol import ReconstructOptions
from conftest import shared_photo


def seam_ratio(texture: np.ndarray, seen: np.ndarray, valid: np.ndarray) -> float:
    """RMS step across the seen/filled border over the RMS step inside (benchmarks/quality/metrics.py)."""
    image = texture.astype(np.float64)
    across, inside = [], []
    for axis in (0, 1):
        step = (np.diff(image, axis=axis) ** 2).sum(-1)
        both = (valid[:-1] & valid[1:]) if axis == 0 else (valid[:, :-1] & valid[:, 1:])
        s0, s1 = (seen[:-1], seen[1:]) if axis == 0 else (seen[:, :-1], seen[:, 1:])
        across.append(step[both & (s0 != s1)])
        inside.append(step[both & (s0 == s1)])
    return float(np.sqrt(np.concatenate(across).mean() / np.concatenate(inside).mean()))


def test_lighting_fit_recovers_a_light_and_dividing_it_out_leaves_the_albedo():
    """A uniform albedo under an SH light with a sun, seen on the front half of a sphere: the fit's
    shading is proportional to the true shading, so dividing it out leaves a flat colour."""
    normals = fibonacci_sphere(4000)
    normals = normals[normals[:, 2] > 0.2]                                    # what a camera sees
    light = Light.ambient((0.3, 0.25, 0.2), (Sun(np.array([0.6, 0.3, 0.74]) / np.linalg.norm([0.6, 0.3, 0.74]),
                                                  np.array([0.8, 0.8, 0.7]), 30.0),))
    true_shading = light.shading(normals)
    albedo = np.array([0.55, 0.38, 0.30])
    colours = albedo * true_shading
    colours[:150] *= 0.3                                                       # dark features (brows): outliers
    lighting = fit_lighting(colours, normals, np.ones(len(normals)))
    delit = colours[150:] / lighting.shading(normals[150:])
    spread = delit.std(0) / delit.mean(0)
    before = colours[150:].std(0) / colours[150:].mean(0)
    assert before.min() > 0.35 and spread.max() < 0.15, (before, spread)   # 9 SH fit a sun only in part
    assert np.allclose((sh_basis(normals) @ lighting.sh.T).mean(0), 1.0, atol=0.05)   # normalised shading
    ratio = lighting.shading(normals[150:]) / true_shading[150:]
    assert (ratio.std(0) / ratio.mean(0)).max() < 0.15


def test_lighting_fit_without_weight_is_flat():
    lighting = fit_lighting(np.ones((5, 3)), np.tile([0.0, 0.0, 1.0], (5, 1)), np.zeros(5))
    assert np.allclose(lighting.shading(np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])), 1.0, atol=1e-4)


def test_the_batched_torch_lighting_fit_equals_the_numpy_fit_face_by_face():
    """fit_lighting_torch (the GPU bake's) gives each face of a batch fit_lighting's result, including
    the flat lighting for a face with no weight; and the GPU bake's normals and areas are the CPU's."""
    from backend_server.geometry import vertex_normals
    from backend_server.pipeline.bake import vertex_areas
    from backend_server.pipeline.bake_gpu import _normals_and_areas
    rng = np.random.default_rng(3)
    normals = fibonacci_sphere(3000)
    light = Light.ambient((0.3, 0.25, 0.2), (Sun(np.array([0.0, 0.6, 0.8]), np.array([0.8, 0.7, 0.6]), 20.0),))
    colours = np.stack([light.shading(normals) * [0.5, 0.4, 0.3] * rng.uniform(0.7, 1.3, (3000, 1)) for _ in range(3)])
    weights = np.stack([np.clip(normals[:, 2], 0, None), rng.uniform(0, 1, 3000) * (normals[:, 2] > 0.3),
                        np.zeros(3000)])
    sh, rms, points = fit_lighting_torch(torch.tensor(colours), torch.tensor(np.stack([normals] * 3)),
                                         torch.tensor(weights))
    for k in range(3):
        expected = fit_lighting(colours[k], normals, weights[k])
        assert np.abs(sh[k].numpy() - expected.sh).max() < 1e-9
        assert abs(float(rms[k]) - expected.rms_residual) < 1e-9 and int(points[k]) == expected.points
    assert int(points[2]) == 0 and np.allclose(sh[2].numpy(), fit_lighting(colours[2], normals, weights[2]).sh)

    vertices = rng.normal(size=(2, 40, 3))
    triangles = np.array([rng.choice(40, 3, replace=False) for _ in range(70)])
    ours, areas = _normals_and_areas(torch.tensor(vertices), torch.tensor(triangles))
    for k in range(2):
        assert np.allclose(ours[k].numpy(), vertex_normals(vertices[k], triangles), atol=1e-9)
        assert np.allclose(areas[k].numpy(), vertex_areas(vertices[k], triangles), atol=1e-12)


def synthetic_observation(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A skin-like albedo (smooth tone plus fine noise) seen on an off-centre disc (a turned face):
    (truth (S, S, 3), observed (S, S, 3) 0 where unseen, weight (S, S))."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    tone = np.stack([0.45 + 0.08 * xx, 0.30 + 0.04 * yy, 0.24 + 0.02 * xx * yy], -1)
    truth = (tone * (1 + 0.08 * rng.standard_normal((size, size, 1)))).astype(np.float32)
    weight = np.clip(2.2 - 5 * np.hypot(xx - 0.35, yy - 0.5), 0, 1).astype(np.float32)
    weight[weight < 0.05] = 0
    return truth, (truth * (weight > 0)[..., None]).astype(np.float32), weight


def test_completion_fills_without_a_seam_and_keeps_fine_texture():
    size = 256
    truth, observed, weight = synthetic_observation(size)
    texture = complete_texture(observed, weight, mirror_symmetric=False)
    seen = weight > 0
    assert seen.mean() < 0.6 and texture.shape == (size, size, 3) and texture.dtype == np.uint8
    assert seam_ratio(texture, seen, np.ones_like(seen)) < 1.5                 # 1 = no seam
    filled = texture[~seen].astype(float)
    fine = filled - np.mean(filled, axis=0)
    assert fine.std() > 2.0                                                    # no flat colour: texture continues
    far = texture[:32, -32:].reshape(-1, 3).astype(float).mean(0)              # the unseen corner
    near = texture[seen].reshape(-1, 3).astype(float).mean(0)
    assert np.abs(far - near).max() < 25                                       # skin tone continued


def test_mirror_fill_uses_only_seen_mirror_texels_and_equalises_colour():
    """The right half unseen: it takes the left half's texture mirrored, with the left/right colour
    difference measured where both sides were seen carried over."""
    size = 256
    rng = np.random.default_rng(1)
    pattern = 0.3 + 0.05 * rng.standard_normal((size, size // 2, 3))
    left = pattern.astype(np.float32)
    truth = np.concatenate([left, left[:, ::-1] * 1.2], axis=1).astype(np.float32)   # right side brighter
    weight = np.zeros((size, size), np.float32)
    weight[:, : size // 2 + 40] = 1.0                                        # a band right of the middle seen too
    weight[: size // 4] = 0.0                                                # the top seen on neither side
    observed = truth * (weight > 0)[..., None]
    texture = complete_texture(observed, weight, mirror_symmetric=True).astype(float) / 255
    from backend_server.render.shade import linear_to_srgb
    right = slice(size - 40, size)
    rows = slice(size // 2, size)
    expected = linear_to_srgb(truth[rows, right])
    error = np.abs(texture[rows, right] - expected).mean()
    correlation = np.corrcoef(texture[rows, right, 1].ravel(), expected[..., 1].ravel())[0, 1]
    assert correlation > 0.6, correlation                                      # the mirrored fine texture
    assert error < 0.05, error
    assert np.isfinite(texture[: size // 4]).all() and texture[: size // 4].std() > 0.005


def test_completion_on_the_cpu_equals_its_torch_twin():
    from backend_server.pipeline.bake_gpu import complete_texture_gpu
    _, observed, weight = synthetic_observation(512, seed=3)
    for symmetric in (True, False):
        cpu = complete_texture(observed, weight, symmetric)
        twin = complete_texture_gpu(torch.from_numpy(observed).permute(2, 0, 1)[None],
                                    torch.from_numpy(weight)[None, None], symmetric)[0].numpy()
        difference = np.abs(cpu.astype(int) - twin)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_lit_completion_keeps_every_seen_texel_exactly_on_cpu_and_twin():
    """keep_seen (the lit texture): no feathering over seen texels, even weakly seen ones; only the
    unseen are completed (and still not flat)."""
    from backend_server.pipeline.bake_gpu import complete_texture_gpu
    from backend_server.pipeline.complete import srgb8_of_linear
    _, observed, weight = synthetic_observation(256, seed=4)
    seen = weight > 0
    expected = srgb8_of_linear(observed.copy())
    cpu = complete_texture(observed, weight, mirror_symmetric=True, keep_seen=True)
    twin = complete_texture_gpu(torch.from_numpy(observed).permute(2, 0, 1)[None], torch.from_numpy(weight)[None, None],
                                True, keep_seen=True)[0].numpy()
    assert (weight[seen] < 0.5).mean() > 0.1                                   # weakly seen texels exist
    assert np.abs(cpu[seen].astype(int) - expected[seen]).max() <= 1
    assert np.abs(twin[seen].astype(int) - expected[seen]).max() <= 1
    assert np.abs(complete_texture(observed, weight, True)[seen].astype(int) - expected[seen]).max() > 5
    assert cpu[~seen].astype(float).std(0).max() > 1.0


@pytest.fixture(scope="module")
def located_photo(reconstructor):
    data = shared_photo("d3d_000006.jpg").read_bytes()        # long blond-brown hair over one cheek, white wall
    return reconstructor.locate(data, "d3d_000006.jpg", ReconstructOptions(), StageClock())


def test_skin_map_rejects_background_and_hair_and_keeps_the_cheeks(located_photo):
    photo, located, skin = located_photo
    probability = skin.probability.astype(float) / 255
    marks = located.faces[0].landmarks
    assert probability.shape == photo.rgb.shape[:2]
    cheeks = [probability[int(marks[i, 1]), int(marks[i, 0])] for i in (50, 280, 4, 151)]
    assert min(cheeks) > 0.5, cheeks
    assert probability[:40, :40].max() < 0.1                                  # the wall behind
    top = int(marks[10, 1]) - int(0.25 * (marks[152, 1] - marks[10, 1]))       # above the hairline: hair
    x0, x1 = int(marks[:, 0].min()), int(marks[:, 0].max())
    assert probability[max(top - 10, 0):top + 10, x0:x1].mean() < 0.4


def test_the_texture_is_an_albedo_by_default_and_lit_on_request(reconstructor):
    data = shared_photo("d3d_000006.jpg").read_bytes()
    albedo = reconstructor.run(data, "a.jpg", ReconstructOptions(texture_size=512, outputs=("json",)))
    lit = reconstructor.run(data, "a.jpg", ReconstructOptions(texture_size=512, outputs=("json",), lit_texture=True))
    facts = json.loads(albedo.faces[0].files[-1].data)
    assert np.asarray(facts["lighting"]["sh"]).shape == (3, 9)
    assert facts["texture"]["content"].startswith("albedo")
    assert json.loads(lit.faces[0].files[-1].data)["texture"]["content"].startswith("lit")
    assert albedo.faces[0].bake.lighting.points > 100
    difference = np.abs(albedo.faces[0].bake.texture.astype(int) - lit.faces[0].bake.texture.astype(int))
    assert difference.mean() > 2                                               # the light was divided out


def test_bake_keeps_the_observation_for_fusion(reconstructor, located_photo):
    photo, located, skin = located_photo
    result = reconstructor.run(shared_photo("d3d_000006.jpg").read_bytes(), "a.jpg",
                               ReconstructOptions(texture_size=512, outputs=("json",)))
    face = result.faces[0]
    bake = bake_texture(photo.rgb, face.texture_vertices, result.model.topology, face.fit.camera, 512,
                        skin.probability, keep_observation=True)
    assert bake.observed is not None and bake.texel_weight is not None
    assert bake.observed.shape == (512, 512, 3) and bake.observed.dtype == np.float32
    assert bake.texel_weight.shape == (512, 512) and bake.texel_weight.dtype == np.float32
    assert 0 <= bake.texel_weight.min() and bake.texel_weight.max() <= 1 and (bake.texel_weight > 0.9).mean() > 0.1
    again = complete_texture(bake.observed, bake.texel_weight, result.model.topology.uv_mirror_symmetric)
    assert np.array_equal(again, bake.texture)                                 # completion is its own step
    assert not np.array_equal(bake_texture(photo.rgb, face.texture_vertices, result.model.topology,
                                           face.fit.camera, 512).texture, bake.texture)   # the skin map matters


def test_skin_distance_through_opencv_equals_the_feature_definition():
    """segment.skin_distance (cv2 tables and transforms) gives the distance that skin_features defines,
    on a real photo, for a skin model of realistic spread."""
    import cv2
    from backend_server.pipeline.segment import skin_distance, skin_features
    path = shared_photo("d3d_000002.jpg")
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    mean, spread = np.array([0.35, -0.45, -1.6], np.float32), np.array([0.07, 0.09, 0.4], np.float32)
    expected = np.sqrt((((skin_features(rgb) - mean) / spread) ** 2).sum(-1))
    distance = skin_distance(rgb, mean, spread)
    assert distance.shape == rgb.shape[:2]
    assert np.abs(distance - expected).max() < 1e-3 * expected.max()
    assert (expected < 2.5).mean() > 0.02 and (expected > 4.5).mean() > 0.02     # both ends of the ramp occur
