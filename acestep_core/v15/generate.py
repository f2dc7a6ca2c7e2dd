"""The ACE-Step 1.5 generation loop (official `AceStepConditionGenerationModel.generate_audio`, turbo and base).

`generate_audio(model, ...)` takes the tensors of the official call (official argument names) and a
`SamplerOptions`, and returns the final latents [B, T, C]. `model` is the 1.5 container
(`acestep_core/v15/model.py`): it must offer `prepare_condition(...)` and `decoder(...)` with the official
argument names, and `null_condition_emb` for the base variant's classifier-free guidance.

The two variants (facts from `acestep/models/turbo/modeling_acestep_v15_turbo.py` and
`acestep/models/base/modeling_acestep_v15_base.py`):
- turbo: the fixed 8-step tables (schedules.turbo_timesteps), no guidance, the last step jumps to x0 = x − v·t.
- base/sft: shifted linspace schedule, CFG with the null-condition embedding (APG by default, ADG optional) inside
  the CFG interval, Euler to t = 0 on every step.
Both: optional Heun (ODE) or SDE updates, velocity norm clamp and EMA, repaint step injection and boundary
crossfade, cover strength as a switch to the non-cover conditions, cover noise strength.

Where we differ from the official code (docs/acestep-15.md): the noise is always drawn on a CPU generator (the
official draws on the model's device, so CUDA noise differs from CPU noise); SDE re-noising draws from the per-item
generators instead of the global RNG; the base SDE re-noises to the schedule's next t (the official uses
1 − (i+1)/N, which ignores the shift); bad option combinations raise instead of falling back silently.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import guidance as G
from .schedules import base_schedule, turbo_timesteps

VARIANTS = ("turbo", "base")
INFER_METHODS = ("ode", "sde")
SAMPLERS = ("euler", "heun")
GUIDANCES = ("apg", "adg")
TURBO_STEPS = 8
MAX_SEED = 2**64 - 1
MAX_CROSSFADE_FRAMES = 10_000
# Official: "velocity norm clamp" and the corrector guard use this epsilon.
NORM_EPS = 1e-10

Callback = Callable[[int, int, Tensor], None]


@dataclass(frozen=True)
class SamplerOptions:
    """Every non-tensor setting of the official `generate_audio` (turbo and base), checked by `validate()`.

    `steps` is the base `infer_steps` (turbo runs its 8-step table or `timesteps`); `shift` defaults to the
    official per-variant default (turbo 3.0, base 1.0); `timesteps` is turbo only. `guidance_scale` ≤ 1 turns CFG
    off (base only; turbo has no guidance). `cfg_interval` is tested on t (1 = noise)."""

    variant: str = "turbo"
    steps: int | None = None
    shift: float | None = None
    timesteps: tuple[float, ...] | None = None
    guidance_scale: float = 7.0
    guidance: str = "apg"
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    audio_cover_strength: float = 1.0
    cover_noise_strength: float = 0.0
    repaint_injection_ratio: float = 0.5
    repaint_crossfade_frames: int = 10
    infer_method: str = "ode"
    sampler: str = "euler"
    velocity_norm_threshold: float = 0.0
    velocity_ema_factor: float = 0.0

    def validate(self) -> "SamplerOptions":
        """Return a copy with the defaults filled in, or raise ValueError naming the bad setting."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name, choices in (("infer_method", INFER_METHODS), ("sampler", SAMPLERS), ("guidance", GUIDANCES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.sampler == "heun" and self.infer_method == "sde":
            raise ValueError("sampler 'heun' needs infer_method 'ode' (Heun is an ODE solver); pick one of them")
        turbo = self.variant == "turbo"
        steps = self.steps
        if turbo:
            if steps not in (None, TURBO_STEPS):
                raise ValueError(
                    f"turbo runs its fixed {TURBO_STEPS}-step schedule; got steps={steps}. Leave steps empty, or "
                    "give custom `timesteps` (1-20 values) for another step count"
                )
        else:
            if self.timesteps is not None:
                raise ValueError("custom timesteps are a turbo option; base/sft use steps and shift")
            steps = 30 if steps is None else steps
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
                raise ValueError(f"steps must be an integer in [1, 1000], got {steps!r}")
        shift = (3.0 if turbo else 1.0) if self.shift is None else self.shift
        _finite("shift", shift, low=0.0, open_low=True, high=100.0)
        _finite("guidance_scale", self.guidance_scale, low=0.0, high=100.0)
        start, end = G.check_cfg_interval(*self.cfg_interval)
        for name in ("audio_cover_strength", "cover_noise_strength", "repaint_injection_ratio"):
            _finite(name, getattr(self, name), low=0.0, high=1.0)
        _finite("velocity_norm_threshold", self.velocity_norm_threshold, low=0.0, high=1e6)
        _finite("velocity_ema_factor", self.velocity_ema_factor, low=0.0, high=1.0, open_high=True)
        frames = self.repaint_crossfade_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or not 0 <= frames <= MAX_CROSSFADE_FRAMES:
            raise ValueError(
                f"repaint_crossfade_frames must be an integer in [0, {MAX_CROSSFADE_FRAMES}], got {frames!r}"
            )
        timesteps = None if self.timesteps is None else tuple(float(t) for t in self.timesteps)
        return replace(self, steps=steps, shift=float(shift), timesteps=timesteps, cfg_interval=(start, end))


