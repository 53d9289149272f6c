"""The fast renderer (render/shade.py) and the synthetic heads (backend_server/synthetic): analytic
shading, light rotation, CPU against CUDA, Cycles against the fast renderer, albedo determinism and
skin-tone range, views, MediaPipe on a synthetic render, and the dataset folder round trip."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from backend_server.geometry import Camera, Pose
from backend_server.models.morphable import MorphableModel, Part
from backend_server.render.shade import (SH_CONSTANTS, Light, RenderMesh, Sun, linear_to_srgb, render, render_batch,
                                         sh_basis, srgb_to_linear)
from backend_server.synthetic.sampling import View, euler_rotation

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the lent GPU machine)")


def uv_sphere(radius: float = 0.1, rings: int = 48, segments: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) vertices and (F, 3) counter-clockwise (outward) triangles of a sphere about the origin."""
    polar = np.linspace(0, np.pi, rings + 1)[1:-1]
    azimuth = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    p, a = np.meshgrid(polar, azimuth, indexing="ij")
    ring = np.stack([np.sin(p) * np.sin(a), np.cos(p), np.sin(p) * np.cos(a)], axis=-1).reshape(-1, 3)
    vertices = radius * np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]])
    index = lambda i, j: 1 + i * segments + j % segments  # noqa: E731
    triangles = [[0, index(0, j), index(0, j + 1)] for j in range(segments)]
    for i in range(rings - 2):
        for j in range(segments):
            triangles += [[index(i, j), index(i + 1, j), index(i + 1, j + 1)],
                          [index(i, j), index(i + 1, j + 1), index(i, j + 1)]]
    last = len(vertices) - 1
    triangles += [[index(rings - 2, j), last, index(rings - 2, j + 1)] for j in range(segments)]
    return vertices, np.array(triangles)


def test_sphere_triangles_face_outward():
    vertices, triangles = uv_sphere()
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    assert (np.einsum("nc,nc->n", np.cross(b - a, c - a), a + b + c) > 0).all()


def sample_light(rng: np.random.Generator) -> Light:
    sh = rng.normal(0, 0.08, (3, 9))
    sh[:, 0] = rng.uniform(0.3, 0.5, 3) / SH_CONSTANTS[0]
    direction = rng.normal(size=3)
    return Light(sh, (Sun(direction / np.linalg.norm(direction), rng.uniform(0.3, 0.8, 3)),))


def test_flat_albedo_sphere_under_a_known_light_gives_the_analytic_shading():
    """Every covered pixel: sRGB(albedo_linear x shading(n)), n the true sphere normal where the
    pixel's ray meets the sphere."""
    rng = np.random.default_rng(7)
    light = sample_light(rng)
    vertices, triangles = uv_sphere()
    centre = np.array([0.02, -0.01, -0.6])
    camera = Camera.for_photo(160, 160)
    mesh = RenderMesh.textured_only(triangles, np.full((len(vertices), 2), 0.5))
    albedo = np.full((4, 4, 3), (150, 120, 90), np.uint8)
    rendering = render(mesh, vertices + centre, camera, albedo, light)

    rows, cols = np.nonzero(rendering.mask)
    rays = np.stack([(cols + 0.5 - camera.cx) / camera.focal_px, -(rows + 0.5 - camera.cy) / camera.focal_px,
                     -np.ones(len(rows))], axis=1)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    along = rays @ centre
    hit_ok = along ** 2 - (centre @ centre - 0.1 ** 2) >= 0
    distance = along - np.sqrt(np.maximum(along ** 2 - (centre @ centre - 0.1 ** 2), 0))
    normals = (rays * distance[:, None] - centre) / 0.1
    expected = linear_to_srgb(srgb_to_linear(np.array([150, 120, 90]) / 255.0) * light.shading(normals)) * 255
    error = np.abs(rendering.rgb[rows, cols].astype(float) - expected)[hit_ok]
    assert rendering.mask.sum() > 3000
    assert error.mean() < 0.6 and np.percentile(error, 99) < 3.0
    assert not rendering.mask[0, 0] and (rendering.rgb[0, 0] == 0).all()          # background


