"""Stage 5a, lighting: the photo's light on the face, fitted so that the bake can divide it out.

Model (Lambertian, no shadows): a skin point's linear colour = albedo x shading(n), with
shading(n) = sh_basis(n) @ sh[c] per linear RGB channel c, `sh_basis` the 9 real spherical
harmonics of `render.shade` (the same convention as the synthetic renderer's `Light.sh`), n the
unit surface normal in the camera frame (+X right, +Y up, +Z toward the viewer).

Fit: weighted least squares over the fitted mesh's texture vertices that the photo sees on skin
(weights: surface area x view angle x skin probability x not clipped), with the albedo taken as
one colour over the skin (its variations are what the robust reweighting rejects: brows, lips,
freckles), a small ridge on the higher bands, and two rounds of Cauchy reweighting on the
residuals. One photo cannot tell a bright light on dark skin from a dim light on light skin, nor
a warm light from warm skin: the shading is normalised so that its weighted mean over the fitted
points is 1 in every channel. Dividing by it removes the *variation* of the light over the face
(shading, its colour gradient) and keeps the photo's mean skin colour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..render.shade import sh_basis, sh_basis_torch

SH_COUNT = 9
RIDGE_BAND1 = 2e-2            # ridge on band-1 coefficients, relative to the normal equations' trace / 9
RIDGE_BAND2 = 2e-1            # ridge on band-2 (what a turned face's normals constrain worst)
ROBUST_ROUNDS = 2
MIN_SHADING = 0.2             # shading is clamped here before dividing (deep shadow: no colour left to recover)
MIN_FIT_WEIGHT = 1e-6         # total weight below this: no fit (flat shading 1)


@dataclass(frozen=True)
class Lighting:
    """The photo's light on one face. sh: (3, 9) float64, the shading's SH coefficients per linear
    RGB channel for camera-frame unit normals (normalised: weighted mean shading 1 over the fitted
    skin); rms_residual: RMS relative residual of the fit (0..1; large = the model explains the
    photo badly: hard cast shadows, specular); points: how many vertices carried weight."""

    sh: np.ndarray
    rms_residual: float
    points: int

    def shading(self, normals: np.ndarray) -> np.ndarray:
        """(N, 3) unit normals, camera frame -> (N, 3) float32 shading, clamped to MIN_SHADING."""
        return np.maximum(sh_basis(normals.astype(np.float32)) @ self.sh.T.astype(np.float32), MIN_SHADING)

    @classmethod
    def from_arrays(cls, sh: np.ndarray, rms_residual: np.ndarray, points: np.ndarray) -> list[Lighting]:
        """The faces of `fit_lighting_torch`'s (B, 3, 9), (B,), (B,) results (as numpy)."""
        return [cls(np.asarray(s, np.float64), float(r), int(n)) for s, r, n in zip(sh, rms_residual, points)]

    def to_json(self) -> dict[str, Any]:
        return {"sh": np.round(self.sh, 5).tolist(), "rms_residual": round(self.rms_residual, 4),
                "points": self.points,
                "convention": "shading(n) = sum_k sh[c][k] Y_k(n), real SH basis of backend_server.render.shade, "
                              "linear RGB, n a camera-frame unit normal; normalised to mean 1 over the face's skin; "
                              "the texture is the photo divided by it (unless lit_texture)"}

    @classmethod
    def flat(cls) -> Lighting:
        sh = np.zeros((3, SH_COUNT))
        sh[:, 0] = 1.0 / 0.282095
        return cls(sh, 0.0, 0)