def _finite(name, value, low, high, open_low=False, open_high=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low) or (open_high and value == high):
        lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value}")
    return float(value)


# --------------------------------------------------------------------------------------------------- randomness


def check_seeds(seed: int | Sequence[int], batch: int) -> list[int] | int:
    """A seed (int) or one seed per batch item, each an integer in [0, 2^64 − 1]."""
    if isinstance(seed, (list, tuple)):
        seeds = list(seed)
    elif isinstance(seed, Tensor) and seed.ndim == 1:
        seeds = [int(s) for s in seed.tolist()]
    else:
        seeds = [seed]
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2^64 - 1], got {s!r}")
    if not isinstance(seed, (list, tuple, Tensor)):
        return seed
    if len(seeds) != batch:
        raise ValueError(f"give one seed per batch item: {batch} items, {len(seeds)} seeds")
    return seeds


def seed_generators(seed: int | Sequence[int], batch: int) -> list[torch.Generator]:
    """CPU generators for a generation: one per item for a seed list, one shared for a single int seed."""
    checked = check_seeds(seed, batch)
    if isinstance(checked, int):
        return [torch.Generator("cpu").manual_seed(checked)]
    return [torch.Generator("cpu").manual_seed(s) for s in checked]


def draw_noise(generators: Sequence[torch.Generator], batch: int, length: int, channels: int) -> Tensor:
    """Standard normal noise [B, T, C] in float32 on the CPU, as the official `prepare_noise` draws it: one
    draw of [1, T, C] per item from its own generator (seed list), or one [B, T, C] draw (single seed)."""
    if len(generators) == 1 and batch != 1:
        return torch.randn((batch, length, channels), generator=generators[0], dtype=torch.float32)
    return torch.cat([torch.randn((1, length, channels), generator=g, dtype=torch.float32) for g in generators])


def seed_noise(seed: int | Sequence[int], batch: int, length: int, channels: int) -> Tensor:
    """The initial noise of a generation from its seed(s): README "Randomness" of the 1.5 fixtures."""
    return draw_noise(seed_generators(seed, batch), batch, length, channels)


# ------------------------------------------------------------------------------------------------ repaint helpers


def repaint_step_injection(x: Tensor, clean_src: Tensor, mask: Tensor, t_next, noise: Tensor) -> Tensor:
    """Keep `x` where `mask` is True (frames to generate); elsewhere put the clean source noised to `t_next` with
    the run's initial noise (official `_repaint_step_injection`)."""
    noised = t_next * noise + (1.0 - t_next) * clean_src
    return torch.where(mask.unsqueeze(-1).expand_as(x), x, noised)


def repaint_soft_mask(mask: Tensor, crossfade_frames: int) -> Tensor:
    """The float blend weight [B, T] of the generated latents (official `_repaint_boundary_blend`): 1 on the
    repaint span, linear ramps of `crossfade_frames` frames (end points excluded) outside it, 0 elsewhere.
    The ramps run around the first and last True frame of each row; rows that are all True or all False keep
    their 0/1 values."""
    soft = mask.to(torch.float32).clone()
    if crossfade_frames <= 0:
        return soft
    length = mask.shape[1]
    for b in range(mask.shape[0]):
        row = mask[b]
        if bool(row.all()) or not bool(row.any()):
            continue
        idx = torch.nonzero(row, as_tuple=False).squeeze(-1)
        left, right = int(idx[0]), int(idx[-1]) + 1
        start = max(left - crossfade_frames, 0)
        if left > start:
            soft[b, start:left] = torch.linspace(0, 1, left - start + 2, device=soft.device)[1:-1]
        end = min(right + crossfade_frames, length)
        if end > right:
            soft[b, right:end] = torch.linspace(1, 0, end - right + 2, device=soft.device)[1:-1]
    return soft


