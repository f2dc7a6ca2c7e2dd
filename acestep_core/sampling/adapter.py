"""The network side of sampling: encoder states of each guidance branch and the `predict(x, sigma, names)` that
runs the transformer for the requested branches (design §7.5, §7.6); `sample_guided` hands it to a sampler.

Every task (acestep_core.tasks) and StemGen (acestep_core.stemgen.generate) goes through `sample_guided`, so the
schedule, the sampler table and the guided velocity are the same for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..conditioning import ERG_TAU, Conditioning
from ..noise import NoiseSource
from .branch_rows import conditional_rows
from .denoiser import GuidanceConfig, Predict, make_guided_velocity
from .options import SamplerOptions
from .samplers import Callback, run_sampler
from .schedules import official_sigmas, oss_sigmas


@dataclass
class Branches:
    """Encoder states of each guidance branch for a batch, computed once per generation (design §7.5, §7.6)."""

    mask: Tensor  # [B, S] the conditional encoder mask, reused by every branch (official)
    cond: Tensor  # [B, S, D]
    uncond: Tensor | None
    text: Tensor | None
    erg_diffusion: bool
    conditioning: Conditioning | None = None  # the conditioning these states encode (for lyric timing)


def _repeat(t: Tensor, batch: int) -> Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def encode_branches(transformer, cond: Conditioning, batch: int, guidance: GuidanceConfig, *, need_uncond: bool) -> Branches:
    """Run the condition encoder for the conditional, unconditional and text-only branches (design §7.5, §7.6)."""
    p = next(transformer.parameters())
    c = cond.to(p.device, p.dtype)
    text, text_mask = _repeat(c.text_states, batch), _repeat(c.text_mask, batch)
    ids, lyric_mask = _repeat(c.lyric_ids, batch), _repeat(c.lyric_mask, batch)
    speaker0 = torch.zeros(batch, transformer.config.speaker_embedding_dim, device=p.device, dtype=p.dtype)
    states, mask = transformer.encode(text, text_mask, speaker0, ids, lyric_mask)
    uncond = text_only = None
    if need_uncond:
        if guidance.use_erg_lyric:
            null_text = _repeat(c.text_states_erg, batch) if guidance.use_erg_tag and c.text_states_erg is not None \
                else torch.zeros_like(text)
            uncond = transformer.encode(null_text, text_mask, speaker0, ids, lyric_mask, lyric_erg_tau=ERG_TAU)[0]
        else:
            uncond = transformer.encode(torch.zeros_like(text), text_mask, speaker0, torch.zeros_like(ids), lyric_mask)[0]
        if guidance.double_condition:
            if guidance.use_erg_lyric:
                text_only = transformer.encode(text, text_mask, speaker0, ids, lyric_mask, lyric_erg_tau=ERG_TAU)[0]
            else:
                text_only = transformer.encode(text, text_mask, speaker0, torch.zeros_like(ids), lyric_mask)[0]
    return Branches(mask, states, uncond, text_only, guidance.use_erg_diffusion, cond)


def make_predict(transformer, branches: Branches, options: SamplerOptions = SamplerOptions()):
    """The network side of guidance: velocity of each requested branch at (x, sigma) (design §7.5).

    With every speed switch off (options.speed) this makes the official separate calls. `batch_branches` runs the requested
    branches as one call, the ERG-diffusion temperature given per item; `reuse_cross_kv` computes the
    cross-attention K/V of all branches once (on first use) and slices it; `skip_full_masks` drops the masks
    when they are all ones (checked once); `linear_ff` is passed to the transformer; `compile` compiles its blocks.
    """
    speed = options.speed
    if speed.compile:
        from ..fast import compile_blocks

        compile_blocks(transformer)
    present = [n for n, s in (("cond", branches.cond), ("text", branches.text), ("uncond", branches.uncond))
               if s is not None]
    tau = {n: ERG_TAU if n == "uncond" and branches.erg_diffusion else None for n in present}
    full = speed.skip_full_masks and bool((branches.mask == 1).all())
    all_kv: list = []
    per_item_tau: dict[tuple, Tensor] = {}

    def rows(names: tuple[str, ...], t: Tensor) -> Tensor:
        """The batch rows of `names` in a tensor stacked over `present`: a view when they are adjacent."""
        b = branches.cond.shape[0]
        idx = [present.index(n) for n in names]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return t[idx[0] * b:(idx[-1] + 1) * b]
        return torch.cat([t[i * b:(i + 1) * b] for i in idx])

    def kv_of(names: tuple[str, ...]):
        if not speed.reuse_cross_kv:
            return None
        if not all_kv:
            states = torch.cat([getattr(branches, n) for n in present])
            all_kv.extend(transformer.cross_kv(states))
        return [(rows(names, k), rows(names, v)) for k, v in all_kv]

    def decode(x: Tensor, sigma: Tensor, names: tuple[str, ...]) -> Tensor:
        count = len(names)
        xs = x.repeat(count, 1, 1, 1) if count > 1 else x
        states = torch.cat([getattr(branches, n) for n in names]) if count > 1 else getattr(branches, names[0])
        t = (sigma.to(torch.float32) * 1000).expand(xs.shape[0]).to(x.device)
        taus = [tau[n] for n in names]
        erg = taus[0] if count == 1 else None
        if count > 1 and any(v is not None for v in taus):
            key = (names, x.shape[0])
            if key not in per_item_tau:
                per_item = torch.tensor([1.0 if v is None else v for v in taus], dtype=torch.float32)
                per_item_tau[key] = per_item.repeat_interleave(x.shape[0]).to(x.device)
            erg = per_item_tau[key]
        frames = mask = None
        if not full:
            frames = torch.ones(xs.shape[0], x.shape[-1], device=x.device, dtype=x.dtype)
            mask = branches.mask.repeat(count, 1)
        with conditional_rows(branches.conditioning, cond_rows(names, x.shape[0])):
            return transformer.decode(xs, frames, states, mask, t, erg_tau=erg, cross_kv=kv_of(names),
                                      linear_ff=speed.linear_ff)

    def predict(x: Tensor, sigma: Tensor, names: tuple[str, ...]) -> tuple[Tensor, ...]:
        if not speed.batch_branches or len(names) == 1:
            return tuple(decode(x, sigma, (n,)) for n in names)
        return decode(x, sigma, tuple(names)).chunk(len(names))

    return predict


def cond_rows(names: tuple[str, ...], batch: int) -> slice | None:
    """The batch rows of the conditional branch in a model call over the branches `names` stacked in that order."""
    if "cond" not in names:
        return None
    i = names.index("cond")
    return slice(i * batch, (i + 1) * batch)


def schedule_sigmas(options: SamplerOptions, dtype: torch.dtype) -> Tensor:
    """The sigma schedule of `options`: the optimal-step one when oss_steps is set, else the official (design §7.1)."""
    if options.oss_steps:
        return oss_sigmas(list(options.oss_steps), options.shift, dtype)
    return official_sigmas(options.steps, options.shift)


def sample_guided(predict: Predict, x: Tensor, sigmas: Tensor, options: SamplerOptions, noise: NoiseSource,
                  callback: Callback | None) -> Tensor:
    """Sample from x over sigmas with the official guided velocity of `predict` and the sampler of `options`.

    The guidance interval is over N = len(sigmas) − 1 steps, Heun's 2N − 1 call index included; PingPong's
    per-step noise is the whole-batch draw of the "manual" stream (design §7.4, §7.9).
    """
    velocity = make_guided_velocity(options.guidance, sigmas.numel() - 1, predict)
    return run_sampler(options.scheduler, velocity, x, sigmas, omega_scale=options.guidance.omega_scale,
                       noise_fn=lambda step, shape: noise.draw_shared("manual", shape), callback=callback)
