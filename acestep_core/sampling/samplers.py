"""Euler, Heun and PingPong samplers of ACE-Step v1 as functions over a sigma schedule (design §7.2–7.4).

A sampler calls `velocity(x, sigma, call_index)` once per model call, with `sigma` a 0-d float32 tensor (the model
timestep is 1000·sigma) and `call_index` the official loop index: the step for Euler/PingPong, the model call
(0 … 2N − 2) for Heun. Updates run in float32 and are cast back to x.dtype. Progress goes only through
`callback(index, total, x)` after each model call; raise inside it to interrupt.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, int], Tensor]
NoiseFn = Callable[[int, torch.Size], Tensor]
Callback = Callable[[int, int, Tensor], None]


def omega_factor(omega_scale: float) -> float:
    """Granularity factor ω' = 0.9 + 0.2/(1 + exp(−0.1·ω)); ω = 0 gives 1 (design §7.2)."""
    return 0.9 + (1.1 - 0.9) / (1 + math.exp(-0.1 * omega_scale))


def _as_sigma(sigma: Tensor | float, like: Tensor) -> Tensor:
    """A noise level as a 0-d float32 tensor on the device of `like`."""
    return torch.as_tensor(sigma, dtype=torch.float32, device=like.device)


def _apply_dx(x32: Tensor, dx: Tensor, omega_scale: float | None) -> Tensor:
    """x + dx, with the mean-preserving omega rescale (dx − m)·ω' + m, m = mean over the WHOLE tensor (batch
    included, official coupling) unless omega_scale is None (design §7.2)."""
    if omega_scale is None:
        return x32 + dx
    mean = dx.mean()
    return x32 + ((dx - mean) * omega_factor(omega_scale) + mean)


def euler_step(
    x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, omega_scale: float | None = None
) -> Tensor:
    """One Euler step x + (σ_next − σ)·v in float32, omega-rescaled unless omega_scale is None (plain, as repaint
    and flow-edit use it), cast back to x.dtype (design §7.2, §8)."""
    dx = (_as_sigma(sigma_next, x) - _as_sigma(sigma, x)) * v.float()
    return _apply_dx(x.float(), dx, omega_scale).to(x.dtype)


def pingpong_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, noise: Tensor) -> Tensor:
    """One PingPong step: x0̂ = x − σ·v, then (1 − σ_next)·x0̂ + σ_next·noise in float32, cast back (design §7.4)."""
    sigma_next = _as_sigma(sigma_next, x)
    denoised = x.float() - _as_sigma(sigma, x) * v.float()
    return ((1 - sigma_next) * denoised + sigma_next * noise.to(device=x.device, dtype=torch.float32)).to(x.dtype)