def repaint_boundary_blend(x: Tensor, clean_src: Tensor, mask: Tensor, crossfade_frames: int) -> Tensor:
    """m·x + (1 − m)·clean with m = `repaint_soft_mask` (official `_repaint_boundary_blend`)."""
    m = repaint_soft_mask(mask, crossfade_frames).to(x.dtype).unsqueeze(-1).expand_as(x)
    return m * x + (1.0 - m) * clean_src


# ---------------------------------------------------------------------------------------------------- the loop


def _velocity(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _clamp_norm(v: Tensor, x: Tensor, threshold: float) -> Tensor:
    """Scale v down so that ‖v‖ ≤ threshold·‖x‖ per item (official velocity norm clamp)."""
    v_norm = torch.norm(v, dim=(1, 2), keepdim=True)
    x_norm = torch.norm(x, dim=(1, 2), keepdim=True) + NORM_EPS
    return v * torch.clamp(threshold * x_norm / (v_norm + NORM_EPS), max=1.0)


def _check_btc(name: str, t: Tensor | None, batch: int, length: int, channels: int | None = None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.ndim != 3 or t.shape[0] != batch or t.shape[1] != length:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor [B={batch}, T={length}, C], got {got}")
    if channels is not None and t.shape[2] != channels:
        raise ValueError(f"{name} must have {channels} channels, got {t.shape[2]}")


def _silence_frames(silence_latent: Tensor, length: int) -> Tensor:
    """The first `length` frames of the silence latent [1, L, C], tiled when it is shorter."""
    if silence_latent.shape[1] < length:
        reps = -(-length // silence_latent.shape[1])
        silence_latent = silence_latent.repeat(1, reps, 1)
    return silence_latent[:, :length, :]


@torch.no_grad()
def generate_audio(
    model,
    *,
    text_hidden_states: Tensor,
    text_attention_mask: Tensor,
    lyric_hidden_states: Tensor,
    lyric_attention_mask: Tensor,
    refer_audio_acoustic_hidden_states_packed: Tensor,
    refer_audio_order_mask: Tensor,
    src_latents: Tensor,
    chunk_masks: Tensor,
    is_covers: Tensor,
    silence_latent: Tensor,
    attention_mask: Tensor | None = None,
    non_cover_text_hidden_states: Tensor | None = None,
    non_cover_text_attention_mask: Tensor | None = None,
    precomputed_lm_hints_25Hz: Tensor | None = None,
    audio_codes: Tensor | None = None,
    repaint_mask: Tensor | None = None,
    clean_src_latents: Tensor | None = None,
    options: SamplerOptions = SamplerOptions(),
    seed: int | Sequence[int] | None = None,
    noise: Tensor | None = None,
    callback: Callback | None = None,
    interrupt: Callable[[], None] | None = None,
    record: dict[str, Tensor] | None = None,
) -> Tensor:
    """Generate latents [B, T, C] as the official `generate_audio` does (see the module docstring).

    Give either `seed` (an int, or one int per item: the official per-item noise) or `noise` [B, T, C].
    `callback(step, total, x)` runs after every step (0-based step); `interrupt()` runs before every step and
    stops the run by raising. `record`, when given, receives the per-step tensors under the names of the 1.5
    parity fixtures (`x_t.step_N`, `decoder_output.step_N`, `velocity.step_N`, `timestep.step_N`,
    `prepare_condition[_non_cover].*`)."""
    opts = options.validate()
    if not isinstance(src_latents, Tensor) or src_latents.ndim != 3:
        raise ValueError("src_latents must be a tensor [B, T, C]")
    batch, length, channels = src_latents.shape
    if length < 1 or batch < 1:
        raise ValueError(f"src_latents must hold at least one item and one frame, got {tuple(src_latents.shape)}")
    _check_btc("chunk_masks", chunk_masks, batch, length, channels)
    _check_btc("clean_src_latents", clean_src_latents, batch, length, channels)
    if not isinstance(is_covers, Tensor) or tuple(is_covers.shape) != (batch,):
        raise ValueError(f"is_covers must be a tensor [B={batch}]")
    if not isinstance(silence_latent, Tensor) or silence_latent.ndim != 3 or silence_latent.shape[2] != channels:
        raise ValueError(f"silence_latent must be a tensor [1, L, {channels}]")
    if (repaint_mask is None) != (clean_src_latents is None):
        raise ValueError("repaint needs both repaint_mask [B, T] and clean_src_latents [B, T, C], or neither")
    if repaint_mask is not None:
        if not isinstance(repaint_mask, Tensor) or tuple(repaint_mask.shape) != (batch, length):
            raise ValueError(f"repaint_mask must be a tensor [B={batch}, T={length}]")
        repaint_mask = repaint_mask.to(torch.bool)
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, device=src_latents.device, dtype=src_latents.dtype)
    elif tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be [B={batch}, T={length}], got {tuple(attention_mask.shape)}")
    switching = opts.audio_cover_strength < 1.0
    if switching and (non_cover_text_hidden_states is None or non_cover_text_attention_mask is None):
        raise ValueError(
            "audio_cover_strength < 1 switches to the non-cover conditions: give non_cover_text_hidden_states and "
            "non_cover_text_attention_mask (the text2music prompt), or set audio_cover_strength to 1"
        )
    if (seed is None) == (noise is None):
        raise ValueError("give exactly one of seed (int or one int per item) and noise [B, T, C]")
    generators: list[torch.Generator] = []
    if noise is None:
        generators = seed_generators(seed, batch)
        noise = draw_noise(generators, batch, length, channels)
    else:
        _check_btc("noise", noise, batch, length, channels)
    if opts.infer_method == "sde" and not generators:
        raise ValueError("infer_method 'sde' draws fresh noise every step: give a seed, not a noise tensor")

    condition_kwargs = dict(
        lyric_hidden_states=lyric_hidden_states,
        lyric_attention_mask=lyric_attention_mask,
        refer_audio_acoustic_hidden_states_packed=refer_audio_acoustic_hidden_states_packed,
        refer_audio_order_mask=refer_audio_order_mask,
        attention_mask=attention_mask,
        silence_latent=silence_latent,
        chunk_masks=chunk_masks,
    )
    enc, enc_mask, ctx = model.prepare_condition(
        text_hidden_states=text_hidden_states,
        text_attention_mask=text_attention_mask,
        hidden_states=src_latents,
        src_latents=src_latents,
        is_covers=is_covers,
        precomputed_lm_hints_25Hz=precomputed_lm_hints_25Hz,
        audio_codes=audio_codes,
        **condition_kwargs,
    )
    _record(record, "prepare_condition", enc, enc_mask, ctx)
    non_cover = None
    if switching:
        silence = _silence_frames(silence_latent, length).expand(batch, -1, -1)
        non_cover = model.prepare_condition(
            text_hidden_states=non_cover_text_hidden_states,
            text_attention_mask=non_cover_text_attention_mask,
            hidden_states=silence,
            src_latents=silence,
            is_covers=torch.zeros_like(is_covers),
            precomputed_lm_hints_25Hz=None,
            audio_codes=None,
            **condition_kwargs,
        )
        _record(record, "prepare_condition_non_cover", *non_cover)

    dtype, device = ctx.dtype, ctx.device
    noise = noise.to(device=device, dtype=dtype)
    state = _LoopState(
        model=model, opts=opts, noise=noise, generators=generators, attention_mask=attention_mask,
        cond=(enc, enc_mask, ctx), non_cover=non_cover, repaint_mask=repaint_mask,
        clean_src=None if clean_src_latents is None else clean_src_latents.to(device=device, dtype=dtype),
        callback=callback, interrupt=interrupt, record=record,
    )
    src = src_latents.to(device=device, dtype=dtype)
    x = _turbo_loop(state, src) if opts.variant == "turbo" else _base_loop(state, src)
    if state.repaint_mask is not None and opts.repaint_crossfade_frames > 0:
        # Official: the blend runs only with a crossfade > 0; with 0 the regenerated frames outside the span stay.
        x = repaint_boundary_blend(x, state.clean_src, state.repaint_mask.to(device), opts.repaint_crossfade_frames)
    return x


def _record(record, prefix, enc, enc_mask, ctx) -> None:
    if record is not None:
        record[f"{prefix}.encoder_hidden_states"] = enc
        record[f"{prefix}.encoder_attention_mask"] = enc_mask
        record[f"{prefix}.context_latents"] = ctx


@dataclass
class _LoopState:
    model: object
    opts: SamplerOptions
    noise: Tensor
    generators: list
    attention_mask: Tensor
    cond: tuple
    non_cover: tuple | None
    repaint_mask: Tensor | None
    clean_src: Tensor | None
    callback: Callback | None
    interrupt: Callable[[], None] | None
    record: dict | None

    def decoder(self, x, t, attention_mask, cond) -> Tensor:
        enc, enc_mask, ctx = cond
        return _velocity(self.model.decoder(
            hidden_states=x, timestep=t, timestep_r=t, attention_mask=attention_mask,
            encoder_hidden_states=enc, encoder_attention_mask=enc_mask, context_latents=ctx, use_cache=False,
        ))

    def fresh_noise(self, like: Tensor) -> Tensor:
        """SDE re-noising noise: the next draw of each item's generator (ours; the official uses the global RNG)."""
        batch, length, channels = like.shape
        return draw_noise(self.generators, batch, length, channels).to(device=like.device, dtype=like.dtype)

    def cover_noise_start(self, src: Tensor, t_values: list[float]) -> tuple[Tensor, int]:
        """x at the start and the first step index: cover_noise_strength > 0 starts from the source noised to the
        schedule value nearest 1 − strength (official "cover noise initialization")."""
        strength = self.opts.cover_noise_strength
        if strength <= 0.0:
            return self.noise, 0
        level = 1.0 - strength
        nearest = min(t_values, key=lambda v: abs(v - level))
        return nearest * self.noise + (1 - nearest) * src, t_values.index(nearest)

    def after_step(self, i: int, total: int, x: Tensor, t_next, injection_cutoff: int) -> Tensor:
        if self.repaint_mask is not None and i < injection_cutoff:
            x = repaint_step_injection(x, self.clean_src, self.repaint_mask.to(x.device), t_next, self.noise)
        return x

    def report(self, i: int, total: int, x: Tensor) -> None:
        if self.record is not None:
            self.record[f"x_t.step_{i}"] = x
        if self.callback is not None:
            self.callback(i, total, x)


def _turbo_loop(s: _LoopState, src: Tensor) -> Tensor:
    o = s.opts
    t_list = turbo_timesteps(o.shift, o.timesteps)
    x, start = s.cover_noise_start(src, t_list)
    t_list = t_list[start:]
    schedule = torch.tensor(t_list, dtype=x.dtype, device=x.device)
    total = len(schedule)
    batch = x.shape[0]
    cover_steps = int(total * o.audio_cover_strength)
    injection_cutoff = round(o.repaint_injection_ratio * total)
    cond, attention_mask = s.cond, s.attention_mask
    prev_v = None
    for i in range(total):
        if s.interrupt is not None:
            s.interrupt()
        t_now = schedule[i].item()
        t_vec = t_now * torch.ones((batch,), device=x.device, dtype=x.dtype)
        if i == cover_steps and s.non_cover is not None:
            cond = s.non_cover
        v = s.decoder(x, t_vec, attention_mask, cond)
        if s.record is not None:
            s.record[f"decoder_output.step_{i}"] = v
            s.record[f"timestep.step_{i}"] = t_vec
        if o.velocity_norm_threshold > 0:
            v = _clamp_norm(v, x, o.velocity_norm_threshold)
        if o.velocity_ema_factor > 0 and prev_v is not None:
            v = (1.0 - o.velocity_ema_factor) * v + o.velocity_ema_factor * prev_v
        if i == total - 1:
            x = x - v * t_vec.unsqueeze(-1).unsqueeze(-1)
            s.report(i, total, x)
            break
        t_next = schedule[i + 1].item()
        if o.infer_method == "sde":
            x0 = x - v * t_vec.unsqueeze(-1).unsqueeze(-1)
            x = t_next * s.fresh_noise(x) + (1 - t_next) * x0
        else:
            dt = (t_now - t_next) * torch.ones((batch,), device=x.device, dtype=x.dtype).unsqueeze(-1).unsqueeze(-1)
            if o.sampler == "heun":
                x_pred = x - v * dt
                t_next_vec = t_next * torch.ones((batch,), device=x.device, dtype=x.dtype)
                v2 = s.decoder(x_pred, t_next_vec, attention_mask, cond)
                if o.velocity_norm_threshold > 0:
                    v2 = _clamp_norm(v2, x_pred, o.velocity_norm_threshold)
                if o.velocity_ema_factor > 0:
                    v2 = (1.0 - o.velocity_ema_factor) * v2 + o.velocity_ema_factor * v
                v = 0.5 * (v + v2)
            x = x - v * dt
        prev_v = v
        x = s.after_step(i, total, x, t_next, injection_cutoff)
        s.report(i, total, x)
    return x


def _with_null(model, cond: tuple) -> tuple:
    """Conditional rows first, then the null-condition rows (official CFG batch layout)."""
    enc, enc_mask, ctx = cond
    null = model.null_condition_emb.to(dtype=enc.dtype, device=enc.device).expand_as(enc)
    return torch.cat([enc, null]), torch.cat([enc_mask, enc_mask]), torch.cat([ctx, ctx])


def _base_loop(s: _LoopState, src: Tensor) -> Tensor:
    o = s.opts
    t = base_schedule(o.steps, o.shift, dtype=s.noise.dtype).to(s.noise.device)
    x, start = s.cover_noise_start(src, t[:-1].tolist())
    t = t[start:]
    total = len(t) - 1
    batch = x.shape[0]
    cover_steps = int(total * o.audio_cover_strength)
    injection_cutoff = round(o.repaint_injection_ratio * total)
    do_cfg = o.guidance_scale > 1.0
    start_t, end_t = o.cfg_interval
    cond, attention_mask = s.cond, s.attention_mask
    if do_cfg:
        cond = _with_null(s.model, cond)
        attention_mask = torch.cat([attention_mask, attention_mask])
    momentum = G.MomentumBuffer()
    prev_v = None

    def guided(raw: Tensor, x_now: Tensor, t_now: Tensor, corrector: bool) -> Tensor:
        if not do_cfg:
            return raw
        cond_v, null_v = raw.chunk(2)
        if not G.in_cfg_interval(t_now, start_t, end_t):
            return cond_v
        if o.guidance == "adg":
            if corrector and not bool(t_now > 0):
                return G.cfg(cond_v, null_v, o.guidance_scale)  # official guard: ADG divides by t
            return G.adg(x_now, cond_v, null_v, t_now, o.guidance_scale)
        if corrector:
            # Official Heun corrector: plain CFG, so the APG momentum moves once per step.
            return G.cfg(cond_v, null_v, o.guidance_scale)
        return G.apg(cond_v, null_v, o.guidance_scale, momentum)

    for i in range(total):
        if s.interrupt is not None:
            s.interrupt()
        t_now, t_next = t[i], t[i + 1]
        if i == cover_steps and s.non_cover is not None:
            cond = _with_null(s.model, s.non_cover) if do_cfg else s.non_cover
        x_in = torch.cat([x, x]) if do_cfg else x
        t_vec = t_now * torch.ones((x_in.shape[0],), device=x.device, dtype=x.dtype)
        raw = s.decoder(x_in, t_vec, attention_mask, cond)
        v = guided(raw, x, t_now, corrector=False)
        if o.velocity_norm_threshold > 0:
            v = _clamp_norm(v, x, o.velocity_norm_threshold)
        if o.velocity_ema_factor > 0 and prev_v is not None:
            v = (1.0 - o.velocity_ema_factor) * v + o.velocity_ema_factor * prev_v
        if o.infer_method == "sde":
            x0 = x - v * t_now
            x = t_next * s.fresh_noise(x) + (1 - t_next) * x0
        else:
            dt = (t_now - t_next) * torch.ones((batch,), device=x.device, dtype=x.dtype).unsqueeze(-1).unsqueeze(-1)
            if o.sampler == "heun":
                x_pred = x - v * dt
                x2 = torch.cat([x_pred, x_pred]) if do_cfg else x_pred
                t2 = t_next * torch.ones((x2.shape[0],), device=x.device, dtype=x.dtype)
                v2 = guided(s.decoder(x2, t2, attention_mask, cond), x_pred, t_next, corrector=True)
                if o.velocity_norm_threshold > 0:
                    v2 = _clamp_norm(v2, x_pred, o.velocity_norm_threshold)
                if o.velocity_ema_factor > 0:
                    v2 = (1.0 - o.velocity_ema_factor) * v2 + o.velocity_ema_factor * v
                v = 0.5 * (v + v2)
            x = x - v * dt
        if s.record is not None:
            s.record[f"decoder_output.step_{i}"] = raw
            s.record[f"timestep.step_{i}"] = t_vec
            s.record[f"velocity.step_{i}"] = v
        prev_v = v
        x = s.after_step(i, total, x, t_next, injection_cutoff)
        s.report(i, total, x)
    return x
