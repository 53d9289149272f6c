"""The CUDA path against the CPU path as reference. GPU tests are marked `gpu` and skip without CUDA;
the pull-push fill and device parsing run on any machine."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend_server.devices import parse_devices
from backend_server.models.builtin import builtin_topology
from backend_server.pipeline.bake import bake_texture, pull_push_fill
from shared_protocol import ReconstructOptions

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the lent GPU machine)")


def test_pull_push_fill_in_torch_matches_the_opencv_one():
    from backend_server.pipeline.bake_gpu import pull_push_fill_gpu
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (64, 64, 3)).astype(np.float32)
    known = rng.uniform(size=(64, 64)) < 0.3
    known[20:40, 20:40] = False
    reference = pull_push_fill(image * known[..., None], known)
    ours = pull_push_fill_gpu(torch.from_numpy(image * known[..., None]).permute(2, 0, 1)[None],
                              torch.from_numpy(known)[None, None])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - reference).max() < 1e-3
    assert np.array_equal(ours[known], image[known])


def test_device_lists_are_checked():
    assert parse_devices("cpu") == ["cpu"]
    with pytest.raises(ValueError, match="unknown device"):
        parse_devices("gpu0")
    with pytest.raises(ValueError, match="cuda:99 does not exist on this machine; GPUs here"):
        parse_devices("0,99" if CUDA else "99")


def resized_jpeg(data: bytes, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).resize(size).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def prepared(reconstructor, grace_hopper_bytes):
    """Two photos of different sizes (512x600 and 700x820), reconstructed on the CPU."""
    options = ReconstructOptions(texture_size=256)
    return [reconstructor.run(grace_hopper_bytes, "grace.jpg", options),
            reconstructor.run(resized_jpeg(grace_hopper_bytes, (700, 820)), "grace_big.jpg", options)]


@gpu
@pytest.mark.gpu
def test_cuda_rasterizer_matches_the_cpu_one():
    from backend_server.render.rasterize import rasterize
    from backend_server.render.rasterize_cuda import rasterize_batch
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (300, 2)).astype(np.float32)
    depth = rng.uniform(1, 2, 300).astype(np.float32)
    triangles = rng.integers(0, 300, (200, 3)).astype(np.int32)
    triangles = triangles[(triangles[:, 0] != triangles[:, 1]) & (triangles[:, 1] != triangles[:, 2])
                          & (triangles[:, 0] != triangles[:, 2])]
    cpu = rasterize(xy, depth, triangles, 200, 160)
    cuda = rasterize_batch(torch.tensor(xy, device="cuda")[None], torch.tensor(depth, device="cuda")[None],
                           torch.tensor(triangles, device="cuda"), 200, 160)
    same = (cuda.triangle[0].cpu().numpy() == cpu.triangle)
    assert same.mean() > 0.995, same.mean()                   # edge pixels may break ties differently
    both = same & cpu.covered
    assert np.abs(cuda.depth[0].cpu().numpy()[both] - cpu.depth[both]).max() < 1e-4
    assert np.abs(cuda.bary[0].cpu().numpy()[both] - cpu.bary[both]).max() < 1e-3


@gpu
@pytest.mark.gpu
def test_gpu_bake_matches_the_cpu_bake(prepared):
    from backend_server.pipeline.bake_gpu import GpuBaker
    topology = builtin_topology(1)
    baker = GpuBaker("cuda:0")
    photos = [p.photo.rgb for p in prepared]
    vertices = [p.faces[0].texture_vertices for p in prepared]
    cameras = [p.faces[0].fit.camera for p in prepared]
    together = baker.bake(photos, vertices, cameras, topology, 2048)            # photos of different sizes
    for k, p in enumerate(prepared):
        alone = baker.bake(photos[k:k + 1], vertices[k:k + 1], cameras[k:k + 1], topology, 2048)[0]
        moved = np.abs(alone.texture.astype(int) - together[k].texture.astype(int))
        assert (moved > 2).mean() < 1e-4, (moved > 2).mean()                 # batching changes ~nothing
        cpu = bake_texture(p.photo.rgb, vertices[k], topology, cameras[k], 2048)
        difference = np.abs(cpu.texture.astype(int) - together[k].texture.astype(int))
        assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 8, (difference.mean(),
                                                                               np.percentile(difference, 99))
        assert abs(cpu.seen_fraction - together[k].seen_fraction) < 0.01


@gpu
@pytest.mark.gpu
def test_batch_command_line_on_gpu_writes_every_file(tmp_path, grace_hopper_bytes):
    from backend_server.cli.facerecon import main
    photos = tmp_path / "in"
    photos.mkdir()
    for k in range(5):
        (photos / f"grace{k}.jpg").write_bytes(grace_hopper_bytes)
        (photos / f"big{k}.jpg").write_bytes(resized_jpeg(grace_hopper_bytes, (700 + k, 820)))
    (photos / "broken.jpg").write_text("not a photo")
    assert main(["reconstruct", str(photos), "-o", str(tmp_path / "out"), "--device", "cuda:0",
                 "--batch-size", "4", "-q"]) == 1                               # the broken one fails
    for k in range(5):
        for stem in (f"grace{k}", f"big{k}"):
            texture = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
            assert texture.shape == (2048, 2048, 3)
            facts = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
            assert facts["timings_ms"]["bake"] > 0 and facts["quality"]["texture_seen_fraction"] > 0.3
    assert not (tmp_path / "out" / "broken.json").exists()


@gpu
@pytest.mark.gpu
def test_batch_command_line_on_gpu_fits_a_model_there(tmp_path, grace_hopper_bytes, sfm_model):
    """A morphable model on the GPU batch path: faces fitted in batches on the GPU, then exported
    in the model's topology with the coefficients, like the CPU path does it."""
    from backend_server.cli.facerecon import main
    photos = tmp_path / "in"
    photos.mkdir()
    for k in range(6):
        (photos / f"g{k}.jpg").write_bytes(resized_jpeg(grace_hopper_bytes, (500 + 20 * k, 600)))
    assert main(["reconstruct", str(photos), "-o", str(tmp_path / "out"), "--device", "cuda:0",
                 "--batch-size", "4", "--model", "sfm", "-q"]) == 0
    for k in range(6):
        facts = json.loads((tmp_path / "out" / f"g{k}.json").read_text())
        assert facts["model"] == "sfm" and len(facts["coefficients"]["identity"]) == 63
        assert facts["timings_ms"]["fit"] > 0 and facts["quality"]["landmark_reprojection_rms_px"] < 8
        vertices = [line for line in (tmp_path / "out" / f"g{k}.obj").read_text().splitlines() if line.startswith("v ")]
        assert len(vertices) == 3448 and (tmp_path / "out" / f"g{k}_shape_keys.bin").exists()


