"""The command line's tasks beyond one pipeline call: long songs past 240 s (windows chained by extend,
acestep_core.longform), lyric timing as LRC (acestep_core.lyric_timing), StemGen and singing to accompaniment
(acestep_core.stemgen). ``cli.generate_command`` hands every run to :func:`generate`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

STEM_TASKS = ("stemgen", "singing2accompaniment")
MAX_MODEL_SECONDS = 240.0  # past this a text2music run is generated in windows (long form)
MAX_LONG_SECONDS = 3600.0


def add_arguments(g: argparse.ArgumentParser) -> None:
    """The flags this module adds to ``generate``."""
    g.add_argument("--lrc", default=None, metavar="FILE",
                   help="also write the lyric timing (from the lyric cross-attention) as an LRC file; with a batch, "
                        "_1, _2, ... are added")
    g.add_argument("--window-seconds", type=float, default=240.0,
                   help="long songs (--duration past 240 s): length of each generated window")
    g.add_argument("--overlap-seconds", type=float, default=20.0,
                   help="long songs: seconds each window re-hears of the previous one")
    g.add_argument("--stemgen", default=None, metavar="FILE",
                   help="StemGen / singing2accompaniment control file (python -m acestep_core.stemgen.train)")
    g.add_argument("--instrument-audio", default=None,
                   help="stemgen: a sample of the wanted instrument's sound (steers the timbre)")
    g.add_argument("--control-scale", type=float, default=1.0, help="stemgen: strength of the control branch")
    g.add_argument("--stemgen-lora-strength", type=float, default=1.0, help="stemgen: strength of the file's LoRA")


@dataclass
class Outcome:
    """What a run made: audio [B, 2, N] at `sample_rate`, LRC text per item, extra files (suffix -> audio)."""

    waveform: Tensor
    sample_rate: int
    lrc: list[str] | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


def check(args: argparse.Namespace) -> None:
    """Refuse inconsistent task flags before the model loads."""
    if args.task in STEM_TASKS:
        if not args.stemgen:
            raise ValueError(f"--task {args.task} needs --stemgen FILE "
                             "(train one: python -m acestep_core.stemgen.train)")
        if not args.src_audio:
            what = "the track the stem must fit" if args.task == "stemgen" else "the vocal recording"
            raise ValueError(f"--task {args.task} needs --src-audio ({what})")
    elif args.stemgen:
        raise ValueError("--stemgen is used with --task stemgen or --task singing2accompaniment")
    if args.duration > MAX_MODEL_SECONDS and args.task != "text2music":
        raise ValueError(f"--duration past {MAX_MODEL_SECONDS:g} s (long form) works for text2music only")
    if args.duration > MAX_LONG_SECONDS:
        raise ValueError(f"--duration must be at most {MAX_LONG_SECONDS:g} s, got {args.duration}")


def _options(request):
    from . import tasks

    return tasks.with_options(request.options(), batch_branches=request.batch_branches)


def _long(model, request, args, callback, levers, notify) -> Outcome:
    from . import fast
    from .conditioning import encode_conditioning
    from .longform import decode_window, generate_long
    from .lyric_timing import to_lrc
    from .noise import SeededNoise

    if request.batch_size != 1:
        raise ValueError("long songs (--duration past 240 s) are made one at a time: use --batch-size 1")
    offloader = fast.prepare(model, levers, notify=notify)  # --cpu-offload: one phase on the device at a time
    with torch.no_grad(), fast.phase(offloader, model.text_encoder):
        cond = encode_conditioning(model, request.prompt, request.lyrics, erg_tag=request.guidance.use_erg_tag)
    noise = SeededNoise(list(request.manual_seeds), list(request.retake_seeds), model.device, model.dtype)

    def decode(z: Tensor) -> Tensor:  # each window's decode in its own phase (the transformer waits meanwhile)
        with fast.phase(offloader, model.dcae, model.vocoder):
            return decode_window(model, z)

    def progress(done: int, total: int) -> None:
        if callback is not None:
            callback(done - 1, total, None)

    with fast.phase(offloader, model.transformer):
        song = generate_long(model, cond, request.audio_duration, noise=noise, window_seconds=args.window_seconds,
                             overlap_seconds=args.overlap_seconds, options=_options(request),
                             sample_rate=request.sample_rate, timing=bool(args.lrc), decode=decode,
                             callback=progress)
    lrc = [to_lrc(song.lines, request.audio_duration)] if args.lrc and song.lines is not None else None
    return Outcome(song.waveform, song.sample_rate, lrc)


def _stem(model, request, args, callback, levers, notify) -> Outcome:
    from . import fast
    from .conditioning import encode_conditioning
    from .noise import SeededNoise
    from .stemgen.generate import encode_reference, generate_latent, instrument_timbre, mix_with_reference, stemgen_lora
    from .stemgen.weights import load_stemgen

    weights = load_stemgen(args.stemgen)
    if weights.task != args.task:
        raise ValueError(f"{args.stemgen} was trained for {weights.task}, not {args.task}; use --task {weights.task}")
    if request.src_audio is None:
        raise ValueError(f"--task {args.task} needs --src-audio")
    transformer = model.transformer
    options = _options(request)
    offloader = fast.prepare(model, levers, notify=notify)  # --cpu-offload: one phase on the device at a time
    with torch.no_grad(), stemgen_lora(transformer, weights, float(args.stemgen_lora_strength)):
        control = weights.build_control(transformer)
        with fast.phase(offloader, model.text_encoder):
            cond = encode_conditioning(model, request.prompt, "", erg_tag=options.guidance.use_erg_tag)
        source = request.src_audio if request.src_audio.ndim == 3 else request.src_audio[None]
        with fast.phase(offloader, model.dcae, model.vocoder):
            reference = encode_reference(model, source, request.src_sample_rate)
            timbre = None
            if args.instrument_audio:
                from .cli import _read_audio

                sample, rate = _read_audio(args.instrument_audio)
                timbre = instrument_timbre(model, sample, rate)
        batch = reference.shape[0]
        if batch == 1 and request.batch_size > 1:
            reference = reference.expand(request.batch_size, -1, -1, -1)
        noise = SeededNoise(list(request.manual_seeds), list(request.retake_seeds), model.device, model.dtype)
        with fast.phase(offloader, transformer, control):
            latent = generate_latent(transformer, control, cond, reference, timbre=timbre,
                                     control_scale=float(args.control_scale), options=options, noise=noise,
                                     callback=callback)
        with fast.phase(offloader, model.dcae, model.vocoder):
            part = fast.decode(model.dcae, model.vocoder, latent, levers=levers,
                               sample_rate=request.sample_rate).float().cpu()
        mix = mix_with_reference(source.float(), request.src_sample_rate, part, request.sample_rate)
    return Outcome(part, request.sample_rate, extra={"_mix": mix.cpu()})


def generate(model, request, args: argparse.Namespace, callback=None, levers=None, notify=None) -> Outcome:
    """Run the CLI's request: a stem task, a long song, or one pipeline call (collecting lyric timing for --lrc).

    `levers` are the speed and memory switches (acestep_core.fast.Levers), `notify(text)` hears their status."""
    from .fast import Levers
    from .pipeline import generate as pipeline_generate

    levers = Levers() if levers is None else levers
    if args.task in STEM_TASKS:
        return _stem(model, request, args, callback, levers, notify)
    if args.task == "text2music" and request.audio_duration > MAX_MODEL_SECONDS:
        return _long(model, request, args, callback, levers, notify)
    if not args.lrc:
        result = pipeline_generate(model, request, callback=callback, levers=levers, notify=notify)
        return Outcome(result.waveform, result.sample_rate)
    from .lyric_timing import align_lyrics, collect_lyric_attention, to_lrc

    lyrics = request.edit_target_lyrics if request.task == "edit" else request.lyrics
    if not lyrics.strip():
        raise ValueError("--lrc needs lyrics (an instrumental has no lyric timing)")
    result = pipeline_generate(model, request, callback=callback, levers=levers, notify=notify,
                               collect=lambda cond: collect_lyric_attention(model.transformer, cond))
    collector = result.collected
    attention = collector.result()
    seconds = result.waveform.shape[-1] / result.sample_rate
    lrc = []
    for item in range(result.waveform.shape[0]):
        alignment = align_lyrics(attention, model.lyric_tokenizer, item=item)
        lrc.append(to_lrc(alignment.lines, seconds))
    return Outcome(result.waveform, result.sample_rate, lrc)


def write_extras(args: argparse.Namespace, outcome: Outcome, paths: list[Path]) -> list[Path]:
    """The LRC files (--lrc) and extra audio (a stem task's mix) beside the outputs."""
    from .audiofile import write_audio

    written = []
    if outcome.lrc and args.lrc:
        base = Path(args.lrc)
        for i, text in enumerate(outcome.lrc):
            path = base if len(outcome.lrc) == 1 else base.with_name(f"{base.stem}_{i + 1}{base.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    for suffix, audio in outcome.extra.items():
        for path, wav in zip(paths, audio):
            target = path.with_name(f"{path.stem}{suffix}{path.suffix}")
            write_audio(target, wav, outcome.sample_rate)
            written.append(target)
    return written
