"""Timestep schedules of ACE-Step 1.5: the fixed turbo tables and the shifted base/sft schedule.

Facts from the official `AceStepConditionGenerationModel.generate_audio` (ace-step/ACE-Step-1.5,
`acestep/models/turbo/modeling_acestep_v15_turbo.py` and `acestep/models/base/modeling_acestep_v15_base.py`).
One time unit: t runs from 1 (noise) to 0 (data); the decoder is given t itself.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Turbo: the three shifts the distilled model was trained for, and the 8-step table of each (the final t = 0 is
# implied). These are the float64 values of shift·t/(1 + (shift − 1)·t) over linspace(1, 0, 9).
VALID_SHIFTS: tuple[float, ...] = (1.0, 2.0, 3.0)
SHIFT_TIMESTEPS: dict[float, tuple[float, ...]] = {
    1.0: (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125),
    2.0: (1.0, 14 / 15, 6 / 7, 10 / 13, 2 / 3, 6 / 11, 0.4, 2 / 9),
    3.0: (1.0, 21 / 22, 0.9, 5 / 6, 0.75, 9 / 14, 0.5, 0.3),
}
# Every distinct value of the three tables, in the official order (largest first); custom turbo timesteps snap
# to the nearest of these, ties going to the first in this order.
VALID_TIMESTEPS: tuple[float, ...] = (
    1.0, 21 / 22, 14 / 15, 0.9, 0.875, 6 / 7, 5 / 6, 10 / 13, 0.75, 2 / 3,
    9 / 14, 0.625, 6 / 11, 0.5, 0.4, 0.375, 0.3, 0.25, 2 / 9, 0.125,
)
MAX_TURBO_STEPS = 20
MAX_BASE_STEPS = 1000


def _check_number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
    return float(value)


def nearest_shift(shift: float) -> float:
    """The turbo shift actually used: `shift` rounded to the nearest of 1, 2, 3 (ties to the smaller)."""
    shift = _check_number("shift", shift)
    return min(VALID_SHIFTS, key=lambda s: abs(s - shift))


def snap_timesteps(timesteps: Sequence[float] | Tensor) -> list[float]:
    """Custom turbo timesteps as the official code uses them: trailing zeros dropped, at most 20 kept, each value
    snapped to the nearest VALID_TIMESTEPS entry. Returns python floats (largest first as given)."""
    values = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
    values = [_check_number("timesteps value", v, 0.0, 1.0) for v in values]
    while values and values[-1] == 0:
        values.pop()
    if not values:
        raise ValueError("timesteps holds no non-zero value; give 1-20 values in (0, 1] or leave timesteps empty")
    if len(values) > MAX_TURBO_STEPS:
        log.warning("timesteps: %d values given, only the first %d are used", len(values), MAX_TURBO_STEPS)
        values = values[:MAX_TURBO_STEPS]
    snapped = [min(VALID_TIMESTEPS, key=lambda v: abs(v - t)) for t in values]
    if snapped != values:
        log.info("timesteps snapped to the turbo grid: %s -> %s", values, snapped)
    return snapped


def turbo_timesteps(shift: float = 3.0, timesteps: Sequence[float] | Tensor | None = None) -> list[float]:
    """The per-step t values of a turbo run (python floats, without the final 0).

    With `timesteps` given they win (snapped, see `snap_timesteps`); otherwise the 8-step table of the nearest
    valid shift."""
    if timesteps is not None and len(timesteps) > 0:
        return snap_timesteps(timesteps)
    rounded = nearest_shift(shift)
    if rounded != shift:
        log.info("turbo shift %s rounded to %s", shift, rounded)
    return list(SHIFT_TIMESTEPS[rounded])


def turbo_schedule(
    shift: float = 3.0, timesteps: Sequence[float] | Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """`turbo_timesteps` as a 1-d tensor in `dtype` (float32: the values the decoder sees)."""
    return torch.tensor(turbo_timesteps(shift, timesteps), dtype=dtype)


def base_schedule(infer_steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The base/sft schedule: t = linspace(1, 0, N + 1) in `dtype`, then t ← s·t/(1 + (s − 1)·t) when s ≠ 1.

    Returns all N + 1 values (the last is 0); step i goes from t[i] to t[i + 1]."""
    if isinstance(infer_steps, bool) or not isinstance(infer_steps, int) or not 1 <= infer_steps <= MAX_BASE_STEPS:
        raise ValueError(f"infer_steps must be an integer in [1, {MAX_BASE_STEPS}], got {infer_steps!r}")
    shift = _check_number("shift", shift)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, infer_steps + 1, dtype=dtype)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t
