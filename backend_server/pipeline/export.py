"""Stage 6, export: mesh, material, texture and facts as file bytes, and safe writing of them.

OBJ: positions in metres in the head frame (+Y up, the face looking toward +Z, pose removed; the
JSON's pose puts it back into the camera frame), per-vertex normals and UVs (origin bottom-left).
The built-in mesh has one UV per vertex; a morphable model's mesh has UVs per corner (seams),
quads, and one material per part (face with the texture, the rest plain colours).
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from shared_protocol import ResultFile

PNG_COMPRESS_LEVEL = 1   # used only where fpng is missing (Pillow fallback)


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
