"""The ACE-Step v1 tasks, each a small function around the shared samplers (design §7, §8).

text2music / retake / audio2audio build a start latent and run a sampler over the guided velocity;
repaint / extend run the official mask-blend loop; flow-edit is its own short sampler. All of them take
a :class:`~acestep_core.noise.NoiseSource` (seeded generators or replayed noise) and report progress
through ``callback(step, total, x)``, which may raise to interrupt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import Conditioning
from .latent import LATENT_CHANNELS, LATENT_HEIGHT, MAX_FRAMES, check_latent, frames_for_seconds  # noqa: F401
from .noise import NoiseSource
from .sampling.adapter import Branches, _repeat, encode_branches, make_predict, sample_guided, schedule_sigmas
from .sampling.branch_rows import conditional_rows
from .sampling.denoiser import GuidanceConfig, guided_velocity  # noqa: F401
from .sampling.guidance import MomentumBuffer, apg
from .validation import MAX_N_AVG, check_count
from .sampling.options import EAGER, SamplerOptions, SpeedOptions, with_options  # noqa: F401  (re-exported: callers import them here)
from .sampling.samplers import SCHEDULERS, Callback, euler_step  # noqa: F401
from .sampling.schedules import audio2audio_sigmas, heun_call_sigmas, official_sigmas  # noqa: F401


def _run_sampler(
    transformer, branches: Branches, x: Tensor, sigmas: Tensor, options: SamplerOptions,
    noise: NoiseSource, callback: Callback | None,
) -> Tensor:
    """Sample from x over sigmas with the official guided velocity of the transformer's branches."""
    return sample_guided(make_predict(transformer, branches, options), x, sigmas, options, noise, callback)


def _model_dtype(transformer) -> tuple[torch.device, torch.dtype]:
    p = next(transformer.parameters())
    return p.device, p.dtype


# --------------------------------------------------------------------------------------------------
# tasks


def text2music(
    transformer, cond: Conditioning, frames: int, *, batch_size: int = 1, options: SamplerOptions = SamplerOptions(),
    noise: NoiseSource, retake_variance: float = 0.0, callback: Callback | None = None,
) -> Tensor:
    """Text to music from fresh noise; retake_variance > 0 mixes in retake noise (retake / variations, design §8)."""
    device, dtype = _model_dtype(transformer)
    if frames > MAX_FRAMES:
        raise ValueError(f"duration is {frames} frames, past the model's 240 s ({MAX_FRAMES} frames); use long-form generation")
    shape = (batch_size, LATENT_CHANNELS, LATENT_HEIGHT, int(frames))
    x = noise.draw("manual", shape).to(device, dtype)
    if retake_variance:
        x = retake_mix(x, noise.draw("retake", shape).to(device, dtype), retake_variance)
    sigmas = schedule_sigmas(options, dtype)
    branches = encode_branches(transformer, cond, batch_size, options.guidance, need_uncond=options.guidance.do_cfg)
    return _run_sampler(transformer, branches, x, sigmas, options, noise, callback)


def retake_mix(base: Tensor, retake: Tensor, variance: float) -> Tensor:
    """cos(θ)·base + sin(θ)·retake with θ = variance·π/2 in the model dtype (design §8 retake)."""
    variance = float(variance)
    if not 0.0 <= variance <= 1.0:
        raise ValueError(f"variance must be in [0, 1], got {variance}")
    theta = torch.tensor(variance * math.pi / 2).to(base.device, base.dtype)
    return torch.cos(theta) * base + torch.sin(theta) * retake


def audio2audio(
    transformer, cond: Conditioning, reference: Tensor, *, ref_strength: float = 0.5, batch_size: int = 1,
    options: SamplerOptions = SamplerOptions(), noise: NoiseSource, callback: Callback | None = None,
) -> Tensor:
    """Start from the reference latent noised to σ* = shift(1 − strength) and sample the rest (design §8 audio2audio)."""
    check_latent(reference, "reference latent")
    if options.oss_steps:
        raise ValueError("oss_steps cannot be combined with audio2audio; clear oss_steps")
    device, dtype = _model_dtype(transformer)
    ref = _repeat(reference.to(device, dtype), batch_size)
    schedule = audio2audio_sigmas(options.steps, ref_strength, options.shift)
    n0 = noise.draw("manual", tuple(ref.shape)).to(device, dtype)
    s = schedule.start_sigma
    x = ref * (1 - s) + n0 * s
    branches = encode_branches(transformer, cond, batch_size, options.guidance, need_uncond=options.guidance.do_cfg)
    return _run_sampler(transformer, branches, x, schedule.sigmas, options, noise, callback)


