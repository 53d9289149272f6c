"""glTF 2.0 binary (`NAME.glb`) of one head: for game engines, web viewers and any glTF importer.

Format code only (no bpy, no model kinds), from a `HeadMesh` (head frame, metres, +Y up, the face
toward +Z: glTF's own axes and unit), how each part looks (`export.PartLook`) and the PNG bytes of
the images the looks name:

- one mesh, one primitive per part (its material) over its own vertices: glTF has one UV per
  vertex, so a model vertex is split where its parts or its UVs differ (`gltf_layout` keeps from
  which model vertex each glTF vertex comes, so positions, normals and morph offsets follow);
- POSITION, NORMAL (smooth across UV seams: computed on the unsplit mesh), TEXCOORD_0 (glTF's
  origin is top-left: v is flipped);
- metallic-roughness materials: a part with an image takes it as `baseColorTexture` (embedded
  PNG, sRGB), the others `baseColorFactor` (linear RGB);
- a model with expressions: the base mesh is the neutral one, each expression a morph target
  (POSITION offsets per unit weight, sparse: only the vertices it moves), its name in
  `mesh.extras.targetNames` (what Blender, three.js and Babylon read), the fitted weights as the
  mesh's default `weights`, so the file shows the fitted face and animates from it.

Packed with pygltflib; checked with the Khronos glTF validator in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .. import __version__
from ..geometry import vertex_normals
from ..models.face_model import HeadMesh, MeshLayout, triangulate

if TYPE_CHECKING:
    from .export import PartLook

MORPH_MIN_OFFSET_M = 1e-5           # a vertex moved less than this by an expression is left out of its target
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UNSIGNED_SHORT, UNSIGNED_INT = 5126, 5123, 5125
LINEAR, LINEAR_MIPMAP_LINEAR, CLAMP_TO_EDGE = 9729, 9987, 33071
ROUGHNESS = 0.6                     # skin: a broad, soft highlight


@dataclass(frozen=True)
class GltfLayout:
    """What every glTF of one model layout shares. source (N,): the model vertex of each glTF
    vertex, each part's vertices contiguous: part k has glTF vertices part_ranges[k] = (start,
    end); uv (N, 2) float32 glTF UVs (origin top-left); part_indices: per part its triangles'
    vertex ids (T*3,) uint32 counted from its start, counter-clockwise; targets: per expression
    the moved glTF vertices (M,) uint32, ascending, and their offsets (M, 3) float32 metres per
    unit weight."""

    source: np.ndarray
    uv: np.ndarray
    part_ranges: list[tuple[int, int]]
    part_indices: list[np.ndarray]
    targets: list[tuple[np.ndarray, np.ndarray]]


@lru_cache(maxsize=8)
def gltf_layout(layout: MeshLayout) -> GltfLayout:
    """Split the model's vertices where their part or their UV differs (a vertex keeps one id per
    (part, vertex, uv)), parts in order, so each part's vertices are contiguous."""
    vertex_count = int(layout.polygons.max()) + 1
    uv_count = len(layout.uvs)
    keys, sizes = [], []
    for k in range(len(layout.parts)):
        rows = layout.polygon_part == k
        corners = triangulate(layout.polygons[rows]).astype(np.int64)
        corner_uvs = triangulate(layout.polygon_uvs[rows]).astype(np.int64)
        keys.append(((k * vertex_count) + corners.ravel()) * uv_count + corner_uvs.ravel())
        sizes.append(corners.size)
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    source = (unique // uv_count) % vertex_count
    uv = np.asarray(layout.uvs, np.float64)[unique % uv_count]
    uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1).astype(np.float32)
    part_of = unique // (uv_count * vertex_count)
    part_ranges = [(int(np.searchsorted(part_of, k)), int(np.searchsorted(part_of, k, side="right")))
                   for k in range(len(layout.parts))]
    part_indices = [(ids - start).astype(np.uint32)
                    for ids, (start, _) in zip(np.split(inverse, np.cumsum(sizes)[:-1]), part_ranges)]
    targets = []
    basis = layout.expression_basis if layout.expression_basis is not None else ()
    for offsets in basis:
        split = np.asarray(offsets, np.float64)[source]
        moved = np.flatnonzero(np.abs(split).max(axis=1) >= MORPH_MIN_OFFSET_M)
        targets.append((moved.astype(np.uint32), split[moved].astype(np.float32)))
    return GltfLayout(source, uv, part_ranges, part_indices, targets)


