"""Sampling settings of one generation (SamplerOptions: schedule, sampler, guidance; design §7.8) and, apart, the
fast-path switches (SpeedOptions) that change how the model is called, not what is sampled."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from .denoiser import GuidanceConfig
from .samplers import SCHEDULERS
from .schedules import parse_oss_steps
from ..validation import MAX_STEPS, check_count


@dataclass(frozen=True)
class SpeedOptions:
    """The fast-path switches: how the model calls are made, not what is sampled (bench/README.md). All off is the
    official call pattern (EAGER); on, results differ from it only by float rounding (tests/test_fast_path.py)."""

    batch_branches: bool = True  # guidance branches in one batched call (ERG as a per-item temperature)
    reuse_cross_kv: bool = True  # each branch's cross-attention K/V once per generation, not per call
    linear_ff: bool = True  # the feed-forward 1x1 convolutions as matrix products
    skip_full_masks: bool = True  # no mask arithmetic when every frame and condition token is valid
    compile: bool = False  # torch.compile the transformer blocks (the first calls compile them)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")


EAGER = SpeedOptions(batch_branches=False, reuse_cross_kv=False, linear_ff=False, skip_full_masks=False, compile=False)
"""Every fast-path switch off: the official one-call-per-branch eager path."""
SPEED_FIELDS = tuple(f.name for f in fields(SpeedOptions))


@dataclass(frozen=True)
class SamplerOptions:
    """How to sample: schedule, sampler and guidance (defaults of the official pipeline, design §7.8), and how fast
    (`speed`, the fast-path switches)."""

    steps: int = 60
    scheduler: str = "euler"
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    oss_steps: tuple[int, ...] = ()
    shift: float = 3.0
    speed: SpeedOptions = field(default_factory=SpeedOptions)

    def __getattr__(self, name: str):
        """Reading a speed switch on the options (`options.batch_branches`) reads `options.speed`."""
        if name in SPEED_FIELDS:
            return getattr(self.speed, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        check_count("steps", self.steps, MAX_STEPS)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r:.200}")
        object.__setattr__(self, "oss_steps", tuple(parse_oss_steps(self.oss_steps or None)))
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        if not isinstance(self.speed, SpeedOptions):
            raise ValueError(f"speed must be a SpeedOptions, got {type(self.speed).__name__}")


def with_options(options: SamplerOptions, **changes) -> SamplerOptions:
    """A copy of `options` with some fields, guidance fields or speed switches changed."""
    guidance_fields = {k: changes.pop(k) for k in list(changes) if hasattr(options.guidance, k)}
    if guidance_fields:
        changes["guidance"] = replace(options.guidance, **guidance_fields)
    speed_fields = {k: changes.pop(k) for k in list(changes) if k in SPEED_FIELDS}
    if speed_fields:
        changes["speed"] = replace(changes.get("speed", options.speed), **speed_fields)
    return replace(options, **changes)
