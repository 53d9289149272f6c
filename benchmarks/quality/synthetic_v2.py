"""Synthetic heads v2: every view of every head reconstructed by each model and by the eos peer,
with the baselines, measured against the truth (`metrics`). One record per (head, view, method)."""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from backend_server.models import store
from backend_server.models.builtin import NAME as BUILTIN
from backend_server.models.morphable import MorphableModel
from backend_server.synthetic.dataset import RenderedHead

from . import metrics
from .baselines import baselines
from .peer_eos import EosPeer
from .reconstruction import Pipeline, Reconstruction

TRUTH_MODEL = "ict-facekit"
PEER = "eos (sfm)"


def novel_targets(views: tuple, source: int) -> dict[str, list[int]]:
    """Novel views measured for a source view: from the frontal view, the two views at ±60°; from
    a turned view, the frontal view and the mirror view (yaw -> -yaw)."""
    yaws = [v.yaw_deg for v in views]
    index = {round(y): k for k, y in enumerate(yaws)}
    yaw = round(yaws[source])
    if yaw == 0:
        return {"side60": [index[y] for y in (60, -60) if y in index]}
    return {"frontal": [index[0]] if 0 in index else [], "mirror": [index[-yaw]] if -yaw in index else []}


def measure(recon: Reconstruction, truth: metrics.HeadTruth, k: int, kind: str,
            model: MorphableModel | None, with_texture: bool, device: str = "cpu") -> dict:
    """Every measure of one reconstruction of view k."""
    row: dict = {"method": recon.method, "kind": kind, "ok": True}
    row.update(metrics.geometry(recon, truth, k, model))
    if with_texture:
        row.update(metrics.texture(recon, truth, k))
    for name, targets in novel_targets(truth.head.sample.views, k).items():
        results = [metrics.novel_view(recon, truth, k, t, device) for t in targets]
        for key in ("psnr", "ssim", "coverage"):
            values = [r[key] for r in results if np.isfinite(r[key])]
            row[f"novel_{name}_{key}"] = float(np.mean(values)) if values else float("nan")
    return row


def photo_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def run(folders: list[Path], models: list[str], peer_folder: Path | None, device: str = "cpu",
        texture_size: int = 512, log: Callable[[str], None] = print) -> list[dict]:
    truth_model = store.load_model(TRUTH_MODEL)
    pipeline = Pipeline(device)
    peer = EosPeer(peer_folder) if peer_folder is not None else None
    morphable = {name: store.load_model(name) for name in models if name != BUILTIN}
    records = []
    seconds: dict[str, list[float]] = {}
    for folder in folders:
        head = RenderedHead.load(folder)
        truth = metrics.HeadTruth(head, truth_model, texture_size)
        started = time.perf_counter()
        for k, view in enumerate(head.sample.views):
            base = {"head": folder.name, "view": view.name, "yaw_deg": view.yaw_deg, "light": head.sample.light_kind,
                    "melanin": head.sample.albedo.melanin}
            data = photo_bytes(head.images[k])
            landmarks, photo = None, None
            for name in models:
                start = time.perf_counter()
                try:
                    recon, photo = pipeline.reconstruct(data, f"{folder.name}_{view.name}.png", name, texture_size)
                except Exception as exc:            # noqa: BLE001 - a failed view is a result, not a crash
                    records.append({**base, "method": name, "kind": "fit", "ok": False, "error": str(exc)[:120]})
                    continue
                seconds.setdefault(name, []).append(time.perf_counter() - start)
                landmarks = recon.landmarks
                model = morphable.get(name)
                records.append({**base, **measure(recon, truth, k, "fit", model, True, device)})
                for baseline in baselines(recon, model):
                    records.append({**base, **measure(baseline, truth, k, "baseline", model, False, device)})
            if peer is not None:
                if landmarks is None or photo is None:
                    records.append({**base, "method": PEER, "kind": "peer", "ok": False, "error": "no landmarks"})
                else:
                    start = time.perf_counter()
                    recon = peer.fit(photo, landmarks, texture_size)
                    seconds.setdefault(PEER, []).append(time.perf_counter() - start)
                    records.append({**base, **measure(recon, truth, k, "peer", peer.sfm, True, device)})
        log(f"{folder.name}: {len(head.sample.views)} views measured ({time.perf_counter() - started:.0f} s)")
    pipeline.close()
    for name, values in seconds.items():
        log(f"  {name}: {np.mean(values):.2f} s a view (reconstruction only)")
    if peer is not None and peer.seconds:
        log(f"  eos fit_shape_and_pose + extract_texture alone: {1000 * np.mean(peer.seconds):.0f} ms a view")
    return records
