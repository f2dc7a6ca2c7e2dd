"""The command line's side of the official app: parameter files in and out, the app's defaults and fallbacks.

``--params FILE`` reads an official (or our) ``*_input_params.json`` and uses its settings as the defaults of
every flag, so a flag given on the command line still wins. Every output gets its ``<out>_input_params.json``
with the official keys (acestep_core.params).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import params as app

# parameter-file key -> (CLI dest, conversion)
_SIMPLE = {
    "prompt": "tags", "lyrics": "lyrics", "audio_duration": "duration", "infer_step": "steps",
    "scheduler_type": "scheduler", "cfg_type": "cfg_type", "guidance_scale": "guidance_scale",
    "guidance_interval": "guidance_interval", "guidance_interval_decay": "guidance_interval_decay",
    "min_guidance_scale": "min_guidance_scale", "guidance_scale_text": "guidance_scale_text",
    "guidance_scale_lyric": "guidance_scale_lyric", "omega_scale": "omega_scale", "retake_variance": "variance",
    "repaint_start": "repaint_start", "repaint_end": "repaint_end", "ref_audio_strength": "ref_strength",
    "edit_n_min": "edit_n_min", "edit_n_max": "edit_n_max", "edit_n_avg": "edit_n_avg", "task": "task",
    "edit_target_prompt": "edit_tags", "edit_target_lyrics": "edit_lyrics", "batch_size": "batch_size",
    "sample_rate": "sample_rate",
}


def add_arguments(g: argparse.ArgumentParser) -> None:
    """The flags this module adds to ``generate``."""
    g.add_argument("--params", default=None, metavar="FILE",
                   help="reproduce a run from an official or our *_input_params.json (flags given here still win)")
    g.add_argument("--erg-lyric", action="store_true",
                   help="ERG on the lyrics (off by default, as the official app's UI; the pipeline's default is on)")
    g.add_argument("--edit-type", default="custom", choices=["only_lyrics", "remix", "custom"],
                   help="edit: only_lyrics = n_min 0.6, n_max 1.0; remix = 0.2, 0.4 (the app's); custom = "
                        "--edit-n-min/--edit-n-max")
    g.add_argument("--no-params-file", action="store_true", help="do not write <out>_input_params.json")


def defaults_from_params(path: str) -> tuple[dict, dict]:
    """(parser defaults, the checked file) of a parameter file."""
    data = app.read_params(path)
    args = app.official_args(data)
    d: dict = {}
    for key, dest in _SIMPLE.items():
        if args.get(key) is not None:
            d[dest] = args[key]
    if args.get("task") == "audio2audio" or data.get("audio2audio_enable"):
        d["task"] = "audio2audio" if data.get("ref_audio_input") else d.get("task", "text2music")
    if args.get("manual_seeds"):
        d["seed"] = ",".join(str(s) for s in args["manual_seeds"])
    if args.get("retake_seeds"):
        d["retake_seed"] = ",".join(str(s) for s in args["retake_seeds"])
    d["oss_steps"] = args.get("oss_steps", "")
    d["no_erg_tag"] = not args.get("use_erg_tag", True)
    d["erg_lyric"] = bool(args.get("use_erg_lyric", True))
    d["no_erg_diffusion"] = not args.get("use_erg_diffusion", True)
    d["edit_type"] = "custom"
    if data.get("format") in app.AUDIO_FORMATS:
        d["out"] = f"song.{data['format']}"  # the app's format unless --out says otherwise
    if data.get("src_audio_path"):
        d["src_audio"] = app.find_audio(data["src_audio_path"], path)
    if data.get("ref_audio_input") and d.get("task") == "audio2audio":
        d["ref_audio"] = app.find_audio(data["ref_audio_input"], path)
    lora = data.get("lora_name_or_path")
    if lora and lora != "none":
        d["lora"] = [f"{lora}:{data.get('lora_weight', 1.0)}"]
    return d, data


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; with ``--params`` the file's values become the defaults and the flags are parsed again."""
    args = parser.parse_args(argv)
    if getattr(args, "params", None):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        defaults, data = defaults_from_params(args.params)
        if data.get("task") == "edit" and data.get("source_prompt") is None:
            print("note: the official app's edit file keeps only the target tags and lyrics; they stand in for the "
                  "source's too (give the source's with --tags / --lyrics)", file=sys.stderr)
        sub.set_defaults(**defaults)
        args = parser.parse_args(argv)
        args.from_params = True
    if args.command == "generate" and args.tags is None:
        parser.error("generate needs --tags (or --params FILE)")
    return args


