"""USD crate file (`NAME.usdc`) of one head: for film pipelines, Omniverse, usdview, Houdini.

Format code only (no bpy, no model kinds), from a `HeadMesh` (head frame, metres, +Y up, the face
toward +Z), how each part looks (`export.PartLook`) and the file names of the images the looks
name (PNG files beside the .usdc; a .usdc cannot hold them):

    /NAME                       the stage's default prim (upAxis Y, metersPerUnit 1): a SkelRoot
                                when the model has expressions, else an Xform
        Skel                    (expressions only) Skeleton without joints, its animation source:
            Anim                SkelAnimation: blendShapes (the expression names), blendShapeWeights
                                (the fitted weights)
        Mesh                    polygons as in the model (triangles and quads, subdivisionScheme
                                none, right-handed = counter-clockwise), points = the neutral mesh
                                when the model has expressions (UsdSkel adds the weighted
                                offsets), else the fitted mesh; primvars:st per face corner
                                (indexed, origin bottom-left); SkelBindingAPI: skel:blendShapes,
                                skel:blendShapeTargets; one GeomSubset per part (materialBind)
            <expression>        (expressions only) BlendShape: offsets (metres per unit weight) and pointIndices
                                (the vertices it moves)
        Looks/<material>        UsdPreviewSurface: diffuseColor from a UsdUVTexture (sRGB) of the
                                part's image, or a plain linear colour; roughness 0.6, metallic 0

Written with Pixar's usd-core; checked with its UsdValidation validators in the tests.
"""
from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..models.face_model import HeadMesh, MeshLayout

if TYPE_CHECKING:
    from .export import PartLook

BLEND_SHAPE_MIN_OFFSET_M = 1e-5     # a vertex moved less than this by an expression is left out of its shape
ROUGHNESS = 0.6


