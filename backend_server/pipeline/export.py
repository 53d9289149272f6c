"""Stage 6, export: mesh, material, texture and facts as file bytes, and safe writing of them.

Every model's head goes out the same way, from its `HeadMesh` (models/face_model.py):
- `NAME.obj`: positions in metres in the head frame (+Y up, the face looking toward +Z, pose
  removed; the JSON's pose puts it back into the camera frame), per-vertex normals, UVs per
  corner (origin bottom-left; seams stay), triangles and quads, one material per part;
- `NAME_neutral.obj`: the same with every expression weight 0 (models with a neutral shape);
- `NAME.mtl`: the textured parts use `NAME.png`, a part with a texture of its own (an eye:
  `FaceModel.part_textures`) uses `NAME_<key>.png`, the others a plain or the skin colour;
- `NAME.png`: the UV texture; `NAME_eye_left.png` and `NAME_eye_right.png` for models with eyes;
  `NAME_shape_keys.bin`: per expression its offsets from the neutral
  mesh and its fitted weight (shared_protocol/shape_keys.py);
- `NAME.glb` (export_gltf.py; its images embedded) and `NAME.usdc` (export_usd.py, beside the
  PNGs it names): the same head, materials (eye textures included) and expressions for other
  tools; asked for only (not in DEFAULT_OUTPUTS);
- `NAME.json`: the facts (`face_facts`); for several photos of one person (`export_person`) one
  head, posed as the reference photo, with a `person` section listing every photo (`person_facts`).
  A person's head goes through the same `face_files` (every format, eye textures included).

Which image and colour each part takes is said once, in `part_looks` (the images' pixels in
`face_images`, their files from `image_file`), for every format.
"""
from __future__ import annotations

import io
import json
import re
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shared_protocol import ReconstructOptions, ResultFile
from shared_protocol.shape_keys import NEUTRAL_SUFFIX, SUFFIX as SHAPE_KEYS_SUFFIX, ShapeKey, encode_shape_keys
from .. import __version__
from ..geometry import vertex_normals
from ..models.face_model import FaceFit, FaceModel, HeadMesh, MeshLayout, PersonFit
from .bake import Bake
from .decode import PhotoInfo
from .landmarks import LocatedFace
from .lighting import Lighting
from .progress import StageClock

PNG_COMPRESS_LEVEL = 1              # used only where fpng is missing (Pillow fallback)
SHAPE_KEY_MIN_OFFSET_M = 1e-5       # a vertex moved less than this by an expression is left out of its key


def safe_stem(photo_name: str) -> str:
    """File-name stem derived from a photo name: no folders, only [A-Za-z0-9._-], never hidden."""
    base = re.split(r"[\\/]", photo_name)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.strip(".") else base
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:100]
    return stem or "photo"


def uv_lines(uvs: np.ndarray) -> str:
    """`vt` lines, origin bottom-left."""
    return ("vt %.6f %.6f\n" * len(uvs)) % tuple(np.asarray(uvs, float).ravel().tolist())


def polygon_lines(polygons: np.ndarray, polygon_uvs: np.ndarray) -> str:
    """`f v/vt/vn` lines of quads and triangles ((F, 4), -1 pads a triangle); normal id = vertex id."""
    lines = []
    for corners in (4, 3):
        rows = (polygons[:, 3] >= 0) if corners == 4 else (polygons[:, 3] < 0)
        if rows.any():
            ids = polygons[rows, :corners] + 1
            triplets = np.stack([ids, polygon_uvs[rows, :corners] + 1, ids], axis=2).reshape(len(ids), -1)
            lines.append(("f" + " %d/%d/%d" * corners + "\n") * len(ids) % tuple(triplets.ravel().tolist()))
    return "".join(lines)


