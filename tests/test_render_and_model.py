"""Rasterizer contract, Loop subdivision and the built-in model's stored topology and UV layout."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from backend_server.models.builtin import builtin_topology, load_builtin, loop_subdivide_matrices
from backend_server.pipeline.bake import pull_push_fill
from backend_server.pipeline.export import safe_stem, write_files
from backend_server.render.rasterize import rasterize
from shared_protocol import ResultFile


def test_square_covers_exactly_its_pixel_centres():
    xy = np.array([[2.0, 2.0], [6.0, 2.0], [6.0, 5.0], [2.0, 5.0]])
    raster = rasterize(xy, np.zeros(4), np.array([[0, 1, 2], [0, 2, 3]]), 10, 8)
    assert raster.covered.sum() == 4 * 3
    assert raster.covered[2:5, 2:6].all()
    assert np.allclose(raster.bary[raster.covered].sum(axis=1), 1.0)


def test_nearer_triangle_wins_and_barycentrics_interpolate():
    xy = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]] * 2)
    depth = np.array([5.0, 5.0, 5.0, 1.0, 1.0, 1.0])
    raster = rasterize(xy, depth, np.array([[0, 1, 2], [3, 4, 5]]), 8, 8)
    assert set(np.unique(raster.triangle[raster.covered])) == {1}
    assert np.allclose(raster.depth[raster.covered], 1.0)
    x = raster.interpolate(xy, np.array([[0, 1, 2], [3, 4, 5]]))[..., 0]
    rows, cols = np.nonzero(raster.covered)
    assert np.allclose(x[rows, cols], cols + 0.5, atol=1e-4)


def test_loop_subdivision_counts_and_affine_weights():
    model = load_builtin()
    triangles, smooth, linear = loop_subdivide_matrices(model.triangles, 468)
    edges = {frozenset(p) for t in model.triangles for p in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0]))}
    assert len(triangles) == 4 * len(model.triangles)
    assert smooth.shape == linear.shape == (468 + len(edges), 468)
    assert np.allclose(smooth.row_sums(), 1.0) and np.allclose(linear.row_sums(), 1.0)
    level2 = builtin_topology(2)
    assert len(level2.triangles) == 16 * len(model.triangles)
    assert np.allclose(level2.refine.sum(axis=1), 1.0) and level2.refine.shape == (level2.vertex_count, 468)


def boundary_loops(triangles: np.ndarray) -> int:
    count = collections.Counter(frozenset(p) for t in triangles for p in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
    boundary = [tuple(e) for e, n in count.items() if n == 1]
    neighbours = collections.defaultdict(list)
    for a, b in boundary:
        neighbours[a].append(b)
        neighbours[b].append(a)
    seen, loops = set(), 0
    for start in neighbours:
        if start in seen:
            continue
        loops += 1
        stack = [start]
        while stack:
            v = stack.pop()
            if v not in seen:
                seen.add(v)
                stack += neighbours[v]
    return loops


def test_builtin_uv_layout_is_valid_symmetric_and_has_holes():
    model = load_builtin()
    uv, tris = model.uvs, model.triangles
    assert uv.min() >= 0 and uv.max() <= 1
    a, b, c = uv[tris[:, 0]], uv[tris[:, 1]], uv[tris[:, 2]]
    signed = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    assert (signed > 0).all(), "flipped UV triangles"
    # No overlaps: rasterized coverage equals the summed triangle area (overlaps would be counted once).
    size = 2048
    raster = rasterize(np.stack([uv[:, 0] * size, (1 - uv[:, 1]) * size], 1), np.zeros(len(uv)), tris, size, size)
    assert raster.covered.sum() == pytest.approx(signed.sum() / 2 * size * size, rel=0.005)
    assert np.allclose(uv[model.mirror, 0], 1 - uv[:, 0]) and np.allclose(uv[model.mirror, 1], uv[:, 1])
    assert boundary_loops(tris) == 4          # outline, two eyes, mouth
    ref = model.reference_vertices
    assert np.allclose(ref[model.mirror] * [-1, 1, 1], ref, atol=1e-9)
    assert 0.12 < np.ptp(ref[:, 0]) < 0.16     # metres: an adult face is ~14 cm wide here


def test_pull_push_keeps_known_and_fills_unknown():
    image = np.zeros((64, 64, 3), np.float32)
    known = np.zeros((64, 64), bool)
    image[10:20, 10:20] = 200
    known[10:20, 10:20] = True
    filled = pull_push_fill(image, known)
    assert np.array_equal(filled[known], image[known])
    assert filled[~known].min() > 50          # everything else took the only colour there is


def test_output_names_cannot_escape(tmp_path):
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("C:\\photos\\Me at home.JPG") == "Me_at_home"
    assert safe_stem(".hidden") == "hidden"
    assert safe_stem("....") == "photo"
    with pytest.raises(ValueError):
        write_files(tmp_path, [ResultFile("../x.obj", "obj", b"v")])
    written = write_files(tmp_path / "out", [ResultFile("a.obj", "obj", b"v 1 2 3\n")])
    assert written[0].read_bytes() == b"v 1 2 3\n"
