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

from . import cli_app, cli_tasks
from .loading import DEFAULT_REPO
from .params import app_default
from .sampling.denoiser import CFG_TYPES, GuidanceConfig
from .sampling.samplers import SCHEDULERS

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


OUT_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")  # the app's formats (params.AUDIO_FORMATS)


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
    from .pipeline import TASKS, Request

    d = Request()  # every sampling and edit default is stated once, in the dataclasses (pipeline.Request)
    gd = d.guidance
    parser = argparse.ArgumentParser(prog="python -m acestep_core", description="ACE-Step v1 music generation")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make a song (or edit one) and write it to a file")
    g.add_argument("--tags", default=None,
                   help="style description, e.g. 'pop, piano, female vocal, 100 bpm' (or @file); stemgen: the instrument")
    g.add_argument("--lyrics", default="", help="lyrics with [verse]/[chorus] tags; empty = instrumental (or @file)")
    g.add_argument("--duration", type=float, default=app_default("audio_duration"),
                   help="seconds of music; -1 (the app's default) = random 30-240 s")
    g.add_argument("--out", default="song.wav",
                   help="output file: .wav (32-bit float), .flac, .mp3 or .ogg (the app's formats); a batch adds "
                        "_1, _2, ...; <out>_input_params.json is written beside each file")
    g.add_argument("--checkpoint", default=DEFAULT_REPO,
                   help="HF folder, ComfyUI all-in-one .safetensors, or Hugging Face repo id (downloaded when missing)")
    g.add_argument("--models-dir", default="models", help="where a repo id is downloaded to")
    g.add_argument("--lyric-vocab", default=None, help="path of the lyric vocab.json (else found automatically)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--task", default=d.task, choices=[*TASKS, *cli_tasks.STEM_TASKS],
                   help="stemgen / singing2accompaniment take --src-audio (the track or the vocal) and --stemgen; "
                        "stemgen's --tags name the instrument")
    g.add_argument("--steps", type=int, default=d.infer_step, help="sampling steps (27 is fast, 60 the official default)")
    g.add_argument("--scheduler", default=d.scheduler_type, choices=list(SCHEDULERS))
    g.add_argument("--cfg-type", default=gd.cfg_type, choices=list(CFG_TYPES))
    g.add_argument("--guidance-scale", type=float, default=gd.guidance_scale)
    g.add_argument("--guidance-interval", type=float, default=gd.guidance_interval)
    g.add_argument("--guidance-interval-decay", type=float, default=gd.guidance_interval_decay)
    g.add_argument("--min-guidance-scale", type=float, default=gd.min_guidance_scale)
    g.add_argument("--guidance-scale-text", type=float, default=gd.guidance_scale_text)
    g.add_argument("--guidance-scale-lyric", type=float, default=gd.guidance_scale_lyric)
    g.add_argument("--omega-scale", type=float, default=gd.omega_scale)
    g.add_argument("--no-erg-tag", action="store_true")
    g.add_argument("--no-erg-lyric", action="store_true")
    g.add_argument("--no-erg-diffusion", action="store_true")
    g.add_argument("--oss-steps", default="", help="custom step list, e.g. '16,29,52,...' (euler/pingpong)")
    g.add_argument("--seed", default=None,
                   help="seed, or one per batch item as the app's manual seeds ('1,2,3,4', which alone sets "
                        "--batch-size); one seed gives item i seed+i; random when omitted")
    g.add_argument("--retake-seed", default=None, help="retake / repaint / extend / edit seed(s), as --seed")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--variance", type=float, default=None,
                   help="retake / repaint / extend variance (0..1); default the app's: retake and repaint 0.2, "
                        "extend 1.0")
    g.add_argument("--src-audio", default=None, help="source audio for repaint / extend / edit")
    g.add_argument("--ref-audio", default=None, help="reference audio for audio2audio")
    g.add_argument("--ref-strength", type=float, default=d.ref_audio_strength)
    g.add_argument("--repaint-start", type=float, default=d.repaint_start, help="seconds; negative extends to the left")
    g.add_argument("--repaint-end", type=float, default=d.repaint_end, help="seconds; past the source extends to the right")
    g.add_argument("--edit-tags", default="", help="target tags for edit (empty = the source's --tags, as the app)")
    g.add_argument("--edit-lyrics", default="",
                   help="target lyrics for edit (or @file; empty = the source's --lyrics, as the app)")
    g.add_argument("--edit-n-min", type=float, default=app_default("edit_n_min"))
    g.add_argument("--edit-n-max", type=float, default=d.edit_n_max)
    g.add_argument("--edit-n-avg", type=int, default=d.edit_n_avg)
    g.add_argument("--lora", action="append", default=[], help="LoRA file or folder, optionally PATH:STRENGTH")
    g.add_argument("--sample-rate", type=int, default=app_default("sample_rate"), choices=[44100, 48000],
                   help="44100 = the model's rate, 48000 = what the official app saves")
    add_speed_arguments(g)
    cli_app.add_arguments(g)
    cli_tasks.add_arguments(g)
    return parser


