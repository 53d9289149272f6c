"""The glTF 2.0 (.glb) and USD (.usdc) outputs, checked by their own validators and consumers:
the Khronos glTF validator (npm gltf-validator), Blender 5.0.1's own glTF importer, and Pixar's
usd-core (its UsdValidation validators, UsdShade, and UsdSkel evaluating the blend shapes)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend_process import ROOT
from shared_protocol import DEFAULT_OUTPUTS, OUTPUT_KINDS, ReconstructOptions

VALIDATOR_MODULES = Path(os.environ.get("FACERECON_NODE_MODULES", ROOT / ".cache" / "npm" / "node_modules"))
VALIDATOR_SCRIPT = ROOT / "tests" / "tools" / "validate_gltf.js"
TEXTURE_SIZE = 1024
ALL_FORMATS = ReconstructOptions(texture_size=TEXTURE_SIZE, outputs=OUTPUT_KINDS)


def missing(reason: str) -> None:
    """Skip where a tool is absent on a developer's machine; in CI (.ci/run installs it) fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must have it: .ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def results(reconstructor, grace_hopper_bytes, tmp_path_factory, request):
    """One reconstruction per model with every output, written to disk: model -> (folder, model,
    HeadMesh). ICT-FaceKit is installed from ../shared when absent (skips without it)."""
    made = {}
    for model in ("builtin", "ict-facekit"):
        if model != "builtin":
            try:
                request.getfixturevalue("ict_model")
            except pytest.skip.Exception:
                continue
        result = reconstructor.run(grace_hopper_bytes, "grace_hopper.jpg",
                                   ReconstructOptions(texture_size=TEXTURE_SIZE, outputs=OUTPUT_KINDS, model=model))
        folder = tmp_path_factory.mktemp(model)
        for file in result.files:
            (folder / file.name).write_bytes(file.data)
        made[model] = (folder, result.model, result.model.head_mesh(result.faces[0].fit))
    return made


def result_for(results, model: str):
    if model not in results:
        pytest.skip(f"{model} is not installed here (needs ../shared/models)")
    return results[model]


def part_images(folder: Path, model, layout) -> dict[int, Path]:
    """Per part index the PNG (written beside the mesh for the OBJ/MTL) it must show in every
    format, said here independently of the exporter: the textured parts the baked texture, each
    eye's visible part (models/eyes.py) its eye's texture. ICT-FaceKit has both eyes."""
    images = {k: folder / "grace_hopper.png" for k, part in enumerate(layout.parts) if part.textured}
    eyes = getattr(model, "eyes", ())
    for eye in eyes:
        images[eye.part] = folder / f"grace_hopper_eye_{eye.side}.png"
    if model.name == "ict-facekit":
        assert sorted(eye.side for eye in eyes) == ["left", "right"]
    return images


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def split_vertex_count(layout) -> int:
    """glTF's vertex count for a layout, counted here independently of the exporter: one vertex per
    distinct (part, vertex, UV) of the polygon corners."""
    used = layout.polygons >= 0
    parts = np.repeat(layout.polygon_part[:, None], 4, axis=1)[used]
    return len(set(zip(parts.tolist(), layout.polygons[used].tolist(), layout.polygon_uvs[used].tolist())))


