"""Guidance of ACE-Step 1.5 base/sft: APG (the default), ADG, plain CFG and the CFG interval.

Velocities are [B, T, C] (frames, then latent channels). Facts from the official
`acestep/models/common/apg_guidance.py` and the base `generate_audio`
(`acestep/models/base/modeling_acestep_v15_base.py`). APG and CFG are the v1 pure functions
(`acestep_core.sampling`): the math is the same, only the reduction dims differ (1.5 reduces over dim 1, the
frame axis, as the official call `apg_forward(..., dims=[1])` does).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sampling import MomentumBuffer, apg as _apg, cfg

APG_DIMS = (1,)
# Official ADG default angle clip: the literal 3.14 / 6 (not math.pi / 6).
ADG_ANGLE_CLIP = 3.14 / 6
ADG_WEIGHT_FLOOR = 1e-3
ADG_SIN_FLOOR = 1e-3
ADG_COS_MARGIN = 1e-6
ADG_PROJ_EPS = 1e-8

__all__ = ["MomentumBuffer", "adg", "apg", "cfg", "in_cfg_interval", "check_cfg_interval"]


def apg(pred_cond: Tensor, pred_uncond: Tensor, scale: float, momentum_buffer: MomentumBuffer | None) -> Tensor:
    """APG as the official base loop calls it: momentum −0.75, norm threshold 2.5, eta 0, reduced over frames
    (official `apg_forward(pred_cond, pred_uncond, guidance_scale, momentum_buffer, dims=[1])`)."""
    return _apg(pred_cond, pred_uncond, scale, momentum_buffer=momentum_buffer, dims=APG_DIMS)


def check_cfg_interval(start: float, end: float) -> tuple[float, float]:
    """Validate a CFG interval [start, end] on t (0 = data, 1 = noise)."""
    for name, value in (("cfg_interval_start", start), ("cfg_interval_end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if start > end:
        raise ValueError(f"cfg_interval_start ({start}) must not exceed cfg_interval_end ({end})")
    return float(start), float(end)


def in_cfg_interval(t: Tensor | float, start: float, end: float) -> bool:
    """Whether guidance applies at time t: start ≤ t ≤ end, tested on t itself as the official base loop does
    (`t_curr >= cfg_interval_start and t_curr <= cfg_interval_end`). diffusers 0.42.1 tests 1 − t instead, which
    mirrors the interval; we follow the official code (docs/acestep-15.md)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return bool(t >= start) and bool(t <= end)


def adg(
    latents: Tensor,
    pred_cond: Tensor,
    pred_uncond: Tensor,
    sigma: Tensor | float,
    scale: float,
    angle_clip: float = ADG_ANGLE_CLIP,
    apply_norm: bool = False,
    apply_clip: bool = True,
) -> Tensor:
    """Angle-based dynamic guidance (official `adg_forward`) for velocity predictions at time `sigma` (> 0).

    Works on the predicted data x̂ = x − σ·v of both branches: the angle θ between x̂_c and x̂_u per frame
    (float64) is scaled by w = max(g − 1, 0) + 1e-3 and clipped to `angle_clip`; the guided x̂ is
    cos(θ')·x̂_c + sin(θ')/sin(θ)·(x̂_c − x̂_u)⊥x̂_u, and the velocity is recovered as (x − x̂)/σ."""
    if pred_cond.shape != pred_uncond.shape or latents.shape != pred_cond.shape or pred_cond.ndim != 3:
        raise ValueError(
            "adg needs latents, pred_cond and pred_uncond of one shape [B, T, C], got "
            f"{tuple(latents.shape)}, {tuple(pred_cond.shape)}, {tuple(pred_uncond.shape)}"
        )
    n, t, c = pred_cond.shape
    sigma = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1, 1, 1).expand(n, 1, 1)
    elif sigma.numel() == n:
        sigma = sigma.reshape(n, 1, 1)
    else:
        raise ValueError(f"sigma must be a scalar or hold one value per batch item ({n}), got {tuple(sigma.shape)}")
    if bool((sigma <= 0).any()):
        raise ValueError("adg needs sigma > 0 (the velocity is recovered by dividing by sigma)")
    weight = scale - 1
    weight = weight * (weight > 0) + ADG_WEIGHT_FLOOR

    hat_cond = latents - sigma * pred_cond
    hat_uncond = latents - sigma * pred_uncond
    hat_diff = hat_cond - hat_uncond

    # Angle per frame, in float64 (official call_cos_tensor on rows of C channels).
    a = hat_cond.reshape(-1, c).double()
    b = hat_uncond.reshape(-1, c).double()
    cos = ((a / torch.linalg.norm(a, dim=1, keepdim=True)) * (b / torch.linalg.norm(b, dim=1, keepdim=True))).sum(
        dim=1, keepdim=True
    )
    theta = torch.acos(cos.clamp(-1.0 + ADG_COS_MARGIN, 1.0 - ADG_COS_MARGIN)).reshape(n, t, 1)
    theta_new = torch.clip(weight * theta, -angle_clip, angle_clip) if apply_clip else weight * theta

    # Component of x̂_c − x̂_u orthogonal to x̂_u per frame, in float32 (official compute_perpendicular_component).
    d = hat_diff.reshape(n * t, c).float()
    u = hat_uncond.reshape(n * t, c).float()
    proj = (d * u).sum(dim=1, keepdim=True) / ((u * u).sum(dim=1, keepdim=True) + ADG_PROJ_EPS) * u
    perp = (d - proj).reshape(n, t, c)

    sin_theta = torch.sin(theta)
    big = sin_theta > ADG_SIN_FLOOR
    rotated = torch.where(big, perp * torch.sin(theta_new) / torch.where(big, sin_theta, 1.0), perp * weight)
    guided = torch.cos(theta_new) * hat_cond + rotated
    if apply_norm:
        guided = guided * torch.linalg.norm(hat_cond, dim=1, keepdim=True) / torch.linalg.norm(
            guided, dim=1, keepdim=True
        )
    return ((latents - guided) / sigma).reshape(n, t, c).to(latents.dtype)
