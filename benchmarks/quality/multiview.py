"""Several photos of one person (issue 18) on the synthetic heads: each head's front view alone,
its three views front and ±60° together (`Reconstructor.run_person`; the set has yaw 0, ±30,
±60, ±90), and the model's mean face placed on the front fit, measured against the truth; and how
often a photo of another person among three is left out.

Records (one per head, model and method; `method` is "<model> 3 photos", "<model> front photo",
"<model> mean face" or, with the peer, "eos (sfm) front photo": eos fits one photo): the geometry
of `metrics.geometry` for the front view (vertex errors over the face area; ICT-FaceKit only,
which shares the truth's topology; the 468 points for every model), the texture of
`metrics.texture` (seen share of the face area: texels a used photo sees, in view, facing it and
not hidden, the same rule for one photo and for three; used share: texels whose colour the bake
took from a photo, skin not clipped nor in deep shadow; PSNR on the seen texels), and
`psnr_face`: PSNR of the whole face area (seen and filled texels) against the truth albedo.
Outlier records (`kind` "outlier"): three photos, the first two of head i (front, +60°), the
third another head's -60° view; `flagged`: that photo, and only it, was left out.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from backend_server.models import store
from backend_server.models.builtin import NAME as BUILTIN
from backend_server.synthetic.dataset import RenderedHead

from . import metrics
from .baselines import baselines
from .peer_eos import EosPeer
from .reconstruction import Pipeline
from .synthetic_v2 import PEER, TRUTH_MODEL, photo_bytes

SIDE_YAW_DEG = 60
PEER_FRONT = f"{PEER} front photo"


def view_at(head: RenderedHead, yaw_deg: float) -> int:
    return min(range(len(head.sample.views)), key=lambda k: abs(head.sample.views[k].yaw_deg - yaw_deg))


def outlier_pairs(heads: int, tries: int) -> list[tuple[int, int]]:
    """`tries` (person, stranger) head pairs, every head in turn the person, strangers rotating."""
    pairs = []
    for t in range(tries):
        i = t % heads
        j = (i + 1 + t // heads) % heads
        pairs.append((i, j if j != i else (i + 1) % heads))
    return pairs


def measured(recon, truth: metrics.HeadTruth, k: int, model, with_texture: bool) -> dict:
    row = dict(metrics.geometry(recon, truth, k, model))
    if with_texture:
        row.update(metrics.texture(recon, truth, k))              # psnr_face: the whole face area
    return row


def run(folders: list[Path], models: list[str], texture_size: int = 512, tries: int = 10,
        log: Callable[[str], None] = print, results: Path | None = None, peer: EosPeer | None = None) -> list[dict]:
    """Every record (see the module's docstring). results: also write each head's result files
    (single front photo and three photos) under results/<head>/<model>/{front,three} for pictures;
    peer: also eos on each front photo (method PEER_FRONT; eos fits one photo), from the first
    model's MediaPipe landmarks."""
    truth_model = store.load_model(TRUTH_MODEL)
    morphable = {name: store.load_model(name) for name in models if name != BUILTIN}
    pipeline = Pipeline()
    heads = [RenderedHead.load(folder) for folder in folders]
    records: list[dict] = []
    for folder, head in zip(folders, heads):
        started = time.perf_counter()
        truth = metrics.HeadTruth(head, truth_model, texture_size)
        views = [view_at(head, y) for y in (0, SIDE_YAW_DEG, -SIDE_YAW_DEG)]
        photos = [(photo_bytes(head.images[k]), f"{folder.name}_{head.sample.views[k].name}.png") for k in views]
        for index, name in enumerate(models):
            base = {"head": folder.name, "model": name, "kind": "person", "ok": True}
            model = morphable.get(name)
            single, front_rgb = pipeline.reconstruct(*photos[0], name, texture_size)
            if peer is not None and index == 0:
                eos_front = peer.fit(front_rgb, single.landmarks, texture_size)
                records.append({**base, "model": "sfm", "method": PEER_FRONT,
                                **measured(eos_front, truth, views[0], peer.sfm, True)})
            alone, _ = pipeline.reconstruct_person(photos[:1], name, texture_size)   # its used texels, as fused
            single.texel_used = None if alone is None else alone.texel_used
            records.append({**base, "method": f"{name} front photo", **measured(single, truth, views[0], model, True)})
            mean_face = baselines(single, model)[0]
            records.append({**base, "method": f"{name} mean face", **measured(mean_face, truth, views[0], model,
                                                                              False)})
            start = time.perf_counter()
            recon, person = pipeline.reconstruct_person(photos, name, texture_size)
            seconds = time.perf_counter() - start
            row = {**base, "method": f"{name} 3 photos", "seconds": seconds, "used": len(person.kept),  # type: ignore[attr-defined]
                   "left_out": sorted(person.fit.left_out)}                                         # type: ignore[attr-defined]
            if recon is None:
                records.append({**row, "ok": False, "error": "the front photo was left out"})
            else:
                records.append({**row, **measured(recon, truth, views[0], model, True)})
            if results is not None:
                out = results / folder.name / name
                pipeline.write_result_files(photos[0][0], photos[0][1], name, out / "front", texture_size)
                write_person(pipeline, photos, name, out / "three", texture_size)
        log(f"{folder.name}: front photo, three photos and mean face measured ({time.perf_counter() - started:.0f} s)")
    for name in models:
        for i, j in outlier_pairs(len(heads), tries):
            a, b = heads[i], heads[j]
            photos = [(photo_bytes(a.images[view_at(a, 0)]), "front.png"),
                      (photo_bytes(a.images[view_at(a, SIDE_YAW_DEG)]), "side.png"),
                      (photo_bytes(b.images[view_at(b, -SIDE_YAW_DEG)]), "stranger.png")]
            _, person = pipeline.reconstruct_person(photos, name, texture_size)
            left = sorted(person.fit.left_out)                                                   # type: ignore[attr-defined]
            records.append({"kind": "outlier", "model": name, "method": name, "ok": True, "person": folders[i].name,
                            "stranger": folders[j].name, "left_out": left, "flagged": left == [2]})
        flagged = [r for r in records if r["kind"] == "outlier" and r["model"] == name]
        log(f"{name}: another person flagged in {sum(r['flagged'] for r in flagged)} of {len(flagged)} tries")
    pipeline.close()
    return records


def write_person(pipeline: Pipeline, photos: list[tuple[bytes, str]], model: str, folder: Path,
                 texture_size: int) -> None:
    from shared_protocol import PersonPhoto, ReconstructOptions
    person = pipeline.reconstructor.run_person([PersonPhoto(name, data) for data, name in photos],
                                               ReconstructOptions(model=model, texture_size=texture_size))
    folder.mkdir(parents=True, exist_ok=True)
    for file in person.files:
        (folder / file.name).write_bytes(file.data)


def _mean(records: list[dict], method: str, key: str) -> float:
    values = [r[key] for r in records if r.get("method") == method and r.get("ok") and key in r
              and np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def table(records: list[dict], models: list[str]) -> str:
    """The multi-view table (markdown): per model and method the mean over heads."""
    def cell(value: float, digits: int = 2) -> str:
        return "–" if not np.isfinite(value) else f"{value:.{digits}f}"

    lines = ["| method | heads | vertex rigid (face area) | 468-pt rigid | surface | neutral vertex | neutral 468-pt "
             "| seen share of face | used share of face | UV PSNR seen | UV PSNR face area | s per request |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in [*models, PEER]:
        for suffix in ("3 photos", "front photo", "mean face"):
            method = f"{name} {suffix}"
            rows = [r for r in records if r.get("method") == method and r["kind"] == "person"]
            if not rows:
                continue
            ok = sum(1 for r in rows if r.get("ok"))
            values = [("vertex_rigid", 2), ("points_rigid", 2), ("surface", 2), ("neutral_vertex", 2),
                      ("neutral_points", 2), ("seen_fraction", 3), ("used_fraction", 3), ("psnr_seen", 2),
                      ("psnr_face", 2), ("seconds", 2)]
            lines.append(f"| {method} | {ok}/{len(rows)} | "
                         + " | ".join(cell(_mean(records, method, key), d) for key, d in values) + " |")
    outliers = ["", "| model | another person's photo among three: flagged (only it left out) |", "|---|---|"]
    for name in models:
        rows = [r for r in records if r["kind"] == "outlier" and r["model"] == name]
        if rows:
            outliers.append(f"| {name} | {sum(r['flagged'] for r in rows)} of {len(rows)} |")
    return "\n".join(lines + outliers)
