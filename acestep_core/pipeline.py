"""One generation end to end with the official app's arguments: the CLI's engine and the parity tests' driver.

ComfyUI users compose the same steps as separate nodes; this module only wires them for the shell and for
scripts: conditioning -> source/reference encode -> task -> decode (design §1, §8).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from . import audio as audio_io
from . import fast, tasks
from .conditioning import Conditioning, encode_conditioning
from .latent import frames_at
from .noise import NoiseSource, SeededNoise
from .sampling.denoiser import GuidanceConfig
from .validation import MemorySettings, call_explaining_oom, check_request_counts

TASKS = ("text2music", "retake", "repaint", "extend", "edit", "audio2audio")
_SAMPLING = tasks.SamplerOptions()
_EDIT = tasks.EditOptions()


@dataclass
class Request:
    """A generation, named as the official ``ACEStepPipeline.__call__`` names its arguments (design §7.8).

    The sampling and edit defaults are those of :class:`~acestep_core.tasks.SamplerOptions`,
    :class:`~acestep_core.sampling.denoiser.GuidanceConfig` and :class:`~acestep_core.tasks.EditOptions` (stated
    once there; the command line takes its defaults from here).
    """

    task: str = "text2music"
    prompt: str = ""
    lyrics: str = ""
    audio_duration: float = 60.0
    infer_step: int = _SAMPLING.steps
    scheduler_type: str = _SAMPLING.scheduler
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    oss_steps: tuple[int, ...] = _SAMPLING.oss_steps
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
    edit_n_min: float = _EDIT.n_min
    edit_n_max: float = _EDIT.n_max
    edit_n_avg: int = _EDIT.n_avg
    sample_rate: int = 48000
    batch_branches: bool = _SAMPLING.speed.batch_branches

    def options(self) -> tasks.SamplerOptions:
        """The sampler options this request asks for."""
        return tasks.SamplerOptions(
            steps=self.infer_step, scheduler=self.scheduler_type, guidance=self.guidance, oss_steps=self.oss_steps,
            speed=tasks.SpeedOptions(batch_branches=self.batch_branches),
        )


@dataclass
class Result:
    """What a generation returns: the final latents, the decoded audio and the conditioning used."""

    latents: Tensor  # [B, 8, 16, T]
    waveform: Tensor | None  # [B, 2, N] float32 at sample_rate
    sample_rate: int
    conditioning: Conditioning
    collected: object = None  # what `collect(...)` yielded (e.g. a lyric-attention collector), else None


def _encode_source(model, waveform: Tensor | None, rate: int | None, what: str, offloader=None) -> Tensor:
    if waveform is None or rate is None:
        raise ValueError(f"this task needs {what}: pass the audio and its sample rate")
    with fast.phase(offloader, model.dcae, model.vocoder):
        return audio_io.encode_audio(model.dcae, model.vocoder.mel_transform, waveform, rate)


def _song_seconds(r: Request) -> float:
    """Length of the song a request works on (for the out-of-memory advice)."""
    if r.task in ("text2music", "retake"):
        return float(r.audio_duration)
    audio, rate = (r.ref_audio, r.ref_sample_rate) if r.task == "audio2audio" else (r.src_audio, r.src_sample_rate)
    seconds = audio.shape[-1] / rate if audio is not None and rate else 0.0
    if r.task == "extend":
        seconds += max(0.0, -r.repaint_start) + max(0.0, r.repaint_end - seconds)
    return seconds


def generate(model, request: Request, *, noise: NoiseSource | None = None, callback=None, decode: bool = True,
             levers: fast.Levers = fast.Levers(), notify=None, collect=None) -> Result:
    """Run one request on a loaded model (design §8). Without `noise`, the official seeded generators are used.

    `levers` are the speed/memory switches (acestep_core.fast.Levers: CPU offload per phase, torch.compile,
    overlapped decode); `notify(text)` hears their status lines. Decoding falls back to smaller windows on
    out-of-memory.

    `collect(conditioning)`, when given, returns a context manager entered around the sampling with the
    conditioning whose lyrics are sung (the edit target for edit), e.g. lyric_timing.collect_lyric_attention;
    what it yields comes back as ``Result.collected``.

    Running out of memory elsewhere raises torch.OutOfMemoryError naming the settings that would fit (validation
    module).
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
    offloader = fast.prepare(model, levers, notify=notify)
    with torch.no_grad(), fast.phase(offloader, model.text_encoder):
        cond = encode_conditioning(model, r.prompt, r.lyrics, erg_tag=r.guidance.use_erg_tag)
        target = None
        if r.task == "edit":
            target = encode_conditioning(model, r.edit_target_prompt, r.edit_target_lyrics, erg_tag=False)
    common = dict(batch_size=r.batch_size, options=options, noise=noise, callback=callback)
    if r.task in ("text2music", "retake"):
        if not (isinstance(r.audio_duration, (int, float)) and math.isfinite(r.audio_duration)):
            raise ValueError(f"audio_duration must be a number of seconds, got {r.audio_duration!r}")
        frames = tasks.frames_for_seconds(r.audio_duration)

    def run_task() -> Tensor:
        source = None
        if r.task == "audio2audio":
            source = _encode_source(model, r.ref_audio, r.ref_sample_rate, "a reference audio (ref_audio)", offloader)
        elif r.task not in ("text2music", "retake"):
            source = _encode_source(model, r.src_audio, r.src_sample_rate, "a source audio (src_audio)", offloader)
        with fast.phase(offloader, transformer):
            return run_on(source)

    def run_on(src: Tensor | None) -> Tensor:
        if r.task in ("text2music", "retake"):
            variance = r.retake_variance if r.task == "retake" else 0.0
            return tasks.text2music(transformer, cond, frames, retake_variance=variance, **common)
        if r.task == "audio2audio":
            return tasks.audio2audio(transformer, cond, src, ref_strength=r.ref_audio_strength, **common)
        if r.task == "repaint":
            start, end = frames_at(r.repaint_start), frames_at(r.repaint_end)
            return tasks.repaint(transformer, cond, src, start, end, variance=r.retake_variance, **common)
        if r.task == "extend":
            start, end = frames_at(r.repaint_start), frames_at(r.repaint_end)
            left, right = max(0, -start), max(0, end - src.shape[-1])
            return tasks.extend(transformer, cond, src, left, right, variance=r.retake_variance, **common)
        edit = tasks.EditOptions(r.edit_n_min, r.edit_n_max, r.edit_n_avg)
        return tasks.flow_edit(transformer, cond, target, src, edit=edit, **common)

    memory = MemorySettings("generating", _song_seconds(r), r.batch_size, model.dtype, model.device,
                            r.batch_branches)
    context = collect(target if target is not None else cond) if collect is not None else contextlib.nullcontext()
    with torch.no_grad():
        with context as collected:
            latents = call_explaining_oom(run_task, memory)
        waveform = None
        if decode:
            with fast.phase(offloader, model.dcae, model.vocoder):
                waveform = fast.decode(model.dcae, model.vocoder, latents, levers=levers, sample_rate=r.sample_rate)
            waveform = waveform.cpu()
    return Result(latents, waveform, r.sample_rate, cond, collected)