def _flag(text: str) -> bool:
    """A switch value as the official app's click options take it (true/false, 1/0, yes/no, on/off)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", "y", "t"):
        return True
    if value in ("0", "false", "no", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_speed_arguments(g: argparse.ArgumentParser) -> None:
    """The speed and memory switches (docs/memory-and-speed.md), under the official app's names: each takes an
    optional true/false (`--cpu-offload`, `--cpu_offload true`); `--bf16` and `--device_id` are aliases of
    --dtype and --device."""
    switches = {
        "cpu_offload": "low VRAM: every component in CPU memory, each moved to the GPU only while it runs",
        "torch_compile": "torch.compile the transformer blocks (the first call compiles; falls back to eager "
                         "when no compiler is found)",
        "overlapped_decode": "decode in overlapped windows from the start (always the fallback when the GPU runs "
                             "out of memory)",
    }
    for name, text in switches.items():
        g.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, type=_flag, nargs="?", const=True,
                       default=False, metavar="BOOL", help=text)
    g.add_argument("--bf16", type=_flag, nargs="?", const=True, default=None, metavar="BOOL",
                   help="official alias: true = --dtype bf16, false = --dtype fp32")
    g.add_argument("--device_id", "--device-id", dest="device_id", type=int, default=None,
                   help="official alias: GPU number N = --device cuda:N")


def speed_settings(args: argparse.Namespace):
    """(device, dtype name, Levers) from the parsed switches and their official aliases; clashes are refused."""
    from .fast import Levers

    device, dtype = args.device, args.dtype
    if args.bf16 is not None:
        wanted = "bf16" if args.bf16 else "fp32"
        if dtype not in ("auto", wanted):
            raise ValueError(f"--bf16 {str(args.bf16).lower()} asks for {wanted} but --dtype is {dtype}; drop one")
        dtype = wanted
    if args.device_id is not None:
        if args.device_id < 0:
            raise ValueError(f"--device_id must be a GPU number >= 0, got {args.device_id}")
        wanted = f"cuda:{args.device_id}"
        if device not in ("auto", "cuda", wanted):
            raise ValueError(f"--device_id {args.device_id} asks for {wanted} but --device is {device}; drop one")
        device = wanted
    levers = Levers(cpu_offload=args.cpu_offload, torch_compile=args.torch_compile,
                    overlapped_decode=args.overlapped_decode)
    return device, dtype, levers


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
    from .conditioning import _check_text
    from .loading import load_acestep
    from .lora import ensure_loras, load_lora_file
    from .pipeline import Request
    from .sampling.schedules import parse_oss_steps
    from .validation import MAX_BATCH, MAX_N_AVG, MAX_STEPS, check_count

    # every input is checked before the model is loaded, so a bad one is answered at once and nothing is written
    out = _check_out(args.out)
    check_count("--steps", args.steps, MAX_STEPS)
    check_count("--batch-size", args.batch_size, MAX_BATCH)
    check_count("--edit-n-avg", args.edit_n_avg, MAX_N_AVG)
    oss_steps = tuple(parse_oss_steps(args.oss_steps))
    device_name, dtype_name, levers = speed_settings(args)
    src, src_rate = _read_audio(args.src_audio)
    ref, ref_rate = _read_audio(args.ref_audio)
    setup = cli_app.prepare(args)  # the app's defaults and fallbacks (seed lists may set the batch size)
    check_count("--batch-size", args.batch_size, MAX_BATCH)
    tags, lyrics = _check_text("tags", setup.tags), _check_text("lyrics", setup.lyrics)
    edit_tags, edit_lyrics = _check_text("tags", setup.edit_tags), _check_text("lyrics", setup.edit_lyrics)
    loras = []
    for spec in args.lora:
        path, _, strength = spec.rpartition(":") if spec.rpartition(":")[2].replace(".", "", 1).lstrip("-").isdigit() \
            else (spec, "", "1")
        loras.append((load_lora_file(cli_app.lora_path(path, args.models_dir)), float(strength)))
    device, dtype = _device_and_dtype(device_name, dtype_name)
    t0 = time.perf_counter()
    # --cpu-offload: the weights are read straight into CPU memory (never all on the GPU at once); the model
    # still computes on `device`, one phase at a time (acestep_core.fast.placement)
    model = load_acestep(args.checkpoint, dtype=dtype, device="cpu" if levers.cpu_offload else device,
                         models_dir=args.models_dir, lyric_vocab=args.lyric_vocab)
    model.device = device
    ensure_loras(model.transformer, loras)
    print(f"loaded {model.source} ({model.layout}, {dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
    seeds, retake = setup.seeds, setup.retake_seeds
    guidance = GuidanceConfig(
        guidance_scale=args.guidance_scale, cfg_type=args.cfg_type, guidance_interval=args.guidance_interval,
        guidance_interval_decay=args.guidance_interval_decay, min_guidance_scale=args.min_guidance_scale,
        guidance_scale_text=args.guidance_scale_text, guidance_scale_lyric=args.guidance_scale_lyric,
        use_erg_tag=not args.no_erg_tag, use_erg_lyric=setup.use_erg_lyric,
        use_erg_diffusion=not args.no_erg_diffusion, omega_scale=args.omega_scale,
    )
    request = Request(
        task=args.task, prompt=tags, lyrics=lyrics, audio_duration=setup.duration,
        infer_step=args.steps, scheduler_type=args.scheduler, guidance=guidance,
        oss_steps=oss_steps, batch_size=args.batch_size,
        manual_seeds=seeds, retake_seeds=retake, retake_variance=setup.variance, repaint_start=args.repaint_start,
        repaint_end=args.repaint_end if args.task != "retake" else setup.duration, src_audio=src,
        src_sample_rate=src_rate, ref_audio=ref, ref_sample_rate=ref_rate, ref_audio_strength=args.ref_strength,
        edit_target_prompt=edit_tags, edit_target_lyrics=edit_lyrics,
        edit_n_min=setup.edit_n_min, edit_n_max=setup.edit_n_max, edit_n_avg=args.edit_n_avg,
        sample_rate=args.sample_rate,
    )
    bar, callback = _progress(args.task)
    t1 = time.perf_counter()
    try:
        result = cli_tasks.generate(model, request, args, callback=callback, levers=levers,
                                    notify=print if bar is None else bar.write)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t1
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = result.waveform.shape[-1] / result.sample_rate
    for path in cli_app.write_outputs(args, setup, request, result.waveform, result.sample_rate,
                                      {"preprocess": 0.0, "diffusion": elapsed, "latent2audio": 0.0}):
        print(f"wrote {path} ({seconds:.1f} s at {result.sample_rate} Hz)")
    for path in cli_tasks.write_extras(args, result, setup.paths):
        print(f"wrote {path}")
    print(f"generated {seconds * result.waveform.shape[0]:.1f} s of audio in {elapsed:.1f} s "
          f"(RTF {seconds * result.waveform.shape[0] / elapsed:.1f}x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = cli_app.parse(parser, argv)
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
