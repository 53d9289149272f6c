"""Real photos (no 3D truth): re-render PSNR/SSIM and, where a photo has 68 hand-made iBUG points
(`PHOTO.pts`), the landmark error; for every model, its baselines and the eos peer.

Re-render: the textured mesh, unlit (its texture is sampled from this photo), rendered into the
photo's camera and compared with the photo over the pixels it covers, less a 2-pixel band at the
outline. It measures how faithfully texture, mesh and camera round-trip, not the 3D shape.
Landmark error: mean distance of the reconstruction's iBUG-68 points to the hand-made ones over
the points the method defines, and over the inner points (iBUG 18-68), as a share of the
outer-eye-corner distance.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from backend_server.models import store
from backend_server.models.builtin import NAME as BUILTIN
from backend_server.render.shade import RenderMesh, render

from .baselines import baselines
from .metrics import SILHOUETTE_BAND_PX, psnr, ssim
from .peer_eos import EosPeer
from .reconstruction import Pipeline, Reconstruction

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def package_photos() -> list[tuple[str, bytes]]:
    """The photos that ship inside packages: matplotlib's grace_hopper.jpg, scikit-image's astronaut."""
    import matplotlib
    grace = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos = [("grace_hopper.jpg", grace.read_bytes())]
    try:
        from skimage import data
    except ImportError:
        return photos
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    return photos + [("astronaut.png", buffer.getvalue())]


def folder_photos(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES]


def read_pts(path: Path) -> np.ndarray:
    """iBUG .pts -> (N, 2) pixels as written (0-based positions as the evaluate command reads them)."""
    lines = path.read_text().splitlines()
    return np.array([[float(v) for v in line.split()] for line in lines[lines.index("{") + 1:lines.index("}")]])


def rerender(recon: Reconstruction, photo: np.ndarray, device: str = "cpu") -> dict:
    vertices = recon.photo_vertices if recon.photo_vertices is not None else recon.vertices
    mesh = RenderMesh.textured_only(recon.uv_triangles, recon.uvs, recon.uv_vertex)
    rendering = render(mesh, vertices, recon.camera, recon.texture, None, device=device)
    face = cv2.erode(rendering.mask.astype(np.uint8), np.ones((3, 3), np.uint8),
                     iterations=SILHOUETTE_BAND_PX).astype(bool)
    composite = np.where(rendering.mask[..., None], rendering.rgb, photo)
    return {"psnr": psnr(composite, photo, face), "ssim": ssim(composite, photo, face), "face_pixels": int(face.sum())}


def landmark_error(recon: Reconstruction, truth68: np.ndarray) -> dict:
    errors = np.linalg.norm(recon.ibug68_px - truth68, axis=1)
    known = np.isfinite(errors)
    eye = float(np.linalg.norm(truth68[36] - truth68[45]))
    return {"landmark68": float(errors[known].mean() / eye), "landmark68_points": int(known.sum()),
            "landmark_inner": float(np.nanmean(errors[17:]) / eye)}


def run(photos: list[tuple[str, bytes]], models: list[str], pts_folder: Path | None, peer_folder: Path | None,
        device: str = "cpu", texture_size: int = 512, log: Callable[[str], None] = print) -> list[dict]:
    pipeline = Pipeline(device)
    peer = EosPeer(peer_folder) if peer_folder is not None else None
    morphable = {name: store.load_model(name) for name in models if name != BUILTIN}
    records = []
    for name, data in photos:
        pts = pts_folder / (Path(name).stem + ".pts") if pts_folder is not None else None
        truth68 = read_pts(pts) if pts is not None and pts.is_file() else None
        original_width = Image.open(io.BytesIO(data)).size[0]
        landmarks, rgb = None, None
        made: list[Reconstruction] = []
        for model in models:
            try:
                recon, rgb = pipeline.reconstruct(data, name, model, texture_size)
            except Exception as exc:            # noqa: BLE001 - a failed photo is a result
                records.append({"photo": name, "method": model, "kind": "fit", "ok": False, "error": str(exc)[:120]})
                continue
            landmarks = recon.landmarks
            made += [recon, *baselines(recon, morphable.get(model))]
        if peer is not None and landmarks is not None and rgb is not None:
            made.append(peer.fit(rgb, landmarks, texture_size))
        for recon in made:
            kind = "peer" if recon.method.startswith("eos") else "baseline" if "mean" in recon.method else "fit"
            row = {"photo": name, "method": recon.method, "kind": kind, "ok": True, **rerender(recon, rgb, device)}
            if truth68 is not None and rgb is not None:
                row.update(landmark_error(recon, truth68 * (rgb.shape[1] / original_width)))
            records.append(row)
    pipeline.close()
    log(f"{len(photos)} photos measured")
    return records