class _Packer:
    """The binary chunk and the bufferViews and accessors that point into it."""

    def __init__(self) -> None:
        import pygltflib
        self.gltf = pygltflib
        self.chunks: list[bytes] = []
        self.size = 0
        self.views: list = []
        self.accessors: list = []

    def view(self, data: bytes, target: int | None = None, stride: int | None = None) -> int:
        """A bufferView of `data`, 4-byte aligned (`stride`: the bytes per vertex, required when
        several accessors share it)."""
        self.views.append(self.gltf.BufferView(buffer=0, byteOffset=self.size, byteLength=len(data), target=target,
                                               byteStride=stride))
        padding = -len(data) % 4
        self.chunks += [data, b"\0" * padding]
        self.size += len(data) + padding
        return len(self.views) - 1

    def accessor(self, array: np.ndarray, kind: str, target: int | None = ARRAY_BUFFER, bounds: bool = False,
                 view: tuple[int, int] | None = None) -> int:
        """An accessor over `array` (float32 VEC2/VEC3 or uint16/uint32 SCALAR indices), in a new
        bufferView or at (bufferView, byteOffset) `view`, which holds it already."""
        component = {np.dtype(np.float32): FLOAT, np.dtype(np.uint16): UNSIGNED_SHORT,
                     np.dtype(np.uint32): UNSIGNED_INT}[array.dtype]
        buffer_view, offset = view if view else (self.view(np.ascontiguousarray(array).tobytes(), target), 0)
        accessor = self.gltf.Accessor(bufferView=buffer_view, byteOffset=offset, componentType=component,
                                      count=len(array), type=kind)
        if bounds:
            accessor.min = array.min(axis=0).astype(float).tolist()
            accessor.max = array.max(axis=0).astype(float).tolist()
        self.accessors.append(accessor)
        return len(self.accessors) - 1

    def offsets_accessor(self, count: int, moved: np.ndarray, offsets: np.ndarray) -> int:
        """A VEC3 accessor of `count` offsets, zero but at the ids `moved`: sparse, without a
        bufferView (glTF reads the rest as zeros), unless every vertex moves; min/max over all."""
        accessor = self.gltf.Accessor(componentType=FLOAT, count=count, type="VEC3", byteOffset=None)
        if len(moved) == count:
            accessor.bufferView = self.view(np.ascontiguousarray(offsets).tobytes(), ARRAY_BUFFER)
            accessor.byteOffset = 0
            low, high = offsets.min(axis=0), offsets.max(axis=0)
        else:
            low = high = np.zeros(3, np.float32)
            if len(moved):
                low, high = np.minimum(offsets.min(axis=0), 0), np.maximum(offsets.max(axis=0), 0)
                accessor.sparse = self.gltf.Sparse(
                    count=len(moved),
                    indices=self.gltf.AccessorSparseIndices(bufferView=self.view(moved.astype(np.uint32).tobytes()),
                                                            componentType=UNSIGNED_INT),
                    values=self.gltf.AccessorSparseValues(bufferView=self.view(np.ascontiguousarray(offsets).tobytes())))
        accessor.min = np.asarray(low, np.float32).astype(float).tolist()
        accessor.max = np.asarray(high, np.float32).astype(float).tolist()
        self.accessors.append(accessor)
        return len(self.accessors) - 1

    def blob(self) -> bytes:
        return b"".join(self.chunks)


