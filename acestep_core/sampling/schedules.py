"""Flow-matching sigma schedules of ACE-Step v1 and the guidance interval (design §7.1, §7.3, §7.5, §7.7, §8).

Every schedule is a float32 tensor of N+1 sigmas running from the first noise level down to a trailing 0;
the model timestep is `1000·σ` (multiplied at the model input, in float32, as the official scheduler does).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0


def flow_shift(s, shift: float):
    """Time shift `shift·s / (1 + (shift − 1)·s)` on a float or tensor, in its own precision (design §7.1)."""
    return shift * s / (1 + (shift - 1) * s)


def _check_steps(name: str, steps: int) -> None:
    """Raise unless `steps` is a positive int."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {steps!r}")


def _check_finite(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise unless `value` is a finite real number inside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")


def _check_shift(shift: float) -> None:
    """Raise unless the time shift is a finite positive number."""
    _check_finite("shift", shift)
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (ACE-Step uses 3.0), got {shift!r}")


def _train_sigma_range(shift: float, sigma_max: float) -> tuple[float, float]:
    """(largest, smallest) training sigma of the official scheduler built with `sigma_max`, in float32 (design §7.1)."""
    ends = torch.tensor([sigma_max * NUM_TRAIN_TIMESTEPS, 1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    largest, smallest = flow_shift(ends, shift).tolist()
    return largest, smallest


def _linspace64(start: float, stop: float, n: int) -> Tensor:
    """float64 `numpy.linspace(start, stop, n)`, same arithmetic (i·step + start, exact endpoint)."""
    if n == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (n - 1)
    values = torch.arange(n, dtype=torch.float64) * step + start
    values[-1] = stop
    return values


def official_sigmas(steps: int, shift: float = DEFAULT_SHIFT, sigma_max: float = 1.0) -> Tensor:
    """Sigmas [steps+1] of the official FlowMatch schedulers: a float64 linspace between the shifted training
    bounds, shifted again, cast to float32, with a trailing 0 (design §7.1; `sigma_max` < 1 is audio2audio, §8)."""
    _check_steps("steps", steps)
    _check_shift(shift)
    _check_finite("sigma_max", sigma_max)
    if not 1.0 / NUM_TRAIN_TIMESTEPS < sigma_max <= 1.0:
        raise ValueError(f"sigma_max must lie in (0.001, 1], got {sigma_max!r}")
    largest, smallest = _train_sigma_range(shift, sigma_max)
    s = _linspace64(largest * NUM_TRAIN_TIMESTEPS, smallest * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    sigmas = flow_shift(s, shift).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def heun_call_sigmas(sigmas: Tensor) -> Tensor:
    """The official Heun scheduler's sigma list [2N]: σ0, σ1, σ1, …, σ_{N−1}, σ_{N−1}, 0; entry k (k < 2N−1) is
    the noise level of model call k, whose timestep is 1000·entry (design §7.3)."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 values, got shape {tuple(sigmas.shape)}")
    return torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])


MAX_OSS_STEP = 1000
"""Largest oss step number: the schedule it picks from has that many steps (the nodes' step maximum)."""


def parse_oss_steps(oss_steps: str | Sequence[int] | None) -> list[int]:
    """The oss_steps list from "16, 29, 52" or a sequence; empty text or None give [] (no oss) (design §7.7)."""
    if oss_steps is None:
        return []
    if isinstance(oss_steps, str):
        text = oss_steps.strip()
        if not text:
            return []
        try:
            oss_steps = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"oss_steps must be comma-separated integers like '16, 29, 52', got {oss_steps!r:.200}"
            ) from None
    steps = list(oss_steps)
    if any(isinstance(k, bool) or not isinstance(k, int) for k in steps):
        raise ValueError(f"oss_steps must hold integers, got {steps!r:.200}")
    if any(not 1 <= k <= MAX_OSS_STEP for k in steps):
        raise ValueError(f"oss_steps must be step numbers from 1 to {MAX_OSS_STEP}, got {steps!r:.200}")
    return steps


def oss_sigmas(
    oss_steps: str | Sequence[int],
    shift: float = DEFAULT_SHIFT,
    rounding_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sigmas [len(oss)+1] for an oss_steps subset: timestep t[k−1] of the max(oss)-step schedule for each k,
    rounded to `rounding_dtype` (the model dtype: bf16 officially) and divided by 1000 in it, then shifted a
    second time in float32, trailing 0 (design §7.7). Works with every sampler, Heun included."""
    steps = parse_oss_steps(oss_steps)
    if not steps:
        raise ValueError("oss_steps is empty; give step numbers like '16, 29, 52' or use official_sigmas")
    if min(steps) < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"oss_steps must be strictly increasing step numbers >= 1, got {steps}")
    if not rounding_dtype.is_floating_point:
        raise ValueError(f"rounding_dtype must be a floating dtype (the model dtype), got {rounding_dtype}")
    _check_shift(shift)
    timesteps = official_sigmas(max(steps), shift)[:-1] * NUM_TRAIN_TIMESTEPS
    picked = timesteps[torch.tensor(steps) - 1].to(rounding_dtype)
    sigmas = flow_shift((picked / NUM_TRAIN_TIMESTEPS).to(torch.float32), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class Audio2AudioSchedule(NamedTuple):
    """Sigmas of an audio2audio run and the noise level σ* at which the reference is mixed with noise (design §8)."""

    sigmas: Tensor
    start_sigma: float


def audio2audio_sigmas(steps: int, ref_strength: float, shift: float = DEFAULT_SHIFT) -> Audio2AudioSchedule:
    """Audio2audio schedule: scheduler built with sigma_max = 1 − a, N' = int((1 − a)·N) steps; start
    x = (1 − σ*)·ref + σ*·noise with σ* = shift(1 − a) (the sigmas are shifted once more) (design §8)."""
    _check_steps("steps", steps)
    _check_finite("ref_strength", ref_strength, 0.0, 1.0)
    sigma_max = 1 - ref_strength
    n_steps = int(sigma_max * steps)
    if n_steps < 1 or sigma_max <= 1.0 / NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"ref_strength={ref_strength} with steps={steps} leaves int((1 - ref_strength) * steps) = {n_steps} "
            "denoising steps; lower ref_strength or raise steps"
        )
    start_sigma, _ = _train_sigma_range(shift, sigma_max)
    return Audio2AudioSchedule(official_sigmas(n_steps, shift, sigma_max), start_sigma)


def guidance_interval(n_steps: int, interval: float) -> tuple[int, int]:
    """Guided step indices start ≤ i < end: start = int(N·(1 − gi)/2), end = int(N·(gi/2 + 0.5)); N is the number
    of schedule steps even for Heun, whose call index runs over 2N − 1 calls (official quirk) (design §7.5)."""
    _check_steps("n_steps", n_steps)
    _check_finite("guidance_interval", interval, 0.0, 1.0)
    start = int(n_steps * ((1 - interval) / 2))
    end = int(n_steps * (interval / 2 + 0.5))
    return start, end


def guidance_scale_at(
    step: int, start: int, end: int, scale: float, decay: float = 0.0, min_scale: float = 3.0
) -> float:
    """Guidance scale at guided step `step` of [start, end): g − (g − g_min)·decay·(step − start)/(end − start − 1)
    when decay > 0, else g (design §7.5). A one-step interval (where the official code divides by zero) uses the
    full scale g, the value the linear decay starts from."""
    _check_finite("guidance_scale", scale)
    _check_finite("guidance_interval_decay", decay, 0.0)
    _check_finite("min_guidance_scale", min_scale)
    if not start <= step < end:
        raise ValueError(f"step {step} lies outside the guidance interval [{start}, {end})")
    if decay <= 0 or end - start == 1:
        return scale
    progress = (step - start) / (end - start - 1)
    return scale - (scale - min_scale) * progress * decay
