"""Sampling of ACE-Step v1: sigma schedules, sampler functions, guidance rules and the guided velocity (design §7)."""
from .denoiser import GuidanceConfig, guided_velocity, make_guided_velocity, separate_branches
from .guidance import MomentumBuffer, apg, cfg, cfg_zero_star, double_condition
from .samplers import (
    SCHEDULERS,
    euler_step,
    generator_noise,
    omega_factor,
    pingpong_step,
    run_sampler,
    sample_euler,
    sample_heun,
    sample_pingpong,
)
from .schedules import (
    audio2audio_sigmas,
    flow_shift,
    guidance_interval,
    guidance_scale_at,
    heun_call_sigmas,
    official_sigmas,
    oss_sigmas,
    parse_oss_steps,
)

__all__ = [
    "SCHEDULERS",
    "GuidanceConfig",
    "MomentumBuffer",
    "apg",
    "audio2audio_sigmas",
    "cfg",
    "cfg_zero_star",
    "double_condition",
    "euler_step",
    "flow_shift",
    "generator_noise",
    "guidance_interval",
    "guidance_scale_at",
    "guided_velocity",
    "heun_call_sigmas",
    "make_guided_velocity",
    "official_sigmas",
    "omega_factor",
    "oss_sigmas",
    "parse_oss_steps",
    "pingpong_step",
    "run_sampler",
    "sample_euler",
    "sample_heun",
    "sample_pingpong",
    "separate_branches",
]