def obj_bytes(vertices: np.ndarray, normals: np.ndarray, uv_block: str, material_blocks: list[tuple[str, str]],
              material_file: str, object_name: str) -> bytes:
    """Wavefront OBJ: positions and one normal per vertex, then the topology's lines (made with
    `uv_lines` and `polygon_lines`; a morphable model's once per model): the UVs and, per material,
    its name and face lines (UV ids per corner, so seams stay). Formatted with one %-operation per
    block (C speed: ~4x faster than np.savetxt)."""
    return "".join([
        f"# FaceRecon mesh: metres, +Y up, face toward +Z\nmtllib {material_file}\no {object_name}\n",
        ("v %.6f %.6f %.6f\n" * len(vertices)) % tuple(np.asarray(vertices, float).ravel().tolist()),
        uv_block,
        ("vn %.5f %.5f %.5f\n" * len(normals)) % tuple(np.asarray(normals, float).ravel().tolist()),
        "s 1\n",
        *(f"usemtl {material}\n{faces}" for material, faces in material_blocks),
    ]).encode("ascii")


def mtl_bytes(materials: list[tuple[str, str | None, tuple[float, float, float]]]) -> bytes:
    """MTL of (name, texture file or None, diffuse colour (linear RGB 0..1, used without a texture))."""
    blocks = ["# FaceRecon materials\n"]
    for name, texture, colour in materials:
        diffuse = "1 1 1" if texture else " ".join(f"{c:.4f}" for c in colour)
        blocks.append(f"newmtl {name}\nKa 0 0 0\nKd {diffuse}\nKs 0.05 0.05 0.05\nNs 20\nillum 2\nd 1\n"
                      + (f"map_Kd {texture}\n" if texture else ""))
    return "".join(blocks).encode("ascii")


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG. fpng (~20 ms at 2048²) where installed, else libpng at level 1."""
    try:
        import fpng
        return fpng.from_ndarray(np.ascontiguousarray(rgb))
    except ImportError:
        from PIL import Image
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()


def write_files(folder: Path, files: list[ResultFile], overwrite: bool = True) -> list[Path]:
    """Write result files into `folder`; a name that would leave the folder is refused."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    written = []
    for file in files:
        target = (root / file.name).resolve()
        if target.parent != root:
            raise ValueError(f"refusing to write {file.name!r} outside {root}")
        if target.exists() and not overwrite:
            raise FileExistsError(target)
        temporary = target.with_name(f".{target.name}.part")
        temporary.write_bytes(file.data)
        temporary.replace(target)          # never a half-written file under the final name
        written.append(target)
    return written


def skin_colour(texture: np.ndarray) -> tuple[float, float, float]:
    """Median colour of a baked face texture (sRGB uint8), as linear RGB 0..1 for a plain material."""
    small = texture[::32, ::32].reshape(-1, 3).astype(np.float64) / 255.0
    srgb = np.median(small, axis=0)
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    return (float(linear[0]), float(linear[1]), float(linear[2]))


FACE_TEXTURE = "texture"            # the image key of the baked photo texture (file NAME.png)


@dataclass(frozen=True)
class PartLook:
    """How one part looks in every format: its material name, the image it takes (a key of the
    face's images, e.g. FACE_TEXTURE; None: a plain colour) and its plain colour (linear RGB 0..1;
    formats use white under an image)."""

    material: str
    image: str | None
    colour: tuple[float, float, float]


PartTextures = dict[int, tuple[str, np.ndarray]]   # FaceModel.part_textures: part index -> (key, image)


def part_looks(name: str, layout: MeshLayout, texture: np.ndarray,
               part_textures: PartTextures | None = None) -> list[PartLook]:
    """The look of each part of `layout` for a face exported under the stem `name`: textured parts
    take the baked texture, a part with a texture of its own (`part_textures`, e.g. an eye) that
    texture (its key, e.g. "eye_left"), skin parts the texture's skin colour, the others their own
    colour. The one place that says which image a part uses (its pixels are in `face_images`, its
    file name from `image_file`)."""
    part_textures = part_textures or {}
    skin = skin_colour(texture) if any(part.skin for part in layout.parts) else (1.0, 1.0, 1.0)
    return [PartLook(name if part.textured else f"{name}_{part.name}",
                     FACE_TEXTURE if part.textured else part_textures[k][0] if k in part_textures else None,
                     skin if part.skin else part.colour) for k, part in enumerate(layout.parts)]


