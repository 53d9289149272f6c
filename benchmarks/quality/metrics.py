"""Measures of a `Reconstruction` against a synthetic head's truth (one view), and image measures.

Geometry (millimetres; all after aligning the reconstruction to the truth, since one photo fixes
neither the distance nor, without it, the scale):
- vertex_rigid / vertex_sim: the face area's vertices against their true positions after a rigid
  (rotation + translation) / similarity (+ scale, as NoW) alignment fitted on those vertices; only
  where the topology is the truth's (ICT-FaceKit);
- points_rigid / points_sim: MediaPipe's 468 points on the reconstruction against the same points on
  the truth, aligned on them; every model has them (the one shared measure);
- surface: reconstructed face-area vertices to the true skin surface after the 468-point rigid
  alignment, over the vertices whose nearest true point lies in the true face area;
- neutral_points / neutral_vertex: the fitted neutral (expression 0, head frame) against the true
  neutral, rigidly aligned: identity alone (468 points; vertices where the topology is the truth's);
- expression_points: the expression's displacement (posed - neutral at the 468 points, head
  frames, the neutral alignment's rotation applied) against the truth's;
- expression_weights: mean absolute error of ICT-FaceKit's weights (gaze shapes left out).
Texture (the truth albedo resampled into the reconstruction's UV layout over the face area; the
same layout directly for ICT-FaceKit; other layouts through the surface: each texel's point on the
aligned reconstruction -> the nearest truth texel on the true posed surface (texels ~0.4 mm apart,
within SURFACE_MATCH_M) -> its truth colour):
- psnr/ssim over the texels the view saw (photo-sampled) and over those it did not (filled);
  psnr_face over the whole face area (seen and filled);
- seam: RMS colour step across the border between seen and filled texels, over the RMS step
  inside them (1 = no seam; the truth texture gives ~1 on the same texel pairs);
- flat_psnr: a flat texture of the seen texels' median colour, the texture baseline;
- gain_psnr_seen / gain_psnr_face: psnr_seen / psnr_face after the per-channel gain (linear light,
  least squares over the seen texels) that matches the texture to the truth: the albedo up to the
  exposure and light colour, which no single photo determines (gain_flat_psnr_seen: the same for
  the flat texture).
Novel view: the reconstruction (aligned as above, its texture unlit: the texture carries the
photo's shading, which is the same in every view of one moment for a diffuse surface) rendered into
another view's camera against that view's render, over the true face area's pixels that both cover
(less a 2-pixel band at the outline); coverage = the share of the true face-area pixels covered.
"""
from __future__ import annotations

from functools import cached_property

import cv2
import numpy as np
from scipy.spatial import cKDTree

from backend_server.geometry import rigid_fit, similarity_fit
from backend_server.pipeline.evaluate import psnr, ssim
from backend_server.models.morphable import MorphableModel, triangulate
from backend_server.render.rasterize import rasterize
from backend_server.render.shade import RenderMesh, linear_to_srgb, render, srgb_to_linear
from backend_server.synthetic.dataset import RenderedHead
from backend_server.synthetic.scene import model_render_topology

from .reconstruction import Reconstruction
from .texels import texel_map

SILHOUETTE_BAND_PX = 2
SURFACE_MATCH_M = 0.005          # a texel farther than this from the true surface has no truth colour
UNFITTED = ("eyeLook",)