def glb_bytes(name: str, mesh: HeadMesh, looks: Sequence[PartLook], images: Mapping[str, bytes]) -> bytes:
    """The head as a .glb. looks: one per `mesh.layout.parts` entry; images: PNG bytes of every
    image a look names."""
    import pygltflib as gl
    layout = mesh.layout
    shape = gltf_layout(layout)
    morphs = mesh.neutral is not None and len(shape.targets) > 0
    base = mesh.neutral if morphs and mesh.neutral is not None else mesh.posed
    normals = vertex_normals(np.asarray(base, np.float64), layout.triangles)[shape.source]
    normals = _unit(normals)
    packer = _Packer()
    positions = np.asarray(base, np.float64)[shape.source].astype(np.float32)
    arrays = {"POSITION": positions, "NORMAL": normals, "TEXCOORD_0": shape.uv}
    views = {key: packer.view(array.tobytes(), ARRAY_BUFFER, array.shape[1] * 4) for key, array in arrays.items()}
    part_attributes = []
    for start, end in shape.part_ranges:
        part_attributes.append({key: packer.accessor(array[start:end], "VEC3" if key != "TEXCOORD_0" else "VEC2",
                                                     bounds=key == "POSITION",
                                                     view=(views[key], start * array.shape[1] * 4))
                                for key, array in arrays.items()} if end > start else {})
    part_targets: list[list] = [[] for _ in shape.part_ranges]
    for moved, offsets in (shape.targets if morphs else []):
        for k, (start, end) in enumerate(shape.part_ranges):
            if end > start:
                low, high = np.searchsorted(moved, [start, end])
                part_targets[k].append(gl.Attributes(POSITION=packer.offsets_accessor(
                    end - start, moved[low:high] - start, offsets[low:high])))

    image_ids: dict[str, int] = {}
    gl_images, textures = [], []
    for look in looks:
        if look.image is not None and look.image not in image_ids:
            gl_images.append(gl.Image(bufferView=packer.view(images[look.image]), mimeType="image/png",
                                      name=f"{name}_{look.image}"))
            textures.append(gl.Texture(sampler=0, source=len(gl_images) - 1))
            image_ids[look.image] = len(textures) - 1
    materials = []
    for look in looks:
        pbr = gl.PbrMetallicRoughness(metallicFactor=0.0, roughnessFactor=ROUGHNESS)
        if look.image is not None:
            pbr.baseColorTexture = gl.TextureInfo(index=image_ids[look.image])
        else:
            pbr.baseColorFactor = [*(float(np.clip(c, 0.0, 1.0)) for c in look.colour), 1.0]
        materials.append(gl.Material(name=look.material, pbrMetallicRoughness=pbr))

    primitives = []
    for k, indices in enumerate(shape.part_indices):
        start, end = shape.part_ranges[k]
        if end == start:
            continue
        primitives.append(gl.Primitive(
            attributes=gl.Attributes(**part_attributes[k]),
            indices=packer.accessor(indices.astype(np.uint16 if end - start <= 65535 else np.uint32), "SCALAR",
                                    ELEMENT_ARRAY_BUFFER),
            material=k, targets=part_targets[k]))
    gl_mesh = gl.Mesh(name=name, primitives=primitives)
    if morphs:
        gl_mesh.weights = [float(w) for w in np.clip(mesh.expression, 0.0, 1.0)]
        gl_mesh.extras = {"targetNames": list(layout.expression_names)}

    gltf = gl.GLTF2(
        asset=gl.Asset(generator=f"FaceRecon {__version__}", version="2.0"),
        scene=0, scenes=[gl.Scene(name=name, nodes=[0])], nodes=[gl.Node(name=name, mesh=0)],
        meshes=[gl_mesh], materials=materials, textures=textures, images=gl_images,
        samplers=[gl.Sampler(magFilter=LINEAR, minFilter=LINEAR_MIPMAP_LINEAR, wrapS=CLAMP_TO_EDGE,
                             wrapT=CLAMP_TO_EDGE)] if textures else [],
        accessors=packer.accessors, bufferViews=packer.views, buffers=[gl.Buffer(byteLength=packer.size)])
    gltf.set_binary_blob(packer.blob())
    return b"".join(gltf.save_to_bytes())


def _unit(normals: np.ndarray) -> np.ndarray:
    """float32 unit vectors (glTF requires them); a vertex without a normal gets +Z."""
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-6, normals / np.maximum(length, 1e-12), np.array([0.0, 0.0, 1.0]))
    normals = normals.astype(np.float32)
    return normals / np.linalg.norm(normals, axis=1, keepdims=True).astype(np.float32)