def face_images(texture: np.ndarray, part_textures: PartTextures | None = None) -> dict[str, np.ndarray]:
    """The images a face's looks may name: key -> (H, W, 3) uint8 sRGB: the baked texture
    (FACE_TEXTURE) and each part's own texture under its key."""
    images = {FACE_TEXTURE: texture}
    for key, image in (part_textures or {}).values():
        if key in images:
            raise ValueError(f"part texture key {key!r} is used twice (or is the face texture's)")
        images[key] = image
    return images


def image_file(name: str, key: str) -> str:
    """The file an image of the face exported under `name` goes to (beside the mesh): NAME.png for
    the baked texture, NAME_<key>.png for the others (e.g. NAME_eye_left.png)."""
    return f"{name}.png" if key == FACE_TEXTURE else f"{name}_{key}.png"


@dataclass(frozen=True)
class LayoutText:
    """What every OBJ and shape-keys file of one layout shares, formatted once: the UV lines, the
    face lines per part, and per expression its moved vertex ids and their offsets (float32 bytes)."""

    uv_block: str
    part_faces: list[str]
    shape_keys: list[tuple[str, bytes, bytes]]


@lru_cache(maxsize=8)
def layout_text(layout: MeshLayout) -> LayoutText:
    part_faces = [polygon_lines(layout.polygons[layout.polygon_part == k], layout.polygon_uvs[layout.polygon_part == k])
                  for k in range(len(layout.parts))]
    shape_keys = []
    basis = layout.expression_basis if layout.expression_basis is not None else ()
    for key_name, offsets in zip(layout.expression_names, basis):
        moved = np.flatnonzero(np.abs(offsets).max(axis=1) >= SHAPE_KEY_MIN_OFFSET_M)
        shape_keys.append((key_name, moved.astype(np.uint32).tobytes(), offsets[moved].astype(np.float32).tobytes()))
    return LayoutText(uv_lines(layout.uvs), part_faces, shape_keys)


def face_files(name: str, mesh: HeadMesh, texture: np.ndarray, outputs: Sequence[str],
               part_textures: PartTextures | None = None) -> list[ResultFile]:
    """The mesh, material, texture and shape-keys files of one face (those of `outputs` that apply;
    a `usdc` brings the PNGs it refers to along). part_textures: per part index, a texture of its
    own (`FaceModel.part_textures`: file-name key, image), in every format."""
    layout = mesh.layout
    text = layout_text(layout)
    looks = part_looks(name, layout, texture, part_textures)
    materials = [look.material for look in looks]
    blocks = [(material, faces) for material, faces in zip(materials, text.part_faces) if faces]
    pngs: dict[str, bytes] = {}

    def obj(vertices: np.ndarray) -> bytes:
        return obj_bytes(vertices, vertex_normals(vertices, layout.triangles), text.uv_block, blocks,
                         f"{name}.mtl", name)

    def images() -> dict[str, bytes]:          # each used image encoded once, for every format
        used = {look.image for look in looks if look.image is not None} | {FACE_TEXTURE}
        for key, pixels in face_images(texture, part_textures).items():
            if key in used and key not in pngs:
                pngs[key] = png_bytes(pixels)
        return pngs

    files = []
    if "obj" in outputs:
        files.append(ResultFile(f"{name}.obj", "obj", obj(mesh.posed)))
    if "neutral_obj" in outputs and mesh.neutral is not None:
        files.append(ResultFile(f"{name}{NEUTRAL_SUFFIX}", "neutral_obj", obj(mesh.neutral)))
    if "mtl" in outputs:
        files.append(ResultFile(f"{name}.mtl", "mtl", mtl_bytes([
            (look.material, image_file(name, look.image) if look.image else None, look.colour) for look in looks])))
    if "png" in outputs or "usdc" in outputs:
        files += [ResultFile(image_file(name, key), "png", data) for key, data in images().items()]
    if "shape_keys" in outputs and text.shape_keys:
        keys = [ShapeKey(key_name, float(value), array("I", ids), array("f", offsets))
                for (key_name, ids, offsets), value in zip(text.shape_keys, mesh.expression)]
        vertex_count = len(mesh.posed)
        files.append(ResultFile(f"{name}{SHAPE_KEYS_SUFFIX}", "shape_keys", encode_shape_keys(vertex_count, keys)))
    if "glb" in outputs:
        from .export_gltf import glb_bytes
        files.append(ResultFile(f"{name}.glb", "glb", glb_bytes(name, mesh, looks, images())))
    if "usdc" in outputs:
        from .export_usd import usdc_bytes
        files.append(ResultFile(f"{name}.usdc", "usdc", usdc_bytes(
            name, mesh, looks, {key: image_file(name, key) for key in images()})))
    return files


