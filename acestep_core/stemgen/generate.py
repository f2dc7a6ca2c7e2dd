"""Generation with a StemGen control branch: sample a stem (or an accompaniment) for a reference track, and mix it
back with the reference (docs/stemgen.md).

The sampler is the ordinary one (design §7: schedule, Euler/Heun/PingPong, CFG/APG/CFG-Zero*, ERG); only the
network call changes: every guidance branch runs `controlled_decode` with the same reference latent and timbre,
so guidance pushes towards the instrument tags while the control keeps the stem in time with the reference.
The LoRA of a StemGen file is applied by the caller (node: on the model's LoRA stack; scripts: `stemgen_lora`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import fast
from ..audio import SAMPLE_RATE, encode_audio, prepare_audio, resample
from ..conditioning import ERG_TAU, Conditioning, encode_conditioning
from ..lora import apply_loras
from ..noise import NoiseSource, noise_for_seed
from ..sampling.adapter import cond_rows, sample_guided, schedule_sigmas
from ..sampling.branch_rows import conditional_rows
from ..latent import MAX_FRAMES, check_latent
from ..tasks import Branches, Callback, SamplerOptions, encode_branches
from .control import StemGenControl, controlled_decode, timbre_vector
from .weights import StemGenWeights


def _timbre_for(timbre: Tensor | None, batch: int, control: StemGenControl, device: torch.device) -> Tensor | None:
    """Check an optional timbre vector and repeat a single one over the batch."""
    if timbre is None:
        return None
    width = control.config.timbre_dim
    if timbre.ndim != 2 or timbre.shape[1] != width or timbre.shape[0] not in (1, batch):
        raise ValueError(f"timbre must be [1 or {batch}, {width}] (from instrument_timbre), got {list(timbre.shape)}")
    return timbre.to(device).expand(batch, width)


def make_control_predict(transformer, control: StemGenControl, branches: Branches, reference: Tensor,
                         timbre: Tensor | None, control_scale: float, options: SamplerOptions):
    """`predict(x, sigma, names)` for the guidance adapter: the requested branches through `controlled_decode`,
    one call each, or one batched call (ERG as a per-item temperature) with `options.speed.batch_branches`;
    `linear_ff` and `skip_full_masks` as in the base sampler (design §7.5)."""
    tau = {"cond": None, "text": None, "uncond": ERG_TAU if branches.erg_diffusion else None}
    full = options.speed.skip_full_masks and bool((branches.mask == 1).all())

    def decode(x: Tensor, sigma: Tensor, names: tuple[str, ...]) -> Tensor:
        count = len(names)
        states = torch.cat([getattr(branches, n) for n in names])
        taus = [tau[n] for n in names]
        erg = taus[0]
        if count > 1 and any(v is not None for v in taus):
            per_item = torch.tensor([1.0 if v is None else v for v in taus], dtype=torch.float32)
            erg = per_item.repeat_interleave(x.shape[0]).to(x.device)
        repeat = (count, 1, 1, 1)
        t = (sigma.to(torch.float32) * 1000).expand(x.shape[0] * count).to(x.device)
        mask = None if full else branches.mask.repeat(count, 1)
        frames = None if full else torch.ones(x.shape[0] * count, x.shape[-1], device=x.device)
        with conditional_rows(branches.conditioning, cond_rows(names, x.shape[0])):
            return controlled_decode(transformer, control, x.repeat(repeat), frames, states, mask, t,
                                     reference=reference.repeat(repeat),
                                     timbre=None if timbre is None else timbre.repeat(count, 1),
                                     control_scale=control_scale, erg_tau=erg, linear_ff=options.speed.linear_ff)

    def predict(x: Tensor, sigma: Tensor, names: tuple[str, ...]) -> tuple[Tensor, ...]:
        if not options.speed.batch_branches or len(names) == 1:
            return tuple(decode(x, sigma, (n,)) for n in names)
        return decode(x, sigma, tuple(names)).chunk(len(names))

    return predict


def generate_latent(transformer, control: StemGenControl, cond: Conditioning, reference: Tensor, *,
                    timbre: Tensor | None = None, control_scale: float = 1.0,
                    options: SamplerOptions = SamplerOptions(), noise: NoiseSource,
                    callback: Callback | None = None) -> Tensor:
    """Latent [B,8,16,T] of the stem that fits `reference` [B,8,16,T] and the instrument/style `cond` (docs/stemgen.md).

    Fresh noise from the "manual" stream, the official schedule (or oss_steps) and sampler of `options`.
    """
    check_latent(reference, "reference latent")
    if reference.shape[-1] > MAX_FRAMES:
        raise ValueError(f"the reference is {reference.shape[-1]} frames, past the model's 240 s ({MAX_FRAMES}); "
                         "cut it into parts of at most 240 s")
    if isinstance(control_scale, bool) or not isinstance(control_scale, (int, float)) \
            or not math.isfinite(control_scale):
        raise ValueError(f"control_scale must be a finite number, got {control_scale!r}")
    parameter = next(transformer.parameters())
    device, dtype = parameter.device, parameter.dtype
    reference = reference.to(device, dtype)
    batch = reference.shape[0]
    timbre = _timbre_for(timbre, batch, control, device)
    x = noise.draw("manual", tuple(reference.shape)).to(device, dtype)
    branches = encode_branches(transformer, cond, batch, options.guidance, need_uncond=options.guidance.do_cfg)
    predict = make_control_predict(transformer, control, branches, reference, timbre, float(control_scale), options)
    return sample_guided(predict, x, schedule_sigmas(options, dtype), options, noise, callback)


def encode_reference(model, waveform: Tensor, sample_rate: int) -> Tensor:
    """Reference audio [B,C,L] / [C,L] → its DCAE latent [B,8,16,T] (design §1)."""
    return encode_audio(model.dcae, model.vocoder.mel_transform, waveform, sample_rate)


def instrument_timbre(model, waveform: Tensor, sample_rate: int) -> Tensor:
    """Instrument reference audio → timbre vector [B, 128]: its DCAE latent averaged over time (docs/stemgen.md)."""
    return timbre_vector(encode_reference(model, waveform, sample_rate))


def mix_with_reference(reference: Tensor, reference_rate: int, stem: Tensor, stem_rate: int) -> Tensor:
    """reference (stereo, resampled to the stem's rate, padded or cut to its length) + stem: [B, 2, N] float32."""
    if stem.ndim != 3 or stem.shape[1] != 2:
        raise ValueError(f"stem must be stereo audio [B, 2, N], got {list(stem.shape)}")
    stereo = prepare_audio(reference.float(), SAMPLE_RATE)                  # channel handling only, no resampling
    ref = resample(stereo, reference_rate, stem_rate).to(stem.device)        # [B, 2, L]
    if ref.shape[0] not in (1, stem.shape[0]):
        raise ValueError(f"reference has {ref.shape[0]} items but the stem has {stem.shape[0]}")
    length = stem.shape[-1]
    ref = F.pad(ref, (0, max(0, length - ref.shape[-1])))[..., :length]
    return (ref + stem.float()).to(torch.float32)


def generate_part(model, transformer, control: StemGenControl, tags: str, reference: Tensor, reference_rate: int, *,
                  seed: int, options: SamplerOptions = SamplerOptions(),
                  instrument_audio: tuple[Tensor, int] | None = None, control_scale: float = 1.0,
                  sample_rate: int = SAMPLE_RATE, callback: Callback | None = None,
                  phase: Callable[..., AbstractContextManager] | None = None) -> tuple[Tensor, Tensor]:
    """(generated part, reference + part), both [B, 2, N] float32 at `sample_rate`, for reference audio
    [B, C, L] at `reference_rate`, the style/instrument `tags` and the seed (noise.noise_for_seed, docs/seeds.md).

    `model` gives the text encoder, DCAE and vocoder; `transformer` is its transformer with the StemGen LoRA (if
    any) applied; `instrument_audio` (waveform, rate) steers the timbre (docs/stemgen.md). `phase(*modules)`, when
    given, is entered around each phase with the modules it runs (low-VRAM mode: acestep_core.fast.phase); the
    decode falls back to smaller windows on out-of-memory (fast.decode).
    """
    phase = phase or (lambda *modules: nullcontext())
    with phase(model.text_encoder):
        cond = encode_conditioning(model, tags, "", erg_tag=options.guidance.use_erg_tag)
    with phase(model.dcae, model.vocoder):
        latent_ref = encode_reference(model, reference, reference_rate)
        timbre = None if instrument_audio is None else instrument_timbre(model, *instrument_audio)
    parameter = next(transformer.parameters())
    noise = noise_for_seed(seed, latent_ref.shape[0], device=fast.compute_device(transformer), dtype=parameter.dtype)
    with phase(transformer, control):
        latent = generate_latent(transformer, control, cond, latent_ref, timbre=timbre,
                                 control_scale=float(control_scale), options=options, noise=noise, callback=callback)
    with phase(model.dcae, model.vocoder):
        part = fast.decode(model.dcae, model.vocoder, latent, sample_rate=int(sample_rate)).float()
    return part, mix_with_reference(reference, reference_rate, part, int(sample_rate))


def generate_stem(model, transformer, control: StemGenControl, instrument: str, reference: Tensor,
                  reference_rate: int, **settings) -> tuple[Tensor, Tensor]:
    """StemGen: (the stem of `instrument` that fits the reference mix, reference + stem); settings as
    :func:`generate_part` (instrument_audio included)."""
    return generate_part(model, transformer, control, instrument, reference, reference_rate, **settings)


def generate_accompaniment(model, transformer, control: StemGenControl, tags: str, vocal: Tensor, vocal_rate: int,
                           **settings) -> tuple[Tensor, Tensor]:
    """Singing to accompaniment: (the backing track for the vocal in the style of `tags`, vocal + backing);
    settings as :func:`generate_part` (no instrument audio)."""
    return generate_part(model, transformer, control, tags, vocal, vocal_rate, **settings)


@contextmanager
def stemgen_lora(transformer, weights: StemGenWeights, strength: float = 1.0) -> Iterator[None]:
    """Apply the LoRA of a StemGen file for the duration of a `with` block (no-op when it has none)."""
    if weights.lora is None or strength == 0:
        yield
        return
    with apply_loras(transformer, [(weights.lora, float(strength))]):
        yield
