"""The one interface every morphable face model implements, and its cached on-disk form.

Frame of every model here: its own head frame in metres, +X the face's left (image right in a
frontal photo), +Y up, +Z out of the face. Loaders convert units (ICT-FaceKit: cm, eos models: mm).

    vertices = mean + identity @ identity_basis + expression @ expression_basis      (V, 3) metres

`identity` has the prior N(0, 1) per component; `expression` weights lie in [0, 1] (0 = neutral).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .face_model import Part, triangulate
from .topology import MeshTopology, SparseRows

CACHE_FORMAT = 2          # 2: parts name their eye


@dataclass(frozen=True)
class Correspondence:
    """Where MediaPipe's 468 face-mesh points lie on the model's surface: per point the three
    vertex ids of a triangle and barycentrics; `valid` is False where the surface does not reach
    the point (it is then left out of the fit)."""

    corners: np.ndarray       # (468, 3) vertex ids
    bary: np.ndarray          # (468, 3)
    valid: np.ndarray         # (468,) bool
    residual_m: np.ndarray    # (468,) distance to the point at computation, metres


@dataclass(frozen=True, eq=False)
class MorphableModel:
    name: str
    mean: np.ndarray                     # (V, 3) float32 metres
    identity_basis: np.ndarray           # (K_id, V, 3) float32 metres per unit coefficient
    expression_basis: np.ndarray         # (K_exp, V, 3) float32 metres per unit weight
    expression_names: tuple[str, ...]
    polygons: np.ndarray                 # (F, 4) vertex ids, counter-clockwise; -1 pads a triangle
    polygon_uvs: np.ndarray              # (F, 4) ids into `uvs`; -1 pads
    uvs: np.ndarray                      # (U, 2), origin bottom-left; textured parts in [0, 1]²
    polygon_part: np.ndarray             # (F,) index into `parts`
    parts: tuple[Part, ...]
    landmarks68: np.ndarray              # (68,) iBUG-68 vertex ids, -1 where the model has none
    face_region: np.ndarray              # vertex ids of the face proper (geometry error, contour)
    info: dict = field(default_factory=dict)          # licence, source, units, counts
    mediapipe: Correspondence | None = None

    @property
    def vertex_count(self) -> int:
        return len(self.mean)

    @property
    def triangles(self) -> np.ndarray:
        """(T, 3) the polygons fanned into triangles (see `triangulate`)."""
        return triangulate(self.polygons)

    @property
    def textured_polygons(self) -> np.ndarray:
        """(F,) bool: the polygons of the parts that take the photo texture."""
        return np.array([part.textured for part in self.parts])[self.polygon_part]

    def vertices(self, identity: np.ndarray | None = None, expression: np.ndarray | None = None) -> np.ndarray:
        """(V, 3) metres for coefficient vectors (None: zeros)."""
        points = self.mean.astype(np.float64)
        if identity is not None:
            points = points + np.tensordot(identity, self.identity_basis, axes=1)
        if expression is not None:
            points = points + np.tensordot(expression, self.expression_basis, axes=1)
        return points

    def vertices_at(self, vertex_ids: np.ndarray, identities: np.ndarray, expressions: np.ndarray,
                    bary: np.ndarray | None = None) -> np.ndarray:
        """(N, P, 3) metres: N faces' (N, K_id) and (N, K_exp) coefficients at P vertices
        (`vertex_ids` (P,)), or, with (P, 3) `bary`, at P surface points ((P, 3) vertex ids);
        one matrix product for all faces."""
        bases = np.concatenate([self.identity_basis, self.expression_basis])[:, vertex_ids]    # (K, P[, 3], 3)
        mean = self.mean.astype(np.float64)[vertex_ids]
        if bary is not None:
            bases = np.einsum("pk,jpkc->jpc", bary, bases)
            mean = np.einsum("pk,pkc->pc", bary, mean)
        coefficients = np.concatenate([identities, expressions], axis=1)
        flat = coefficients @ bases.reshape(len(bases), -1).astype(np.float64)
        return mean[None] + flat.reshape(len(coefficients), *mean.shape)

    def __reduce__(self) -> tuple:
        """Pickled by name: another process loads the installed model (never MBs through a pipe)."""
        return (_installed_model, (self.name,))

    def correspondence(self) -> Correspondence:
        """MediaPipe's points on this model; ValueError if the cache has none (install it again)."""
        if self.mediapipe is None:
            raise ValueError(f"model {self.name!r} has no MediaPipe correspondence; install it again")
        return self.mediapipe

    def with_correspondence(self, correspondence: Correspondence) -> "MorphableModel":
        from dataclasses import replace
        return replace(self, mediapipe=correspondence)

    # --- cache ------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """One compressed .npz (arrays; ICT-FaceKit: 21 MB) with the model's facts as JSON inside."""
        arrays = {name: getattr(self, name) for name in
                  ("mean", "identity_basis", "expression_basis", "polygons", "polygon_uvs", "uvs",
                   "polygon_part", "landmarks68", "face_region")}
        if self.mediapipe is not None:
            arrays.update({f"mediapipe_{k}": getattr(self.mediapipe, k)
                           for k in ("corners", "bary", "valid", "residual_m")})
        facts = {"format": CACHE_FORMAT, "name": self.name, "expression_names": list(self.expression_names),
                 "parts": [vars(p) for p in self.parts], "info": self.info}
        temporary = path.with_name(path.name + ".part.npz")
        np.savez_compressed(temporary, facts=np.frombuffer(json.dumps(facts).encode(), np.uint8), **arrays)
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> "MorphableModel":
        """ValueError, naming the file, for a cache that is damaged or of another format."""
        try:
            with np.load(path) as data:
                facts = json.loads(bytes(data["facts"]).decode())
                arrays = {k: data[k] for k in data.files if k != "facts"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path} is damaged ({exc}); install the model again") from None
        if facts.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: cache format {facts.get('format')}, expected {CACHE_FORMAT}")
        correspondence = None
        if "mediapipe_corners" in arrays:
            correspondence = Correspondence(*(arrays.pop(f"mediapipe_{k}")
                                              for k in ("corners", "bary", "valid", "residual_m")))
        return cls(facts["name"], expression_names=tuple(facts["expression_names"]),
                   parts=tuple(Part(p["name"], tuple(p["colour"]), p["textured"], p["skin"], p["eye"])
                               for p in facts["parts"]),
                   info=facts["info"], mediapipe=correspondence, **arrays)


