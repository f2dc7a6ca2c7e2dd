"""The ACE-Step 1.5 core API: a loaded bundle and one function per task, from strings, metadata and audio to audio.

The ComfyUI nodes and the command line call these functions and hold no math themselves. Each task function
(`text2music`, `cover`, `repaint`, `lego`, `extract`, `complete`) checks its inputs where they come in (one
ValueError naming the input), then runs the same stages the official handler runs (acestep/handler.py at
53067ab: `_prepare_batch`, `infer_refer_latent`, `preprocess_batch`, `service_generate`, `generate_music`):

1. prompts: `prompts.build_prompts` (instruction, caption template with its metadata block, lyric template);
2. text: the caption through the whole Qwen3 model (right-padded, no mask, at most 256 tokens), the lyrics through
   its token embeddings only (at most 2048 tokens) (`encode_texts`);
3. audio in: mono duplicated, the first two channels kept, resampled to 48 kHz, clamped to [-1, 1]
   (`_normalize_audio_to_stereo_48k`); the source through the VAE (a sample of the posterior, as
   `latent_dist.sample()`); silent audio becomes the silence latent (`is_silence`);
4. timbre: each reference repeated to at least 30 s, three 10 s segments (front, middle, back) joined, VAE
   encoded and packed with its item index (`process_reference_audio`, `infer_refer_latent`); items without a
   reference get `silence_latent[:, :750]`;
5. task tensors (`tasks.build_task_inputs`), latents padded to at least 128 frames with the silence latent
   (`_prepare_batch`), the loop (`generate.generate_audio`), VAE decode, anti-clipping (divide by the peak only
   where it passes 1).

Where we differ from the handler (docs/acestep-15.md, "The pipeline"): every random draw comes from generators
seeded with the item's seed (the handler's reference segments and VAE samples use the global RNG), so one seed
gives one song on every device; the audio is cut to the requested (or source) length instead of returning the
128-frame minimum; a single seed gives the batch the seeds seed, seed+1, ... (the handler draws random seeds for
items after the first); bad inputs raise instead of falling back to text2music.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..audio import resample
from .generate import MAX_SEED, SamplerOptions, check_seeds, generate_audio
from .prompts import (DURATION_MAX, TRACK_NAMES, VALID_LANGUAGES, Prompts, build_prompts)
from .tasks import (CHUNK_MASK_MODES, HANDLER_REPAINT_CROSSFADE_FRAMES, HANDLER_REPAINT_INJECTION_RATIO,
                    build_task_inputs, seconds_to_frames)

SAMPLE_RATE = 48_000
HOP = 1920
LATENT_RATE = SAMPLE_RATE / HOP  # 25 latent frames per second
MIN_FRAMES = 128  # handler `_prepare_batch`: max_latent_length = max(128, ...)
TEXT_MAX_TOKENS = 256  # handler: caption tokenizer max_length
LYRIC_MAX_TOKENS = 2048  # handler: lyric tokenizer max_length
TIMBRE_FRAMES = 750  # handler `infer_refer_latent`: silence_latent[:, :750] for items without a reference
REFERENCE_SECONDS = 30  # handler `process_reference_audio`: repeat to 30 s, three 10 s segments
REFERENCE_SEGMENT_SECONDS = 10
SILENCE_LEVEL = 1e-6  # handler `is_silence`: every |sample| below this
MAX_BATCH = 16
MAX_REFERENCES = 8  # per item
MAX_AUDIO_SECONDS = float(DURATION_MAX)
MIN_DURATION = 0.1  # handler `create_target_wavs`: at least 100 ms, rounded to 0.1 s
CODEBOOK_SIZE = 64_000
AUDIO_CODE_PATTERN = re.compile(r"<\|audio_code_(\d+)\|>")

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stages "vae_encode", "diffusion", "vae_decode"."""


class Interrupted(RuntimeError):
    """Raised by an interrupt check to stop a run (ComfyUI raises its own exception instead)."""


