"""A folder of rendered synthetic heads with their truth; written, read, and made from the command line.

    python -m backend_server.synthetic.dataset --model ict-facekit --out DIR --count 6 [--renderer cycles|fast]
        [--size 384] [--samples 16] [--seed 0] [--device cpu|cuda:N]

Layout, one folder per head (`head000`, ...):
- `head.json`: the recipe (model, seed, renderer, sizes), coefficients by name, the views (pose:
  head frame -> camera frame, metres; intrinsics), the light (head frame, `render.shade`'s
  convention), the albedo recipe and the background colour;
- `truth.npz`: `neutral` and `posed` (V, 3) head-frame metres (float32), `identity`, `expression`,
  `vertex_colours` (V, 3) sRGB 0..1 (the albedo of the untextured parts);
- `albedo.png`: the truth albedo texture in the model's UV layout (sRGB);
- `<view>.png` the render of each view (RGB over the background), `<view>_mask.png` its coverage.

A head whose folder already holds a complete render of the same recipe is kept (a cache): the
command says how many it reused. Everything is deterministic from `--seed` (head k uses seed + k).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..models.morphable import MorphableModel
from ..render.shade import Light
from .albedo import AlbedoParams
from .sampling import DEFAULT_YAWS_DEG, LIGHT_KINDS, HeadSample, View, sample_head
from .scene import SyntheticScene

DATASET_FORMAT = 2                  # bumped whenever what a recipe renders changes (2: irises)
GOLDEN = 0.6180339887


def sample_to_json(sample: HeadSample, model: MorphableModel) -> dict:
    return {"model": sample.model_name, "seed": sample.seed,
            "identity": sample.identity.tolist(),
            "expression": dict(zip(model.expression_names, sample.expression.tolist())),
            "views": [v.to_json() for v in sample.views], "light": sample.light.to_json(),
            "light_kind": sample.light_kind, "albedo": sample.albedo.to_json(),
            "background_srgb": list(sample.background_srgb)}


def sample_from_json(value: dict) -> HeadSample:
    return HeadSample(value["model"], value["seed"], np.array(value["identity"]),
                      np.array(list(value["expression"].values())),
                      tuple(View.from_json(v) for v in value["views"]), Light.from_json(value["light"]),
                      value["light_kind"], AlbedoParams.from_json(value["albedo"]),
                      tuple(value["background_srgb"]))


@dataclass(frozen=True)
class RenderedHead:
    """One head read back: its sample (views, light, coefficients), truth geometry (head frame,
    metres), truth albedo texture, and per view the render (H, W, 3) uint8 and coverage (H, W) bool."""

    folder: Path
    sample: HeadSample
    recipe: dict
    neutral: np.ndarray
    posed: np.ndarray
    texture: np.ndarray
    vertex_colours: np.ndarray
    images: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]

    def posed_in_view(self, k: int) -> np.ndarray:
        """(V, 3) the posed truth in view k's camera frame."""
        return self.sample.views[k].pose.apply(self.posed)

    @classmethod
    def load(cls, folder: Path) -> RenderedHead:
        folder = Path(folder)
        facts = json.loads((folder / "head.json").read_text())
        sample = sample_from_json(facts["sample"])
        with np.load(folder / "truth.npz") as truth:
            arrays = {k: truth[k] for k in truth.files}
        images = tuple(np.asarray(Image.open(folder / f"{v.name}.png").convert("RGB")) for v in sample.views)
        masks = tuple(np.asarray(Image.open(folder / f"{v.name}_mask.png")) > 127 for v in sample.views)
        return cls(folder, sample, facts["recipe"], arrays["neutral"].astype(np.float64),
                   arrays["posed"].astype(np.float64), np.asarray(Image.open(folder / "albedo.png").convert("RGB")),
                   arrays["vertex_colours"], images, masks)