def _blend_loop(
    transformer, branches: Branches, x0: Tensor, z: Tensor, mask: Tensor, n_min: int, options: SamplerOptions,
    callback: Callback | None,
) -> Tensor:
    """Official repaint/extend loop: skip steps < n_min, noise x0 to σ at n_min, then plain Euler on the
    guided velocity with everything outside `mask` pinned to the source's noising path (design §8)."""
    sigmas = official_sigmas(options.steps, options.shift)
    t = sigmas * 1000  # the official loop works from timesteps/1000
    n = options.steps
    predict = make_predict(transformer, branches, options)
    momentum = MomentumBuffer()
    keep = mask == 0
    x = None
    for i in range(n_min, n):
        t_i = t[i] / 1000
        t_next = t[i + 1] / 1000 if i + 1 < n else torch.zeros_like(t_i)
        if x is None:
            x = ((1 - t_i) * x0 + t_i * z).to(x0.dtype)
        v = guided_velocity(x, sigmas[i], i, config=options.guidance, n_steps=n, predict=predict, momentum=momentum)
        x = euler_step(x, v, t_i, t_next, None)
        x = torch.where(keep, ((1 - t_next) * x0 + t_next * z).to(x.dtype), x)
        if callback is not None:
            callback(i, n, x)
    return x0.clone() if x is None else x


def repaint(
    transformer, cond: Conditioning, source: Tensor, start_frame: int, end_frame: int, *, variance: float = 0.5,
    batch_size: int = 1, options: SamplerOptions = SamplerOptions(), noise: NoiseSource,
    callback: Callback | None = None,
) -> Tensor:
    """Regenerate frames [start, end) of `source`, keeping the rest (design §8 repaint).

    A window that covers the whole song is a retake of fresh noise, as official.
    """
    check_latent(source, "source latent")
    device, dtype = _model_dtype(transformer)
    frames = source.shape[-1]
    if not 0 <= start_frame < end_frame <= frames:
        raise ValueError(
            f"repaint region frames [{start_frame}, {end_frame}) must lie inside the source's {frames} frames "
            "with start before end"
        )
    shape = (batch_size, LATENT_CHANNELS, LATENT_HEIGHT, frames)
    n0 = noise.draw("manual", shape).to(device, dtype)
    nr = noise.draw("retake", shape).to(device, dtype)
    branches = encode_branches(transformer, cond, batch_size, options.guidance, need_uncond=options.guidance.do_cfg)
    if end_frame - start_frame == frames:
        x = retake_mix(n0, nr, variance)
        return _run_sampler(transformer, branches, x, schedule_sigmas(options, dtype), options, noise, callback)
    mask = torch.zeros(shape, device=device, dtype=dtype)
    mask[..., start_frame:end_frame] = 1
    z = torch.where(mask == 1, retake_mix(n0, nr, variance), n0)
    x0 = _repeat(source.to(device, dtype), batch_size)
    n_min = int(options.steps * (1 - float(variance)))
    return _blend_loop(transformer, branches, x0, z, mask, n_min, options, callback)


