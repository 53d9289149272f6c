"""Quality figures: re-render the textured mesh into the photo's camera and compare.

PSNR and SSIM are computed over the face region: photo pixels covered by the re-rendered mesh,
less a band of SILHOUETTE_BAND_PX at its outline, where render and photo mix face and background.
Landmark error: iBUG-68 points derived from the 478 landmarks against hand-made ones, in pixels
and as a fraction of the outer-eye-corner distance (points 36 and 45, 0-based).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..geometry import Camera, sample_bilinear, uv_to_texture_px
from ..models.topology import MeshTopology
from ..render.rasterize import rasterize

SILHOUETTE_BAND_PX = 2


def render_textured(vertices: np.ndarray, topology: MeshTopology, texture: np.ndarray,
                    camera: Camera, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(rendered (H, W, 3) float32 RGB, mask (H, W) bool) of the mesh seen by `camera`; the
    rasterization runs on `device` (cpu, or cuda:N through nvdiffrast)."""
    args = (camera.project(vertices), -vertices[:, 2], topology.triangles, camera.width, camera.height)
    if device == "cpu":
        raster = rasterize(*args)
    else:
        from ..render.rasterize_cuda import rasterize_on
        raster = rasterize_on(device, *args)
    mask = raster.covered
    uv = raster.interpolate(topology.uvs, topology.triangles)[mask]
    rendered = np.zeros((camera.height, camera.width, 3), np.float32)
    rendered[mask] = sample_bilinear(texture, uv_to_texture_px(uv, texture.shape[0]))
    return rendered, mask


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over masked pixels (8-bit peak 255)."""
    mse = float(((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM (Gaussian window, sigma 1.5, per channel) over masked pixels (NaN for an empty
    mask); pass images equal outside the mask so windows at its border compare like with like."""
    if not mask.any():
        return float("nan")
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map[mask].mean())


def photo_metrics(photo_rgb: np.ndarray, vertices: np.ndarray, topology: MeshTopology,
                  texture: np.ndarray, camera: Camera, device: str = "cpu") -> dict[str, float]:
    rendered, covered = render_textured(vertices, topology, texture, camera, device)
    face = cv2.erode(covered.astype(np.uint8), np.ones((3, 3), np.uint8),
                     iterations=SILHOUETTE_BAND_PX).astype(bool)
    # Outside the face the photo stands in for the render, so SSIM windows at the edge are fair.
    composite = np.where(covered[..., None], rendered, photo_rgb.astype(np.float32))
    return {"psnr_db": psnr(composite, photo_rgb, face), "ssim": ssim(composite, photo_rgb, face),
            "face_pixels": int(face.sum())}


def read_pts(path: Path) -> np.ndarray:
    """iBUG .pts file -> (N, 2) pixel coordinates as written."""
    lines = Path(path).read_text().splitlines()
    start = lines.index("{") + 1
    end = lines.index("}")
    return np.array([[float(v) for v in line.split()] for line in lines[start:end]])


def landmark_error(predicted68: np.ndarray, truth68: np.ndarray) -> dict[str, float]:
    """Mean point-to-point error in pixels and normalised by the outer-eye-corner distance, over
    the points predicted (rows of NaN: a model without that point), and over the inner points
    predicted (iBUG 18-68: brows, eyes, nose, mouth; comparable across models)."""
    errors = np.linalg.norm(predicted68 - truth68, axis=1)
    known = np.isfinite(errors)
    eye_distance = float(np.linalg.norm(truth68[36] - truth68[45]))
    return {"landmark68_mean_px": float(errors[known].mean()), "landmark68_max_px": float(errors[known].max()),
            "landmark68_normalized": float(errors[known].mean() / eye_distance),
            "landmark68_points": int(known.sum()),
            "landmark_inner_normalized": float(np.nanmean(errors[17:]) / eye_distance)}
