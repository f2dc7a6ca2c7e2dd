"""The adapter between the network and a sampler: the official per-step guidance logic of ACE-Step v1 around
abstract model predictions (design §7.5, §7.8).

The network side is one `predict(x, sigma, branches)` callable returning the velocity of each requested branch
("cond", "text" = text-only, "uncond"), in that order; the task layer decides whether to run them as separate
calls (official parity) or one batched call.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .guidance import MomentumBuffer, apg, cfg, cfg_zero_star, double_condition
from .samplers import Velocity
from .schedules import guidance_interval, guidance_scale_at

Branch = Literal["cond", "text", "uncond"]
Predict = Callable[[Tensor, Tensor, tuple[Branch, ...]], tuple[Tensor, ...]]
BranchFn = Callable[[Tensor, Tensor], Tensor]

CFG_TYPES = ("apg", "cfg", "cfg_star")


@dataclass(frozen=True)
class GuidanceConfig:
    """Guidance knobs with the defaults of the official `ACEStepPipeline.__call__` (design §7.8)."""

    guidance_scale: float = 15.0
    cfg_type: str = "apg"
    guidance_interval: float = 0.5
    guidance_interval_decay: float = 0.0
    min_guidance_scale: float = 3.0
    guidance_scale_text: float = 0.0
    guidance_scale_lyric: float = 0.0
    zero_steps: int = 1
    use_zero_init: bool = True
    use_erg_tag: bool = True
    use_erg_lyric: bool = True
    use_erg_diffusion: bool = True
    omega_scale: float = 10.0

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "min_guidance_scale", "guidance_scale_text", "guidance_scale_lyric",
                     "omega_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("guidance_interval", "guidance_interval_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.cfg_type not in CFG_TYPES:
            raise ValueError(f"cfg_type must be one of {CFG_TYPES}, got {self.cfg_type!r:.200}")
        if isinstance(self.zero_steps, bool) or not isinstance(self.zero_steps, int) or self.zero_steps < 0:
            raise ValueError(f"zero_steps must be an integer >= 0, got {self.zero_steps!r}")
        for name in ("use_zero_init", "use_erg_tag", "use_erg_lyric", "use_erg_diffusion"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def do_cfg(self) -> bool:
        """Guidance runs at all iff guidance_scale is neither 0 nor 1 (design §7.5)."""
        return self.guidance_scale not in (0.0, 1.0)

    @property
    def double_condition(self) -> bool:
        """Double-condition guidance iff both guidance_scale_text and guidance_scale_lyric exceed 1 (design §7.5)."""
        return self.guidance_scale_text > 1.0 and self.guidance_scale_lyric > 1.0

    def branches(self, step_index: int, n_steps: int) -> tuple[Branch, ...]:
        """The predictions step `step_index` of an `n_steps` schedule needs: cond alone outside the guidance
        interval, else cond, (text,) uncond (design §7.5)."""
        start, end = guidance_interval(n_steps, self.guidance_interval)
        if not (self.do_cfg and start <= step_index < end):
            return ("cond",)
        return ("cond", "text", "uncond") if self.double_condition else ("cond", "uncond")


def separate_branches(cond: BranchFn, uncond: BranchFn, text: BranchFn | None = None) -> Predict:
    """A `predict` making one model call per branch in the official order cond, text, uncond (design §7.5)."""
    functions = {"cond": cond, "uncond": uncond, "text": text}

    def predict(x: Tensor, sigma: Tensor, branches: tuple[Branch, ...]) -> tuple[Tensor, ...]:
        if "text" in branches and text is None:
            raise ValueError("double-condition guidance needs the text-only prediction; pass text=")
        return tuple(functions[name](x, sigma) for name in branches)

    return predict


def guided_velocity(
    x: Tensor,
    sigma: Tensor,
    step_index: int,
    *,
    config: GuidanceConfig,
    n_steps: int,
    predict: Predict,
    momentum: MomentumBuffer | None,
) -> Tensor:
    """Velocity of one step with the official guidance: interval by absolute `step_index` against the `n_steps`
    schedule (Heun: call index against N), scale decay, double-condition overriding cfg_type, APG updating
    `momentum` (design §7.5)."""
    branches = config.branches(step_index, n_steps)
    predictions = predict(x, sigma, branches)
    if len(predictions) != len(branches) or any(p.shape != x.shape for p in predictions):
        raise ValueError(f"predict must return {len(branches)} tensors shaped like x {tuple(x.shape)} for {branches}")
    if branches == ("cond",):
        return predictions[0]
    if config.double_condition:
        v_cond, v_text, v_uncond = predictions
        return double_condition(v_cond, v_uncond, v_text, config.guidance_scale_text, config.guidance_scale_lyric)
    v_cond, v_uncond = predictions
    start, end = guidance_interval(n_steps, config.guidance_interval)
    scale = guidance_scale_at(
        step_index, start, end, config.guidance_scale, config.guidance_interval_decay, config.min_guidance_scale
    )
    if config.cfg_type == "apg":
        return apg(v_cond, v_uncond, scale, momentum)
    if config.cfg_type == "cfg":
        return cfg(v_cond, v_uncond, scale)
    return cfg_zero_star(v_cond, v_uncond, scale, step_index, config.zero_steps, config.use_zero_init)


def make_guided_velocity(config: GuidanceConfig, n_steps: int, predict: Predict) -> Velocity:
    """A sampler `Velocity` for one generation: `guided_velocity` with a fresh APG momentum buffer that persists
    across its guided steps; `n_steps` is the schedule's step count N (len(sigmas) − 1), also for Heun (design §7.5)."""
    momentum = MomentumBuffer()

    def velocity(x: Tensor, sigma: Tensor, step_index: int) -> Tensor:
        return guided_velocity(
            x, sigma, step_index, config=config, n_steps=n_steps, predict=predict, momentum=momentum
        )

    return velocity