# ------------------------------------------------------------------------------------------------- the bundle
@dataclass
class Bundle15:
    """Everything a 1.5 generation needs: the model container (DiT, condition encoder, tokenizer/detokenizer),
    the VAE, the Qwen3 text encoder with its tokenizer, and the silence latent [1, L, C]."""

    model: object
    vae: object
    text_encoder: object
    silence_latent: Tensor
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("model", "vae", "text_encoder"):
            if getattr(self, name) is None:
                raise ValueError(f"a 1.5 bundle needs a {name.replace('_', ' ')}; load all three components")
        if getattr(self.text_encoder, "tokenizer", None) is None:
            raise ValueError("the 1.5 text encoder has no tokenizer; load the Qwen3-Embedding-0.6B folder (or give "
                             "tokenizer_folder for a ComfyUI text-encoder file)")
        channels = self.model.config.audio_acoustic_hidden_dim
        s = self.silence_latent
        if not isinstance(s, Tensor) or s.ndim != 3 or s.shape[0] != 1 or s.shape[2] != channels or s.shape[1] < 1:
            raise ValueError(f"silence_latent must be a tensor [1, L, {channels}]")
        if self.vae.config.decoder_input_channels != channels:
            raise ValueError(f"the VAE has {self.vae.config.decoder_input_channels} latent channels, the DiT "
                             f"{channels}: they do not belong together")
        if self.vae.sampling_rate != SAMPLE_RATE or self.vae.hop_length != HOP:
            raise ValueError(f"the 1.5 VAE must run at {SAMPLE_RATE} Hz with a hop of {HOP} samples, got "
                             f"{self.vae.sampling_rate} Hz and {self.vae.hop_length}")
        if self.text_encoder.hidden_size != self.model.config.text_hidden_dim:
            raise ValueError(f"the text encoder gives {self.text_encoder.hidden_size} features, the DiT expects "
                             f"{self.model.config.text_hidden_dim}")

    @property
    def variant(self) -> str:
        """"turbo" or "base" (sft samples like base)."""
        return "turbo" if self.model.config.is_turbo else "base"

    @property
    def device(self) -> torch.device:
        return self.model.null_condition_emb.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.null_condition_emb.dtype


def load_bundle(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                model_version: str | None = None, vae_path=None, text_path=None, tokenizer_folder=None,
                progress=None) -> Bundle15:
    """A ready bundle from the official folder layout or ComfyUI files (see `loading.load_acestep15`)."""
    from .loading import load_acestep15

    ckpt = load_acestep15(path, ("dit", "vae", "text"), dtype=dtype, device=device, model_version=model_version,
                          vae_path=vae_path, text_path=text_path, tokenizer_folder=tokenizer_folder,
                          progress=progress)
    return Bundle15(ckpt.model, ckpt.vae, ckpt.text_encoder, ckpt.silence_latent, dict(ckpt.sources))


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Result15:
    """audio [B, 2, samples] float32 at `sample_rate`; latents [B, T, C] (before cropping); the seeds used."""

    audio: Tensor | None
    latents: Tensor
    seeds: list[int]
    sample_rate: int = SAMPLE_RATE
    prompts: list[Prompts] = field(default_factory=list)


@dataclass
class TextStates:
    """The four text tensors of `prepare_condition`, plus the non-cover caption states when cover strength < 1."""

    text_hidden_states: Tensor
    text_attention_mask: Tensor
    lyric_hidden_states: Tensor
    lyric_attention_mask: Tensor
    non_cover_text_hidden_states: Tensor | None = None
    non_cover_text_attention_mask: Tensor | None = None


