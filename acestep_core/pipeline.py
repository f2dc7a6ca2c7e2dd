"""One generation end to end with the official app's arguments: the CLI's engine and the parity tests' driver.

ComfyUI users compose the same steps as separate nodes; this module only wires them for the shell and for
scripts: conditioning -> source/reference encode -> task -> decode (design §1, §8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import audio as audio_io
from . import tasks
from .conditioning import Conditioning, encode_conditioning
from .noise import NoiseSource, SeededNoise
from .sampling.denoiser import GuidanceConfig
from .validation import MemorySettings, call_explaining_oom, check_request_counts

TASKS = ("text2music", "retake", "repaint", "extend", "edit", "audio2audio")


@dataclass
class Request:
    """A generation, named as the official ``ACEStepPipeline.__call__`` names its arguments (design §7.8)."""

    task: str = "text2music"
    prompt: str = ""
    lyrics: str = ""
    audio_duration: float = 60.0
    infer_step: int = 60
    scheduler_type: str = "euler"
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    oss_steps: tuple[int, ...] = ()
    batch_size: int = 1
    manual_seeds: int | list[int] | None = None
    retake_seeds: int | list[int] | None = None
    retake_variance: float = 0.5
    repaint_start: float = 0.0
    repaint_end: float = 0.0
    src_audio: Tensor | None = None  # [C, L] or [B, C, L] for repaint / extend / edit
    src_sample_rate: int | None = None
    ref_audio: Tensor | None = None  # [C, L] for audio2audio
    ref_sample_rate: int | None = None
    ref_audio_strength: float = 0.5
    edit_target_prompt: str = ""
    edit_target_lyrics: str = ""
    edit_n_min: float = 0.0
    edit_n_max: float = 1.0
    edit_n_avg: int = 1
    sample_rate: int = 48000
    batch_branches: bool = False

    def options(self) -> tasks.SamplerOptions:
        """The sampler options this request asks for."""
        return tasks.SamplerOptions(
            steps=self.infer_step, scheduler=self.scheduler_type, guidance=self.guidance, oss_steps=self.oss_steps,
            batch_branches=self.batch_branches,
        )


@dataclass
class Result:
    """What a generation returns: the final latents, the decoded audio and the conditioning used."""

    latents: Tensor  # [B, 8, 16, T]
    waveform: Tensor | None  # [B, 2, N] float32 at sample_rate
    sample_rate: int
    conditioning: Conditioning


def _encode_source(model, waveform: Tensor | None, rate: int | None, what: str) -> Tensor:
    if waveform is None or rate is None:
        raise ValueError(f"this task needs {what}: pass the audio and its sample rate")
    return audio_io.encode_audio(model.dcae, model.vocoder.mel_transform, waveform, rate)


def _frames(seconds: float) -> int:
    return int(seconds * audio_io.SAMPLE_RATE / audio_io.SAMPLES_PER_LATENT)


def _song_seconds(r: Request) -> float:
    """Length of the song a request works on (for the out-of-memory advice)."""
    if r.task in ("text2music", "retake"):
        return float(r.audio_duration)
    audio, rate = (r.ref_audio, r.ref_sample_rate) if r.task == "audio2audio" else (r.src_audio, r.src_sample_rate)
    seconds = audio.shape[-1] / rate if audio is not None and rate else 0.0
    if r.task == "extend":
        seconds += max(0.0, -r.repaint_start) + max(0.0, r.repaint_end - seconds)
    return seconds


def generate(model, request: Request, *, noise: NoiseSource | None = None, callback=None, decode: bool = True) -> Result:
    """Run one request on a loaded model (design §8). Without `noise`, the official seeded generators are used.

    Running out of memory raises torch.OutOfMemoryError naming the settings that would fit (validation module).
    """
    r = request
    check_request_counts(r)
    if r.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {r.task!r:.200}")
    transformer = model.transformer
    if noise is None:
        noise = SeededNoise.from_seeds(r.manual_seeds, r.batch_size, retake_seed=r.retake_seeds,
                                       device=model.device, dtype=model.dtype)
    options = r.options()
    cond = encode_conditioning(model, r.prompt, r.lyrics, erg_tag=r.guidance.use_erg_tag)
    common = dict(batch_size=r.batch_size, options=options, noise=noise, callback=callback)
    if r.task in ("text2music", "retake"):
        if not (isinstance(r.audio_duration, (int, float)) and math.isfinite(r.audio_duration)):
            raise ValueError(f"audio_duration must be a number of seconds, got {r.audio_duration!r}")
        frames = tasks.frames_for_seconds(r.audio_duration)

    def run_task() -> Tensor:
        if r.task in ("text2music", "retake"):
            variance = r.retake_variance if r.task == "retake" else 0.0
            return tasks.text2music(transformer, cond, frames, retake_variance=variance, **common)
        if r.task == "audio2audio":
            ref = _encode_source(model, r.ref_audio, r.ref_sample_rate, "a reference audio (ref_audio)")
            return tasks.audio2audio(transformer, cond, ref, ref_strength=r.ref_audio_strength, **common)
        src = _encode_source(model, r.src_audio, r.src_sample_rate, "a source audio (src_audio)")
        if r.task == "repaint":
            start, end = _frames(r.repaint_start), _frames(r.repaint_end)
            return tasks.repaint(transformer, cond, src, start, end, variance=r.retake_variance, **common)
        if r.task == "extend":
            start, end = _frames(r.repaint_start), _frames(r.repaint_end)
            left, right = max(0, -start), max(0, end - src.shape[-1])
            return tasks.extend(transformer, cond, src, left, right, variance=r.retake_variance, **common)
        target = encode_conditioning(model, r.edit_target_prompt, r.edit_target_lyrics, erg_tag=False)
        edit = tasks.EditOptions(r.edit_n_min, r.edit_n_max, r.edit_n_avg)
        return tasks.flow_edit(transformer, cond, target, src, edit=edit, **common)

    memory = MemorySettings("generating", _song_seconds(r), r.batch_size, model.dtype, model.device,
                            r.batch_branches)
    with torch.no_grad():
        latents = call_explaining_oom(run_task, memory)
        waveform = None
        if decode:
            waveform = audio_io.decode_latents(model.dcae, model.vocoder, latents, sample_rate=r.sample_rate).cpu()
    return Result(latents, waveform, r.sample_rate, cond)


def request_from_official_args(args: dict, **audio) -> Request:
    """A :class:`Request` from a dict of official ``__call__`` arguments (fixtures' case.json ``args``)."""
    g = GuidanceConfig(
        guidance_scale=args.get("guidance_scale", 15.0), cfg_type=args.get("cfg_type", "apg"),
        guidance_interval=args.get("guidance_interval", 0.5),
        guidance_interval_decay=args.get("guidance_interval_decay", 0.0),
        min_guidance_scale=args.get("min_guidance_scale", 3.0),
        guidance_scale_text=args.get("guidance_scale_text", 0.0) or 0.0,
        guidance_scale_lyric=args.get("guidance_scale_lyric", 0.0) or 0.0,
        use_erg_tag=args.get("use_erg_tag", True), use_erg_lyric=args.get("use_erg_lyric", True),
        use_erg_diffusion=args.get("use_erg_diffusion", True), omega_scale=args.get("omega_scale", 10.0),
    )
    task = args.get("task", "text2music")
    if task == "text2music" and args.get("audio2audio_enable"):
        task = "audio2audio"
    oss = args.get("oss_steps") or ""
    return Request(
        task=task, prompt=args.get("prompt", ""), lyrics=args.get("lyrics", ""),
        audio_duration=args.get("audio_duration", 60.0), infer_step=args.get("infer_step", 60),
        scheduler_type=args.get("scheduler_type", "euler"), guidance=g,
        oss_steps=tuple(int(s) for s in str(oss).split(",") if s.strip()), batch_size=args.get("batch_size", 1),
        manual_seeds=args.get("manual_seeds"), retake_seeds=args.get("retake_seeds"),
        retake_variance=args.get("retake_variance", 0.5), repaint_start=args.get("repaint_start", 0.0),
        repaint_end=args.get("repaint_end", 0.0), ref_audio_strength=args.get("ref_audio_strength", 0.5),
        edit_target_prompt=args.get("edit_target_prompt", ""), edit_target_lyrics=args.get("edit_target_lyrics", ""),
        edit_n_min=args.get("edit_n_min", 0.0), edit_n_max=args.get("edit_n_max", 1.0),
        edit_n_avg=args.get("edit_n_avg", 1), **audio,
    )