def extend(
    transformer, cond: Conditioning, source: Tensor, left_frames: int, right_frames: int, *, variance: float = 1.0,
    batch_size: int = 1, options: SamplerOptions = SamplerOptions(), noise: NoiseSource,
    callback: Callback | None = None,
) -> Tensor:
    """Add new frames before and/or after `source`, generating only those (design §8 extend).

    Official numbers for one side within the source length; beyond that (longer than the source, both sides
    past 240 s) the official code breaks and this does the right thing: fresh noise for every new frame, and a
    240 s window that keeps the far part of the source aside and re-attaches it untouched.
    """
    check_latent(source, "source latent")
    left_frames, right_frames = int(left_frames), int(right_frames)
    if left_frames < 0 or right_frames < 0 or left_frames + right_frames == 0:
        raise ValueError(f"extend needs left or right seconds > 0 (got {left_frames} and {right_frames} frames)")
    if left_frames > MAX_FRAMES - 1 or right_frames > MAX_FRAMES - 1:
        raise ValueError("one extension step is limited to just under 240 s; extend in several steps")
    if left_frames and right_frames and left_frames + right_frames + source.shape[-1] > MAX_FRAMES:
        once = extend(transformer, cond, source, left_frames, 0, variance=variance, batch_size=batch_size,
                      options=options, noise=noise, callback=callback)
        return extend(transformer, cond, once, 0, right_frames, variance=variance, batch_size=batch_size,
                      options=options, noise=noise, callback=callback)
    device, dtype = _model_dtype(transformer)
    src = _repeat(source.to(device, dtype), batch_size)
    t_src = src.shape[-1]
    shape = (batch_size, LATENT_CHANNELS, LATENT_HEIGHT, t_src)
    n0 = noise.draw("manual", shape).to(device, dtype)
    nr = noise.draw("retake", shape).to(device, dtype)
    if left_frames + right_frames <= t_src:
        left_noise, right_noise = nr[..., :left_frames], nr[..., t_src - right_frames:]
    else:
        extra = noise.draw("retake", (batch_size, LATENT_CHANNELS, LATENT_HEIGHT, left_frames + right_frames))
        extra = extra.to(device, dtype)
        left_noise, right_noise = extra[..., :left_frames], extra[..., left_frames:]
    padded = torch.nn.functional.pad(src, (left_frames, right_frames))
    z = torch.cat([left_noise, n0, right_noise], dim=-1)
    mask = torch.zeros_like(padded)
    mask[..., :left_frames] = 1
    if right_frames:
        mask[..., -right_frames:] = 1
    # keep the window inside 240 s: set the far end of the source aside
    aside_left = aside_right = None
    total = padded.shape[-1]
    if total > MAX_FRAMES:
        cut = total - MAX_FRAMES
        if right_frames:
            aside_left, padded, z, mask = padded[..., :cut], padded[..., cut:], z[..., cut:], mask[..., cut:]
        else:
            aside_right, padded, z, mask = padded[..., -cut:], padded[..., :-cut], z[..., :-cut], mask[..., :-cut]
    branches = encode_branches(transformer, cond, batch_size, options.guidance, need_uncond=options.guidance.do_cfg)
    n_min = int(options.steps * (1 - float(variance)))
    out = _blend_loop(transformer, branches, padded, z, mask, n_min, options, callback)
    parts = [p for p in (aside_left, out, aside_right) if p is not None]
    return torch.cat(parts, dim=-1)


# --------------------------------------------------------------------------------------------------
# flow-edit


@dataclass(frozen=True)
class EditOptions:
    """Flow-edit knobs (design §8 edit): the edited share of the schedule and the averaging count."""

    n_min: float = 0.0
    n_max: float = 1.0
    n_avg: int = 1

    def __post_init__(self) -> None:
        if not (0.0 <= self.n_min <= self.n_max <= 1.0):
            raise ValueError(f"edit needs 0 <= n_min <= n_max <= 1, got n_min={self.n_min}, n_max={self.n_max}")
        check_count("n_avg", self.n_avg, MAX_N_AVG)


def _edit_states(transformer, cond: Conditioning, batch: int, with_uncond: bool) -> tuple[Tensor, Tensor]:
    """Encoder states for flow-edit: conditional then unconditional (zero text, speaker, lyric ids AND lyric mask)
    stacked on the batch, computed once (the official code recomputes them at every call)."""
    device, dtype = _model_dtype(transformer)
    c = cond.to(device, dtype)
    text, text_mask = _repeat(c.text_states, batch), _repeat(c.text_mask, batch)
    ids, lyric_mask = _repeat(c.lyric_ids, batch), _repeat(c.lyric_mask, batch)
    speaker = torch.zeros(batch, transformer.config.speaker_embedding_dim, device=device, dtype=dtype)
    if with_uncond:
        text = torch.cat([text, torch.zeros_like(text)])
        text_mask = torch.cat([text_mask, text_mask])
        speaker = torch.cat([speaker, speaker])
        ids = torch.cat([ids, torch.zeros_like(ids)])
        lyric_mask = torch.cat([lyric_mask, torch.zeros_like(lyric_mask)])
    return transformer.encode(text, text_mask, speaker, ids, lyric_mask)