# --- geometry helpers ------------------------------------------------------------------------------
def aligned(source: np.ndarray, target: np.ndarray, scale: bool) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) moving source (N, 3) onto target (N, 3): rigid (s = 1) or similarity."""
    if scale:
        return similarity_fit(source, target)
    pose = rigid_fit(source, target)
    return 1.0, pose.rotation, pose.translation


def apply(transform: tuple[float, np.ndarray, np.ndarray], points: np.ndarray) -> np.ndarray:
    s, rotation, translation = transform
    return s * points @ rotation.T + translation


def mean_error_mm(a: np.ndarray, b: np.ndarray) -> float:
    return float(1000 * np.linalg.norm(a - b, axis=1).mean())


def at_mediapipe(model: MorphableModel, vertices: np.ndarray) -> np.ndarray:
    """(468, 3) MediaPipe's points on a model's surface given its vertices (V, 3)."""
    c = model.mediapipe
    return np.einsum("nk,nkc->nc", c.bary, vertices[c.corners])


def closest_points(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, tree: cKDTree,
                   candidates: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (N, 3) points the nearest point on the triangles among the `candidates` triangles with the
    nearest centroids (`tree` over the centroids): (triangle ids (N,), barycentrics (N, 3),
    distances (N,)). Exact point-triangle distance (Ericson's regions)."""
    _, nearest = tree.query(points, k=candidates)
    corners = vertices.astype(np.float32)[triangles[nearest]]                       # (N, K, 3, 3)
    a, b, c = corners[..., 0, :], corners[..., 1, :], corners[..., 2, :]
    p = points.astype(np.float32)[:, None, :]
    bary = _triangle_barycentrics(p, a, b, c)
    closest = bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c
    distance = np.linalg.norm(closest - p, axis=-1)
    best = distance.argmin(axis=1)
    rows = np.arange(len(points))
    return nearest[rows, best], bary[rows, best], distance[rows, best]