# ---------------------------------------------------------------------------------------------------- checks
def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_seconds(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a number of seconds in [{low}, {high}], got {value!r}")
    return float(value)


def resolve_seeds(seed, batch_size: int) -> list[int]:
    """One seed per item: an int gives seed, seed+1, ... (wrapping at 2^64); a list must have one per item."""
    _check_int("batch_size", batch_size, 1, MAX_BATCH)
    if isinstance(seed, (list, tuple)):
        return list(check_seeds(list(seed), batch_size))
    check_seeds(seed, 1)
    return [(seed + i) % (MAX_SEED + 1) for i in range(batch_size)]


def prepare_audio(audio, sample_rate, name: str = "audio") -> Tensor:
    """Audio [C, N] or [1, C, N] (float, any rate) -> [2, N'] float32 at 48 kHz in [-1, 1], as the handler's
    `_normalize_audio_to_stereo_48k`: mono duplicated, only the first two channels kept, clamped. A ComfyUI AUDIO
    dict ({"waveform", "sample_rate"}) is accepted too (its first item)."""
    if isinstance(audio, dict):
        if "waveform" not in audio or "sample_rate" not in audio:
            raise ValueError(f"{name}: an audio dict needs 'waveform' and 'sample_rate'")
        audio, sample_rate = audio["waveform"], audio["sample_rate"]
    if not isinstance(audio, Tensor) or not audio.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [channels, samples], got "
                         f"{audio.dtype if isinstance(audio, Tensor) else type(audio).__name__}")
    if audio.ndim == 3:
        if audio.shape[0] != 1:
            raise ValueError(f"{name}: give one clip [channels, samples] (got a batch of {audio.shape[0]})")
        audio = audio[0]
    if audio.ndim == 1:
        audio = audio.unsqueeze(0)
    if audio.ndim != 2 or audio.shape[0] < 1:
        raise ValueError(f"{name} must be [channels, samples], got {tuple(audio.shape)}")
    if audio.shape[-1] == 0:
        raise ValueError(f"{name} is empty (0 samples); load a clip with sound in it")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not 1000 <= sample_rate <= 384_000:
        raise ValueError(f"{name}: sample_rate must be an integer in [1000, 384000] Hz, got {sample_rate!r}")
    seconds = audio.shape[-1] / sample_rate
    if seconds > MAX_AUDIO_SECONDS:
        raise ValueError(f"{name} is {seconds:.0f} s long; ACE-Step 1.5 takes at most {MAX_AUDIO_SECONDS:.0f} s: "
                         "trim it first")
    if not torch.isfinite(audio).all():
        raise ValueError(f"{name} contains NaN or infinite samples; clean or re-export the file")
    audio = audio.to(torch.float32)
    if audio.shape[0] == 1:
        audio = torch.cat([audio, audio], dim=0)
    audio = audio[:2]
    audio = resample(audio, sample_rate, SAMPLE_RATE)
    if audio.shape[-1] < HOP:
        raise ValueError(f"{name} is shorter than one latent frame ({HOP / SAMPLE_RATE * 1000:.0f} ms)")
    return audio.clamp(-1.0, 1.0)


def is_silence(audio: Tensor) -> bool:
    return bool((audio.abs() < SILENCE_LEVEL).all())


def parse_audio_codes(codes) -> Tensor:
    """5 Hz audio codes -> indices [1, N] int64: a string of `<|audio_code_N|>` tokens (the 5 Hz LM's output,
    handler `_parse_audio_code_string`), a sequence of ints or an int tensor [N] / [1, N]. Out-of-range codes
    raise (the handler clamps them silently)."""
    if isinstance(codes, str):
        values = [int(x) for x in AUDIO_CODE_PATTERN.findall(codes)]
        if not values:
            raise ValueError("audio_codes: no <|audio_code_N|> tokens found in the text")
        codes = torch.tensor(values)
    elif isinstance(codes, (list, tuple)):
        if not codes or any(isinstance(c, bool) or not isinstance(c, int) for c in codes):
            raise ValueError("audio_codes must be a non-empty list of integers")
        codes = torch.tensor(codes)
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex() or codes.numel() == 0:
        raise ValueError("audio_codes must be a code string, a list of integers or an integer tensor")
    if codes.ndim == 2 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 1:
        raise ValueError(f"audio_codes must be one sequence [N], got shape {tuple(codes.shape)}")
    if int(codes.min()) < 0 or int(codes.max()) >= CODEBOOK_SIZE:
        raise ValueError(f"audio_codes must lie in [0, {CODEBOOK_SIZE - 1}]")
    return codes.to(torch.int64).unsqueeze(0)