def lora_path(spec: str, models_dir: str) -> str:
    """A --lora file or folder as given; a Hugging Face repo id (the app's LoRA names, e.g.
    ACE-Step/ACE-Step-v1-chinese-rap-LoRA) is downloaded once into <models-dir>/loras/<name>."""
    import re

    if Path(spec).exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", spec):
        return spec
    target = Path(models_dir) / "loras" / spec.split("/")[-1]
    if (target / "pytorch_lora_weights.safetensors").is_file():
        return str(target)
    import huggingface_hub

    print(f"downloading the LoRA {spec} into {target}")
    huggingface_hub.snapshot_download(spec, local_dir=str(target),
                                      allow_patterns=["pytorch_lora_weights.safetensors", "*.json"])
    return str(target)


def seed_list(text: str | None, name: str) -> list[int] | None:
    """A --seed / --retake-seed value: one seed or the app's list '1,2,3,4'."""
    return app.parse_seed_list(text, name)


def batch_seeds(seeds: list[int] | None, batch: int, name: str) -> list[int]:
    """Per-item seeds: a list as given (one per item), one seed as seed + i (the pack's rule), none random."""
    from .noise import resolve_seeds

    if seeds is None:
        return resolve_seeds(None, batch)
    if len(seeds) == 1 and batch > 1:
        return [(seeds[0] + i) % (app.MAX_SEED + 1) for i in range(batch)]
    return app.seeds_for_batch(seeds, batch, name)


def output_paths(out: str, count: int) -> list[Path]:
    """Output files of a batch: ``out`` itself, or out_1, out_2, ... (the format from its suffix)."""
    from .audiofile import format_of

    path = Path(out)
    format_of(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i + 1}{path.suffix}") for i in range(count)]


class Setup:
    """The settings of one CLI run after the app's defaults and fallbacks are applied."""

    def __init__(self, args: argparse.Namespace):
        from .cli import _text

        self.tags = _text(args.tags, "tags")
        self.lyrics = _text(args.lyrics, "lyrics")
        from .cli_tasks import MAX_LONG_SECONDS, check

        check(args)
        self.duration = float(args.duration)
        if args.task in ("text2music", "retake"):
            self.duration = app.resolve_duration(args.duration, maximum=MAX_LONG_SECONDS)
            if args.duration == -1:
                print(f"random duration: {self.duration:.2f} s (--duration -1, as the app)")
        elif args.src_audio or args.ref_audio:  # the app records the source's length
            import soundfile

            self.duration = float(soundfile.info(args.src_audio or args.ref_audio).duration)
        self.variance = float(args.variance) if args.variance is not None else app.variance_for(args.task)
        self.use_erg_lyric = bool(args.erg_lyric) and not args.no_erg_lyric
        self.edit_tags, self.edit_lyrics = app.edit_texts(self.tags, self.lyrics, _text(args.edit_tags, "edit tags"),
                                                          _text(args.edit_lyrics, "edit lyrics"))
        self.edit_n_min, self.edit_n_max = app.edit_range(args.edit_type, args.edit_n_min, args.edit_n_max)
        listed = seed_list(args.seed, "--seed")
        if listed and len(listed) > 1 and int(args.batch_size) == 1:
            args.batch_size = len(listed)  # '1,2,3,4' makes four songs, one per seed
        batch = int(args.batch_size)
        self.seeds = batch_seeds(listed, batch, "--seed")
        self.retake_seeds = batch_seeds(seed_list(args.retake_seed, "--retake-seed"), batch, "--retake-seed")
        self.paths = output_paths(args.out, batch)


def prepare(args: argparse.Namespace) -> Setup:
    """Apply the app's defaults and fallbacks to parsed ``generate`` arguments (checked before the model loads)."""
    return Setup(args)


def _lora_entry(args: argparse.Namespace) -> tuple[str, float]:
    """(lora_name_or_path, lora_weight) as the parameter file names them (the first --lora; 'none' without)."""
    if not args.lora:
        return "none", 1.0
    spec = args.lora[0]
    path, _, strength = spec.rpartition(":")
    try:
        return path, float(strength)
    except ValueError:
        return spec, 1.0


def write_outputs(args: argparse.Namespace, setup: Setup, request, waveform, sample_rate: int,
                  timecosts: dict) -> list[Path]:
    """Write each item of [B, C, N] audio to its path and, unless --no-params-file, its parameter file."""
    from .audiofile import format_of, write_audio

    written = []
    lora, weight = _lora_entry(args)
    for i, (path, wav) in enumerate(zip(setup.paths, waveform)):
        write_audio(path, wav, sample_rate)
        written.append(path)
        if args.no_params_file:
            continue
        record = app.params_record(
            request, actual_seeds=[setup.seeds[i]], retake_seeds=[setup.retake_seeds[i]], audio_path=str(path),
            audio_format=format_of(path), timecosts=timecosts, lora_name_or_path=lora, lora_weight=weight,
            src_audio_path=args.src_audio, ref_audio_input=args.ref_audio if args.task == "audio2audio" else None,
        )
        record["batch_size"] = 1
        app.write_params(record, app.params_path_for(path))
    return written
