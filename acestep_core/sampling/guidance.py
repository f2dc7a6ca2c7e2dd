"""Guidance rules of ACE-Step v1 as pure functions on velocity predictions [B, C, H, W] (design §7.5).

Official source of the formulas: ACE-Step `acestep/apg_guidance.py` (APG: Sadat et al. 2024, arXiv 2410.02416;
CFG-Zero*: Fan et al. 2025, arXiv 2503.18886).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
CFG_STAR_EPS = 1e-8
NORMALIZE_EPS = 1e-12


def _check_scale(name: str, value: float) -> None:
    """Raise unless a guidance weight is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_pair(v_cond: Tensor, other: Tensor, name: str = "v_uncond") -> None:
    """Raise unless another prediction has the shape of v_cond."""
    if v_cond.shape != other.shape:
        raise ValueError(
            f"v_cond and {name} must have the same shape, got {tuple(v_cond.shape)} and {tuple(other.shape)}"
        )


def cfg(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance v_u + g·(v_c − v_u) (design §7.5)."""
    _check_scale("scale", scale)
    _check_pair(v_cond, v_uncond)
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass
class MomentumBuffer:
    """APG running average r ← d + momentum·r, starting at 0, kept by the caller for one generation (design §7.5)."""

    momentum: float = APG_MOMENTUM
    running_average: Tensor | None = None

    def update(self, diff: Tensor) -> Tensor:
        """Fold `diff` into the running average and return the new average."""
        if self.running_average is None:
            self.running_average = diff
        else:
            self.running_average = diff + self.momentum * self.running_average
        return self.running_average


def project(v: Tensor, onto: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(parallel, orthogonal) parts of `v` relative to `onto` over `dims`, computed in float64 (design §7.5)."""
    v64, onto64 = v.double(), onto.double()
    unit = onto64 / onto64.norm(p=2, dim=dims, keepdim=True).clamp_min(NORMALIZE_EPS)
    parallel = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = v64 - parallel
    return parallel.to(v.dtype), orthogonal.to(v.dtype)


def apg(
    v_cond: Tensor,
    v_uncond: Tensor,
    scale: float,
    momentum_buffer: MomentumBuffer | None = None,
    eta: float = 0.0,
    norm_threshold: float = APG_NORM_THRESHOLD,
    dims: Sequence[int] = (-1, -2),
) -> Tensor:
    """Adaptive projected guidance: momentum on d = v_c − v_u (updates `momentum_buffer` in place), L2 clip of d
    to `norm_threshold` over `dims`, then v_c + (g − 1)·(d⊥ + eta·d∥) with d split along v_c (design §7.5)."""
    _check_scale("scale", scale)
    _check_scale("eta", eta)
    _check_scale("norm_threshold", norm_threshold)
    _check_pair(v_cond, v_uncond)
    dims = tuple(dims)
    diff = v_cond - v_uncond
    if momentum_buffer is not None:
        diff = momentum_buffer.update(diff)
    if norm_threshold > 0:
        diff_norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / diff_norm)
    parallel, orthogonal = project(diff, v_cond, dims)
    return v_cond + (scale - 1) * (orthogonal + eta * parallel)


def cfg_zero_star(
    v_cond: Tensor,
    v_uncond: Tensor,
    scale: float,
    step_index: int,
    zero_steps: int = 1,
    use_zero_init: bool = True,
) -> Tensor:
    """CFG-Zero*: 0 while step_index ≤ zero_steps (with use_zero_init), else α·v_u + g·(v_c − α·v_u) with
    α = ⟨v_c, v_u⟩/(‖v_u‖² + 1e-8) per batch item (design §7.5)."""
    _check_scale("scale", scale)
    _check_pair(v_cond, v_uncond)
    if use_zero_init and step_index <= zero_steps:
        return torch.zeros_like(v_cond)
    batch = v_cond.shape[0]
    cond_flat, uncond_flat = v_cond.reshape(batch, -1), v_uncond.reshape(batch, -1)
    dot = (cond_flat * uncond_flat).sum(dim=1, keepdim=True)
    squared_norm = (uncond_flat**2).sum(dim=1, keepdim=True) + CFG_STAR_EPS
    alpha = (dot / squared_norm).reshape((batch,) + (1,) * (v_cond.ndim - 1))
    return v_uncond * alpha + scale * (v_cond - v_uncond * alpha)


def double_condition(
    v_cond: Tensor, v_uncond: Tensor, v_text: Tensor, scale_text: float, scale_lyric: float
) -> Tensor:
    """Double-condition guidance (1 − g_t)·v_u + (g_t − g_l)·v_text + g_l·v_c, v_text from text-only
    conditioning (design §7.5)."""
    _check_scale("scale_text", scale_text)
    _check_scale("scale_lyric", scale_lyric)
    _check_pair(v_cond, v_uncond)
    _check_pair(v_cond, v_text, "v_text")
    return (1 - scale_text) * v_uncond + (scale_text - scale_lyric) * v_text + scale_lyric * v_cond