def face_facts(photo: PhotoInfo, face: LocatedFace, fit: FaceFit, model: FaceModel, mesh: HeadMesh, bake: Bake,
               options: ReconstructOptions, timings_ms: dict[str, float], face_count: int, name: str
               ) -> dict[str, Any]:
    """Everything the JSON output says about one face (units in the key names)."""
    facts = model.facts(fit, name)
    points = fit.landmark_points
    reprojection = np.linalg.norm(fit.camera.project(points) - face.landmarks[:len(points), :2], axis=1)
    quality = {"texture_seen_fraction": bake.seen_fraction, "texture_mirrored_fraction": bake.mirrored_fraction,
               "landmark_reprojection_rms_px": float(np.sqrt((reprojection ** 2).mean())), **facts.quality}
    mesh_facts = dict(facts.mesh)
    if mesh.neutral is not None:
        mesh_facts["neutral_file"] = f"{name}{NEUTRAL_SUFFIX}"
        mesh_facts["shape_keys_file"] = f"{name}{SHAPE_KEYS_SUFFIX}" if mesh.layout.expression_names else None
    return {
        "format": "facerecon-face/1",
        "backend_version": __version__,
        "model": options.model,
        "coefficients": facts.coefficients,
        "mesh": {**mesh_facts, "frame": "head frame: metres, +Y up, face toward +Z; camera = pose applied"},
        "texture": {"size_px": options.texture_size, "uv_origin": "bottom-left", "colour_space": "sRGB",
                    "content": "lit: the photo's colours" if options.lit_texture else
                    "albedo: the photo's colours divided by the lighting below"},
        "lighting": bake.lighting.to_json(),
        "photo": {"name": photo.name, "width_px": photo.size[0], "height_px": photo.size[1],
                  "original_width_px": photo.original_size[0], "original_height_px": photo.original_size[1],
                  "scale": photo.scale},
        "face": {"index": face.index, "of": face_count,
                 "box_px": [face.box.x0, face.box.y0, face.box.width, face.box.height],
                 "detector_score": face.box.score},
        "camera": fit.camera.to_json(),
        "pose": {**fit.pose.to_json(), "frame": "x_camera = rotation @ x_head + translation_m; "
                 "camera: metres, +X right, +Y up, +Z toward the viewer"},
        "landmarks_px": np.round(face.landmarks, 3).tolist(),
        "quality": quality,
        "timings_ms": dict(timings_ms),
    }


@dataclass(frozen=True)
class FaceExport:
    """One face's result files (JSON last) and the facts its JSON holds."""

    files: tuple[ResultFile, ...]
    facts: dict[str, Any]


def export_photo(photo: PhotoInfo, faces: Sequence[LocatedFace], names: Sequence[str], fits: Sequence[FaceFit],
                 bakes: Sequence[Bake], model: FaceModel, options: ReconstructOptions, clock: StageClock
                 ) -> list[FaceExport]:
    """Stage 6 for every face of a photo: mesh, material, texture and shape-keys files, then the
    JSONs, which carry every stage's time (this one's included)."""
    clock.enter("export", 0.9)
    meshes = [model.head_mesh(fit) for fit in fits]
    files = [face_files(name, mesh, bake.texture, options.outputs, model.part_textures(face.iris_srgb))
             for name, mesh, bake, face in zip(names, meshes, bakes, faces)]
    clock.stop()
    exports = []
    for name, face, fit, mesh, bake, face_files_ in zip(names, faces, fits, meshes, bakes, files):
        facts = face_facts(photo, face, fit, model, mesh, bake, options, clock.timings, len(faces), name)
        if "json" in options.outputs:
            face_files_.append(ResultFile(f"{name}.json", "json", json.dumps(facts, indent=1).encode("utf-8")))
        exports.append(FaceExport(tuple(face_files_), facts))
    return exports