def test_a_rotated_light_shades_rotated_normals_alike():
    rng = np.random.default_rng(1)
    light = sample_light(rng)
    rotation = euler_rotation(40, -20, 10)
    normals = rng.normal(size=(200, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    assert np.allclose(light.rotated(rotation).shading(normals @ rotation.T), light.shading(normals), atol=1e-9)
    basis = sh_basis(normals)                                   # orthonormal: mean of Y_k Y_l over the sphere
    assert np.allclose(4 * np.pi * basis.T @ basis / len(normals), np.identity(9), atol=0.35)


def test_unlit_render_shows_the_texture_as_is():
    vertices = np.array([[-0.1, -0.1, -0.5], [0.1, -0.1, -0.5], [0.1, 0.1, -0.5], [-0.1, 0.1, -0.5]])
    uvs = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    mesh = RenderMesh.textured_only(np.array([[0, 1, 2], [0, 2, 3]]), uvs)
    texture = np.zeros((2, 2, 3), np.uint8)
    texture[0, :] = (200, 10, 10)             # row 0: the top of the texture (v = 1)
    texture[1, :] = (10, 10, 200)
    rendering = render(mesh, vertices, Camera.for_photo(64, 64), texture, None)
    column = rendering.rgb[:, 32]
    covered = np.flatnonzero(rendering.mask[:, 32])
    assert tuple(column[covered[2]]) == (200, 10, 10) and tuple(column[covered[-3]]) == (10, 10, 200)


def test_supersampling_keeps_the_mask_and_softens_edges():
    vertices, triangles = uv_sphere()
    mesh = RenderMesh.textured_only(triangles, np.full((len(vertices), 2), 0.5))
    camera = Camera.for_photo(96, 96)
    albedo = np.full((2, 2, 3), 255, np.uint8)
    one = render(mesh, vertices + [0, 0, -0.6], camera, albedo, None, supersample=1)
    four = render(mesh, vertices + [0, 0, -0.6], camera, albedo, None, supersample=4)
    assert abs(int(one.mask.sum()) - int(four.mask.sum())) < 0.03 * one.mask.sum()
    assert len(np.unique(four.rgb[..., 0])) > 2 and set(np.unique(one.rgb[..., 0])) <= {0, 255}


@gpu
def test_cuda_renderer_matches_the_cpu_one_batched():
    rng = np.random.default_rng(3)
    vertices, triangles = uv_sphere()
    mesh = RenderMesh.textured_only(triangles, (vertices[:, :2] / 0.2 + 0.5))
    albedo = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    poses = [Pose(euler_rotation(yaw, 10, 0), np.array([0.0, 0.0, -0.6])) for yaw in (0, 50)]
    batch = np.stack([p.apply(vertices) for p in poses])
    cameras = [Camera.for_photo(128, 128)] * 2
    lights = [sample_light(rng).rotated(p.rotation) for p in poses]
    cpu = render_batch(mesh, batch, cameras, albedo, lights)
    cuda = render_batch(mesh, batch, cameras, albedo, lights, device="cuda:0")
    for a, b in zip(cpu, cuda):
        both = a.mask & b.mask
        assert (a.mask != b.mask).mean() < 0.002
        assert np.abs(a.rgb[both].astype(int) - b.rgb[both]).mean() < 0.5


# --- synthetic heads -------------------------------------------------------------------------------
def test_views_have_the_asked_yaw_and_centre_the_face(sfm_model):
    from backend_server.synthetic.sampling import face_centre, sample_views
    views = sample_views(sfm_model, np.random.default_rng(0), (0.0, 45.0, -90.0), size_px=256)
    centre = face_centre(sfm_model)
    for view in views:
        angles = view.pose.euler_degrees()
        assert abs(angles["yaw"] - view.yaw_deg) < 1e-6 and abs(angles["pitch"] - view.pitch_deg) < 1e-6
        assert abs(view.pitch_deg) <= 10 and abs(view.roll_deg) <= 6
        pixel = view.camera.project(view.pose.apply(centre[None]))[0]
        assert np.abs(pixel - 128).max() < 15
        assert 0.34 < -view.pose.translation[2] - 0 < 0.6


def test_albedo_is_deterministic_and_spans_very_light_to_very_dark(sfm_model):
    from dataclasses import replace

    from backend_server.synthetic.albedo import albedo_texture, sample_albedo
    params = sample_albedo(np.random.default_rng(5))
    first = albedo_texture(sfm_model, params, 128)
    assert np.array_equal(first, albedo_texture(sfm_model, params, 128))
    assert not np.array_equal(first, albedo_texture(sfm_model, sample_albedo(np.random.default_rng(6)), 128))
    light = albedo_texture(sfm_model, replace(params, melanin=0.0, freckles=0.0), 128)
    dark = albedo_texture(sfm_model, replace(params, melanin=1.0, freckles=0.0), 128)
    luminance = lambda t: float(np.median(srgb_to_linear(t.reshape(-1, 3) / 255.0) @ [0.2126, 0.7152, 0.0722]))  # noqa: E731
    assert luminance(light) > 0.45 and luminance(dark) < 0.03
    # skin is redder than it is blue, whatever the tone
    for texture in (light, dark):
        median = np.median(texture.reshape(-1, 3).astype(float), axis=0)
        assert median[0] > median[2]
    tones = [sample_albedo(np.random.default_rng(s)).melanin for s in range(200)]
    assert min(tones) < 0.05 and max(tones) > 0.95


def test_features_land_on_the_lips_and_brows(sfm_model):
    """Lips redder and brows darker than the cheeks, measured at MediaPipe's points on the model."""
    from backend_server.synthetic.albedo import FaceLayout, albedo_at, sample_albedo
    from backend_server.geometry import vertex_normals
    from dataclasses import replace
    layout = FaceLayout.of(sfm_model)
    normals = vertex_normals(sfm_model.mean.astype(np.float64), sfm_model.triangles)
    c = sfm_model.mediapipe
    at = np.einsum("nk,nkc->nc", c.bary, normals[c.corners])
    params = replace(sample_albedo(np.random.default_rng(2)), melanin=0.3, brow_darkness=0.7, lip_tint=1.0)
    at /= np.linalg.norm(at, axis=1, keepdims=True)
    colours = albedo_at(params, layout, layout.points, at)
    lips, cheeks = colours[[11, 12, 15, 16]], colours[[50, 280, 205, 425]]
    upper, lower = [105, 334, 66, 296], [52, 282, 65, 295]          # brows' upper and lower outlines
    middle = 0.5 * (layout.points[upper] + layout.points[lower])
    brows = albedo_at(params, layout, middle, at[upper])
    assert (lips[:, 0] / lips[:, 1]).mean() > 1.15 * (cheeks[:, 0] / cheeks[:, 1]).mean()
    assert brows.sum(1).mean() < 0.85 * cheeks.sum(1).mean()


def test_mediapipe_finds_the_face_in_a_frontal_fast_render(ict_model, reconstructor):
    """The synthetic head looks like a face to MediaPipe: its 468 points land within 4 % of the
    face's size of where the truth's are."""
    from backend_server.synthetic.sampling import sample_head
    from backend_server.synthetic.scene import SyntheticScene
    sample = sample_head(ict_model, 11, (0.0,), size_px=512, light_kind="soft")
    scene = SyntheticScene.build(ict_model, sample, 512)
    started = time.perf_counter()
    [rendering] = scene.render_fast(supersample=2)
    assert time.perf_counter() - started < 10
    buffer = io.BytesIO()
    Image.fromarray(rendering.rgb).save(buffer, format="PNG")
    from backend_server.pipeline.decode import decode_photo
    from backend_server.pipeline.detect import select_faces
    photo = decode_photo(buffer.getvalue(), "synthetic.png")
    [(_, box)] = select_faces(reconstructor.locator.detector(photo.rgb), 0, "synthetic.png")
    marks = reconstructor.locator.landmarker(photo.rgb, box, "synthetic.png")[:468, :2]
    view = sample.views[0]
    c = ict_model.mediapipe
    truth = view.camera.project(np.einsum("nk,nkc->nc", c.bary, scene.in_view(view)[c.corners]))
    size = np.ptp(truth[c.valid], axis=0).max()
    assert np.median(np.linalg.norm(marks - truth, axis=1)[c.valid]) < 0.04 * size


def test_a_dataset_head_round_trips_through_its_folder(tmp_path, sfm_model):
    from backend_server.synthetic.dataset import RenderedHead, generate
    messages: list[str] = []
    [folder] = generate(sfm_model, tmp_path, 1, seed=4, renderer="fast", size_px=128, texture_size=128,
                        yaws_deg=(0.0, -60.0), log=messages.append)
    head = RenderedHead.load(folder)
    assert [v.name for v in head.sample.views] == ["yaw+000", "yaw-060"]
    assert head.images[0].shape == (128, 128, 3) and head.masks[1].any()
    assert np.allclose(head.posed, sfm_model.vertices(head.sample.identity, head.sample.expression), atol=1e-6)
    again = generate(sfm_model, tmp_path, 1, seed=4, renderer="fast", size_px=128, texture_size=128,
                     yaws_deg=(0.0, -60.0), log=messages.append)
    assert again == [folder] and "reused" in messages[-1]


def test_cycles_and_the_fast_renderer_agree_on_a_lambert_sphere(tmp_path):
    """The light conventions hold in both renderers: SH environment (with a gradient) and a sun,
    diffuse only, mean difference under 2 levels of 255 inside the sphere."""
    pytest.importorskip("bpy", reason="Cycles needs bpy (test extra)")
    from backend_server.synthetic import cycles
    import cv2
    vertices, triangles = uv_sphere()
    polygons = np.concatenate([triangles, -np.ones((len(triangles), 1), int)], axis=1)
    model = MorphableModel("sphere", vertices.astype(np.float32), np.zeros((0, len(vertices), 3), np.float32),
                           np.zeros((0, len(vertices), 3), np.float32), (), polygons,
                           np.where(polygons >= 0, 0, -1), np.full((1, 2), 0.5), np.zeros(len(triangles), int),
                           (Part("face", textured=True),), np.full(68, -1), np.arange(len(vertices)))
    sh = np.zeros((3, 9))
    sh[:, 0], sh[:, 1], sh[0, 3] = 0.3 / SH_CONSTANTS[0], 0.2 / SH_CONSTANTS[1], 0.1 / SH_CONSTANTS[3]
    toward = np.array([0.6, 0.3, 0.74])
    light = Light(sh, (Sun(toward / np.linalg.norm(toward), np.array([0.8, 0.7, 0.6]), 1),))
    views = tuple(View(f"v{yaw}", yaw, 10, 0, Pose(euler_rotation(yaw, 10, 0), np.array([0, 0, -0.6])),
                       Camera.for_photo(80, 80)) for yaw in (0, 70))
    albedo = np.full((4, 4, 3), 150, np.uint8)
    reference = cycles.render_views(model, vertices, albedo, np.full((len(vertices), 3), 150 / 255), light, views,
                                    (0, 0, 0), samples=48, specular=0.0)
    mesh = RenderMesh.textured_only(triangles, np.full((len(vertices), 2), 0.5))
    for (rgb, mask), view in zip(reference, views):
        fast = render(mesh, view.pose.apply(vertices), view.camera, albedo, light.rotated(view.pose.rotation),
                      supersample=2)
        inside = cv2.erode((mask & fast.mask).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (mask != fast.mask).mean() < 0.01
        assert np.abs(rgb[inside].astype(float) - fast.rgb[inside]).mean() < 2.0
