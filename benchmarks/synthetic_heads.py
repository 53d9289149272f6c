"""The geometry benchmark: random ICT-FaceKit heads rendered by Blender, then reconstructed.

    # real face textures in ICT-FaceKit's UV layout, baked from photos by the pipeline itself
    facerecon reconstruct ../shared/photos --model ict-facekit --uv-only -o synth/textures
    python benchmarks/synthetic_heads.py generate --textures synth/textures --out synth/heads --count 24
    python benchmarks/synthetic_heads.py run --data synth/heads [--models builtin ict-facekit sfm]

generate (bpy 5.0.1, Cycles on the CPU): per head a random identity (N(0, 1)), up to three
expressions (weights 0.2-0.7), a pose (yaw ±35°, pitch ±15°, roll ±10°) at 0.45-0.7 m, a face
texture picked from --textures, the rest of the head in that texture's skin colour, a random key
light and ambient colour. The Blender camera sits at the origin of the project's camera frame (a
50 mm lens on a 36 mm sensor, 640² pixels: exactly `Camera.for_photo(640, 640)`), so the ground
truth is the posed vertices themselves. Writes NNN.png and NNN.npz (camera-frame vertices, metres).

run: reconstructs every render with each model and reports, after rigid alignment (rotation and
translation; one photo does not fix the distance):
- 468-point error: MediaPipe's 468 points on the reconstruction against the same points on the
  truth (through each model's correspondence): the one measure every model shares;
- surface error: reconstructed face vertices (up to 1200, evenly strided) to the true face surface
  (ICT-FaceKit's narrow face area), after the 468-point alignment;
- vertex error (ICT-FaceKit only): the face area's vertices against their true positions.
All in millimetres, mean and median over the faces' points, then averaged over heads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 640
SURFACE_POINTS = 1200          # face vertices (evenly strided) measured against the true surface
EXPRESSIONS = ("jawOpen", "mouthSmile_L", "mouthSmile_R", "browInnerUp", "mouthFunnel", "cheekPuff",
               "browDown_L", "eyeSquint_R", "mouthPucker", "noseSneer_L")


def euler_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Ry(yaw) @ Rx(pitch) @ Rz(roll), radians (the convention of fit.Pose.euler_degrees)."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return ry @ rx @ rz


# --- generate (bpy) -----------------------------------------------------------------------------
def generate(args: argparse.Namespace) -> None:
    import bpy
    from backend_server.models import store
    from backend_server.pipeline.export import skin_colour
    from PIL import Image
    model = store.load_model("ict-facekit")
    textures = sorted(Path(args.textures).glob("*.png"))
    if not textures:
        raise SystemExit(f"no .png textures in {args.textures}; make them with facerecon reconstruct --model "
                         "ict-facekit --uv-only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    names = list(model.expression_names)
    corners = [[v for v in polygon if v >= 0] for polygon in model.polygons.tolist()]
    corner_uvs = [model.uvs[[u for u in polygon if u >= 0]] for polygon in model.polygon_uvs.tolist()]
    flat_uvs = np.concatenate(corner_uvs).ravel()

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = args.samples
    scene.cycles.use_denoising = True
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    scene.render.image_settings.file_format = "PNG"
    scene.view_settings.view_transform = "Standard"
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.lens, camera.data.sensor_width, camera.data.sensor_fit = 50.0, 36.0, "AUTO"
    camera.data.clip_start = 0.01
    scene.collection.objects.link(camera)
    scene.camera = camera                        # at the origin, looking down -Z, +Y up: the camera frame
    light = bpy.data.objects.new("key", bpy.data.lights.new("key", "AREA"))
    light.data.size = 0.6
    scene.collection.objects.link(light)
    scene.world = bpy.data.worlds.new("world")

    for index in range(args.count):
        identity = rng.normal(size=len(model.identity_basis))
        expression = np.zeros(len(names))
        for name in rng.choice(EXPRESSIONS, size=rng.integers(0, 4), replace=False):
            expression[names.index(name) if name in names else names.index(name + "_L")] = rng.uniform(0.2, 0.7)
        yaw, pitch, roll = np.radians([rng.uniform(-35, 35), rng.uniform(-15, 15), rng.uniform(-10, 10)])
        rotation = euler_rotation(yaw, pitch, roll)
        translation = np.array([rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02), -rng.uniform(0.45, 0.7)])
        vertices = model.vertices(identity, expression) @ rotation.T + translation
        texture_path = textures[rng.integers(len(textures))]

        mesh = bpy.data.meshes.new(f"head{index}")
        mesh.from_pydata(vertices.tolist(), [], corners)
        mesh.uv_layers.new(name="UVMap").data.foreach_set("uv", flat_uvs)
        mesh.polygons.foreach_set("use_smooth", [True] * len(corners))
        mesh.polygons.foreach_set("material_index", model.polygon_part.tolist())
        image = bpy.data.images.load(str(texture_path.resolve()))
        skin = skin_colour(np.asarray(Image.open(texture_path).convert("RGB")))
        for part in model.parts:
            material = bpy.data.materials.new(part.name)
            if material.node_tree is None:
                material.use_nodes = True
            bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
            bsdf.inputs["Roughness"].default_value = 0.55
            bsdf.inputs["Base Color"].default_value = (*(skin if part.skin else part.colour), 1.0)
            if part.textured:
                node = material.node_tree.nodes.new("ShaderNodeTexImage")
                node.image = image
                material.node_tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
            mesh.materials.append(material)
        head = bpy.data.objects.new(f"head{index}", mesh)
        scene.collection.objects.link(head)

        direction = np.array([rng.uniform(-1, 1), rng.uniform(-0.2, 1), rng.uniform(0.3, 1)])
        light.location = (translation + 1.2 * direction / np.linalg.norm(direction)).tolist()
        light.rotation_euler = (0, 0, 0)
        constraint = light.constraints.get("aim") or light.constraints.new("TRACK_TO")
        constraint.name, constraint.target = "aim", head
        light.data.energy = rng.uniform(40, 120)
        ambient = rng.uniform(0.15, 0.6)
        scene.world.color = (ambient, ambient * rng.uniform(0.9, 1.05), ambient * rng.uniform(0.85, 1.1))
        scene.render.filepath = str((out / f"{index:03d}.png").resolve())
        bpy.ops.render.render(write_still=True)
        np.savez_compressed(out / f"{index:03d}.npz", vertices=vertices.astype(np.float32), identity=identity,
                            expression=expression, rotation=rotation, translation=translation,
                            texture=texture_path.name)
        bpy.data.objects.remove(head)
        bpy.data.meshes.remove(mesh)
        print(f"{index + 1}/{args.count} rendered", flush=True)


# --- run ------------------------------------------------------------------------------------------
def reconstructed_points(result) -> tuple[np.ndarray, np.ndarray]:
    """(468, 3) at MediaPipe's points and (N, 3) the face's vertices; camera frame, metres."""
    from backend_server.models.morphable_face import MorphableFaceModel
    face, model = result.faces[0], result.model
    if not isinstance(model, MorphableFaceModel):
        return face.fit.landmark_points, face.texture_vertices
    return face.fit.landmark_points, face.fit.pose.apply(model.head_mesh(face.fit).posed[model.model.face_region])


def run(args: argparse.Namespace) -> None:
    from backend_server.models import store
    from backend_server.models.correspondence import closest_surface_points
    from backend_server.geometry import rigid_fit
    from backend_server.pipeline.reconstruct import Reconstructor
    from shared_protocol import ProtocolError, ReconstructOptions
    truth_model = store.load_model("ict-facekit")
    region = truth_model.face_region
    in_region = np.zeros(truth_model.vertex_count, bool)
    in_region[region] = True
    triangles = truth_model.triangles
    face_triangles = triangles[in_region[triangles].all(axis=1)]
    corr = truth_model.mediapipe
    reconstructor = Reconstructor(args.device)
    samples = sorted(Path(args.data).glob("*.npz"))[:args.limit or None]
    rows = {}
    for name in args.models:
        per_head, failures, seconds = [], 0, []
        for sample in samples:
            truth = np.load(sample)["vertices"].astype(np.float64)
            photo = sample.with_suffix(".png")
            start = time.perf_counter()
            try:
                result = reconstructor.run(photo.read_bytes(), photo.name,
                                           ReconstructOptions(model=name, texture_size=256, outputs=("json",)))
            except ProtocolError as exc:
                failures += 1
                print(f"{name} {photo.name}: {exc}")
                continue
            seconds.append(time.perf_counter() - start)
            at_points, face_vertices = reconstructed_points(result)
            truth_points = np.einsum("nk,nkc->nc", corr.bary, truth[corr.corners])
            valid = corr.valid
            if hasattr(result.model, "model"):
                valid = valid & result.model.model.mediapipe.valid
            alignment = rigid_fit(at_points[valid], truth_points[valid])
            point_error = 1000 * np.linalg.norm(alignment.apply(at_points[valid]) - truth_points[valid], axis=1)
            aligned = alignment.apply(face_vertices)[::max(1, len(face_vertices) // SURFACE_POINTS)]
            _, _, surface = closest_surface_points(aligned, truth, face_triangles)
            row = {"points_mean": point_error.mean(), "points_median": np.median(point_error),
                   "surface_mean": 1000 * surface.mean(), "surface_median": 1000 * np.median(surface)}
            if name == "ict-facekit":
                posed = result.faces[0].fit.pose.apply(result.model.head_mesh(result.faces[0].fit).posed[region])
                aligned_posed = rigid_fit(posed, truth[region]).apply(posed)
                vertex_error = 1000 * np.linalg.norm(aligned_posed - truth[region], axis=1)
                row.update(vertex_mean=vertex_error.mean(), vertex_median=np.median(vertex_error))
            per_head.append({"head": sample.stem, **row})
        summary = {k: float(np.mean([r[k] for r in per_head])) for k in per_head[0] if k != "head"} if per_head else {}
        summary.update(heads=len(per_head), failures=failures, seconds_per_photo=float(np.mean(seconds or [0])),
                       per_head=per_head)
        rows[name] = summary
        print(f"{name:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items() if k != "per_head"), flush=True)
    print("\n| model | heads | 468-point mean / median mm | surface mean / median mm | vertex mean / median mm |")
    print("|---|---|---|---|---|")
    for name, s in rows.items():
        vertex = f"{s['vertex_mean']:.2f} / {s['vertex_median']:.2f}" if "vertex_mean" in s else "-"
        print(f"| {name} | {s['heads']} ({s['failures']} failed) | {s.get('points_mean', 0):.2f} / "
              f"{s.get('points_median', 0):.2f} | {s.get('surface_mean', 0):.2f} / "
              f"{s.get('surface_median', 0):.2f} | {vertex} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="render random ICT-FaceKit heads with Blender")
    make.add_argument("--textures", required=True, help="folder of face textures in ICT-FaceKit's UV layout")
    make.add_argument("--out", required=True)
    make.add_argument("--count", type=int, default=24)
    make.add_argument("--samples", type=int, default=24, help="Cycles samples per pixel")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(run=generate)
    measure = commands.add_parser("run", help="reconstruct the renders and measure the geometry error")
    measure.add_argument("--data", required=True)
    measure.add_argument("--models", nargs="+", default=["builtin", "ict-facekit", "sfm"])
    measure.add_argument("--device", default="cpu")
    measure.add_argument("--limit", type=int, default=0)
    measure.add_argument("--json")
    measure.set_defaults(run=run)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