def _check_inputs(x: Tensor, sigmas: Tensor | Sequence[float]) -> Tensor:
    """Validate the start latent and schedule; return the sigmas as float32 on x's device."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(x.device)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D schedule of at least 2 values (1 step), got shape {tuple(sigmas.shape)}"
        )
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    return sigmas


def _call(velocity: Velocity, x: Tensor, sigma: Tensor, index: int) -> Tensor:
    """Evaluate the velocity and check its shape."""
    v = velocity(x, sigma, index)
    if not isinstance(v, Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"velocity must return a tensor shaped like x {tuple(x.shape)}, got {shape}")
    return v


def sample_euler(
    velocity: Velocity,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    omega_scale: float | None = 10.0,
    callback: Callback | None = None,
) -> Tensor:
    """Euler over `sigmas` (N steps, N model calls) with the omega rescale (design §7.2)."""
    sigmas = _check_inputs(x, sigmas)
    n_steps = sigmas.numel() - 1
    for i in range(n_steps):
        v = _call(velocity, x, sigmas[i], i)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1], omega_scale)
        if callback is not None:
            callback(i, n_steps, x)
    return x


def _derivative(x32: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """Heun slope (x − x0̂)/σ with x0̂ = x − σ·v, in float32 as the official scheduler forms it (design §7.3)."""
    denoised = x32 - v.float() * sigma
    return (x32 - denoised) / sigma


def sample_heun(
    velocity: Velocity,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    omega_scale: float | None = 10.0,
    callback: Callback | None = None,
) -> Tensor:
    """Heun over `sigmas` (any schedule, oss included): 2N − 1 model calls, call 2i at σ_i on x_i and call 2i + 1
    at σ_{i+1} on the Euler prediction, the last step plain Euler; omega rescale on dx in both kinds of step;
    the callback also sees the Euler predictions (design §7.3)."""
    sigmas = _check_inputs(x, sigmas)
    if not bool((sigmas[:-1] > 0).all()):
        raise ValueError(f"Heun needs every sigma but the last to be > 0, got {sigmas.tolist()}")
    n_steps = sigmas.numel() - 1
    n_calls = 2 * n_steps - 1
    for i in range(n_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x32 = x.float()
        slope = _derivative(x32, _call(velocity, x, sigma, 2 * i), sigma)
        dt = sigma_next - sigma
        x_pred = _apply_dx(x32, slope * dt, omega_scale).to(x.dtype)
        if callback is not None:
            callback(2 * i, n_calls, x_pred)
        if i == n_steps - 1:
            return x_pred
        slope_next = _derivative(x_pred.float(), _call(velocity, x_pred, sigma_next, 2 * i + 1), sigma_next)
        x = _apply_dx(x32, 0.5 * (slope + slope_next) * dt, omega_scale).to(x.dtype)
        if callback is not None:
            callback(2 * i + 1, n_calls, x)
    return x


def generator_noise(generators: torch.Generator | Sequence[torch.Generator]) -> NoiseFn:
    """PingPong noise source: float32 normal draws of the full batch shape from the FIRST generator only, made
    on that generator's device (official coupling, design §7.4, §7.9)."""
    if isinstance(generators, torch.Generator):
        generator = generators
    elif len(generators) > 0 and isinstance(generators[0], torch.Generator):
        generator = generators[0]
    else:
        raise ValueError(f"generator must be a torch.Generator or a non-empty list of them, got {generators!r}")

    def draw(step: int, shape: torch.Size) -> Tensor:
        return torch.empty(shape, dtype=torch.float32, device=generator.device).normal_(generator=generator)

    return draw


def sample_pingpong(
    velocity: Velocity,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """PingPong SDE over `sigmas`: x0̂ = x − σ_i·v, re-noised to σ_{i+1} with fresh noise each step (the last
    step still draws); noise from `generator` (its first item) or `noise_fn(step, shape)`; omega unused
    (design §7.4)."""
    if (generator is None) == (noise_fn is None):
        raise ValueError("sample_pingpong needs exactly one of generator or noise_fn")
    sigmas = _check_inputs(x, sigmas)
    draw = noise_fn if noise_fn is not None else generator_noise(generator)
    n_steps = sigmas.numel() - 1
    for i in range(n_steps):
        v = _call(velocity, x, sigmas[i], i)
        noise = draw(i, x.shape)
        if not isinstance(noise, Tensor) or noise.shape != x.shape:
            raise ValueError(f"noise_fn must return a tensor shaped like x {tuple(x.shape)}")
        x = pingpong_step(x, v, sigmas[i], sigmas[i + 1], noise)
        if callback is not None:
            callback(i, n_steps, x)
    return x


SCHEDULERS = ("euler", "heun", "pingpong")
"""The sampler table: every generation (tasks, StemGen) picks its sampler here by name."""


def run_sampler(scheduler: str, velocity: Velocity, x: Tensor, sigmas: Tensor, *, omega_scale: float,
                noise_fn: NoiseFn, callback: Callback | None = None) -> Tensor:
    """Run the sampler named `scheduler` (one of SCHEDULERS): Euler and Heun with the omega rescale, PingPong with
    `noise_fn` for its per-step noise (design §7.2–7.4)."""
    if scheduler == "euler":
        return sample_euler(velocity, x, sigmas, omega_scale=omega_scale, callback=callback)
    if scheduler == "heun":
        return sample_heun(velocity, x, sigmas, omega_scale=omega_scale, callback=callback)
    if scheduler == "pingpong":
        return sample_pingpong(velocity, x, sigmas, noise_fn=noise_fn, callback=callback)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
