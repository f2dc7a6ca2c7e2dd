"""Command line: ``python -m acestep_core generate --tags ... --lyrics ... --duration 60 --out song.wav``.

Loads the checkpoint (the Hugging Face repo id by default, downloaded into ``--models-dir`` when missing),
runs one task with the official app's defaults and writes the audio with soundfile.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .loading import DEFAULT_REPO
from .sampling.denoiser import GuidanceConfig

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _text(value: str | None) -> str:
    """A literal string, or the contents of a file given as @path."""
    if value and value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8")
    return value or ""


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
    add_speed_arguments(g)
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

    data, rate = sf.read(path, dtype="float32", always_2d=True)  # [L, C]
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

    from .loading import load_acestep
    from .lora import ensure_loras, load_lora_file
    from .pipeline import Request, generate

    device_name, dtype_name, levers = speed_settings(args)
    device, dtype = _device_and_dtype(device_name, dtype_name)
    t0 = time.perf_counter()
    # --cpu-offload: the weights are read straight into CPU memory (never all on the GPU at once); the model
    # still computes on `device`, one phase at a time (acestep_core.fast.placement)
    model = load_acestep(args.checkpoint, dtype=dtype, device="cpu" if levers.cpu_offload else device,
                         models_dir=args.models_dir, lyric_vocab=args.lyric_vocab)
    model.device = device
    loras = []
    for spec in args.lora:
        path, _, strength = spec.rpartition(":") if spec.rpartition(":")[2].replace(".", "", 1).lstrip("-").isdigit() \
            else (spec, "", "1")
        loras.append((load_lora_file(path), float(strength)))
    ensure_loras(model.transformer, loras)
    print(f"loaded {model.source} ({model.layout}, {dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
    src, src_rate = _read_audio(args.src_audio)
    ref, ref_rate = _read_audio(args.ref_audio)
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
        task=args.task, prompt=_text(args.tags), lyrics=_text(args.lyrics), audio_duration=args.duration,
        infer_step=args.steps, scheduler_type=args.scheduler, guidance=guidance,
        oss_steps=tuple(int(s) for s in args.oss_steps.split(",") if s.strip()), batch_size=args.batch_size,
        manual_seeds=seeds, retake_seeds=retake, retake_variance=args.variance, repaint_start=args.repaint_start,
        repaint_end=args.repaint_end if args.task != "retake" else args.duration, src_audio=src,
        src_sample_rate=src_rate, ref_audio=ref, ref_sample_rate=ref_rate, ref_audio_strength=args.ref_strength,
        edit_target_prompt=_text(args.edit_tags), edit_target_lyrics=_text(args.edit_lyrics),
        edit_n_min=args.edit_n_min, edit_n_max=args.edit_n_max, edit_n_avg=args.edit_n_avg,
        sample_rate=args.sample_rate,
    )
    bar, callback = _progress(args.task)
    t1 = time.perf_counter()
    try:
        result = generate(model, request, callback=callback, levers=levers,
                          notify=print if bar is None else bar.write)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t1
    out = Path(args.out)
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
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
