"""Markdown tables of the benchmark's records (means over the views or photos a method measured)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

YAW_BUCKETS = (0, 30, 60, 90)


def method_order(records: list[dict]) -> list[str]:
    """Fits, each followed by its baselines, then the peer, in the order they first appear."""
    seen: list[str] = []
    for r in records:
        if r["method"] not in seen:
            seen.append(r["method"])
    fits = [m for m in seen if not any(r["method"] == m and r["kind"] != "fit" for r in records)]
    ordered = []
    for fit in fits:
        ordered.append(fit)
        ordered += [m for m in seen if m.startswith(fit + " ") and m not in ordered]
    return ordered + [m for m in seen if m not in ordered]


def mean(records: list[dict], method: str, key: str, where=lambda r: True) -> float:
    values = [r[key] for r in records if r["method"] == method and r.get("ok") and key in r and where(r)
              and np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def cell(value: float, digits: int = 2) -> str:
    return "–" if not np.isfinite(value) else f"{value:.{digits}f}"


def table(records: list[dict], columns: list[tuple[str, str, int]], methods: list[str] | None = None,
          where=lambda r: True, count: str = "views") -> str:
    """columns: (header, record key, digits). A method with no value in any column is left out."""
    methods = methods or method_order(records)
    lines = [f"| method | {count} | " + " | ".join(h for h, _, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for method in methods:
        values = [mean(records, method, key, where) for _, key, _ in columns]
        if not any(np.isfinite(v) for v in values):
            continue
        rows = [r for r in records if r["method"] == method and where(r)]
        ok = sum(1 for r in rows if r.get("ok"))
        cells = [cell(v, d) for v, (_, _, d) in zip(values, columns)]
        lines.append(f"| {method} | {ok}/{len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GEOMETRY = [("vertex rigid", "vertex_rigid", 2), ("vertex sim.", "vertex_sim", 2), ("468-pt rigid", "points_rigid", 2),
            ("468-pt sim.", "points_sim", 2), ("surface", "surface", 2), ("neutral 468-pt", "neutral_points", 2),
            ("neutral vertex", "neutral_vertex", 2), ("expression 468-pt", "expression_points", 2),
            ("expr. weights MAE", "expression_weights", 3)]
TEXTURE = [("PSNR seen", "psnr_seen", 2), ("PSNR filled", "psnr_filled", 2), ("PSNR face", "psnr_face", 2),
           ("SSIM seen", "ssim_seen", 3),
           ("SSIM filled", "ssim_filled", 3), ("seam", "seam", 1), ("seam of truth", "seam_truth", 2),
           ("flat colour PSNR seen", "flat_psnr_seen", 2), ("flat colour PSNR filled", "flat_psnr_filled", 2),
           ("seen share", "seen_fraction", 2)]
NOVEL = [("0° → ±60° PSNR", "novel_side60_psnr", 2), ("SSIM", "novel_side60_ssim", 3),
         ("cover", "novel_side60_coverage", 2), ("turned → 0° PSNR", "novel_frontal_psnr", 2),
         ("SSIM", "novel_frontal_ssim", 3), ("cover", "novel_frontal_coverage", 2),
         ("turned → mirror PSNR", "novel_mirror_psnr", 2), ("SSIM", "novel_mirror_ssim", 3),
         ("cover", "novel_mirror_coverage", 2)]
PHOTOS = [("PSNR dB", "psnr", 2), ("SSIM", "ssim", 3), ("face pixels", "face_pixels", 0),
          ("68-pt error %", "landmark68_percent", 2), ("inner-pt error %", "landmark_inner_percent", 2),
          ("68-pt points", "landmark68_points", 0)]


def by_yaw(records: list[dict], key: str, digits: int = 2) -> str:
    """One column per |yaw| bucket: the mean of `key` and (views measured / views)."""
    methods = [m for m in method_order(records) if any(r["method"] == m and key in r for r in records)]
    lines = ["| method | " + " | ".join(f"|yaw| {y}°" for y in YAW_BUCKETS) + " |", "|---|" + "---|" * len(YAW_BUCKETS)]
    for method in methods:
        cells = []
        for yaw in YAW_BUCKETS:
            rows = [r for r in records if r["method"] == method and round(abs(r["yaw_deg"])) == yaw]
            ok = [r for r in rows if r.get("ok")]
            value = mean(records, method, key, lambda r, y=yaw: round(abs(r["yaw_deg"])) == y)
            cells.append(f"{cell(value, digits)} ({len(ok)}/{len(rows)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_light(records: list[dict], key: str, digits: int = 2) -> str:
    kinds = sorted({r["light"] for r in records if "light" in r})
    methods = [m for m in method_order(records) if any(r["method"] == m and key in r for r in records)]
    lines = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(
            cell(mean(records, method, key, lambda r, k=k: r.get("light") == k), digits) for k in kinds) + " |")
    return "\n".join(lines)


def against(records: list[dict], key: str, reference_suffix: str = " mean face") -> str:
    """Per fit: on how many views it beats its reference (its mean face, or the peer), by `key`."""
    per_view: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in records:
        if r.get("ok") and key in r and np.isfinite(r[key]):
            per_view[(r["head"], r["view"])][r["method"]] = r[key]
    lines = []
    fits = [m for m in method_order(records) if any(r["method"] == m and r["kind"] == "fit" for r in records)]
    for method in fits:
        reference = method + reference_suffix if not reference_suffix.startswith("=") else reference_suffix[1:]
        if reference == method:
            continue
        pairs = [(v[method], v[reference]) for v in per_view.values() if method in v and reference in v]
        if not pairs:
            continue
        better = sum(1 for a, b in pairs if a < b)
        mine, theirs = np.mean([a for a, _ in pairs]), np.mean([b for _, b in pairs])
        lines.append(f"| {method} | {reference} | {key} | {mine:.2f} | {theirs:.2f} | {better}/{len(pairs)} |")
    return "\n".join(lines)


def against_header() -> str:
    return ("| method | against | measure (mm) | method | against | views where method is better |\n"
            "|---|---|---|---|---|---|")


def synthetic_tables(records: list[dict]) -> str:
    fits_and_peer = [m for m in method_order(records)
                     if any(r["method"] == m and r["kind"] != "baseline" for r in records)]
    comparisons = [against(records, key) for key in ("vertex_rigid", "points_rigid", "neutral_points", "surface")]
    comparisons += [against(records, key, "=eos (sfm)") for key in ("points_rigid", "neutral_points", "surface")]
    return "\n\n".join([
        "### Geometry (mm; mean over the views each method reconstructed)", table(records, GEOMETRY),
        "### Texture against the truth albedo (face area of the UV layout)", table(records, TEXTURE, fits_and_peer),
        "### Novel views (unlit texture, aligned, against the other view's render)", table(records, NOVEL),
        "### 468-point error (mm, rigid) by |yaw| (views reconstructed / views)", by_yaw(records, "points_rigid"),
        "### Texture PSNR on seen texels (dB) by light", by_light(records, "psnr_seen"),
        "### Fit against baseline and peer, view by view",
        against_header() + "\n" + "\n".join(line for c in comparisons for line in c.splitlines() if line)])


def photo_tables(records: list[dict]) -> str:
    for r in records:
        for key in ("landmark68", "landmark_inner"):
            if key in r:
                r[f"{key}_percent"] = 100 * r[key]
    landmark_rows = [r for r in records if "landmark68" in r]
    photos = sorted({r["photo"] for r in landmark_rows})
    return "\n\n".join([
        "### Real photos: re-render (mean over photos) and landmark error (photos with .pts: "
        + (", ".join(photos) or "none") + ")", table(records, PHOTOS, count="photos")])
