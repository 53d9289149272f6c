"""The peer: eos's own fitting (`eos.fitting.fit_shape_and_pose`) with the Surrey Face Model, its
contour landmarks and edge topology, on iBUG-68 points taken from MediaPipe's landmarks (the
built-in model's mapping), and eos's texture extraction (`eos.render.extract_texture`).

eos's camera is scaled orthographic (pixels = s (R x + t), y flipped). Its result is placed in the
project's pinhole camera frame at the distance where the pinhole's scale equals eos's
(d = focal_px / s), undistorted (`vertices`: for geometry); `photo_vertices` instead lifts every
vertex onto the ray through eos's own projection of it, so re-rendering into the photo matches
eos's projection exactly. The texture is eos's: its alpha marks the texels eos saw; the others stay
black (eos fills nothing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend_server.geometry import Camera, Pose
from backend_server.models import store
from backend_server.models.builtin import load_builtin

from .reconstruction import Reconstruction
from .texels import texel_map

MM = 0.001


@dataclass
class EosPeer:
    """The SFM loaded by eos-py from the eos `share/` files in `folder`."""

    folder: Path

    def __post_init__(self) -> None:
        import eos
        f = Path(self.folder)
        shape = eos.morphablemodel.load_model(str(f / "sfm_shape_3448.bin"))
        blendshapes = eos.morphablemodel.load_blendshapes(str(f / "expression_blendshapes_3448.bin"))
        self.model = eos.morphablemodel.MorphableModel(
            shape.get_shape_model(), blendshapes, color_model=eos.morphablemodel.PcaModel(),
            vertex_definitions=None, texture_coordinates=shape.get_texture_coordinates())
        self.mapper = eos.core.LandmarkMapper(str(f / "ibug_to_sfm.txt"))
        self.edges = eos.morphablemodel.load_edge_topology(str(f / "sfm_3448_edge_topology.json"))
        self.contour_landmarks = eos.fitting.ContourLandmarks.load(str(f / "ibug_to_sfm.txt"))
        self.contour = eos.fitting.ModelContour.load(str(f / "sfm_model_contours.json"))
        self.sfm = store.load_model("sfm")          # the same topology, with the MediaPipe correspondence
        texcoords = np.asarray(shape.get_texture_coordinates(), np.float64)
        self.uvs = np.stack([texcoords[:, 0], 1 - texcoords[:, 1]], axis=1)
        self.triangles = np.asarray(shape.get_shape_model().get_triangle_list(), np.int64)
        self.seconds: list[float] = []

    def fit(self, photo_rgb: np.ndarray, landmarks: np.ndarray, texture_size: int = 512) -> Reconstruction:
        """photo (H, W, 3) uint8, MediaPipe's 478 landmarks (photo pixels) -> Reconstruction."""
        import eos
        height, width = photo_rgb.shape[:2]
        ibug = load_builtin().ibug68_points(landmarks[:, :2])
        marks = [eos.core.Landmark(str(k + 1), [float(x), float(y)]) for k, (x, y) in enumerate(ibug)]
        start = time.perf_counter()
        mesh, params, shape_coefficients, blendshape_coefficients = eos.fitting.fit_shape_and_pose(
            self.model, marks, self.mapper, width, height, self.edges, self.contour_landmarks, self.contour)
        rgba = np.concatenate([photo_rgb, np.full((height, width, 1), 255, np.uint8)], axis=2)
        isomap = np.asarray(eos.render.extract_texture(mesh, params, rgba, texture_size))
        self.seconds.append(time.perf_counter() - start)

        model_mm = np.asarray(mesh.vertices, np.float64)
        modelview = np.asarray(params.get_modelview(), np.float64)
        projection = np.asarray(params.get_projection(), np.float64)
        view_mm = model_mm @ modelview[:3, :3].T + modelview[:3, 3]
        x_px = (projection[0, 0] * view_mm[:, 0] + projection[0, 3] + 1) * width / 2
        y_px = (1 - (projection[1, 1] * view_mm[:, 1] + projection[1, 3])) * height / 2
        camera = Camera.for_photo(width, height)
        px_per_m = projection[0, 0] * width / 2 / MM
        distance = camera.focal_px / px_per_m
        origin_px = np.array([(projection[0, 0] * modelview[0, 3] + projection[0, 3] + 1) * width / 2,
                              (1 - (projection[1, 1] * modelview[1, 3] + projection[1, 3])) * height / 2])
        translation = np.array([(origin_px[0] - camera.cx) * distance / camera.focal_px,
                                (camera.cy - origin_px[1]) * distance / camera.focal_px, -distance])
        pose = Pose(modelview[:3, :3], translation)
        vertices = pose.apply(model_mm * MM)
        depth = distance - (view_mm[:, 2] - modelview[2, 3]) * MM
        lifted = np.stack([(x_px - camera.cx) * depth / camera.focal_px, (camera.cy - y_px) * depth / camera.focal_px,
                           -depth], axis=1)
        neutral_mm = self.model.get_shape_model().draw_sample(shape_coefficients)
        neutral = np.asarray(neutral_mm, np.float64).reshape(-1, 3) * MM
        correspondence = self.sfm.mediapipe
        points468 = np.einsum("nk,nkc->nc", correspondence.bary, vertices[correspondence.corners])
        ibug68 = np.full((68, 2), np.nan)
        known = self.sfm.landmarks68 >= 0
        ibug68[known] = np.stack([x_px, y_px], axis=1)[self.sfm.landmarks68[known]]
        texture = np.ascontiguousarray(isomap[..., :3])
        return Reconstruction(
            "eos (sfm)", "sfm", vertices, self.triangles, neutral, pose, camera, points468, correspondence.valid,
            np.arange(len(vertices)), texture, isomap[..., 3] > 127,
            texel_map(self.triangles, self.uvs, texture_size).covered(), self.triangles, self.uvs,
            np.arange(len(vertices)), np.asarray(shape_coefficients), np.asarray(blendshape_coefficients),
            landmarks, ibug68, lifted)
