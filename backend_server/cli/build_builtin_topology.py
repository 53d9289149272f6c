"""Builds `data/builtin_topology.json`, the built-in model's fixed data, once; the result is committed.

    python -m backend_server.cli.build_builtin_topology

- triangles: the faces of MediaPipe's 468-point tessellation graph (its 3-cliques, less the few
  cliques that are not faces), oriented counter-clockwise seen from the front (+Z);
- reference shape: MediaPipe's landmarks on matplotlib's sample portrait and on its mirror image,
  averaged, turned frontal, made exactly left/right symmetric and scaled to metres by a 63 mm
  distance between the iris centres (an adult average); head frame: +X the face's left (image
  right), +Y up, +Z out of the face, origin midway between the iris centres;
- mirror: for every vertex its left/right twin (midline vertices map to themselves);
- uvs: a cylindrical projection of the reference shape around a vertical axis behind the face,
  scaled to [0.02, 0.98]; symmetric (u of a twin is 1 - u) and free of flipped triangles.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

IRIS_CENTRES = (468, 473)
INTERPUPILLARY_M = 0.063
CYLINDER_AXIS_DEPTH_M = 0.09     # vertical projection axis this far behind the head origin
UV_MARGIN = 0.02
OUTPUT = Path(__file__).parents[1] / "models" / "data" / "builtin_topology.json"

# iBUG-68 points as MediaPipe vertices (one vertex, or the mean of two), in iBUG order (0-based):
# jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, outer lips 48-59, inner lips 60-67.
IBUG68_FROM_MEDIAPIPE = [
    [127], [234], [93], [132, 58], [58, 172], [136], [150], [176], [152], [400], [379], [365],
    [397, 288], [361], [323], [454], [356],
    [70], [63], [105], [66], [107], [336], [296], [334], [293], [300],
    [168, 6], [197, 195], [5], [4], [75], [97], [2], [326], [305],
    [33], [160], [158], [133], [153], [144], [362], [385], [387], [263], [373], [380],
    [61], [39], [37], [0], [267], [269], [291], [405], [314], [17], [84], [181],
    [78], [82], [13], [312], [308], [317], [14], [87],
]


def tessellation_triangles() -> np.ndarray:
    import mediapipe as mp
    edges = {frozenset(e) for e in mp.solutions.face_mesh.FACEMESH_TESSELATION}
    neighbours = collections.defaultdict(set)
    for a, b in map(tuple, edges):
        neighbours[a].add(b)
        neighbours[b].add(a)
    cliques = {tuple(sorted((a, b, c))) for a in neighbours for b in neighbours[a] if b > a
               for c in neighbours[a] & neighbours[b] if c > b}
    use = collections.Counter(frozenset(p) for t in cliques for p in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))
    # A clique whose three edges each border two other triangles is a hole's outline, not a face.
    faces = [t for t in cliques
             if not all(use[frozenset(p)] > 2 for p in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))]
    return np.array(sorted(faces), dtype=np.int64)


def sample_shapes() -> list[np.ndarray]:
    """(478, 3) landmark sets in a Y-up frame (metre-free units) from the sample photo and its mirror."""
    import matplotlib
    from ..pipeline.decode import decode_photo
    from ..pipeline.detect import FaceDetector
    from ..pipeline.landmarks import LandmarkDetector
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photo = decode_photo(path.read_bytes(), path.name)
    detector, landmarker = FaceDetector(), LandmarkDetector()
    shapes = []
    for rgb in (photo.rgb, np.ascontiguousarray(photo.rgb[:, ::-1])):
        points = landmarker(rgb, detector(rgb)[0], path.name)
        shapes.append(points * np.array([1.0, -1.0, -1.0]))     # x right, y up, z toward the viewer
    return shapes


def frontal_frame(shape: np.ndarray) -> np.ndarray:
    """Rotate and centre a shape: eye line along +X, the sample camera's viewing axis (the sample
    person looks into the camera) along +Z, so such a face has zero rotation; origin at the eyes."""
    origin = shape[list(IRIS_CENTRES)].mean(axis=0)
    x_axis = shape[IRIS_CENTRES[1]] - shape[IRIS_CENTRES[0]]
    x_axis /= np.linalg.norm(x_axis)
    forward = np.array([0.0, 0.0, 1.0])
    z_axis = forward - x_axis * (forward @ x_axis)
    z_axis /= np.linalg.norm(z_axis)
    rotation = np.stack([x_axis, np.cross(z_axis, x_axis), z_axis])
    return (shape - origin) @ rotation.T


def procrustes_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rotation R minimising |source @ R.T - target| for centred point sets."""
    u, _, vt = np.linalg.svd(target.T @ source)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def mirror_map(shape: np.ndarray) -> np.ndarray:
    """Index of each vertex's left/right twin in a frontal, nearly symmetric shape (an involution)."""
    mirrored = shape * np.array([-1.0, 1.0, 1.0])
    cost = np.linalg.norm(shape[:, None, :] - mirrored[None, :, :], axis=2)
    _, twin = linear_sum_assignment(cost)
    if not np.array_equal(twin[twin], np.arange(len(twin))):
        raise RuntimeError("mirror correspondence is not an involution; use a more frontal sample")
    return twin