def fit_lighting(colours_linear: np.ndarray, normals: np.ndarray, weights: np.ndarray) -> Lighting:
    """colours_linear: (N, 3) linear RGB 0..1 of surface points seen on skin; normals: (N, 3) unit,
    camera frame; weights: (N,) >= 0. Returns the normalised `Lighting` (flat when nothing has weight)."""
    weights = np.asarray(weights, np.float64)
    used = weights > 0
    if weights.sum() < MIN_FIT_WEIGHT or used.sum() < 2 * SH_COUNT:
        return Lighting.flat()
    basis = sh_basis(np.asarray(normals, np.float64)[used])                         # (n, 9)
    colours = np.asarray(colours_linear, np.float64)[used]                          # (n, 3)
    prior = weights[used] / weights[used].sum()
    robust = np.ones(len(basis))
    coefficients = np.zeros((3, SH_COUNT))
    for _ in range(ROBUST_ROUNDS + 1):
        w = prior * robust
        normal_matrix = basis.T @ (basis * w[:, None])
        scale = np.trace(normal_matrix) / SH_COUNT
        ridge = np.diag([0.0] + [RIDGE_BAND1] * 3 + [RIDGE_BAND2] * 5) * scale
        coefficients = np.linalg.solve(normal_matrix + ridge, basis.T @ (colours * w[:, None])).T     # (3, 9)
        predicted = basis @ coefficients.T
        relative = np.abs(colours - predicted).sum(1) / np.maximum(np.abs(predicted).sum(1), 1e-6)
        spread = max(1.4826 * float(np.median(relative)), 0.02)
        robust = 1.0 / (1.0 + (relative / (2.0 * spread)) ** 2)
    w = prior * robust
    predicted = basis @ coefficients.T
    mean = np.maximum((predicted * w[:, None]).sum(0) / w.sum(), 1e-6)              # (3,)
    relative = np.minimum(np.abs(colours - predicted) / np.maximum(np.abs(predicted), 1e-3), 1.0)
    rms = float(np.sqrt((relative ** 2 * w[:, None]).sum() / (3 * w.sum())))
    return Lighting(coefficients / mean[:, None], rms, int(used.sum()))


def fit_lighting_torch(colours_linear: torch.Tensor, normals: torch.Tensor, weights: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fit_lighting` for a batch of faces, in torch on their device, with no host synchronisation.

    colours_linear: (B, N, 3) linear RGB; normals: (B, N, 3) unit, camera frame; weights: (B, N) >= 0
    (0 = not used), any float dtype. Returns sh (B, 3, 9) float64 (normalised as `fit_lighting`'s),
    rms_residual (B,) float64 and points (B,) int64; a face with too little weight gets the flat
    lighting (`Lighting.flat`: rms 0, points 0). The same maths in float64 (the median of the
    robust spread over each face's used points, as numpy's), so the two agree to rounding.
    """
    weights = weights.double()
    used = weights > 0
    count = used.sum(1)
    total = weights.sum(1)
    valid = (total >= MIN_FIT_WEIGHT) & (count >= 2 * SH_COUNT)
    basis = sh_basis_torch(normals.double())                                          # (B, N, 9)
    colours = colours_linear.double()
    prior = weights / total.clamp_min(MIN_FIT_WEIGHT)[:, None]
    ridge = torch.tensor([0.0] + [RIDGE_BAND1] * 3 + [RIDGE_BAND2] * 5, dtype=torch.float64, device=basis.device)
    identity = torch.eye(SH_COUNT, dtype=torch.float64, device=basis.device)
    robust = torch.ones_like(prior)
    coefficients = torch.zeros((len(basis), 3, SH_COUNT), dtype=torch.float64, device=basis.device)
    for _ in range(ROBUST_ROUNDS + 1):
        w = prior * robust
        weighted = basis * w[..., None]                                                    # (B, N, 9)
        normal_matrix = weighted.transpose(1, 2) @ basis
        scale = normal_matrix.diagonal(dim1=1, dim2=2).sum(1) / SH_COUNT
        system = normal_matrix + torch.diag_embed(ridge * scale[:, None])
        system = torch.where(valid[:, None, None], system, identity)               # a face without weight: no solve
        right = weighted.transpose(1, 2) @ colours
        coefficients = torch.linalg.solve_ex(system, right)[0].transpose(1, 2)        # (B, 3, 9)
        predicted = basis @ coefficients.transpose(1, 2)                                   # (B, N, 3)
        relative = (colours - predicted).abs().sum(2) / predicted.abs().sum(2).clamp_min(1e-6)
        median = torch.nanquantile(torch.where(used, relative, torch.nan), 0.5, dim=1)
        spread = (1.4826 * torch.nan_to_num(median)).clamp_min(0.02)
        robust = 1.0 / (1.0 + (relative / (2.0 * spread[:, None])) ** 2)
    w = prior * robust
    predicted = basis @ coefficients.transpose(1, 2)
    mean = ((predicted * w[..., None]).sum(1) / w.sum(1).clamp_min(1e-300)[:, None]).clamp_min(1e-6)   # (B, 3)
    relative = ((colours - predicted).abs() / predicted.abs().clamp_min(1e-3)).clamp(max=1.0)
    rms = ((relative ** 2 * w[..., None]).sum((1, 2)) / (3 * w.sum(1)).clamp_min(1e-300)).sqrt()
    flat = torch.as_tensor(Lighting.flat().sh, device=basis.device)
    sh = torch.where(valid[:, None, None], coefficients / mean[..., None], flat)
    return sh, torch.where(valid, rms, 0.0), torch.where(valid, count, 0)