def _installed_model(name: str) -> "MorphableModel":
    from .store import load_model
    return load_model(name)


def texture_topology(model: MorphableModel, recipe: tuple) -> MeshTopology:
    """The textured parts of `model` as a MeshTopology over texture vertices (one per distinct
    (vertex, UV) pair); `refine` selects them from the model's (V, 3) vertices."""
    textured = model.textured_polygons
    corners = triangulate(model.polygons[textured])
    corner_uvs = triangulate(model.polygon_uvs[textured])
    pairs, texture_vertex = np.unique(np.stack([corners.ravel(), corner_uvs.ravel()], axis=1), axis=0,
                                      return_inverse=True)
    uvs = model.uvs[pairs[:, 1]]
    return MeshTopology(texture_vertex.reshape(-1, 3), uvs, SparseRows.selection(pairs[:, 0], model.vertex_count),
                        recipe, uv_mirror_symmetric=uv_layout_is_symmetric(model.mean[pairs[:, 0]], uvs))


def uv_layout_is_symmetric(points: np.ndarray, uvs: np.ndarray, reach_m: float = 0.002,
                           tolerance: float = 0.01) -> bool:
    """True when 95 % of the points have a left/right twin (the nearest point to (-x, y, z), within
    `reach_m`) whose UV is (1 - u, v) within `tolerance`."""
    import torch
    cloud = torch.as_tensor(points, dtype=torch.float32)
    mirrored = cloud * torch.tensor([-1.0, 1.0, 1.0])
    nearest = [torch.cdist(block, cloud).min(dim=1) for block in mirrored.split(2048)]
    distance = torch.cat([n.values for n in nearest]).numpy()
    twins = torch.cat([n.indices for n in nearest]).numpy()
    error = np.abs(uvs[twins] - np.stack([1 - uvs[:, 0], uvs[:, 1]], axis=1)).max(axis=1)
    return bool(((distance < reach_m) & (error < tolerance)).mean() >= 0.95)


def keep_parts(mean: np.ndarray, bases: list[np.ndarray], polygons: np.ndarray, polygon_part: np.ndarray,
               keep: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Drop polygons whose part is not in `keep` (bool per part) and the vertices only they used.
    Returns mean, bases, polygons (renumbered), polygon_part and the kept old vertex ids."""
    chosen = keep[polygon_part]
    polygons, polygon_part = polygons[chosen], polygon_part[chosen]
    used = np.unique(polygons[polygons >= 0])
    new_id = np.full(len(mean), -1, np.int64)
    new_id[used] = np.arange(len(used))
    polygons = np.where(polygons >= 0, new_id[np.maximum(polygons, 0)], -1)
    return mean[used], [basis[:, used] for basis in bases], polygons, polygon_part, used
