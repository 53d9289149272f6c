"""Several photos of one person fitted as one morphable face: one identity for all photos, a head
pose and an expression per photo, in torch (CPU or CUDA), reusing `morphable_fit.ModelFitter`'s
objective (its `_Problem`: the same landmarks, per-point noise, contour points and prior, so the
calibrated `Weighting` applies where the model has a calibration).

Objective: the sum over photos of each photo's objective in `morphable_fit` with the identity
shared, each photo's landmark terms weighted by cos(yaw)^VIEW_WEIGHT_POWER; the identity's prior
counts once per photo (its mean: where a calibration predicts one, its three-view read-out when
the photos include a front and both sides (`calibration.ViewsPrior`), else the mean of the
photos' predicted means; else 0). Counting it once let the identity chase the turned views'
landmark biases: on the synthetic heads the neutral shape got worse than the front photo's own fit (4.6 against
3.6 mm); as it is, it is level with the model's mean face (3.5 mm), see docs/quality.md.
Solved by Levenberg-Marquardt over all parameters at once (the Weighting's `iterations` plus
JOINT_EXTRA_ITERATIONS steps):
per photo (rotation increment, direction, log distance, expression), then the identity, a dense
(B·(6 + K_exp) + K_id)² normal system (277² for three photos of ICT-FaceKit) assembled from each
photo's JᵀJ. Start: each photo's own fit (`ModelFitter.fit`, batched), identity the prior's mean
(with a calibration) or their mean.

Leaving a photo out: per photo the *mismatch* is its landmarks' cost under the joint fit minus
under its own fit, per landmark, over MISMATCH_LIMIT. While the largest is over 1, that photo is
left out and the others are fitted again; of two photos that disagree, the first stays. This
catches only gross failures (landmarks that missed the face): on the synthetic heads another
person's photo costs no more than the person's own (MediaPipe's shapes are too alike, and the
expressions absorb the rest), so another person is recognised by the pipeline from the skin's
colour instead (pipeline/fuse.py `appearance_mismatch`; docs/quality.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import Camera
from .morphable_fit import CONTOUR_EVERY, START_DAMPING, ModelFit, ModelFitter, _Problem, _State

JOINT_EXTRA_ITERATIONS = 4            # the joint fit takes the Weighting's `iterations` (16 uncalibrated,
                                      # 6 calibrated) plus these: more parameters per step than one photo's
VIEW_WEIGHT_POWER = 4.0               # a photo's landmarks count cos(yaw)^this: MediaPipe's points on
                                      # turned heads are biased (docs/quality.md: 468-point error 5.25 mm
                                      # at 60 degrees against 3.61 mm frontal), so side views mostly add
                                      # what the front cannot see (contours, profile) without outvoting it
IDENTITY_PRIOR_PER_PHOTO = True       # the identity's prior counted once per photo (False: once)
MISMATCH_LIMIT = 1.0                  # excess cost per used landmark (residuals in sigmas, squared)


@dataclass(frozen=True)
class JointResult:
    """fits: one per photo given (the shared identity in each); mismatch: (B,) each photo's excess
    cost per landmark over MISMATCH_LIMIT (see the module's docstring)."""

    fits: list[ModelFit]
    mismatch: np.ndarray


def _prior_mean(fitter: ModelFitter, landmarks: list[np.ndarray], cameras: list[Camera],
                reference: np.ndarray, yaws_deg: list[float]) -> np.ndarray:
    """(B, K_id + K_exp): each photo's prior mean (the calibration's prediction, or 0), with the
    identity part replaced by one for all: the calibration's three-view read-out where it has one
    and the photos (by their own fits' yaws) include its three views, else the photos' mean."""
    count = len(landmarks)
    mean = np.zeros((count, fitter.k_identity + fitter.k_expression))
    calibration = fitter.weighting.calibration
    if calibration is None:
        return mean
    mean = np.array([calibration.predict(marks, reference, camera) for marks, camera in zip(landmarks, cameras)])
    mean[:, fitter.k_identity:] = np.clip(mean[:, fitter.k_identity:], 0, 1) * fitter.expression_mask.cpu().numpy()
    views = calibration.views
    chosen = None if views is None else views.pick(yaws_deg)
    if views is not None and chosen is not None:
        mean[:, :fitter.k_identity] = views.predict([landmarks[k] for k in chosen], reference,
                                                    [cameras[k] for k in chosen])
    else:
        mean[:, :fitter.k_identity] = mean[:, :fitter.k_identity].mean(0)
    return mean


def _state_of(fits: list[ModelFit], identity: np.ndarray, device: torch.device) -> _State:
    f32 = torch.float32
    translation = torch.as_tensor(np.array([f.pose.translation for f in fits]), dtype=f32, device=device)
    coefficients = np.array([np.concatenate([identity, f.expression]) for f in fits])
    return _State(torch.as_tensor(np.array([f.pose.rotation for f in fits]), dtype=f32, device=device),
                  translation[:, :2] / -translation[:, 2:], torch.log(-translation[:, 2]),
                  torch.as_tensor(coefficients, dtype=f32, device=device))


def _data_cost(fitter: ModelFitter, problem: _Problem, state: _State) -> torch.Tensor:
    """(B,) each photo's landmark cost (reprojection and depth; no prior), contours chosen for `state`."""
    jaw = fitter._contour_choice(state, problem) if len(fitter.jaw) else None
    residual = problem.residuals(problem.landmark_bases(jaw), state)
    return (residual[:, :residual.shape[1] - len(problem.prior)] ** 2).sum(1)


def joint_iterations(fitter: ModelFitter) -> int:
    """Levenberg-Marquardt steps of the joint fit: the fitter's Weighting's plus JOINT_EXTRA_ITERATIONS."""
    return fitter.weighting.iterations + JOINT_EXTRA_ITERATIONS


def joint_fit(fitter: ModelFitter, landmarks: list[np.ndarray], cameras: list[Camera], reference: np.ndarray,
              singles: list[ModelFit]) -> JointResult:
    """One identity for every photo. landmarks: (478, 3) photo pixels per photo; cameras: one per
    photo; reference: the built-in model's (468, 3) shape (the calibration's features); singles:
    each photo's own fit (the start, and the mismatch's reference)."""
    count = len(landmarks)
    dev, f32 = fitter.device, torch.float32
    k_id, k_exp = fitter.k_identity, fitter.k_expression
    marks = torch.as_tensor(np.array([m[:468] for m in landmarks]), dtype=f32, device=dev)
    prior_mean = _prior_mean(fitter, landmarks, cameras, reference,
                             [f.pose.euler_degrees()["yaw"] for f in singles])
    problem = _Problem(fitter, marks, cameras, torch.as_tensor(prior_mean, dtype=f32, device=dev))
    state = _state_of(singles, prior_mean[0, :k_id] if fitter.weighting.calibration is not None
                      else np.mean([f.identity for f in singles], axis=0), dev)

    # Global parameter ids: photo b's (rotation, direction, log distance, expression) at b·L, the
    # identity after every photo's; g[b] maps photo b's local parameters (6, identity, expression).
    local = 6 + k_exp
    size = count * local + k_id
    g = torch.empty((count, 6 + k_id + k_exp), dtype=torch.long, device=dev)
    for b in range(count):
        g[b, :6] = torch.arange(b * local, b * local + 6)
        g[b, 6:6 + k_id] = torch.arange(count * local, size)
        g[b, 6 + k_id:] = torch.arange(b * local + 6, (b + 1) * local)
    rows = problem.residuals(problem.landmark_bases(None), state).shape[1]
    keep = torch.ones((count, rows), dtype=f32, device=dev)          # row weights (residuals are scaled)
    first_prior = rows - len(problem.prior)
    if not IDENTITY_PRIOR_PER_PHOTO:
        keep[1:, first_prior:first_prior + k_id] = 0.0
    facing = torch.as_tensor([abs(float(f.pose.rotation[2, 2])) for f in singles], dtype=f32, device=dev)
    keep[:, :first_prior] *= (facing ** (VIEW_WEIGHT_POWER / 2))[:, None]     # residuals: squared in the cost
    fixed = torch.zeros(size, dtype=torch.float64, device=dev)
    fixed.index_put_((g.flatten(),), (1.0 - fitter.parameter_mask).double().repeat(count), accumulate=False)

    damping = START_DAMPING
    jaw_choice = None
    for iteration in range(joint_iterations(fitter)):
        if iteration % CONTOUR_EVERY == 0 and len(fitter.jaw):
            jaw_choice = fitter._contour_choice(state, problem)
        bases = problem.landmark_bases(jaw_choice)
        residual, jacobian = problem.jacobian(bases, state)
        residual, jacobian = residual * keep, jacobian * keep[..., None]
        cost = float((residual ** 2).sum())
        jt = jacobian.transpose(1, 2).double()
        local_hessian = jt @ jacobian.double()                                      # (B, P, P)
        local_gradient = (jt @ residual.double()[..., None])[..., 0]                # (B, P)
        hessian = torch.zeros((size, size), dtype=torch.float64, device=dev)
        hessian.index_put_((g[:, :, None].expand_as(local_hessian), g[:, None, :].expand_as(local_hessian)),
                           local_hessian, accumulate=True)
        gradient = torch.zeros(size, dtype=torch.float64, device=dev)
        gradient.index_put_((g,), local_gradient, accumulate=True)
        diagonal = torch.diagonal(hessian)
        step = torch.linalg.solve(hessian + torch.diag(damping * diagonal + 1e-9 + fixed), -gradient)
        trial = state.moved(step[g].to(f32), k_id, fitter.expression_mask)
        trial_cost = float(((problem.residuals(bases, trial) * keep) ** 2).sum())
        if trial_cost < cost:
            state, damping = trial, max(damping / 3, 1e-7)
        else:
            damping = min(damping * 4, 1e7)

    joint_cost = _data_cost(fitter, problem, state)
    single_cost = _data_cost(fitter, problem, _State(*_single_tensors(singles, dev)))
    used = len(problem.used)
    mismatch = ((joint_cost - single_cost).clamp_min(0) / used / MISMATCH_LIMIT).cpu().numpy()

    return JointResult(fitter.model_fits(problem, state, marks, cameras), mismatch)


def _single_tensors(fits: list[ModelFit], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The _State fields of each photo's own fit (its own identity)."""
    f32 = torch.float32
    translation = torch.as_tensor(np.array([f.pose.translation for f in fits]), dtype=f32, device=device)
    coefficients = np.array([np.concatenate([f.identity, f.expression]) for f in fits])
    return (torch.as_tensor(np.array([f.pose.rotation for f in fits]), dtype=f32, device=device),
            translation[:, :2] / -translation[:, 2:], torch.log(-translation[:, 2]),
            torch.as_tensor(coefficients, dtype=f32, device=device))


def fit_person(fitter: ModelFitter, landmarks: list[np.ndarray | None], cameras: list[Camera],
               reference: np.ndarray) -> tuple[list[ModelFit | None], dict[int, str], list[float]]:
    """Per photo its joint fit (None: left out), why each left-out photo was, and each photo's
    mismatch (NaN where not measured)."""
    present = [k for k, marks in enumerate(landmarks) if marks is not None]
    left_out = {k: "no face was found in it" for k, marks in enumerate(landmarks) if marks is None}
    mismatch = [float("nan")] * len(landmarks)
    fits: list[ModelFit | None] = [None] * len(landmarks)
    if not present:
        return fits, left_out, mismatch
    marks = [landmarks[k] for k in present]
    singles = dict(zip(present, fitter.fit(marks, [cameras[k] for k in present], reference)))  # type: ignore[arg-type]
    kept = list(present)
    while True:
        if len(kept) == 1:
            fits[kept[0]] = singles[kept[0]]
            return fits, left_out, mismatch
        result = joint_fit(fitter, [landmarks[k] for k in kept], [cameras[k] for k in kept],  # type: ignore[misc]
                           reference, [singles[k] for k in kept])
        for k, value in zip(kept, result.mismatch):
            mismatch[k] = float(value)
        worst = int(np.argmax(result.mismatch))
        if result.mismatch[worst] <= 1.0:
            for k, fit in zip(kept, result.fits):
                fits[k] = fit
            return fits, left_out, mismatch
        drop = kept[1] if len(kept) == 2 else kept[worst]
        left_out[drop] = (f"its face does not fit the others' shape (mismatch {mismatch[drop]:.1f}, limit 1): "
                          "another person, or landmarks that missed the face")
        kept.remove(drop)