def head_sample(model: MorphableModel, seed: int, index: int, count: int, size_px: int,
                yaws_deg: tuple[float, ...]) -> HeadSample:
    """Head `index` of a set of `count`: seed + index, its light kind cycling through LIGHT_KINDS
    and its skin tone spread over the range (golden-ratio sequence), so even a small set covers both."""
    sample = sample_head(model, seed + index, yaws_deg, size_px, LIGHT_KINDS[index % len(LIGHT_KINDS)])
    melanin = float((0.5 + index * GOLDEN) % 1.0)
    return replace(sample, albedo=replace(sample.albedo, melanin=melanin))


def write_head(folder: Path, scene: SyntheticScene, recipe: dict, renders: list[tuple[np.ndarray, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "truth.npz", neutral=scene.neutral.astype(np.float32),
                        posed=scene.posed.astype(np.float32), identity=scene.sample.identity,
                        expression=scene.sample.expression, vertex_colours=scene.vertex_colours.astype(np.float32))
    Image.fromarray(scene.texture).save(folder / "albedo.png")
    for view, (rgb, mask) in zip(scene.sample.views, renders):
        Image.fromarray(rgb).save(folder / f"{view.name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{view.name}_mask.png")
    facts = {"format": DATASET_FORMAT, "recipe": recipe, "sample": sample_to_json(scene.sample, scene.model)}
    (folder / "head.json").write_text(json.dumps(facts, indent=1))      # last: marks the head complete


def is_complete(folder: Path, recipe: dict) -> bool:
    try:
        facts = json.loads((folder / "head.json").read_text())
    except (OSError, ValueError):
        return False
    return facts.get("format") == DATASET_FORMAT and facts.get("recipe") == recipe


def generate(model: MorphableModel, out: Path, count: int, seed: int = 0, renderer: str = "cycles",
             size_px: int = 384, samples: int = 16, texture_size: int = 1024,
             yaws_deg: tuple[float, ...] = DEFAULT_YAWS_DEG, device: str = "cpu", log=print) -> list[Path]:
    """Render `count` heads into out/headNNN (kept where already complete); returns the folders."""
    folders = []
    reused = 0
    for index in range(count):
        folder = Path(out) / f"head{index:03d}"
        recipe = {"model": model.name, "seed": seed + index, "renderer": renderer, "size_px": size_px,
                  "samples": samples if renderer == "cycles" else None, "texture_size": texture_size,
                  "yaws_deg": list(yaws_deg), "index": index, "count": count}
        folders.append(folder)
        if is_complete(folder, recipe):
            reused += 1
            continue
        start = time.perf_counter()
        scene = SyntheticScene.build(model, head_sample(model, seed, index, count, size_px, yaws_deg), texture_size)
        if renderer == "cycles":
            from . import cycles
            renders = cycles.render_views(model, scene.posed, scene.texture, scene.vertex_colours,
                                          scene.sample.light, scene.sample.views, scene.sample.background_srgb, samples)
        elif renderer == "fast":
            renders = [(r.rgb, r.mask) for r in scene.render_fast(device=device)]
        else:
            raise ValueError(f"unknown renderer {renderer!r} (cycles or fast)")
        write_head(folder, scene, recipe, renders)
        log(f"head {index + 1}/{count} rendered ({renderer}, {len(renders)} views, "
            f"{time.perf_counter() - start:.1f} s)")
    if reused:
        log(f"{reused} of {count} heads reused from {out} (same recipe; delete the folder to render again)")
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ict-facekit")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--renderer", choices=("cycles", "fast"), default="cycles")
    parser.add_argument("--size", type=int, default=384, help="picture side in pixels")
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--yaws", type=float, nargs="+", default=list(DEFAULT_YAWS_DEG))
    parser.add_argument("--device", default="cpu", help="the fast renderer's device: cpu or cuda:N")
    args = parser.parse_args()
    from ..models import store
    generate(store.load_model(args.model), Path(args.out), args.count, args.seed, args.renderer, args.size,
             args.samples, args.texture_size, tuple(args.yaws), args.device)


if __name__ == "__main__":
    main()