# ------------------------------------------------------------------------------------------------------ text
def _tokenize(tokenizer, texts: Sequence[str], max_tokens: int, min_length: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, L] and mask [B, L] (handler: per-item tokenizer call with truncation, then
    `_pad_sequences` with the tokenizer's pad id)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError("the text tokenizer has no pad token; load the Qwen3-Embedding-0.6B tokenizer")
    rows = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
        ids = list(ids[0] if ids and isinstance(ids[0], (list, tuple)) else ids)
        if not ids:
            raise ValueError("the tokenizer returned no tokens for a prompt")
        rows.append(ids)
    length = max(min_length, max(len(r) for r in rows))
    ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def encode_texts(bundle: Bundle15, prompts: Sequence[Prompts], non_cover: bool = False) -> TextStates:
    """Caption states (full Qwen3, no mask, official `infer_text_embeddings`) and lyric token embeddings
    (`infer_lyric_embeddings`); with `non_cover`, the text2music captions too, padded to the same length."""
    enc, tok = bundle.text_encoder, bundle.text_encoder.tokenizer
    dtype = bundle.dtype
    ids, mask = _tokenize(tok, [p.caption for p in prompts], TEXT_MAX_TOKENS)
    lyric_ids, lyric_mask = _tokenize(tok, [p.lyrics for p in prompts], LYRIC_MAX_TOKENS)
    states = TextStates(
        text_hidden_states=enc.encode_text(ids).to(bundle.device, dtype),
        text_attention_mask=mask.to(bundle.device),
        lyric_hidden_states=enc.embed_lyrics(lyric_ids).to(bundle.device, dtype),
        lyric_attention_mask=lyric_mask.to(bundle.device),
    )
    if non_cover:
        nc_ids, nc_mask = _tokenize(tok, [p.non_cover_caption for p in prompts], TEXT_MAX_TOKENS, ids.shape[1])
        states.non_cover_text_hidden_states = enc.encode_text(nc_ids).to(bundle.device, dtype)
        states.non_cover_text_attention_mask = nc_mask.to(bundle.device)
    return states


# ----------------------------------------------------------------------------------------------------- audio
@torch.no_grad()
def encode_audio(bundle: Bundle15, audio: Tensor, generator: torch.Generator | None,
                 progress: Progress | None = None) -> Tensor:
    """48 kHz stereo [2, N] -> latents [1, T, C] in the bundle's dtype: a posterior sample (handler
    `tiled_encode`: `latent_dist.sample()`), or the silence latent when the audio is silent (`is_silence`)."""
    frames = audio.shape[-1] // HOP
    if is_silence(audio):
        silence = bundle.silence_latent
        if silence.shape[1] < frames:
            silence = silence.repeat(1, -(-frames // silence.shape[1]), 1)
        return silence[:, :frames].to(bundle.device, bundle.dtype)
    step = None if progress is None else (lambda d, t: progress("vae_encode", d, t))
    latents = bundle.vae.encode(audio.unsqueeze(0), sample=True, generator=generator, progress=step)
    return latents.transpose(1, 2).to(bundle.device, bundle.dtype)


def reference_segments(audio: Tensor, generator: torch.Generator) -> Tensor:
    """30 s of timbre reference from a 48 kHz clip [2, N] (handler `process_reference_audio`): repeated to at
    least 30 s, then one 10 s segment from a random offset in each third, joined. The offsets come from
    `generator` (the handler uses Python's global `random`)."""
    target, seg = REFERENCE_SECONDS * SAMPLE_RATE, REFERENCE_SEGMENT_SECONDS * SAMPLE_RATE
    if audio.shape[-1] < target:
        audio = audio.repeat(1, math.ceil(target / audio.shape[-1]))
    total = audio.shape[-1]
    third = total // 3

    def offset(span: int) -> int:
        return int(torch.randint(0, max(0, span - seg) + 1, (1,), generator=generator))

    starts = [offset(third), third + offset(third), 2 * third + offset(total - 2 * third)]
    return torch.cat([audio[:, s:s + seg] for s in starts], dim=-1)


@torch.no_grad()
def reference_timbre(bundle: Bundle15, references: Sequence[Sequence[Tensor] | None], seeds: Sequence[int],
                     progress: Progress | None = None) -> tuple[Tensor, Tensor]:
    """Packed timbre latents [N, 750, C] and their item indices [N] (handler `infer_refer_latent`): items without
    a (non-silent) reference get silence_latent[:, :750]; each reference clip (48 kHz stereo) is cut to 30 s by
    `reference_segments` and encoded with a generator seeded by the item's seed."""
    latents, order = [], []
    silence = bundle.silence_latent
    if silence.shape[1] < TIMBRE_FRAMES:
        silence = silence.repeat(1, -(-TIMBRE_FRAMES // silence.shape[1]), 1)
    for i, refs in enumerate(references):
        clips = [r for r in (refs or []) if not is_silence(r)]
        if not clips:
            latents.append(silence[:, :TIMBRE_FRAMES].to(bundle.device, bundle.dtype))
            order.append(i)
            continue
        g = torch.Generator("cpu").manual_seed(int(seeds[i]))
        for clip in clips:
            latents.append(encode_audio(bundle, reference_segments(clip, g), g, progress))
            order.append(i)
    return torch.cat(latents, dim=0), torch.tensor(order, dtype=torch.long, device=bundle.device)


@torch.no_grad()
def decode_latents(bundle: Bundle15, latents: Tensor, samples: int | None = None,
                   progress: Progress | None = None) -> Tensor:
    """Latents [B, T, C] -> audio [B, 2, samples] float32 on the CPU: tiled VAE decode, then anti-clipping as the
    handler (`generate_music`): items whose peak passes 1 are divided by it. Cut to `samples` when given."""
    step = None if progress is None else (lambda d, t: progress("vae_decode", d, t))
    wav = bundle.vae.decode(latents.transpose(1, 2).contiguous(), output_device="cpu", progress=step).float()
    peak = wav.abs().amax(dim=(1, 2), keepdim=True)
    wav = wav / peak.clamp(min=1.0)
    return wav if samples is None else wav[..., :samples]


# ------------------------------------------------------------------------------------------------ the run
def _options(bundle: Bundle15, options: SamplerOptions | None, **overrides) -> SamplerOptions:
    if options is not None and not isinstance(options, SamplerOptions):
        raise ValueError(f"options must be a SamplerOptions, got {type(options).__name__}")
    opts = options or SamplerOptions(variant=bundle.variant)
    if opts.variant != bundle.variant:
        raise ValueError(f"options.variant is {opts.variant!r} but the loaded model is {bundle.variant!r}")
    from dataclasses import replace
    return replace(opts, **{k: v for k, v in overrides.items() if v is not None}).validate()


@torch.no_grad()
def generate_latents(
    bundle: Bundle15,
    task: str,
    states: TextStates,
    *,
    length: int,
    seeds: Sequence[int],
    refer_packed: Tensor,
    refer_order: Tensor,
    source_latents: Tensor | None = None,
    spans: Sequence[tuple[int, int] | None] | None = None,
    chunk_mask_mode: str = "auto",
    lm_hints: Tensor | None = None,
    options: SamplerOptions,
    callback: Callable[[int, int, Tensor], None] | None = None,
    interrupt: Callable[[], None] | None = None,
) -> Tensor:
    """Task tensors + the loop, from encoded texts and latents: the part of the pipeline under the text and
    audio encoders (handler `_prepare_batch` → `service_generate`). `source_latents` [1 or B, T, C] is padded
    with silence to `length`; `lm_hints` [1 or B, T, C] are 25 Hz hints from audio codes (cover items)."""
    batch = len(seeds)
    silence = bundle.silence_latent
    if source_latents is not None and source_latents.shape[1] < length:
        pad = silence if silence.shape[1] >= length else silence.repeat(1, -(-length // silence.shape[1]), 1)
        fill = pad[:, :length - source_latents.shape[1]].to(source_latents).expand(source_latents.shape[0], -1, -1)
        source_latents = torch.cat([source_latents, fill], dim=1)
    inputs = build_task_inputs(task, batch=batch, length=length, silence_latent=silence.to(bundle.dtype),
                               source_latents=source_latents, spans=spans, chunk_mask_mode=chunk_mask_mode,
                               code_hints=[lm_hints is not None] * batch)
    hints = None
    if lm_hints is not None:
        hints = lm_hints.to(bundle.device, bundle.dtype).expand(batch, -1, -1)
    return generate_audio(
        bundle.model,
        text_hidden_states=states.text_hidden_states,
        text_attention_mask=states.text_attention_mask,
        lyric_hidden_states=states.lyric_hidden_states,
        lyric_attention_mask=states.lyric_attention_mask,
        refer_audio_acoustic_hidden_states_packed=refer_packed,
        refer_audio_order_mask=refer_order,
        src_latents=inputs.src_latents.to(bundle.device),
        chunk_masks=inputs.chunk_masks.to(bundle.device),
        is_covers=inputs.is_covers.to(bundle.device),
        silence_latent=silence.to(bundle.device, bundle.dtype),
        non_cover_text_hidden_states=states.non_cover_text_hidden_states,
        non_cover_text_attention_mask=states.non_cover_text_attention_mask,
        precomputed_lm_hints_25Hz=hints,
        repaint_mask=None if inputs.repaint_mask is None else inputs.repaint_mask.to(bundle.device),
        clean_src_latents=None if inputs.clean_src_latents is None else inputs.clean_src_latents.to(bundle.device),
        options=options,
        seed=list(seeds),
        callback=callback,
        interrupt=interrupt,
    )


def _references(reference_audio, batch: int) -> list[list[Tensor]]:
    """None, one clip (shared by every item) or a list of clips (all for every item), each (tensor, rate) or a
    ComfyUI AUDIO dict."""
    if reference_audio is None:
        return [[] for _ in range(batch)]
    clips = reference_audio if isinstance(reference_audio, list) else [reference_audio]
    if len(clips) > MAX_REFERENCES:
        raise ValueError(f"reference_audio: at most {MAX_REFERENCES} clips, got {len(clips)}")
    out = []
    for i, c in enumerate(clips):
        if isinstance(c, tuple) and len(c) == 2:
            out.append(prepare_audio(c[0], c[1], f"reference_audio[{i}]"))
        elif isinstance(c, dict):
            out.append(prepare_audio(c, None, f"reference_audio[{i}]"))
        else:
            raise ValueError("reference_audio must be (waveform, sample_rate), a ComfyUI AUDIO dict, or a list "
                             "of them")
    return [out for _ in range(batch)]


def check_source_latents(bundle: Bundle15, latents) -> Tensor:
    """Source latents [1, T, C] (e.g. from an earlier VAE encode) in the bundle's dtype and device."""
    channels = bundle.model.config.audio_acoustic_hidden_dim
    if not isinstance(latents, Tensor) or not latents.is_floating_point() or latents.ndim != 3 \
            or latents.shape[0] != 1 or latents.shape[2] != channels or latents.shape[1] < 1:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"source_latents must be a float tensor [1, frames, {channels}], got {shape}")
    if latents.shape[1] * HOP / SAMPLE_RATE > MAX_AUDIO_SECONDS:
        raise ValueError(f"source_latents describe more than {MAX_AUDIO_SECONDS:.0f} s; trim the source first")
    if not torch.isfinite(latents).all():
        raise ValueError("source_latents contain NaN or infinite values; encode the source again")
    return latents.to(bundle.device, bundle.dtype)


def _source(source_audio, source_sample_rate) -> Tensor:
    if source_audio is None:
        raise ValueError("source_audio is required for this task: give the song to edit (waveform and its "
                         "sample_rate)")
    return prepare_audio(source_audio, source_sample_rate, "source_audio")


def run(
    bundle: Bundle15,
    task: str,
    caption: str,
    lyrics: str = "",
    *,
    language: str = "en",
    duration: float | None = None,
    source_audio=None,
    source_sample_rate: int | None = None,
    source_latents: Tensor | None = None,
    frames: int | None = None,
    reference_audio=None,
    audio_codes=None,
    span: tuple[float, float | None] | None = None,
    track_name: str | None = None,
    complete_track_classes: Sequence[str] | None = None,
    bpm=None,
    keyscale: str | None = None,
    timesignature=None,
    batch_size: int = 1,
    seed: int | Sequence[int] = 0,
    options: SamplerOptions | None = None,
    chunk_mask_mode: str = "auto",
    audio_cover_strength: float | None = None,
    decode: bool = True,
    progress: Progress | None = None,
    interrupt: Callable[[], None] | None = None,
) -> Result15:
    """Every task through one path (the task functions below are the public entry points). `source_latents`
    [1, T, C] (an earlier VAE encode, e.g. the ComfyUI Encode node's) replaces `source_audio`; `frames` gives a
    text2music length in latent frames instead of `duration` (the ComfyUI empty latent's length, exactly).
    Results are audio and latents cut to the requested length: `Result15.latents` keeps the padded length."""
    if not isinstance(bundle, Bundle15):
        raise ValueError(f"bundle must be a Bundle15 (see load_bundle), got {type(bundle).__name__}")
    if frames is not None and task != "text2music":
        raise ValueError(f"frames (the song length) applies to text2music; {task} takes its length from the source")
    seeds = resolve_seeds(seed, batch_size)
    if chunk_mask_mode not in CHUNK_MASK_MODES:
        raise ValueError(f"chunk_mask_mode must be one of {CHUNK_MASK_MODES}, got {chunk_mask_mode!r}")
    if not isinstance(lyrics, str):
        raise ValueError("lyrics must be a text (empty for an instrumental)")
    if language not in VALID_LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(VALID_LANGUAGES)}; got {language!r}")
    if task in ("lego", "extract") and (not isinstance(track_name, str) or track_name.strip().lower()
                                         not in TRACK_NAMES):
        raise ValueError(f"track_name must be one of {', '.join(TRACK_NAMES)}; got {track_name!r}")
    if task == "complete":
        classes = [complete_track_classes] if isinstance(complete_track_classes, str) else complete_track_classes
        if not classes or any(not isinstance(c, str) or c.strip().lower() not in TRACK_NAMES for c in classes):
            raise ValueError(f"complete_track_classes must be a non-empty list from {', '.join(TRACK_NAMES)}; "
                             f"got {complete_track_classes!r}")
        complete_track_classes = list(classes)
    repaint_defaults = {}
    if task in ("repaint", "lego"):
        repaint_defaults = dict(repaint_injection_ratio=HANDLER_REPAINT_INJECTION_RATIO,
                                repaint_crossfade_frames=HANDLER_REPAINT_CROSSFADE_FRAMES) if options is None else {}
    opts = _options(bundle, options, audio_cover_strength=audio_cover_strength, **repaint_defaults)
    if task != "cover" and (opts.audio_cover_strength != 1.0 or opts.cover_noise_strength != 0.0):
        raise ValueError("audio_cover_strength and cover_noise_strength apply to the cover task only; leave them at "
                         "1.0 and 0.0")
    references = _references(reference_audio, batch_size)

    # The source (audio, or 5 Hz codes for cover) fixes the length; text2music takes `duration`.
    source = codes = None
    if audio_codes is not None:
        if task != "cover":
            raise ValueError("audio_codes apply to the cover task only")
        codes = parse_audio_codes(audio_codes)
    if task == "text2music" or (task == "cover" and codes is not None and source_audio is None
                                and source_latents is None):
        if source_audio is not None or source_latents is not None:
            raise ValueError("text2music takes no source_audio; use cover, repaint, lego, extract or complete")
        if codes is not None:
            seconds = codes.shape[1] * bundle.model.config.pool_window_size / LATENT_RATE
        elif frames is not None:
            if duration is not None:
                raise ValueError("give duration or frames for text2music, not both")
            _check_int("frames", frames, 1, int(MAX_AUDIO_SECONDS * LATENT_RATE))
            seconds = frames * HOP / SAMPLE_RATE
        else:
            if duration is None:
                raise ValueError("duration (seconds) is required for text2music")
            seconds = round(_check_seconds("duration", duration, MIN_DURATION, MAX_AUDIO_SECONDS), 1)
    elif source_latents is not None:
        if source_audio is not None:
            raise ValueError("give source_audio or source_latents, not both")
        source_latents = check_source_latents(bundle, source_latents)
        seconds = source_latents.shape[1] * HOP / SAMPLE_RATE
        if duration is not None:
            raise ValueError(f"{task} takes its length from source_latents; leave duration empty")
    else:
        source = _source(source_audio, source_sample_rate)
        seconds = source.shape[-1] / SAMPLE_RATE
        if duration is not None:
            raise ValueError(f"{task} takes its length from source_audio; leave duration empty")
    if seconds > MAX_AUDIO_SECONDS:
        raise ValueError(f"the audio codes describe {seconds:.0f} s; at most {MAX_AUDIO_SECONDS:.0f} s")
    if source_latents is not None:
        frames = source_latents.shape[1]
    elif frames is None or task != "text2music":
        frames = max(1, int(seconds * SAMPLE_RATE) // HOP)
    length = max(MIN_FRAMES, frames)

    spans = None
    if task == "repaint" and span is None:
        raise ValueError("repaint needs span=(start_seconds, end_seconds)")
    if span is not None:
        if task not in ("repaint", "lego"):
            raise ValueError(f"span applies to repaint and lego, not to {task}")
        if not isinstance(span, (tuple, list)) or len(span) != 2:
            raise ValueError("span must be (start_seconds, end_seconds); end None means the end of the song")
        start = _check_seconds("span start", span[0], 0.0, seconds)
        end = seconds if span[1] is None or span[1] == -1 else _check_seconds("span end", span[1], 0.0, seconds)
        if end <= start:
            raise ValueError(f"span end must be after its start, got {start} and {end} seconds")
        spans = [seconds_to_frames(start, end, length)] * batch_size

    prompts = [build_prompts(task, caption, lyrics, language, bpm=bpm, keyscale=keyscale,
                             timesignature=timesignature, duration=seconds, track_name=track_name,
                             complete_track_classes=complete_track_classes)] * batch_size

    def check():
        if interrupt is not None:
            interrupt()

    def stage(name: str, done: int, total: int) -> None:  # VAE tiles: report, then honour the interrupt
        if progress is not None:
            progress(name, done, total)
        check()

    check()
    states = encode_texts(bundle, prompts, non_cover=opts.audio_cover_strength < 1.0 and task == "cover")
    check()
    refer_packed, refer_order = reference_timbre(bundle, references, seeds, stage)
    hints = None
    if source is not None:
        check()
        g = torch.Generator("cpu").manual_seed(seeds[0])
        source_latents = encode_audio(bundle, source, g, stage)
    if codes is not None:
        model = bundle.model
        quantized = model.tokenizer.quantizer.get_output_from_indices(codes.unsqueeze(-1).to(bundle.device))
        hints = model.detokenize(quantized.to(bundle.dtype))
        if hints.shape[1] < length:
            sil = bundle.silence_latent
            sil = sil if sil.shape[1] >= length else sil.repeat(1, -(-length // sil.shape[1]), 1)
            hints = torch.cat([hints, sil[:, :length - hints.shape[1]].to(hints)], dim=1)
        hints = hints[:, :length]
    check()

    def step(i, total, _x):
        if progress is not None:
            progress("diffusion", i + 1, total)

    latents = generate_latents(bundle, task, states, length=length, seeds=seeds, refer_packed=refer_packed,
                               refer_order=refer_order, source_latents=source_latents, spans=spans,
                               chunk_mask_mode=chunk_mask_mode, lm_hints=hints, options=opts, callback=step,
                               interrupt=interrupt)
    audio = None
    if decode:
        check()
        audio = decode_latents(bundle, latents, int(round(seconds * SAMPLE_RATE)), stage)
    return Result15(audio=audio, latents=latents, seeds=seeds, prompts=prompts)


# ------------------------------------------------------------------------------------------------ the tasks
def text2music(bundle: Bundle15, caption: str, lyrics: str = "", *, duration: float, **kw) -> Result15:
    """A new song of `duration` seconds from a caption and lyrics (optional reference_audio for the timbre)."""
    return run(bundle, "text2music", caption, lyrics, duration=duration, **kw)


def cover(bundle: Bundle15, caption: str, lyrics: str = "", *, source_audio=None, source_sample_rate=None,
          audio_cover_strength: float = 1.0, audio_codes=None, **kw) -> Result15:
    """A new version of `source_audio` (or of 5 Hz `audio_codes`, the LM planner's output) in the style of the
    caption. `audio_cover_strength` s runs the first int(steps·s) steps with the cover conditions and the rest as
    text2music (official switch)."""
    return run(bundle, "cover", caption, lyrics, source_audio=source_audio, source_sample_rate=source_sample_rate,
               audio_cover_strength=audio_cover_strength, audio_codes=audio_codes, **kw)


def repaint(bundle: Bundle15, caption: str, lyrics: str = "", *, source_audio, source_sample_rate,
            start: float, end: float | None, **kw) -> Result15:
    """Regenerate seconds [start, end) of `source_audio`; outside the span the source is kept (step injection
    0.5 and a 12-frame crossfade, the handler defaults, unless `options` says otherwise)."""
    return run(bundle, "repaint", caption, lyrics, source_audio=source_audio, source_sample_rate=source_sample_rate,
               span=(start, end), **kw)


def lego(bundle: Bundle15, caption: str, lyrics: str = "", *, source_audio, source_sample_rate, track_name: str,
         start: float | None = None, end: float | None = None, **kw) -> Result15:
    """Add a `track_name` track (one of TRACK_NAMES) to `source_audio`, over the whole song or [start, end)."""
    span = None if start is None and end is None else (start or 0.0, end)
    return run(bundle, "lego", caption, lyrics, source_audio=source_audio, source_sample_rate=source_sample_rate,
               track_name=track_name, span=span, **kw)


def extract(bundle: Bundle15, caption: str = "", lyrics: str = "", *, source_audio, source_sample_rate,
            track_name: str, **kw) -> Result15:
    """Pull the `track_name` stem (one of TRACK_NAMES) out of `source_audio`."""
    return run(bundle, "extract", caption, lyrics, source_audio=source_audio, source_sample_rate=source_sample_rate,
               track_name=track_name, **kw)


def complete(bundle: Bundle15, caption: str, lyrics: str = "", *, source_audio, source_sample_rate,
             track_classes: Sequence[str], **kw) -> Result15:
    """Complete `source_audio` (e.g. a lone vocal) with the given track classes (names from TRACK_NAMES)."""
    return run(bundle, "complete", caption, lyrics, source_audio=source_audio, source_sample_rate=source_sample_rate,
               complete_track_classes=track_classes, **kw)