def person_facts(photos: Sequence[PhotoInfo], located: Sequence[LocatedFace | None], person: PersonFit,
                 reference: int, model: FaceModel, contribution: Sequence[float], seen: Sequence[float],
                 gains: Sequence[Sequence[float]], lightings: Sequence[Lighting]) -> dict[str, Any]:
    """The JSON's `person` section: per photo (in request order) whether it was used (or why not),
    its pose, camera, expression and gaze (the model's coefficients less the shared identity), how
    far its face lay from the others' (`mismatch`, 1 = the limit), its share of the fused texture's
    seen texels, the colour gain applied to it and its lighting (as a single photo's JSON has it).
    contribution / seen / gains / lightings: per kept photo."""
    kept = person.kept
    entries = []
    for k, info in enumerate(photos):
        fit, face = person.fits[k], located[k]
        entry: dict[str, Any] = {"index": k, "name": info.name, "used": fit is not None,
                                 "left_out": person.left_out.get(k), "reference": k == reference,
                                 "mismatch": None if not np.isfinite(person.mismatch[k]) else
                                 round(float(person.mismatch[k]), 3)}
        if face is not None:
            entry["face"] = {"box_px": [face.box.x0, face.box.y0, face.box.width, face.box.height],
                             "detector_score": face.box.score}
        if fit is not None:
            n = kept.index(k)
            coefficients = model.facts(fit, "").coefficients
            entry.update({
                "width_px": info.size[0], "height_px": info.size[1],
                "camera": fit.camera.to_json(), "pose": fit.pose.to_json(),
                "expression": coefficients.get("expression"), "gaze_deg": coefficients.get("gaze_deg"),
                "texture_contribution": round(float(contribution[n]), 4),
                "texture_seen_fraction": round(float(seen[n]), 4),
                "colour_gain": [round(float(g), 4) for g in gains[n]],
                "lighting": lightings[n].to_json()})
        entries.append(entry)
    return {"photos": entries, "used": len(kept), "of": len(photos), "reference_photo": reference,
            "note": "one shape from every used photo; the head is posed as the reference photo (its pose, "
                    "expression, camera and lighting are the JSON's own); texture_contribution: the photo's "
                    "share of the texels any photo saw; colour_gain: per linear RGB channel, what the photo's "
                    "colours were multiplied by to match the reference photo's"}


def export_person(photos: Sequence[PhotoInfo], located: Sequence[LocatedFace | None], person: PersonFit,
                  reference: int, model: FaceModel, fused: Any, completed: Any, lightings: Sequence[Lighting],
                  options: ReconstructOptions, name: str, clock: StageClock) -> FaceExport:
    """Stage 6 for one person: the head of the reference photo's fit (its expression and pose; the
    shared shape) with the fused texture, and the JSON with the `person` section. fused: a
    fuse.FusedTexture; completed: a fuse.CompletedTexture; lightings: each kept photo's lighting
    (person.kept order; the reference photo's is the JSON's own `lighting`)."""
    clock.enter("export", 0.9)
    fit, face = person.fits[reference], located[reference]
    assert fit is not None and face is not None
    mesh = model.head_mesh(fit)
    files = face_files(name, mesh, completed.texture, options.outputs, model.part_textures(face.iris_srgb))
    clock.stop()
    bake = Bake(completed.texture, completed.seen_fraction, completed.mirrored_fraction,
                lightings[person.kept.index(reference)])
    facts = face_facts(photos[reference], face, fit, model, mesh, bake, options, clock.timings, 1, name)
    facts["texture"]["content"] = (
        "lit: the photos' colours, equalised to the reference photo's" if options.lit_texture else
        "albedo: each photo's colours divided by its own lighting (person.photos[].lighting; the reference "
        "photo's is the lighting below), equalised to the reference photo's")
    facts["person"] = person_facts(photos, located, person, reference, model, fused.contribution,
                                   fused.seen_fraction, fused.gains, lightings)
    if "json" in options.outputs:
        files.append(ResultFile(f"{name}.json", "json", json.dumps(facts, indent=1).encode("utf-8")))
    return FaceExport(tuple(files), facts)