@gpu
@pytest.mark.gpu
def test_server_on_gpu_reports_memory(tmp_path, grace_hopper_bytes):
    from backend_process import BackendProcess
    from shared_protocol.client import Client
    server = BackendProcess(tmp_path / "serve.log", "--devices", "0", workers=1).start(timeout_s=240)
    try:
        with Client(server.address) as client:
            result = client.reconstruct(grace_hopper_bytes, "grace.jpg", timeout_s=120)
        png = next(f.data for f in result.files if f.name == "grace.png")
        assert Image.open(io.BytesIO(png)).size == (2048, 2048)
        [worker] = server.status().workers
        assert worker["device"] == "cuda:0" and 0 < worker["gpu_memory_mb"] < 2048
    finally:
        assert server.stop() == 0


@gpu
@pytest.mark.gpu
def test_evaluate_rerender_on_gpu_matches_cpu(prepared):
    from backend_server.pipeline.evaluate import photo_metrics
    p = prepared[0]
    face = p.faces[0]
    topology, camera = p.model.topology, face.fit.camera
    texture = bake_texture(p.photo.rgb, face.texture_vertices, topology, camera, 2048, delit=False).texture  # lit
    cpu = photo_metrics(p.photo.rgb, face.texture_vertices, topology, texture, camera, "cpu")
    cuda = photo_metrics(p.photo.rgb, face.texture_vertices, topology, texture, camera, "cuda:0")
    assert cpu["psnr_db"] > 30
    rms_levels = [255.0 * 10 ** (-m["psnr_db"] / 20) for m in (cpu, cuda)]      # RMS error in 8-bit levels
    assert abs(rms_levels[0] - rms_levels[1]) < 0.1, rms_levels   # at ~45 dB, 0.2 dB is only 0.04 levels
    assert abs(cpu["ssim"] - cuda["ssim"]) < 0.005