@lru_cache(maxsize=8)
def _layout_arrays(layout: MeshLayout
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """faceVertexCounts, faceVertexIndices, st indices (in that corner order) and per expression
    its moved vertex ids and offsets (float32): what every USD of one layout shares."""
    corners = np.where(layout.polygons[:, 3] >= 0, 4, 3).astype(np.int32)
    used = layout.polygons >= 0
    indices = layout.polygons[used].astype(np.int32)             # row-major: each polygon's corners in order
    st_indices = layout.polygon_uvs[used].astype(np.int32)
    shapes = []
    basis = layout.expression_basis if layout.expression_basis is not None else ()
    for offsets in basis:
        moved = np.flatnonzero(np.abs(offsets).max(axis=1) >= BLEND_SHAPE_MIN_OFFSET_M)
        shapes.append((moved.astype(np.int32), np.asarray(offsets)[moved].astype(np.float32)))
    return corners, indices, st_indices, shapes


def usdc_bytes(name: str, mesh: HeadMesh, looks: Sequence[PartLook], image_files: Mapping[str, str]) -> bytes:
    """The head as a .usdc. looks: one per `mesh.layout.parts` entry; image_files: the file name
    (beside the .usdc) of every image a look names."""
    from pxr import Gf, Sdf, Tf, Usd, UsdGeom, UsdShade, UsdSkel, Vt

    layout = mesh.layout
    corners, indices, st_indices, shapes = _layout_arrays(layout)
    morphs = mesh.neutral is not None and len(shapes) > 0
    base = mesh.neutral if morphs and mesh.neutral is not None else mesh.posed

    stage = Usd.Stage.CreateInMemory()
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    root_path = Sdf.Path("/" + Tf.MakeValidIdentifier(name))
    root = (UsdSkel.Root if morphs else UsdGeom.Xform).Define(stage, root_path).GetPrim()
    stage.SetDefaultPrim(root)
    Usd.ModelAPI(root).SetKind("component")

    geometry = UsdGeom.Mesh.Define(stage, root_path.AppendChild("Mesh"))
    geometry.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
    geometry.CreateOrientationAttr(UsdGeom.Tokens.rightHanded)
    geometry.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(corners))
    geometry.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(indices))
    points = np.asarray(base, np.float64).astype(np.float32)
    geometry.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
    geometry.CreateExtentAttr(Vt.Vec3fArray([Gf.Vec3f(*points.min(axis=0).tolist()),
                                             Gf.Vec3f(*points.max(axis=0).tolist())]))
    st = UsdGeom.PrimvarsAPI(geometry).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray,
                                                     UsdGeom.Tokens.faceVarying)
    st.Set(Vt.Vec2fArray.FromNumpy(np.asarray(layout.uvs, np.float32)))
    st.SetIndices(Vt.IntArray.FromNumpy(st_indices))

    materials = _materials(stage, root_path.AppendChild("Looks"), looks, image_files)
    UsdShade.MaterialBindingAPI.Apply(geometry.GetPrim())
    for k, (look, material) in enumerate(zip(looks, materials)):
        faces = np.flatnonzero(layout.polygon_part == k).astype(np.int32)
        if not len(faces):
            continue
        subset = UsdGeom.Subset.CreateGeomSubset(geometry, Tf.MakeValidIdentifier(look.material),
                                                 UsdGeom.Tokens.face, Vt.IntArray.FromNumpy(faces),
                                                 UsdShade.Tokens.materialBind, UsdGeom.Tokens.nonOverlapping)
        UsdShade.MaterialBindingAPI.Apply(subset.GetPrim()).Bind(material)
    UsdGeom.Subset.SetFamilyType(geometry, UsdShade.Tokens.materialBind, UsdGeom.Tokens.partition
                                 if all((layout.polygon_part == k).any() for k in range(len(looks)))
                                 else UsdGeom.Tokens.nonOverlapping)

    if morphs:
        names = list(layout.expression_names)
        skeleton = UsdSkel.Skeleton.Define(stage, root_path.AppendChild("Skel"))
        animation = UsdSkel.Animation.Define(stage, skeleton.GetPath().AppendChild("Anim"))
        animation.CreateBlendShapesAttr(Vt.TokenArray(names))
        animation.CreateBlendShapeWeightsAttr(Vt.FloatArray.FromNumpy(
            np.clip(np.asarray(mesh.expression, np.float32), 0.0, 1.0)))
        UsdSkel.BindingAPI.Apply(skeleton.GetPrim()).CreateAnimationSourceRel().SetTargets([animation.GetPath()])
        binding = UsdSkel.BindingAPI.Apply(geometry.GetPrim())
        binding.CreateSkeletonRel().SetTargets([skeleton.GetPath()])
        binding.CreateBlendShapesAttr(Vt.TokenArray(names))
        targets = []
        for shape_name, (moved, offsets) in zip(names, shapes):
            shape = UsdSkel.BlendShape.Define(stage, geometry.GetPath().AppendChild(Tf.MakeValidIdentifier(shape_name)))
            shape.CreateOffsetsAttr(Vt.Vec3fArray.FromNumpy(offsets.reshape(-1, 3)))
            shape.CreatePointIndicesAttr(Vt.IntArray.FromNumpy(moved))
            targets.append(shape.GetPath())
        binding.CreateBlendShapeTargetsRel().SetTargets(targets)

    with tempfile.TemporaryDirectory(prefix="facerecon-usd-") as folder:
        path = os.path.join(folder, "head.usdc")
        if not stage.GetRootLayer().Export(path):
            raise RuntimeError(f"usd-core could not write {name}.usdc")
        with open(path, "rb") as file:
            return file.read()


def _materials(stage, looks_path, looks: Sequence[PartLook], image_files: Mapping[str, str]) -> list:
    """One UsdPreviewSurface material per look, under `looks_path`."""
    from pxr import Gf, Sdf, Tf, UsdGeom, UsdShade
    UsdGeom.Scope.Define(stage, looks_path)
    materials = []
    for look in looks:
        material = UsdShade.Material.Define(stage, looks_path.AppendChild(Tf.MakeValidIdentifier(look.material)))
        surface = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("Surface"))
        surface.CreateIdAttr("UsdPreviewSurface")
        surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(ROUGHNESS)
        surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
        diffuse = surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f)
        if look.image is not None:
            reader = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("UV"))
            reader.CreateIdAttr("UsdPrimvarReader_float2")
            reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
            texture = UsdShade.Shader.Define(stage, material.GetPath().AppendChild("Texture"))
            texture.CreateIdAttr("UsdUVTexture")
            texture.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(Sdf.AssetPath(f"./{image_files[look.image]}"))
            texture.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
            texture.CreateInput("wrapS", Sdf.ValueTypeNames.Token).Set("clamp")
            texture.CreateInput("wrapT", Sdf.ValueTypeNames.Token).Set("clamp")
            texture.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(
                reader.ConnectableAPI(), "result")
            diffuse.ConnectToSource(texture.ConnectableAPI(), "rgb")
        else:
            diffuse.Set(Gf.Vec3f(*(float(np.clip(c, 0.0, 1.0)) for c in look.colour)))
        material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
        materials.append(material)
    return materials