def flow_edit(
    transformer, source_cond: Conditioning, target_cond: Conditioning, source: Tensor, *,
    edit: EditOptions = EditOptions(), batch_size: int = 1, options: SamplerOptions = SamplerOptions(),
    noise: NoiseSource, callback: Callback | None = None,
) -> Tensor:
    """FlowEdit from the source prompt/lyrics to the target ones (design §8 edit).

    Always the Euler schedule with APG at guidance_scale on every step, cond/uncond batched in one call, noise
    from the retake stream. Unlike the official code this works for batch > 1 (the source is repeated) and,
    with the PingPong sampler, the edit phase moves the latent (the official one leaves it unchanged).
    """
    check_latent(source, "source latent")
    device, dtype = _model_dtype(transformer)
    x_src = _repeat(source.to(device, dtype), batch_size)
    scale = options.guidance.guidance_scale
    do_cfg = scale not in (0.0, 1.0)
    src_states, src_mask = _edit_states(transformer, source_cond, batch_size, do_cfg)
    tar_states, tar_mask = _edit_states(transformer, target_cond, batch_size, do_cfg)
    sigmas = official_sigmas(options.steps, options.shift)
    t = sigmas * 1000
    n = options.steps
    n_min, n_max = int(n * edit.n_min), int(n * edit.n_max)
    frames = torch.ones(x_src.shape[0] * (2 if do_cfg else 1), x_src.shape[-1], device=device, dtype=dtype)
    # fast path: each condition's cross-attention K/V once per edit, not at every call (as in text2music)
    kv = {id(s): transformer.cross_kv(s) for s in (src_states, tar_states)} if options.speed.reuse_cross_kv else {}

    def v_of(z: Tensor, t_value: Tensor, states: Tensor, mask: Tensor, momentum: MomentumBuffer | None,
             cond: Conditioning) -> Tensor:
        inp = torch.cat([z, z]) if do_cfg else z
        with conditional_rows(cond, slice(0, z.shape[0])):                  # conditional rows first
            v = transformer.decode(inp, frames, states, mask, t_value.expand(inp.shape[0]),
                                   cross_kv=kv.get(id(states)), linear_ff=options.speed.linear_ff)
        if not do_cfg:
            return v
        v_c, v_u = v.chunk(2)
        return apg(v_c, v_u, scale, momentum)

    shape = tuple(x_src.shape)
    momentum_src, momentum_tar = MomentumBuffer(), MomentumBuffer()
    z_edit, x_tar = x_src.clone(), None
    for i in range(n_min, n):
        t_i = t[i] / 1000
        t_next = t[i + 1] / 1000 if i + 1 < n else torch.zeros_like(t_i)
        if i < n_max:
            delta = torch.zeros_like(x_src)
            for _ in range(edit.n_avg):
                eps = noise.draw("retake", shape).to(device, dtype)
                z_src = (1 - t_i) * x_src + t_i * eps
                z_tar = z_edit + z_src - x_src
                v_src = v_of(z_src, t[i], src_states, src_mask, momentum_src, source_cond)
                v_tar = v_of(z_tar, t[i], tar_states, tar_mask, None, target_cond)
                delta = delta + (1 / edit.n_avg) * (v_tar - v_src)
            z_edit = (z_edit.float() + (t_next - t_i) * delta).to(dtype)
        else:
            if i == n_max:
                eps = noise.draw("retake", shape).to(device, dtype)
                x_tar = z_edit + (sigmas[i] * eps + (1 - sigmas[i]) * x_src) - x_src
            v_tar = v_of(x_tar, t[i], tar_states, tar_mask, momentum_tar, target_cond)
            if options.scheduler == "pingpong":
                x_tar = (x_tar.float() - t_i * v_tar.float())
                x_tar = ((1 - t_next) * x_tar + t_next * noise.draw_shared("retake", shape).float()).to(dtype)
            else:
                x_tar = (x_tar.float() + (t_next - t_i) * v_tar).to(dtype)
        if callback is not None:
            callback(i, n, z_edit if x_tar is None else x_tar)
    return z_edit if x_tar is None else x_tar


TASKS = ("text2music", "repaint", "extend", "audio2audio")
"""The tasks `run_task` runs by name (flow edit has two conditionings and its own entry point)."""


def run_task(task: str, transformer, cond: Conditioning, source: Tensor, settings: dict, **common) -> Tensor:
    """Run one task by name on `source` with its settings (the sampler node's latent mark, design §8).

    `settings`: text2music {"retake_variance"} (source gives the length); repaint {"start_frame", "end_frame",
    "variance"}; extend {"left_frames", "right_frames", "variance"}; audio2audio {"ref_strength"}. `common` is
    batch_size / options / noise / callback, as every task takes them.
    """
    if task == "text2music":
        return text2music(transformer, cond, source.shape[-1], retake_variance=settings["retake_variance"], **common)
    if task == "repaint":
        return repaint(transformer, cond, source, settings["start_frame"], settings["end_frame"],
                       variance=settings["variance"], **common)
    if task == "extend":
        return extend(transformer, cond, source, settings["left_frames"], settings["right_frames"],
                      variance=settings["variance"], **common)
    if task == "audio2audio":
        return audio2audio(transformer, cond, source, ref_strength=settings["ref_strength"], **common)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
