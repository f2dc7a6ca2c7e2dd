"""Command line: ``python -m acestep_core generate --tags ... --lyrics ... --duration 60 --out song.wav``.

Loads the checkpoint (the Hugging Face repo id by default, downloaded into ``--models-dir`` when missing),
runs one task with the official app's defaults and writes the audio with soundfile.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .loading import DEFAULT_REPO
from .sampling.denoiser import GuidanceConfig

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


OUT_SUFFIXES = (".wav", ".flac", ".ogg")


def _text(value: str | None, name: str = "text") -> str:
    """A literal string, or the contents of a file given as @path (a file far past the longest text is not read)."""
    from .validation import MAX_LYRICS_CHARS

    if value and value.startswith("@"):
        try:
            size = os.stat(value[1:]).st_size
            if size > 4 * MAX_LYRICS_CHARS:  # more than the longest text accepted, even at 4 bytes a character
                raise ValueError(f"{name} file {value[1:]!r} is {size} bytes long; at most {MAX_LYRICS_CHARS} "
                                 "characters are accepted")
            with open(value[1:], encoding="utf-8") as handle:
                return handle.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"{name} file {value[1:]!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise ValueError(f"{name} file {value[1:]!r} cannot be read: {err.strerror or err}") from None
    return value or ""


def _check_out(value: str) -> Path:
    """The output path, checked before any work: a known audio suffix and not a folder."""
    out = Path(value)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"--out {value!r}: the file name must end in {', '.join(OUT_SUFFIXES)} (the audio format)")
    if out.is_dir():
        raise ValueError(f"--out {value!r} is a folder; give a file name such as {str(out / 'song.wav')!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m acestep_core", description="ACE-Step v1 music generation")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make a song (or edit one) and write it to a file")
    g.add_argument("--tags", required=True, help="style description, e.g. 'pop, piano, female vocal, 100 bpm' (or @file)")
    g.add_argument("--lyrics", default="", help="lyrics with [verse]/[chorus] tags; empty = instrumental (or @file)")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of music (at most 240)")
    g.add_argument("--out", default="song.wav", help="output file (.wav or .flac); a batch adds _1, _2, ...")
    g.add_argument("--checkpoint", default=DEFAULT_REPO,
                   help="HF folder, ComfyUI all-in-one .safetensors, or Hugging Face repo id (downloaded when missing)")
    g.add_argument("--models-dir", default="models", help="where a repo id is downloaded to")
    g.add_argument("--lyric-vocab", default=None, help="path of the lyric vocab.json (else found automatically)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--task", default="text2music", choices=["text2music", "retake", "repaint", "extend", "edit", "audio2audio"])
    g.add_argument("--steps", type=int, default=60, help="sampling steps (27 is fast, 60 the official default)")
    g.add_argument("--scheduler", default="euler", choices=["euler", "heun", "pingpong"])
    g.add_argument("--cfg-type", default="apg", choices=["apg", "cfg", "cfg_star"])
    g.add_argument("--guidance-scale", type=float, default=15.0)
    g.add_argument("--guidance-interval", type=float, default=0.5)
    g.add_argument("--guidance-interval-decay", type=float, default=0.0)
    g.add_argument("--min-guidance-scale", type=float, default=3.0)
    g.add_argument("--guidance-scale-text", type=float, default=0.0)
    g.add_argument("--guidance-scale-lyric", type=float, default=0.0)
    g.add_argument("--omega-scale", type=float, default=10.0)
    g.add_argument("--no-erg-tag", action="store_true")
    g.add_argument("--no-erg-lyric", action="store_true")
    g.add_argument("--no-erg-diffusion", action="store_true")
    g.add_argument("--oss-steps", default="", help="custom step list, e.g. '16,29,52,...' (euler/pingpong)")
    g.add_argument("--seed", type=int, default=None, help="seed (random when omitted); batch items use seed, seed+1, ...")
    g.add_argument("--retake-seed", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--variance", type=float, default=0.5, help="retake / repaint variance (0..1)")
    g.add_argument("--src-audio", default=None, help="source audio for repaint / extend / edit")
    g.add_argument("--ref-audio", default=None, help="reference audio for audio2audio")
    g.add_argument("--ref-strength", type=float, default=0.5)
    g.add_argument("--repaint-start", type=float, default=0.0, help="seconds; negative extends to the left")
    g.add_argument("--repaint-end", type=float, default=0.0, help="seconds; past the source extends to the right")
    g.add_argument("--edit-tags", default="", help="target tags for edit")
    g.add_argument("--edit-lyrics", default="", help="target lyrics for edit (or @file)")
    g.add_argument("--edit-n-min", type=float, default=0.6)
    g.add_argument("--edit-n-max", type=float, default=1.0)
    g.add_argument("--edit-n-avg", type=int, default=1)
    g.add_argument("--lora", action="append", default=[], help="LoRA file or folder, optionally PATH:STRENGTH")
    g.add_argument("--sample-rate", type=int, default=48000, choices=[44100, 48000],
                   help="44100 = the model's rate, 48000 = what the official app saves")
    return parser


def _read_audio(path: str | None):
    if path is None:
        return None, None
    import soundfile as sf
    import torch

    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # [L, C]
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"audio file {path!r} cannot be read as audio ({err}); give a .wav or .flac file") from None
    return torch.from_numpy(data.T.copy()), int(rate)


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = DTYPES[dtype] or ("bfloat16" if str(device).startswith("cuda") else "float32")
    return torch.device(device), getattr(torch, name)


def _progress(total_hint: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
        return None, None
    bar = tqdm(desc=total_hint, unit="step")

    def callback(step: int, total: int, _x) -> None:
        bar.total = total
        bar.n = step + 1
        bar.refresh()

    return bar, callback


def generate_command(args: argparse.Namespace) -> int:
    import soundfile as sf

    from . import tasks
    from .conditioning import _check_text
    from .loading import load_acestep
    from .lora import ensure_loras, load_lora_file
    from .pipeline import Request, generate
    from .sampling.schedules import parse_oss_steps
    from .validation import MAX_BATCH, MAX_N_AVG, MAX_STEPS, check_count

    # every input is checked before the model is loaded, so a bad one is answered at once and nothing is written
    out = _check_out(args.out)
    check_count("--steps", args.steps, MAX_STEPS)
    check_count("--batch-size", args.batch_size, MAX_BATCH)
    check_count("--edit-n-avg", args.edit_n_avg, MAX_N_AVG)
    oss_steps = tuple(parse_oss_steps(args.oss_steps))
    tags, lyrics = _check_text("tags", _text(args.tags, "tags")), _check_text("lyrics", _text(args.lyrics, "lyrics"))
    edit_tags = _check_text("tags", _text(args.edit_tags, "edit tags"))
    edit_lyrics = _check_text("lyrics", _text(args.edit_lyrics, "edit lyrics"))
    if args.task in ("text2music", "retake") and tasks.frames_for_seconds(args.duration) > tasks.MAX_FRAMES:
        raise ValueError(f"--duration {args.duration} is past the model's 240 s; use long-form generation")
    src, src_rate = _read_audio(args.src_audio)
    ref, ref_rate = _read_audio(args.ref_audio)
    loras = []
    for spec in args.lora:
        path, _, strength = spec.rpartition(":") if spec.rpartition(":")[2].replace(".", "", 1).lstrip("-").isdigit() \
            else (spec, "", "1")
        loras.append((load_lora_file(path), float(strength)))
    device, dtype = _device_and_dtype(args.device, args.dtype)
    t0 = time.perf_counter()
    model = load_acestep(args.checkpoint, dtype=dtype, device=device, models_dir=args.models_dir,
                         lyric_vocab=args.lyric_vocab)
    ensure_loras(model.transformer, loras)
    print(f"loaded {model.source} ({model.layout}, {dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
    seeds = None if args.seed is None else [args.seed + i for i in range(args.batch_size)]
    retake = None if args.retake_seed is None else [args.retake_seed + i for i in range(args.batch_size)]
    guidance = GuidanceConfig(
        guidance_scale=args.guidance_scale, cfg_type=args.cfg_type, guidance_interval=args.guidance_interval,
        guidance_interval_decay=args.guidance_interval_decay, min_guidance_scale=args.min_guidance_scale,
        guidance_scale_text=args.guidance_scale_text, guidance_scale_lyric=args.guidance_scale_lyric,
        use_erg_tag=not args.no_erg_tag, use_erg_lyric=not args.no_erg_lyric,
        use_erg_diffusion=not args.no_erg_diffusion, omega_scale=args.omega_scale,
    )
    request = Request(
        task=args.task, prompt=tags, lyrics=lyrics, audio_duration=args.duration,
        infer_step=args.steps, scheduler_type=args.scheduler, guidance=guidance,
        oss_steps=oss_steps, batch_size=args.batch_size,
        manual_seeds=seeds, retake_seeds=retake, retake_variance=args.variance, repaint_start=args.repaint_start,
        repaint_end=args.repaint_end if args.task != "retake" else args.duration, src_audio=src,
        src_sample_rate=src_rate, ref_audio=ref, ref_sample_rate=ref_rate, ref_audio_strength=args.ref_strength,
        edit_target_prompt=edit_tags, edit_target_lyrics=edit_lyrics,
        edit_n_min=args.edit_n_min, edit_n_max=args.edit_n_max, edit_n_avg=args.edit_n_avg,
        sample_rate=args.sample_rate,
    )
    bar, callback = _progress(args.task)
    t1 = time.perf_counter()
    try:
        result = generate(model, request, callback=callback)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t1
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = result.waveform.shape[-1] / result.sample_rate
    for i, wav in enumerate(result.waveform):
        path = out if result.waveform.shape[0] == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        sf.write(str(path), wav.clamp(-1, 1).numpy().T, result.sample_rate)
        print(f"wrote {path} ({seconds:.1f} s at {result.sample_rate} Hz)")
    print(f"generated {seconds * result.waveform.shape[0]:.1f} s of audio in {elapsed:.1f} s "
          f"(RTF {seconds * result.waveform.shape[0] / elapsed:.1f}x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return generate_command(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        _print_error(f"error: {error}")
        return 2
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except Exception as error:  # a bug, not a bad input: one line, with the type, to report
        if os.environ.get("ACESTEP_TRACEBACK"):
            raise
        _print_error(f"internal error ({type(error).__name__}: {error}); please report it "
                     "(set ACESTEP_TRACEBACK=1 to see where)")
        return 1


def _print_error(text: str) -> None:
    """One line on stderr, whatever the text holds (lone surrogates included)."""
    line = " ".join(text.split("\n"))[:2000]
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