def _triangle_barycentrics(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Barycentrics (..., 3) of the closest point to p on each triangle (a, b, c), vectorized."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denominator = np.where(np.abs(va + vb + vc) > 1e-30, va + vb + vc, 1e-30)
    v, w = vb / denominator, vc / denominator
    out = np.stack([1 - v - w, v, w], axis=-1)                         # inside the face

    def put(mask: np.ndarray, weights: np.ndarray) -> None:
        out[mask] = weights[mask]

    def safe(x: np.ndarray) -> np.ndarray:
        return np.where(np.abs(x) > 1e-30, x, 1e-30)

    t_ab = d1 / safe(d1 - d3)
    put((vc <= 0) & (d1 >= 0) & (d3 <= 0), np.stack([1 - t_ab, t_ab, 0 * t_ab], -1))
    t_ac = d2 / safe(d2 - d6)
    put((vb <= 0) & (d2 >= 0) & (d6 <= 0), np.stack([1 - t_ac, 0 * t_ac, t_ac], -1))
    t_bc = (d4 - d3) / safe((d4 - d3) + (d5 - d6))
    put((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), np.stack([0 * t_bc, 1 - t_bc, t_bc], -1))
    one = np.ones_like(d1)
    zero = np.zeros_like(d1)
    put((d1 <= 0) & (d2 <= 0), np.stack([one, zero, zero], -1))
    put((d3 >= 0) & (d4 <= d3), np.stack([zero, one, zero], -1))
    put((d6 >= 0) & (d5 <= d6), np.stack([zero, zero, one], -1))
    return out


# --- image measures --------------------------------------------------------------------------------
def seam_ratio(texture: np.ndarray, seen: np.ndarray, valid: np.ndarray) -> float:
    """RMS colour step between neighbouring texels across the seen/filled border, over the RMS
    step inside (the mean of the mean squared steps inside the seen and inside the filled texels);
    valid texels only. 1: the border is as smooth as the rest."""
    image = texture.astype(np.float64)
    across, inside_seen, inside_filled = [], [], []
    for axis in (0, 1):
        step = (np.diff(image, axis=axis) ** 2).sum(-1)
        both = np.diff(valid.astype(np.int8), axis=axis) == 0
        both &= valid[:-1, :] if axis == 0 else valid[:, :-1]
        s0 = seen[:-1, :] if axis == 0 else seen[:, :-1]
        s1 = seen[1:, :] if axis == 0 else seen[:, 1:]
        across.append(step[both & (s0 != s1)])
        inside_seen.append(step[both & s0 & s1])
        inside_filled.append(step[both & ~s0 & ~s1])
    border, a, b = (np.concatenate(x) for x in (across, inside_seen, inside_filled))
    if len(border) == 0 or len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(np.sqrt(border.mean() / max(0.5 * (a.mean() + b.mean()), 1e-9)))


# --- the truth -------------------------------------------------------------------------------------
class HeadTruth:
    """A rendered head and its model, with what every measure needs computed once."""

    def __init__(self, head: RenderedHead, model: MorphableModel, texture_size: int) -> None:
        self.head, self.model, self.size = head, model, texture_size
        in_face = np.zeros(model.vertex_count, bool)
        in_face[model.face_region] = True
        self.in_face = in_face
        skin = np.array([p.textured or p.skin for p in model.parts])[model.polygon_part]
        textured = np.array([p.textured for p in model.parts])[model.polygon_part][skin]
        polygons = model.polygons[skin]
        self.skin_triangles = triangulate(polygons)                       # (T, 3) vertex ids
        self.skin_uv_triangles = triangulate(model.polygon_uvs[skin])     # (T, 3) UV ids, same order
        self.skin_textured = np.concatenate([textured, textured[polygons[:, 3] >= 0]])
        self.skin_triangle_in_face = in_face[self.skin_triangles].all(axis=1)
        self.textured_triangles = self.skin_triangles[self.skin_textured]
        self.textured_uv_triangles = self.skin_uv_triangles[self.skin_textured]
        self.texel_colours = np.zeros((0, 3), np.uint8)
        self.texel_in_face = np.zeros(0, bool)
        self.texture = cv2.resize(head.texture, (texture_size, texture_size), interpolation=cv2.INTER_AREA)
        triangles, uvs, vertex_of, textured = model_render_topology(model)
        self.render_mesh = RenderMesh(triangles, uvs, vertex_of, head.vertex_colours[vertex_of], textured)
        self.triangles = model.triangles
        self.face_triangle = in_face[self.triangles].all(axis=1)
        self._face_pixels: dict[int, np.ndarray] = {}

    @cached_property
    def texel_tree(self) -> cKDTree:
        """Over the truth texture's texels at their points on the posed head (head frame): the
        truth colour nearest to a point is its nearest texel's (texels ~0.4 mm apart at 512²)."""
        texels = texel_map(self.textured_uv_triangles, self.model.uvs, self.size)
        points = texels.points(self.textured_triangles, self.head.posed)
        self.texel_colours = self.texture.reshape(-1, 3)[texels.texel]
        self.texel_in_face = self.in_face[self.textured_triangles[texels.triangle]].all(axis=1)
        return cKDTree(points)

    @cached_property
    def tree(self) -> cKDTree:
        """Over the skin triangles' centroids on the posed head (head frame)."""
        return cKDTree(self.head.posed[self.skin_triangles].mean(axis=1))

    def in_view(self, k: int) -> np.ndarray:
        return self.head.posed_in_view(k)

    def points468(self, vertices: np.ndarray) -> np.ndarray:
        return at_mediapipe(self.model, vertices)

    def face_pixels(self, k: int) -> np.ndarray:
        """(H, W) bool: pixels of view k where the nearest surface is the true face area (cached)."""
        if k not in self._face_pixels:
            self._face_pixels[k] = self._rasterize_face(k)
        return self._face_pixels[k]

    def _rasterize_face(self, k: int) -> np.ndarray:
        view = self.head.sample.views[k]
        vertices = self.in_view(k)
        raster = rasterize(view.camera.project(vertices), -vertices[:, 2], self.triangles, view.camera.width,
                           view.camera.height)
        face = raster.covered & self.face_triangle[np.maximum(raster.triangle, 0)]
        return face & self.head.masks[k]


# --- measures ----------------------------------------------------------------------------------------
def geometry(recon: Reconstruction, truth: HeadTruth, k: int, recon_model: MorphableModel | None) -> dict:
    """The geometry measures of one reconstruction of view k (see the module docstring)."""
    true_camera = truth.in_view(k)
    valid = recon.points468_valid & truth.model.mediapipe.valid
    true_points = truth.points468(true_camera)
    out: dict[str, float] = {}
    for name, scale in (("points_rigid", False), ("points_sim", True)):
        transform = aligned(recon.points468[valid], true_points[valid], scale)
        out[name] = mean_error_mm(apply(transform, recon.points468[valid]), true_points[valid])
    rigid = aligned(recon.points468[valid], true_points[valid], False)
    same_topology = recon.model == truth.model.name and len(recon.vertices) == truth.model.vertex_count
    if same_topology:
        region = truth.model.face_region
        for name, scale in (("vertex_rigid", False), ("vertex_sim", True)):
            transform = aligned(recon.vertices[region], true_camera[region], scale)
            out[name] = mean_error_mm(apply(transform, recon.vertices[region]), true_camera[region])
    face = apply(rigid, recon.vertices[recon.face_region])
    head_points = truth.head.sample.views[k].pose.head_frame(face)
    triangle, _, distance = closest_points(head_points, truth.head.posed, truth.skin_triangles, truth.tree)
    on_face = truth.skin_triangle_in_face[triangle]
    out["surface"] = float(1000 * distance[on_face].mean()) if on_face.any() else float("nan")
    if recon.neutral is not None and recon_model is not None:
        mine, theirs = at_mediapipe(recon_model, recon.neutral)[valid], truth.points468(truth.head.neutral)[valid]
        transform = aligned(mine, theirs, False)
        out["neutral_points"] = mean_error_mm(apply(transform, mine), theirs)
        if same_topology:
            region = truth.model.face_region
            t = aligned(recon.neutral[region], truth.head.neutral[region], False)
            out["neutral_vertex"] = mean_error_mm(apply(t, recon.neutral[region]), truth.head.neutral[region])
        posed_head = recon.head_vertices
        displacement = (at_mediapipe(recon_model, posed_head) - at_mediapipe(recon_model, recon.neutral))[valid]
        true_displacement = (truth.points468(truth.head.posed) - truth.points468(truth.head.neutral))[valid]
        out["expression_points"] = mean_error_mm(displacement @ transform[1].T, true_displacement)
        if same_topology and recon.expression is not None:
            names = truth.model.expression_names
            used = np.array([not n.startswith(UNFITTED) for n in names])
            out["expression_weights"] = float(np.abs(recon.expression - truth.head.sample.expression)[used].mean())
    return out


def truth_in_layout(recon: Reconstruction, truth: HeadTruth, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth colours (S, S, 3) uint8 in the reconstruction's UV layout, valid (S, S) bool: texels
    of the true face area that have a truth colour)."""
    size = recon.texture.shape[0]
    texels = texel_map(recon.uv_triangles, recon.uvs, size)
    out = np.zeros((size * size, 3), np.uint8)
    valid = np.zeros(size * size, bool)
    if recon.model == truth.model.name and len(recon.vertices) == truth.model.vertex_count:
        in_face = truth.in_face[recon.uv_vertex[recon.uv_triangles[texels.triangle]]].all(axis=1)
        colours = truth.texture.reshape(-1, 3)[texels.texel]
        out[texels.texel[in_face]] = colours[in_face]
        valid[texels.texel[in_face]] = True
        return out.reshape(size, size, 3), valid.reshape(size, size)
    valid_points = recon.points468_valid & truth.model.mediapipe.valid
    rigid = aligned(recon.points468[valid_points], truth.points468(truth.in_view(k))[valid_points], False)
    points = apply(rigid, texels.points(recon.uv_triangles, recon.vertices[recon.uv_vertex]))
    head_points = truth.head.sample.views[k].pose.head_frame(points)
    distance, nearest = truth.texel_tree.query(head_points, distance_upper_bound=SURFACE_MATCH_M)
    keep = np.isfinite(distance)
    keep[keep] = truth.texel_in_face[nearest[keep]]
    out[texels.texel[keep]] = truth.texel_colours[nearest[keep]]
    valid[texels.texel[keep]] = True
    return out.reshape(size, size, 3), valid.reshape(size, size)


def exposure_matched(texture: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 sRGB `texture` times the per-channel gain, in linear light, that brings its
    masked texels closest to `reference`'s (least squares): what one photo cannot know (the
    exposure and the light's colour multiply the albedo) taken out of the comparison."""
    lut = srgb_to_linear(np.arange(256) / 255.0)
    mine, truth = lut[texture], lut[reference]
    if not mask.any():
        return texture
    gain = (mine[mask] * truth[mask]).sum(0) / np.maximum((mine[mask] ** 2).sum(0), 1e-12)
    return np.rint(linear_to_srgb(mine * gain) * 255).astype(np.uint8)


def texture(recon: Reconstruction, truth: HeadTruth, k: int) -> dict:
    """Texture measures of one reconstruction of view k against the truth albedo."""
    reference, valid = truth_in_layout(recon, truth, k)
    if recon.texture.shape[0] != truth.size:
        raise ValueError("texture sizes differ: reconstruct at the benchmark's texture size")
    seen = recon.texel_seen & valid
    filled = ~recon.texel_seen & valid
    mine = np.where(valid[..., None], recon.texture, reference)            # equal outside: fair SSIM windows
    flat = np.where(valid[..., None], np.median(recon.texture[seen], axis=0) if seen.any() else 0, reference)
    gained_flat = np.where(valid[..., None], exposure_matched(flat.astype(np.uint8), reference, seen), reference)
    gained = np.where(valid[..., None], exposure_matched(recon.texture, reference, seen), reference)
    return {"psnr_seen": psnr(mine, reference, seen), "psnr_filled": psnr(mine, reference, filled),
            "psnr_face": psnr(mine, reference, valid),
            "gain_psnr_seen": psnr(gained, reference, seen), "gain_psnr_face": psnr(gained, reference, valid),
            "ssim_seen": ssim(mine, reference, seen), "ssim_filled": ssim(mine, reference, filled),
            "seam": seam_ratio(recon.texture, recon.texel_seen, valid),
            "seam_truth": seam_ratio(reference, recon.texel_seen, valid),
            "flat_psnr_seen": psnr(flat, reference, seen), "flat_psnr_filled": psnr(flat, reference, filled),
            "gain_flat_psnr_seen": psnr(gained_flat, reference, seen),
            "seen_fraction": float(seen.sum() / max(valid.sum(), 1)),
            **({} if recon.texel_used is None else
               {"used_fraction": float((recon.texel_used & valid).sum() / max(valid.sum(), 1))})}


def novel_view(recon: Reconstruction, truth: HeadTruth, source: int, target: int, device: str = "cpu") -> dict:
    """The reconstruction of view `source`, aligned, rendered unlit into view `target` (the fast
    renderer on `device`)."""
    views = truth.head.sample.views
    valid = recon.points468_valid & truth.model.mediapipe.valid
    rigid = aligned(recon.points468[valid], truth.points468(truth.in_view(source))[valid], False)
    head = views[source].pose.head_frame(apply(rigid, recon.vertices))
    vertices = views[target].pose.apply(head)
    mesh = RenderMesh.textured_only(recon.uv_triangles, recon.uvs, recon.uv_vertex)
    rendering = render(mesh, vertices, views[target].camera, recon.texture, None, device=device)
    face = truth.face_pixels(target)
    band = cv2.erode(face.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=SILHOUETTE_BAND_PX).astype(bool)
    both = band & cv2.erode(rendering.mask.astype(np.uint8), np.ones((3, 3), np.uint8),
                            iterations=SILHOUETTE_BAND_PX).astype(bool)
    photo = truth.head.images[target]
    mine = np.where(both[..., None], rendering.rgb, photo)
    return {"psnr": psnr(mine, photo, both), "ssim": ssim(mine, photo, both),
            "coverage": float(both.sum() / max(band.sum(), 1))}