@gpu
def test_model_fit_and_bake_on_the_gpu_match_the_cpu(ict_model):
    """ICT-FaceKit through the FaceModel interface: the batched fit on CUDA lands where the CPU fit
    does, its texture vertices computed on the GPU match the CPU's, and the bake in the model's
    topology gives the CPU bake's texture."""
    from backend_server.geometry import Camera
    from backend_server.models.morphable_fit import ideal_landmarks
    from backend_server.models.registry import face_model
    from backend_server.pipeline.bake_gpu import GpuBaker
    model = face_model("ict-facekit")
    rng = np.random.default_rng(5)
    camera = Camera.for_photo(640, 640)
    truths = [ict_model.vertices(rng.normal(size=100)) + np.array([0.0, 0.0, -0.7]) for _ in range(3)]
    marks = [ideal_landmarks(ict_model, v, camera) for v in truths]
    on_gpu = model.fit(marks, [camera] * 3, "cuda:0")
    on_cpu = model.fit(marks, [camera] * 3, "cpu")
    for g, c in zip(on_gpu, on_cpu):
        posed_g = g.pose.apply(ict_model.vertices(g.identity, g.expression))
        posed_c = c.pose.apply(ict_model.vertices(c.identity, c.expression))
        assert np.abs(posed_g - posed_c).max() < 0.002                       # metres
        assert g.reprojection_rms_px < 2.0
    for g, c in zip(model.texture_vertices(on_gpu, "cuda:0"), model.texture_vertices(on_gpu, "cpu")):
        assert g.shape == c.shape == (model.topology.vertex_count, 3) and np.abs(g - c).max() < 1e-4
    topology = model.topology
    photo = rng.integers(0, 255, (640, 640, 3), dtype=np.uint8)
    photo = np.asarray(Image.fromarray(photo).resize((80, 80)).resize((640, 640), Image.BILINEAR))   # smooth
    vertices = topology.refine @ truths[0]
    cpu = bake_texture(photo, vertices, topology, camera, 512)
    [ours] = GpuBaker("cuda:0").bake([photo], [vertices], [camera], topology, 512)
    difference = np.abs(ours.texture.astype(int) - cpu.texture.astype(int))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 8
    assert ours.seen_fraction == pytest.approx(cpu.seen_fraction, abs=0.01)


@gpu
@pytest.mark.gpu
def test_gpu_bake_matches_the_cpu_bake_with_skin_lighting_and_observation(prepared):
    """The same lighting, texel weights, de-lit observation and completed texture on both devices."""
    from backend_server.pipeline.bake_gpu import GpuBaker
    from backend_server.pipeline.segment import SkinSegmenter
    topology = builtin_topology(1)
    segmenter = SkinSegmenter()
    skins = [segmenter(p.photo.rgb, [p.faces[0].landmarks]).probability for p in prepared]
    segmenter.close()
    photos = [p.photo.rgb for p in prepared]
    vertices = [p.faces[0].texture_vertices for p in prepared]
    cameras = [p.faces[0].fit.camera for p in prepared]
    ours = GpuBaker("cuda:0").bake(photos, vertices, cameras, topology, 1024, skins=skins, keep_observation=True)
    for k in range(len(prepared)):
        cpu = bake_texture(photos[k], vertices[k], topology, cameras[k], 1024, skins[k], keep_observation=True)
        assert np.abs(ours[k].lighting.sh - cpu.lighting.sh).max() < 0.02 * np.abs(cpu.lighting.sh).max()
        assert ours[k].texel_weight is not None and cpu.texel_weight is not None
        assert ours[k].observed is not None and cpu.observed is not None
        weight_difference = np.abs(ours[k].texel_weight - cpu.texel_weight)
        assert weight_difference.mean() < 0.01 and np.percentile(weight_difference, 99) < 0.1
        both = (ours[k].texel_weight > 0) & (cpu.texel_weight > 0)
        assert np.percentile(np.abs(ours[k].observed - cpu.observed)[both], 99) < 0.02
        difference = np.abs(cpu.texture.astype(int) - ours[k].texture.astype(int))
        assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 8