def validate_gltf(path: Path) -> dict:
    node = shutil.which("node")
    if node is None or not (VALIDATOR_MODULES / "gltf-validator").is_dir():
        missing(f"the Khronos glTF validator is not installed (node and npm's gltf-validator in {VALIDATOR_MODULES}; "
                "bash .ci/run installs it, or: npm install --prefix .cache/npm gltf-validator)")
    done = subprocess.run([node, str(VALIDATOR_SCRIPT), str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NODE_PATH": str(VALIDATOR_MODULES)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def issues(report: dict) -> list[str]:
    return [f"{m['severity']} {m['code']} {m.get('pointer')}: {m['message']}" for m in report["issues"]["messages"]]


# -- protocol and CLI plumbing --------------------------------------------------------------------------------------

def test_new_formats_are_asked_for_only():
    assert {"glb", "usdc"} <= set(OUTPUT_KINDS)
    assert not {"glb", "usdc"} & set(DEFAULT_OUTPUTS)
    assert ReconstructOptions().outputs == DEFAULT_OUTPUTS
    assert set(DEFAULT_OUTPUTS) == {"obj", "mtl", "png", "json", "neutral_obj", "shape_keys"}


def test_format_option_maps_to_outputs_and_refuses_nonsense():
    from backend_server.cli.facerecon import build_parser, format_list, outputs_of
    assert outputs_of(["obj"]) == DEFAULT_OUTPUTS                     # the default is what it always was
    assert outputs_of(format_list("glb")) == ("json", "glb")           # the texture is inside the .glb
    assert outputs_of(format_list("usdc")) == ("png", "json", "usdc")  # the .usdc refers to the .png
    assert outputs_of(format_list("usdc, GLB,obj")) == OUTPUT_KINDS
    parser = build_parser()
    assert parser.parse_args(["reconstruct", "x.jpg"]).format == ["obj"]
    for bad in (["--format", "fbx"], ["--format", ","], ["--format", "glb", "--uv-only"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["reconstruct", "x.jpg", *bad])


def test_builtin_files_per_format(results):
    folder, _, _ = result_for(results, "builtin")
    assert {p.name for p in folder.iterdir()} == {f"grace_hopper.{s}" for s in ("obj", "mtl", "png", "json", "glb",
                                                                              "usdc")}
    from backend_server.pipeline.export import face_files
    _, model, mesh = results["builtin"]
    texture = np.zeros((64, 64, 3), np.uint8)
    assert [f.name for f in face_files("g", mesh, texture, ("glb",))] == ["g.glb"]
    assert [f.name for f in face_files("g", mesh, texture, ("usdc",))] == ["g.png", "g.usdc"]


def test_part_textures_go_to_every_format(results):
    """A model's part textures (ICT-FaceKit's eyes) are written for the MTL, embedded in the .glb
    and brought along for the .usdc, each PNG once."""
    from backend_server.pipeline.export import face_files
    _, model, mesh = result_for(results, "ict-facekit")
    texture = np.zeros((64, 64, 3), np.uint8)
    eyes = model.part_textures((40, 90, 160))
    assert sorted(key for key, _ in eyes.values()) == ["eye_left", "eye_right"]
    assert [f.name for f in face_files("g", mesh, texture, ("usdc",), eyes)] == [
        "g.png", "g_eye_left.png", "g_eye_right.png", "g.usdc"]
    assert [f.name for f in face_files("g", mesh, texture, ("glb",), eyes)] == ["g.glb"]
    assert [f.name for f in face_files("g", mesh, texture, ("mtl", "png"), eyes)] == [
        "g.mtl", "g.png", "g_eye_left.png", "g_eye_right.png"]
    without = [f for f in face_files("g", mesh, texture, ("glb",)) if f.kind == "glb"][0]
    with_eyes = [f for f in face_files("g", mesh, texture, ("glb",), eyes) if f.kind == "glb"][0]
    assert len(with_eyes.data) > len(without.data) + 2 * 1000          # two eye PNGs inside


# -- glTF -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["builtin", "ict-facekit"])
def test_glb_passes_the_khronos_validator(results, model):
    folder, model_of, mesh = result_for(results, model)
    report = validate_gltf(folder / "grace_hopper.glb")
    print(f"{model}: gltf-validator {report['validatorVersion']}: {report['issues']['numErrors']} errors, "
          f"{report['issues']['numWarnings']} warnings, {report['issues']['numInfos']} infos, "
          f"{report['issues']['numHints']} hints", *issues(report), sep="\n  ")
    assert report["issues"]["numErrors"] == 0, issues(report)
    assert report["issues"]["numWarnings"] == 0, issues(report)
    info = report["info"]
    layout = mesh.layout
    assert info["totalVertexCount"] == split_vertex_count(layout)
    assert info["totalTriangleCount"] == len(layout.triangles)
    assert info["materialCount"] == len(layout.parts) and info["drawCallCount"] == len(layout.parts)
    assert info["hasMorphTargets"] is (len(layout.expression_names) > 0)
    folder_images = sorted(set(part_images(folder, model_of, layout).values()))
    found = [r["image"] for r in info["resources"] if r["pointer"].startswith("/images/")]
    assert sorted((i["width"], i["height"], i["format"], i["transfer"]) for i in found) == sorted(
        (*png_pixels(path.read_bytes()).shape[1::-1], "rgb", "srgb") for path in folder_images)
    assert len(found) == (3 if model == "ict-facekit" else 1)          # the face's texture and each eye's


@pytest.mark.parametrize("model", ["builtin", "ict-facekit"])
def test_glb_materials_embed_the_image_each_part_takes(results, model):
    """Each material's baseColorTexture is the PNG embedded in the .glb, pixel for pixel the file
    the OBJ's MTL names for that part: the baked texture, and each eye's painted texture (iris,
    pupil, sclera) on its eye material; plain parts have none."""
    import pygltflib
    folder, model_of, mesh = result_for(results, model)
    gltf = pygltflib.GLTF2.load_from_bytes((folder / "grace_hopper.glb").read_bytes())
    blob = gltf.binary_blob()
    expected = part_images(folder, model_of, mesh.layout)
    mtl = (folder / "grace_hopper.mtl").read_text()
    assert len(gltf.materials) == len(mesh.layout.parts)
    for k, material in enumerate(gltf.materials):
        texture = material.pbrMetallicRoughness.baseColorTexture
        if k not in expected:
            assert texture is None, material.name
            continue
        image = gltf.images[gltf.textures[texture.index].source]
        assert image.mimeType == "image/png" and image.uri is None                 # embedded, not beside it
        view = gltf.bufferViews[image.bufferView]
        embedded = png_pixels(blob[view.byteOffset:view.byteOffset + view.byteLength])
        assert np.array_equal(embedded, png_pixels(expected[k].read_bytes())), (material.name, expected[k].name)
        assert f"newmtl {material.name}\n" in mtl                                # OBJ/MTL: the same file
        assert mtl.split(f"newmtl {material.name}\n")[1].split("newmtl")[0].count(f"map_Kd {expected[k].name}\n") == 1
    eye_materials = [gltf.materials[eye.part] for eye in getattr(model_of, "eyes", ())]
    for material in eye_materials:                                                  # a painted eye, not a flat colour
        image = gltf.images[gltf.textures[material.pbrMetallicRoughness.baseColorTexture.index].source]
        assert image.name.startswith("grace_hopper_eye_")
        view = gltf.bufferViews[image.bufferView]
        pixels = png_pixels(blob[view.byteOffset:view.byteOffset + view.byteLength])
        assert pixels.min(axis=2).max() > 190 and pixels.max(axis=2).min() < 40      # white sclera, dark pupil
    assert len(eye_materials) == (2 if model == "ict-facekit" else 0)


def test_the_validator_finds_a_broken_glb(results, tmp_path):
    """The check bites: one position bound made wrong is an error the validator reports."""
    import pygltflib
    folder, _, _ = result_for(results, "builtin")
    gltf = pygltflib.GLTF2.load_from_bytes((folder / "grace_hopper.glb").read_bytes())
    position = gltf.meshes[0].primitives[0].attributes.POSITION
    gltf.accessors[position].max[1] += 0.5
    broken = tmp_path / "broken.glb"
    broken.write_bytes(b"".join(gltf.save_to_bytes()))
    report = validate_gltf(broken)
    assert report["issues"]["numErrors"] >= 1
    assert "ACCESSOR_MAX_MISMATCH" in {m["code"] for m in report["issues"]["messages"]}


def blender_import(glb: Path, work: Path) -> tuple[dict, dict]:
    pytest.importorskip("bpy", reason="bpy 5.0.1 (Blender as a Python module) is in the test extra")
    arrays = work / "blender.npz"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "blender_gltf_import.py"), str(glb), str(arrays)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BLENDER_USER_RESOURCES": str(work / "blender_user")})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), dict(np.load(arrays))


def from_blender(points: np.ndarray) -> np.ndarray:
    """Blender's frame (+Z up, the glTF importer's conversion) back to glTF's (+Y up)."""
    return np.stack([points[:, 0], points[:, 2], -points[:, 1]], axis=1)


@pytest.mark.parametrize("model", ["builtin", "ict-facekit"])
def test_blender_imports_the_glb_with_texture_and_shape_keys(results, model, tmp_path):
    from backend_server.pipeline.export_gltf import gltf_layout
    folder, model_of, mesh = result_for(results, model)
    facts, arrays = blender_import(folder / "grace_hopper.glb", tmp_path)
    layout = mesh.layout
    assert facts["operator"] == ["FINISHED"] and facts["objects_added"] == 1 and facts["meshes"] == 1
    assert facts["name"] == "grace_hopper"
    assert facts["vertices"] == split_vertex_count(layout)
    assert facts["polygons"] == len(layout.triangles)                  # glTF carries triangles
    assert facts["uv_layers"] == ["UVMap"]
    assert [m["name"] for m in facts["materials"]] == [f"grace_hopper{'' if p.textured else '_' + p.name}"
                                                       for p in layout.parts]
    assert facts["material_use"] == list(range(len(layout.parts)))
    expected = part_images(folder, model_of, layout)
    images = {image["name"]: image for image in facts["images"]}
    assert len(images) == len(set(expected.values())) == (3 if model == "ict-facekit" else 1)
    for k, (material, part) in enumerate(zip(facts["materials"], layout.parts)):
        if k in expected:                  # the face's texture; an eye's material: its eye's texture
            assert material["base_color_from"] == ["TEX_IMAGE"], material
            image = images[material["image"]]
            assert image["packed"] and image["colour_space"] == "sRGB"
            truth = png_pixels(expected[k].read_bytes())
            assert image["size"] == [truth.shape[1], truth.shape[0]]
            shown = np.round(arrays[f"image:{image['name']}"][::-1, :, :3] * 255.0)   # Blender: bottom row first
            assert np.abs(shown - truth).max() <= 1, (material["name"], expected[k].name)
        else:
            assert material["base_color_from"] == [] and material["image"] is None
            if not part.skin:
                assert material["colour"] == pytest.approx(part.colour, abs=1e-6)
    # Where Blender put each vertex: glTF vertex i is model vertex source[i] (the exporter's split);
    # with the shape keys at their imported values the mesh is the fitted head, the Basis the neutral one.
    source = gltf_layout(layout).source
    shown = from_blender(arrays["shown"])
    assert np.abs(shown - mesh.posed[source]).max() < 2e-5
    if layout.expression_names:
        assert [k["name"] for k in facts["keys"]] == ["Basis", *layout.expression_names]
        assert [k["value"] for k in facts["keys"][1:]] == pytest.approx(mesh.expression.tolist(), abs=1e-6)
        assert {k["relative_to"] for k in facts["keys"]} == {"Basis"}
        assert mesh.expression.max() > 0.05                                # a real expression was fitted
        basis = from_blender(arrays["basis"])
        assert np.abs(basis - mesh.neutral[source]).max() < 1e-6
        assert np.abs(mesh.posed - mesh.neutral).max() > 1e-3              # so the keys matter
    else:
        assert facts["keys"] == []


# -- USD ------------------------------------------------------------------------------------------------------------

def open_usd(path: Path):
    pxr = pytest.importorskip("pxr", reason="usd-core (Pixar's USD) is in the backend extra")
    stage = pxr.Usd.Stage.Open(str(path))
    assert stage is not None
    return stage


def usd_validation_errors(stage) -> list[str]:
    from pxr import UsdValidation
    validators = UsdValidation.ValidationRegistry().GetOrLoadAllValidators()
    assert len(validators) >= 20                       # geometry, shading, skeleton, stage metadata, ...
    return [f"{e.GetName()}: {e.GetMessage()}" for e in UsdValidation.ValidationContext(validators).Validate(stage)
            if e.GetType() != UsdValidation.ValidationErrorType.Info]


@pytest.mark.parametrize("model", ["builtin", "ict-facekit"])
def test_usdc_passes_usd_validation_and_holds_mesh_uvs_and_materials(results, model):
    from pxr import Sdf, UsdGeom, UsdShade
    folder, model_of, mesh = result_for(results, model)
    stage = open_usd(folder / "grace_hopper.usdc")
    assert usd_validation_errors(stage) == []
    assert UsdGeom.GetStageUpAxis(stage) == "Y" and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    root = stage.GetDefaultPrim()
    assert root.GetPath() == Sdf.Path("/grace_hopper")
    geometry = UsdGeom.Mesh(stage.GetPrimAtPath("/grace_hopper/Mesh"))
    layout = mesh.layout
    points = np.array(geometry.GetPointsAttr().Get())
    assert len(points) == len(mesh.posed)
    counts = np.array(geometry.GetFaceVertexCountsAttr().Get())
    assert len(counts) == len(layout.polygons) and counts.sum() == (layout.polygons >= 0).sum()
    assert geometry.GetSubdivisionSchemeAttr().Get() == "none"
    st = UsdGeom.PrimvarsAPI(geometry).GetPrimvar("st")
    assert st.GetInterpolation() == "faceVarying" and st.IsIndexed()
    assert np.allclose(np.array(st.ComputeFlattened()), layout.uvs[layout.polygon_uvs[layout.polygon_uvs >= 0]],
                       atol=1e-6)
    subsets = UsdShade.MaterialBindingAPI(geometry).GetMaterialBindSubsets()
    assert len(subsets) == len(layout.parts)
    expected = part_images(folder, model_of, layout)
    eye_files = set()
    for k, (subset, part) in enumerate(zip(subsets, layout.parts)):
        assert np.array_equal(np.array(subset.GetIndicesAttr().Get()), np.flatnonzero(layout.polygon_part == k))
        material, _ = UsdShade.MaterialBindingAPI(subset).ComputeBoundMaterial()
        surface = material.ComputeSurfaceSource()[0]
        assert surface.GetIdAttr().Get() == "UsdPreviewSurface"
        diffuse = surface.GetInput("diffuseColor")
        if k in expected:                  # the face's texture; an eye's material: its eye's texture
            texture = UsdShade.Shader(diffuse.GetConnectedSources()[0][0].source.GetPrim())
            assert texture.GetIdAttr().Get() == "UsdUVTexture"
            assert texture.GetInput("sourceColorSpace").Get() == "sRGB"
            file = texture.GetInput("file").Get()
            assert Path(file.resolvedPath) == expected[k] and Path(file.resolvedPath).is_file()
            if expected[k].name.startswith("grace_hopper_eye_"):
                eye_files.add(expected[k].name)
        else:
            assert not diffuse.HasConnectedSource()
            if not part.skin:
                assert tuple(diffuse.Get()) == pytest.approx(part.colour, abs=1e-6)
    assert eye_files == ({"grace_hopper_eye_left.png", "grace_hopper_eye_right.png"} if model == "ict-facekit"
                         else set())


def test_usd_validation_finds_a_broken_stage():
    """The check bites: no up axis, no unit, a material binding without its API are errors."""
    pytest.importorskip("pxr", reason="usd-core (Pixar's USD) is in the backend extra")
    from pxr import Usd, UsdGeom, UsdShade
    stage = Usd.Stage.CreateInMemory()
    mesh = UsdGeom.Mesh.Define(stage, "/head")
    mesh.CreateFaceVertexCountsAttr([3])
    stage.SetDefaultPrim(mesh.GetPrim())
    subset = UsdGeom.Subset.CreateGeomSubset(mesh, "face", "face", [0], "materialBind", "nonOverlapping")
    UsdShade.MaterialBindingAPI(subset.GetPrim()).GetDirectBindingRel().SetTargets(["/head/Looks/skin"])
    names = {error.split(":")[0] for error in usd_validation_errors(stage)}
    assert {"MissingUpAxisMetadata", "MissingMetersPerUnitMetadata", "MissingMaterialBindingAPI"} <= names


@pytest.mark.parametrize("model", ["builtin", "ict-facekit"])
def test_usdskel_poses_the_neutral_mesh_with_the_fitted_blend_shapes(results, model):
    from pxr import Usd, UsdGeom, UsdSkel
    folder, _, mesh = result_for(results, model)
    stage = open_usd(folder / "grace_hopper.usdc")
    geometry = UsdGeom.Mesh(stage.GetPrimAtPath("/grace_hopper/Mesh"))
    points = np.array(geometry.GetPointsAttr().Get())
    names = mesh.layout.expression_names
    if not names:
        assert not stage.GetDefaultPrim().IsA(UsdSkel.Root)
        assert np.abs(points - mesh.posed).max() < 1e-6
        return
    assert np.abs(points - mesh.neutral).max() < 1e-6                 # the rest shape is the neutral face
    binding = UsdSkel.BindingAPI(geometry)
    assert list(binding.GetBlendShapesAttr().Get()) == list(names)    # ARKit names for ICT-FaceKit
    assert len(binding.GetBlendShapeTargetsRel().GetTargets()) == len(names)
    animation = UsdSkel.Animation(stage.GetPrimAtPath("/grace_hopper/Skel/Anim"))
    assert list(animation.GetBlendShapesAttr().Get()) == list(names)
    assert np.array(animation.GetBlendShapeWeightsAttr().Get()) == pytest.approx(mesh.expression, abs=1e-6)
    assert UsdSkel.BakeSkinning(stage.Traverse())                     # UsdSkel applies the blend shapes
    baked = np.array(geometry.GetPointsAttr().Get(Usd.TimeCode.Default()))
    assert np.abs(baked - mesh.posed).max() < 2e-5                    # = the fitted face
    assert np.abs(mesh.posed - mesh.neutral).max() > 1e-3


def test_command_line_writes_the_formats_asked_for_and_skips_them_when_done(tmp_path, grace_hopper_bytes):
    photo = tmp_path / "hopper.jpg"
    photo.write_bytes(grace_hopper_bytes)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "backend_server.cli.facerecon", "reconstruct", str(photo), "-o", str(out),
               "--texture-size", "256", "--format", "glb,usdc", "-q"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert {p.name for p in out.iterdir()} == {"hopper.glb", "hopper.usdc", "hopper.png", "hopper.json"}
    assert (out / "hopper.glb").read_bytes()[:4] == b"glTF"
    assert (out / "hopper.usdc").read_bytes()[:8] == b"PXR-USDC"
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 done, 0 failed, 1 skipped" in again.stdout
    (out / "hopper.glb").unlink()                                       # a missing format is redone
    third = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "1 done" in third.stdout and (out / "hopper.glb").is_file()
    refused = subprocess.run(command[:-3] + ["--format", "fbx"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "formats are obj, glb, usdc" in refused.stderr
