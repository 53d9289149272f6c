"""Fast shaded rendering: a textured, lit mesh seen by a camera, on the CPU or on CUDA (batched).

The synthetic data's fast renderer beside Cycles (`backend_server.synthetic.cycles`); both take the
same `Light`. Rasterization is the project's own (`rasterize.rasterize` on the CPU,
`rasterize_cuda.rasterize_batch` on CUDA, one contract); everything after it (normals, texture
lookup, lighting, colour encoding) is one torch implementation that runs on either device.

Conventions, written once here (the de-lighting of later work fits the same model to photos):

- Colour: albedo textures and vertex colours are sRGB-encoded (uint8, or float 0..1). Shading
  happens in linear RGB (sRGB decoded, IEC 61966-2-1); the result is sRGB-encoded, clipped to
  [0, 1] and rounded to uint8, as Cycles does with the "Standard" view transform at exposure 0.
- Light: the radiance leaving a surface point of linear albedo `a` and unit normal `n` is
  `a * shading(n)` per colour channel c, with
      shading_c(n) = sum_k sh[c, k] Y_k(n) + sum_suns colour_c * max(0, n . direction)
  Lambert only: no cast shadows, no interreflection, no specular.
- Y_k, the 9 real spherical harmonics of bands 0-2, orthonormal on the unit sphere, in this order
  (n = (x, y, z) in the light's frame):
      Y0 = 0.282095                 Y1 = 0.488603 y            Y2 = 0.488603 z
      Y3 = 0.488603 x               Y4 = 1.092548 x y          Y5 = 1.092548 y z
      Y6 = 0.315392 (3 z^2 - 1)     Y7 = 1.092548 x z          Y8 = 0.546274 (x^2 - y^2)
  `sh` holds coefficients of the *shading* (irradiance / pi: the incoming radiance already
  convolved with the clamped cosine), not of the incoming radiance. An environment of radiance
  L(w) = sum_k l_k Y_k(w) gives sh_k = l_k * A_band / pi, A_0 = pi, A_1 = 2 pi / 3, A_2 = pi / 4
  (Ramamoorthi and Hanrahan 2001); so a uniform environment of radiance L gives shading L, i.e.
  sh_0 = L / 0.282095.
- Sun: `colour` is the shading the sun adds at normal incidence (linear RGB); Cycles' sun
  strength (irradiance, W/m^2) for the same light is pi * colour.
- Frames: a light's directions and SH live in the frame of the normals it shades. `render` shades
  camera-frame normals, so pass a light in the camera frame: `light.rotated(pose.rotation)` turns
  a head-frame light into the camera frame of that pose.
- Screen and camera: `backend_server.geometry` (camera frame metres, +Y up, +Z toward the viewer;
  pixels x right, y down, centres at +0.5); UV origin bottom-left, texture row 0 at the top.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..geometry import Camera
from .rasterize import rasterize

SH_CONSTANTS = (0.282095, 0.488603, 0.488603, 0.488603, 1.092548, 1.092548, 0.315392, 1.092548, 0.546274)
SH_BAND_OF = (0, 1, 1, 1, 2, 2, 2, 2, 2)
COSINE_LOBE = (np.pi, 2 * np.pi / 3, np.pi / 4)      # A_l: clamped-cosine convolution per band


def _sh_terms(x: Any, y: Any, z: Any) -> list[Any]:
    c = SH_CONSTANTS
    return [c[0] * (x * 0 + 1), c[1] * y, c[2] * z, c[3] * x, c[4] * x * y, c[5] * y * z,
            c[6] * (3 * z * z - 1), c[7] * x * z, c[8] * (x * x - y * y)]


def sh_basis(normals: np.ndarray) -> np.ndarray:
    """(..., 3) unit vectors -> (..., 9) the real SH basis above."""
    return np.stack(_sh_terms(normals[..., 0], normals[..., 1], normals[..., 2]), axis=-1)


def sh_basis_torch(normals: torch.Tensor) -> torch.Tensor:
    """The torch twin of sh_basis."""
    return torch.stack(_sh_terms(normals[..., 0], normals[..., 1], normals[..., 2]), dim=-1)


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded 0..1 -> linear 0..1."""
    return np.where(srgb <= 0.04045, srgb / 12.92, ((np.maximum(srgb, 0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear -> sRGB-encoded, clipped to 0..1."""
    v = np.clip(linear, 0, 1)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


SRGB_LUT_SIZE = 16384
SRGB8_OF_LINEAR = np.rint(linear_to_srgb(np.arange(SRGB_LUT_SIZE) / (SRGB_LUT_SIZE - 1)) * 255).astype(np.uint8)


def srgb8_of_linear(linear: np.ndarray) -> np.ndarray:
    """float32 linear RGB -> uint8 sRGB through a SRGB_LUT_SIZE table (within 0.2 of a level);
    `linear` is overwritten."""
    np.clip(linear, 0.0, 1.0, out=linear)
    linear *= SRGB_LUT_SIZE - 1
    linear += 0.5
    return SRGB8_OF_LINEAR[linear.astype(np.int32)]


def srgb_to_linear_torch(srgb: torch.Tensor) -> torch.Tensor:
    return torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb.clamp_min(0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb_torch(linear: torch.Tensor) -> torch.Tensor:
    v = linear.clamp(0, 1)
    return torch.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


@dataclass(frozen=True)
class Sun:
    """A directional light: `direction` (3,) unit, pointing toward the light; `colour` (3,) the
    linear shading it adds at normal incidence; `angle_deg` its angular diameter (soft shadows in
    Cycles; the fast renderer casts no shadows and ignores it)."""

    direction: np.ndarray
    colour: np.ndarray
    angle_deg: float = 2.0


@dataclass(frozen=True)
class Light:
    """Shading = SH part + suns (see the module docstring). sh: (3, 9) per linear RGB channel."""

    sh: np.ndarray
    suns: tuple[Sun, ...] = ()

    @classmethod
    def ambient(cls, rgb: tuple[float, float, float] | np.ndarray, suns: tuple[Sun, ...] = ()) -> Light:
        """A uniform environment of linear radiance `rgb` (shading `rgb` on every normal), plus suns."""
        sh = np.zeros((3, 9))
        sh[:, 0] = np.asarray(rgb, np.float64) / SH_CONSTANTS[0]
        return cls(sh, suns)

    def shading(self, normals: np.ndarray) -> np.ndarray:
        """(N, 3) unit normals (this light's frame) -> (N, 3) linear shading (numpy reference)."""
        out = sh_basis(normals) @ np.asarray(self.sh, np.float64).T
        for sun in self.suns:
            out = out + np.maximum(normals @ np.asarray(sun.direction, np.float64), 0)[:, None] * sun.colour
        return out

    def rotated(self, rotation: np.ndarray) -> Light:
        """The same light in a frame where every direction d becomes rotation @ d (e.g. a head-frame
        light -> the camera frame of a pose). SH rotated exactly by least squares on 64 directions
        (bands 0-2 are closed under rotation)."""
        directions = fibonacci_sphere(64)
        basis_rotated = sh_basis(directions @ np.asarray(rotation).T)            # Y(R d)
        values = sh_basis(directions) @ np.asarray(self.sh, np.float64).T           # f(d), (64, 3)
        sh = np.linalg.lstsq(basis_rotated, values, rcond=None)[0].T               # g(R d) = f(d)
        suns = tuple(replace(s, direction=np.asarray(rotation) @ s.direction) for s in self.suns)
        return Light(sh, suns)

    def radiance_sh(self) -> np.ndarray:
        """(3, 9) SH coefficients of the incoming radiance whose diffuse shading is `sh` (for an
        environment map in Cycles): l_k = sh_k * pi / A_band."""
        factor = np.array([np.pi / COSINE_LOBE[b] for b in SH_BAND_OF])
        return np.asarray(self.sh, np.float64) * factor

    def to_json(self) -> dict:
        return {"sh": np.asarray(self.sh).tolist(),
                "suns": [{"direction": np.asarray(s.direction).tolist(), "colour": np.asarray(s.colour).tolist(),
                          "angle_deg": s.angle_deg} for s in self.suns],
                "convention": "backend_server.render.shade (shading SH, linear RGB)"}

    @classmethod
    def from_json(cls, value: dict) -> Light:
        return cls(np.array(value["sh"], np.float64),
                   tuple(Sun(np.array(s["direction"]), np.array(s["colour"]), float(s["angle_deg"]))
                         for s in value["suns"]))


def fibonacci_sphere(count: int) -> np.ndarray:
    """(count, 3) nearly uniform unit vectors."""
    k = np.arange(count) + 0.5
    z = 1 - 2 * k / count
    phi = np.pi * (1 + 5 ** 0.5) * k
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


@dataclass(frozen=True, eq=False)
class RenderMesh:
    """A mesh ready to render: triangles (F, 3) over *render vertices* (one per distinct
    (vertex, UV) pair), counter-clockwise seen from outside; per render vertex its UV (R, 2) and
    its vertex `vertex_of` (R,) in the caller's vertex array; `colours` (R, 3) sRGB 0..1 used on
    triangles that are not `textured` (F,) bool. Normals are computed per vertex over all
    triangles (smooth across UV seams)."""

    triangles: np.ndarray
    uvs: np.ndarray
    vertex_of: np.ndarray
    colours: np.ndarray
    textured: np.ndarray
    vertex_triangles: np.ndarray = field(init=False)   # (F, 3) the triangles over vertices
    _on_device: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vertex_triangles", self.vertex_of[self.triangles])

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The arrays as tensors on `device`, made once per device: triangles, vertex_of,
        vertex_triangles, textured, and `attributes` (R, 5) = UV and colour per render vertex."""
        key = str(device)
        if key not in self._on_device:
            attributes = np.concatenate([self.uvs, self.colours], axis=1)
            self._on_device[key] = {
                "triangles": torch.as_tensor(self.triangles, dtype=torch.int64, device=device),
                "vertex_of": torch.as_tensor(self.vertex_of, dtype=torch.int64, device=device),
                "vertex_triangles": torch.as_tensor(self.vertex_triangles, dtype=torch.int64, device=device),
                "textured": torch.as_tensor(self.textured, dtype=torch.bool, device=device),
                "attributes": torch.as_tensor(attributes, dtype=torch.float32, device=device)}
        return self._on_device[key]

    @classmethod
    def textured_only(cls, triangles: np.ndarray, uvs: np.ndarray, vertex_of: np.ndarray | None = None) -> RenderMesh:
        """Every triangle takes the texture (a reconstruction's UV topology, the built-in mesh)."""
        count = len(uvs)
        return cls(np.asarray(triangles, np.int64), np.asarray(uvs, np.float64),
                   np.arange(count) if vertex_of is None else np.asarray(vertex_of, np.int64),
                   np.zeros((count, 3), np.float32), np.ones(len(triangles), bool))


@dataclass(frozen=True)
class Rendering:
    """rgb: (H, W, 3) uint8 sRGB, background outside the mesh; mask: (H, W) bool, pixels the mesh
    covers (at least half of a pixel's samples when supersampled)."""

    rgb: np.ndarray
    mask: np.ndarray


def vertex_normals_torch(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) vertices, (F, 3) triangles -> (B, V, 3) area-weighted unit normals (outward for
    counter-clockwise triangles); the torch twin of geometry.vertex_normals."""
    a, b, c = (vertices[:, triangles[:, k]] for k in range(3))
    face = torch.cross(b - a, c - a, dim=-1)
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals.index_add_(1, triangles[:, k], face)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def sample_texture(albedo: torch.Tensor, image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookups (N, 3) in textures (B, S, S, 3) (float 0..1, or uint8 0..255: only the
    texels looked up are converted) at UVs (N, 2) of images (N,) (texel centres at +0.5, the nearest
    border texel outside: `geometry.sample_bilinear`'s rule)."""
    size = albedo.shape[1]
    x = uv[:, 0] * size - 0.5
    y = (1 - uv[:, 1]) * size - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    flat = albedo.reshape(-1, 3)
    col0, col1 = x0.long().clamp(0, size - 1), (x0.long() + 1).clamp(0, size - 1)
    row0 = image * size * size + y0.long().clamp(0, size - 1) * size
    row1 = image * size * size + (y0.long() + 1).clamp(0, size - 1) * size

    scale = 1 / 255.0 if albedo.dtype == torch.uint8 else 1.0

    def at(index: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, index).float() * scale

    top = torch.lerp(at(row0 + col0), at(row0 + col1), fx)
    bottom = torch.lerp(at(row1 + col0), at(row1 + col1), fx)
    return torch.lerp(top, bottom, fy)


def shade_pixels(mesh: RenderMesh, triangle: torch.Tensor, bary: torch.Tensor, vertices: torch.Tensor,
                 albedo: torch.Tensor, sh: torch.Tensor | None, suns: list[list[Sun]],
                 background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-independent half: per pixel (B, H, W) triangle ids (-1 none) and barycentrics
    (B, H, W, 3), camera-frame vertices (B, V, 3), albedo (B, S, S, 3) sRGB (float 0..1 or uint8), SH (B, 3, 9)
    (None: unlit, the albedo itself), suns per image -> (linear RGB (B, H, W, 3), coverage (B, H, W)).
    Only covered pixels are computed."""
    device = vertices.device
    arrays = mesh.tensors(device)
    batch, height, width = triangle.shape
    pixel = torch.nonzero(triangle.reshape(-1) >= 0).squeeze(1)
    image = torch.div(pixel, height * width, rounding_mode="floor")
    face = triangle.reshape(-1).index_select(0, pixel)
    corners = arrays["triangles"].index_select(0, face)                                          # (N, 3)
    weights = bary.reshape(-1, 3).index_select(0, pixel)                                         # (N, 3)

    def interpolate(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = values.index_select(0, ids[:, 0]) * weights[:, :1]
        out.addcmul_(values.index_select(0, ids[:, 1]), weights[:, 1:2])
        return out.addcmul_(values.index_select(0, ids[:, 2]), weights[:, 2:])

    attributes = interpolate(arrays["attributes"], corners)                                     # (N, 5)
    textured = arrays["textured"].index_select(0, face)
    colour = attributes[:, 2:]
    if bool(textured.any()):
        colour = torch.where(textured[:, None], sample_texture(albedo, image, attributes[:, :2]), colour)
    colour = srgb_to_linear_torch(colour)
    if sh is not None:
        normals = vertex_normals_torch(vertices, arrays["vertex_triangles"])
        vertex = (arrays["vertex_of"].index_select(0, corners.reshape(-1)).reshape(-1, 3)
                  + image[:, None] * vertices.shape[1])
        normal = interpolate(normals.reshape(-1, 3), vertex)
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        basis = sh_basis_torch(normal)                                                           # (N, 9)
        counts = torch.bincount(image, minlength=batch).tolist()          # pixels are in image order
        shading = torch.cat([chunk @ sh[b].T for b, chunk in enumerate(basis.split(counts))])    # (N, 3)
        for b, (chunk, image_suns) in enumerate(zip(normal.split(counts), suns)):
            part = shading[sum(counts[:b]):sum(counts[:b + 1])]
            for sun in image_suns:
                direction = torch.as_tensor(sun.direction, dtype=torch.float32, device=device)
                tint = torch.as_tensor(sun.colour, dtype=torch.float32, device=device)
                part.add_((chunk @ direction).clamp_min(0)[:, None] * tint)
        colour = colour * shading
    linear = background.expand(batch * height * width, 3).clone()
    linear[pixel] = colour
    coverage = torch.zeros(batch * height * width, device=device)
    coverage[pixel] = 1.0
    return linear.reshape(batch, height, width, 3), coverage.reshape(batch, height, width)


def _scaled(camera: Camera, factor: int) -> Camera:
    return Camera(camera.focal_px * factor, camera.cx * factor, camera.cy * factor,
                  camera.width * factor, camera.height * factor)


def _rasterize_cpu(xy: np.ndarray, depth: np.ndarray, triangles: np.ndarray, width: int, height: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """rasterize.rasterize per image, (B, H, W) triangle ids and (B, H, W, 3) barycentrics. Back
    faces (clockwise on the screen, whose y points down) are culled first, which halves the work;
    the image is the same wherever a front face covers the back ones (closed, consistently wound
    meshes: every model head). Where an open mesh shows its back side (a face mask seen from
    behind) the CPU shows what lies behind it, CUDA (no culling) the back face."""
    triangles_out, bary_out = [], []
    for screen, z in zip(xy, depth):
        corners = screen[triangles]
        signed = ((corners[:, 1, 0] - corners[:, 0, 0]) * (corners[:, 2, 1] - corners[:, 0, 1])
                  - (corners[:, 1, 1] - corners[:, 0, 1]) * (corners[:, 2, 0] - corners[:, 0, 0]))
        front = np.flatnonzero(signed < 0)
        raster = rasterize(screen, z, triangles[front], width, height)
        triangles_out.append(np.where(raster.triangle >= 0, front[np.maximum(raster.triangle, 0)], -1))
        bary_out.append(raster.bary)
    return torch.as_tensor(np.stack(triangles_out)), torch.as_tensor(np.stack(bary_out))


def render_batch(mesh: RenderMesh, vertices: np.ndarray | torch.Tensor, cameras: list[Camera],
                 albedos: np.ndarray | torch.Tensor, lights: list[Light | None],
                 background_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0), device: str = "cpu",
                 supersample: int = 1) -> list[Rendering]:
    """B images at once. vertices (B, V, 3) camera-frame metres (each in its camera's frame);
    cameras: B cameras of one image size; albedos (B, S, S, 3) uint8 sRGB (or one (S, S, 3) for
    all); lights: B lights in the camera frames (None: unlit, the albedo as is); background_rgb:
    sRGB 0..1. device: "cpu" (rasterize.rasterize, image by image) or "cuda:N" (nvdiffrast, the
    whole batch in one call). supersample: k x k samples per pixel, averaged in linear RGB."""
    target = torch.device(device)
    batch = len(cameras)
    if len({(c.width, c.height) for c in cameras}) != 1:
        raise ValueError("render_batch: every camera must have the same image size")
    big = [_scaled(c, supersample) for c in cameras]
    width, height = big[0].width, big[0].height
    points = torch.as_tensor(np.asarray(vertices) if not isinstance(vertices, torch.Tensor) else vertices,
                             dtype=torch.float32).to(target)
    positions = points[:, mesh.tensors(target)["vertex_of"]]                                  # (B, R, 3)
    intrinsics = torch.tensor([[c.focal_px, c.cx, c.cy] for c in big], dtype=torch.float32, device=target)
    depth = -positions[..., 2]
    xy = torch.stack([intrinsics[:, 1, None] + intrinsics[:, 0, None] * positions[..., 0] / depth,
                      intrinsics[:, 2, None] - intrinsics[:, 0, None] * positions[..., 1] / depth], dim=-1)
    if target.type == "cpu":
        triangle, bary = _rasterize_cpu(xy.numpy().astype(np.float64), depth.numpy(), mesh.triangles, width, height)
    else:
        from .rasterize_cuda import rasterize_batch
        raster = rasterize_batch(xy, depth, mesh.tensors(target)["triangles"].to(torch.int32), width, height)
        triangle, bary = raster.triangle, raster.bary
    albedo = torch.as_tensor(np.array(albedos) if not isinstance(albedos, torch.Tensor) else albedos).to(target)
    albedo = albedo if albedo.dtype == torch.uint8 else albedo.float()
    if albedo.dim() == 3:
        albedo = albedo[None].expand(batch, -1, -1, -1)
    lit = [light is not None for light in lights]
    if any(lit) and not all(lit):
        raise ValueError("render_batch: light every image or none")
    sh = None
    if all(lit):
        sh = torch.as_tensor(np.stack([light.sh for light in lights if light is not None]), dtype=torch.float32,
                             device=target)
    suns = [list(light.suns) if light is not None else [] for light in lights]
    background = srgb_to_linear_torch(torch.as_tensor(background_rgb, dtype=torch.float32, device=target))
    linear, coverage = shade_pixels(mesh, triangle, bary, points, albedo, sh, suns, background)
    if supersample > 1:
        pool = torch.nn.functional.avg_pool2d
        linear = pool(linear.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
        coverage = pool(coverage[:, None], supersample)[:, 0]
    rgb = torch.round(linear_to_srgb_torch(linear) * 255).to(torch.uint8).cpu().numpy()
    mask = (coverage >= 0.5).cpu().numpy()
    return [Rendering(rgb[b], mask[b]) for b in range(batch)]


def render(mesh: RenderMesh, vertices: np.ndarray, camera: Camera, albedo: np.ndarray, light: Light | None,
           background_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0), device: str = "cpu",
           supersample: int = 1) -> Rendering:
    """One image: vertices (V, 3) camera-frame metres, albedo (S, S, 3) uint8 sRGB, light in the
    camera frame (None: unlit). See render_batch."""
    return render_batch(mesh, np.asarray(vertices)[None], [camera], albedo, [light], background_rgb, device,
                        supersample)[0]
