"""Sampling settings of one generation: schedule, sampler and guidance, and the fast-path switches (design §7.8)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .denoiser import GuidanceConfig
from .samplers import SCHEDULERS
from .schedules import parse_oss_steps


@dataclass(frozen=True)
class SamplerOptions:
    """How to sample: schedule, sampler and guidance (defaults of the official pipeline, design §7.8)."""

    steps: int = 60
    scheduler: str = "euler"
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    oss_steps: tuple[int, ...] = ()
    shift: float = 3.0
    batch_branches: bool = True  # fast path: guidance branches in one batched call (ERG as a per-item temperature)
    reuse_cross_kv: bool = True  # fast path: each branch's cross-attention K/V once per generation, not per call
    linear_ff: bool = True  # fast path: the feed-forward 1x1 convolutions as matrix products
    skip_full_masks: bool = True  # fast path: no mask arithmetic when every frame and condition token is valid
    compile: bool = False  # torch.compile the transformer blocks (the first calls compile them)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        object.__setattr__(self, "oss_steps", tuple(parse_oss_steps(self.oss_steps or None)))
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")


def with_options(options: SamplerOptions, **changes) -> SamplerOptions:
    """A copy of `options` with some fields (or guidance fields) changed."""
    guidance_fields = {k: changes.pop(k) for k in list(changes) if hasattr(options.guidance, k)}
    if guidance_fields:
        changes["guidance"] = replace(options.guidance, **guidance_fields)
    return replace(options, **changes)