def symmetric_reference(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    shapes = [frontal_frame(s) for s in samples]
    base = shapes[0]
    aligned = [base] + [s @ procrustes_rotation(s, base).T for s in shapes[1:]]
    mean = np.mean(aligned, axis=0)[:468]
    twin = mirror_map(mean)
    symmetric = (mean + mean[twin] * np.array([-1.0, 1.0, 1.0])) / 2
    symmetric[twin == np.arange(468), 0] = 0.0
    iris = np.mean(aligned, axis=0)[list(IRIS_CENTRES)]
    scale = INTERPUPILLARY_M / np.linalg.norm(iris[1] - iris[0])
    return symmetric * scale, twin


def cylindrical_uvs(shape: np.ndarray) -> np.ndarray:
    angle = np.arctan2(shape[:, 0], shape[:, 2] + CYLINDER_AXIS_DEPTH_M) * CYLINDER_AXIS_DEPTH_M
    height = shape[:, 1]
    span = max(np.abs(angle).max() * 2, np.ptp(height))
    scale = (1 - 2 * UV_MARGIN) / span
    u = 0.5 + angle * scale
    v = 0.5 + (height - (height.max() + height.min()) / 2) * scale
    return np.stack([u, v], axis=1)


def orient_consistently(triangles: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Flip triangles so neighbours agree (each shared edge runs opposite ways), normals out (+Z)."""
    triangles = triangles.copy()
    by_edge = collections.defaultdict(list)
    for index, tri in enumerate(triangles):
        for k in range(3):
            by_edge[frozenset((tri[k], tri[(k + 1) % 3]))].append(index)
    done = np.zeros(len(triangles), bool)
    done[0] = True
    queue = collections.deque([0])
    while queue:
        index = queue.popleft()
        tri = triangles[index]
        for k in range(3):
            a, b = tri[k], tri[(k + 1) % 3]
            for other in by_edge[frozenset((a, b))]:
                if done[other]:
                    continue
                o = list(triangles[other])
                if any(o[j] == a and o[(j + 1) % 3] == b for j in range(3)):   # same direction: flip
                    triangles[other] = triangles[other][[0, 2, 1]]
                done[other] = True
                queue.append(other)
    if not done.all():
        raise RuntimeError("tessellation is not connected")
    a, b, c = (reference[triangles[:, k]] for k in range(3))
    if np.cross(b - a, c - a)[:, 2].sum() < 0:
        triangles = triangles[:, [0, 2, 1]]
    return triangles


def signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = points[triangles[:, 0]], points[triangles[:, 1]], points[triangles[:, 2]]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def main() -> None:
    samples = sample_shapes()
    triangles = orient_consistently(tessellation_triangles(), samples[0])
    reference, twin = symmetric_reference(samples)
    uvs = cylindrical_uvs(reference)
    areas = signed_areas(uvs, triangles)
    if (areas <= 0).any():
        raise RuntimeError(f"{int((areas <= 0).sum())} UV triangles are flipped")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({
        "description": __doc__.split("\n\n")[0],
        "reference_vertices_m": np.round(reference, 6).tolist(),
        "triangles": triangles.tolist(),
        "uvs": np.round(uvs, 6).tolist(),
        "mirror": twin.tolist(),
        "ibug68": IBUG68_FROM_MEDIAPIPE,
    }, separators=(",", ":")))
    print(f"wrote {OUTPUT}: {len(reference)} vertices, {len(triangles)} triangles")


if __name__ == "__main__":
    main()