GUIDANCE_ARGS = tuple(f.name for f in fields(GuidanceConfig))
"""Official ``__call__`` arguments that are GuidanceConfig fields under the same name."""
REQUEST_ARGS = ("prompt", "lyrics", "audio_duration", "infer_step", "scheduler_type", "batch_size", "manual_seeds",
                "retake_seeds", "retake_variance", "repaint_start", "repaint_end", "ref_audio_strength",
                "edit_target_prompt", "edit_target_lyrics", "edit_n_min", "edit_n_max", "edit_n_avg")
"""Official ``__call__`` arguments that are Request fields under the same name."""


def request_from_official_args(args: dict, **audio) -> Request:
    """A :class:`Request` from a dict of official ``__call__`` arguments (fixtures' case.json ``args``).

    Arguments left out (or None) take the dataclass defaults; the guidance branches run as the official separate
    calls (batch_branches off), the call pattern the parity fixtures were recorded with.
    """
    g = GuidanceConfig(**{k: args[k] for k in GUIDANCE_ARGS if args.get(k) is not None})
    task = args.get("task", "text2music")
    if task == "text2music" and args.get("audio2audio_enable"):
        task = "audio2audio"
    oss = args.get("oss_steps") or ""
    given = {k: args[k] for k in REQUEST_ARGS if args.get(k) is not None}
    return Request(
        task=task, guidance=g, oss_steps=tuple(int(s) for s in str(oss).split(",") if s.strip()),
        batch_branches=False, **given, **audio,
    )
