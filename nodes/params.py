"""The official app's files in ComfyUI: load a ``*_input_params.json`` into the graph, save audio (wav, flac, mp3,
ogg) with its parameter file beside it, and the app's genre presets (acestep_core.params, acestep_core.presets).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from ..acestep_core import params as app
from ..acestep_core import tasks
from ..acestep_core.audiofile import write_audio
from ..acestep_core.presets import PRESET_NAMES, preset_tags
from ..acestep_core.sampling.denoiser import CFG_TYPES, GuidanceConfig
from . import bridge, wire
from .wire import CATEGORY, OPTIONS

PARAMS_KEY = "acestep_params"  # the settings record a sampler puts on its latent and Decode carries to AUDIO
SCHEDULERS = list(tasks.SCHEDULERS)
CFGS = list(CFG_TYPES)


def input_folder() -> Path:
    """ComfyUI's input directory, else ./input."""
    folder_paths = bridge.comfy_module("folder_paths")
    return Path(folder_paths.get_input_directory()) if folder_paths is not None else Path.cwd() / "input"


def output_folder() -> Path:
    """ComfyUI's output directory, else ./output."""
    folder_paths = bridge.comfy_module("folder_paths")
    return Path(folder_paths.get_output_directory()) if folder_paths is not None else Path.cwd() / "output"


def params_files() -> list[str]:
    """The .json files in the input folder and its sub-folders (relative names, '/'-separated)."""
    root = input_folder()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json") if p.is_file())


def _params_path(name: str) -> Path:
    if not isinstance(name, str) or "\x00" in name or len(name) > 1024:
        raise ValueError(f"params_file must be a file name from the list (at most 1024 characters), got {name!r:.80}")
    root = input_folder().resolve()
    try:
        path = (root / name).resolve()
    except OSError as err:
        raise ValueError(f"params_file {name!r:.80} is not a usable file name ({err.strerror})") from None
    if root not in path.parents:
        raise ValueError(f"params_file {name!r:.200} points outside the input folder; pick a file from the list")
    if not path.is_file():
        raise ValueError(f"params_file {name!r:.200} is not in {root}; upload the *_input_params.json (the upload button)")
    return path


class AceStepLoadParams:
    DESCRIPTION = (
        "Reads a parameter file the official ACE-Step app writes beside every song (<name>_input_params.json) and "
        "outputs its settings, so a song made in the app can be remade or edited here. Put the file in "
        "ComfyUI/input or use the upload button."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("STRING", "STRING", "FLOAT", "INT", "STRING", "INT", SCHEDULERS, CFGS, "FLOAT", "FLOAT", OPTIONS,
                    "FLOAT", "INT", "STRING", "STRING", "STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("tags", "lyrics", "seconds", "seed", "seeds", "steps", "scheduler", "cfg_type", "guidance_scale",
                    "omega_scale", "options", "variance", "retake_seed", "task", "edit_tags", "edit_lyrics",
                    "n_min", "n_max", "repaint_start", "repaint_end")
    OUTPUT_TOOLTIPS = (
        "Tags (prompt); for an edit file, the source tags when the file has them, else the target's.",
        "Lyrics (for an edit file, as tags).",
        "Song length in seconds (audio_duration) for ACE-Step Empty Latent.",
        "First seed (actual_seeds) for the sampler's seed.",
        "All seeds, '1,2,3,4', for the sampler's seeds input (one per batch item).",
        "Sampling steps (infer_step).",
        "Scheduler (scheduler_type).",
        "Guidance type (cfg_type).",
        "Guidance scale.",
        "Granularity scale (omega_scale).",
        "The advanced settings (guidance interval, decay, ERG, double guidance, OSS steps) for the sampler's options.",
        "retake_variance (retake / repaint / extend).",
        "First retake seed (also the edit seed).",
        "The file's task: text2music, retake, repaint, extend, edit or audio2audio.",
        "Edit target tags (edit_target_prompt; empty for other tasks).",
        "Edit target lyrics (edit_target_lyrics).",
        "Edit n_min.",
        "Edit n_max.",
        "Repaint start (seconds; negative = extend to the left).",
        "Repaint end (seconds; past the song = extend to the right).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "params_file": (params_files() or [""], {
                    "acestep_params_upload": True,
                    "tooltip": "A *_input_params.json from the official app (or from ACE-Step Save Audio) in "
                               "ComfyUI/input.",
                }),
            },
        }

    @classmethod
    def IS_CHANGED(cls, params_file: str):
        try:
            return hashlib.sha256(_params_path(params_file).read_bytes()).hexdigest()
        except ValueError:
            return params_file

    @classmethod
    def VALIDATE_INPUTS(cls, params_file: str):
        try:
            _params_path(params_file)
        except ValueError as error:
            return str(error)
        return True

    def load(self, params_file: str):
        data = app.read_params(_params_path(params_file))
        args = app.official_args(data)
        guidance = GuidanceConfig(
            guidance_scale=float(args.get("guidance_scale", 15.0)), cfg_type=args.get("cfg_type", "apg"),
            guidance_interval=float(args.get("guidance_interval", 0.5)),
            guidance_interval_decay=float(args.get("guidance_interval_decay", 0.0)),
            min_guidance_scale=float(args.get("min_guidance_scale", 3.0)),
            guidance_scale_text=float(args.get("guidance_scale_text", 0.0)),
            guidance_scale_lyric=float(args.get("guidance_scale_lyric", 0.0)),
            use_erg_tag=bool(args.get("use_erg_tag", True)), use_erg_lyric=bool(args.get("use_erg_lyric", True)),
            use_erg_diffusion=bool(args.get("use_erg_diffusion", True)),
            omega_scale=float(args.get("omega_scale", 10.0)),
        )
        options = tasks.SamplerOptions(steps=int(args.get("infer_step", 60)),
                                       scheduler=args.get("scheduler_type", "euler"), guidance=guidance,
                                       oss_steps=args.get("oss_steps") or ())
        seeds = args.get("manual_seeds") or [0]
        retake = args.get("retake_seeds") or [0]
        return (
            args.get("prompt", ""), args.get("lyrics", ""), float(args.get("audio_duration", 60.0)), int(seeds[0]),
            ",".join(str(s) for s in seeds), int(args.get("infer_step", 60)), args.get("scheduler_type", "euler"),
            args.get("cfg_type", "apg"), guidance.guidance_scale, guidance.omega_scale, options,
            float(args.get("retake_variance", 0.5)), int(retake[0]), args["task"],
            args.get("edit_target_prompt", "") or "", args.get("edit_target_lyrics", "") or "",
            float(args.get("edit_n_min", 0.0)), float(args.get("edit_n_max", 1.0)),
            float(args.get("repaint_start", 0.0)), float(args.get("repaint_end", 0.0)),
        )


def _next_path(prefix: str, suffix: str) -> Path:
    """<output>/<prefix>_NNNNN<suffix> with the next free number; the prefix may hold folders."""
    root = output_folder().resolve()
    target = (root / prefix).resolve()
    if root not in target.parents:
        raise ValueError(f"filename_prefix {prefix!r:.200} points outside the output folder; use a relative name")
    target.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(target.name) + r"_(\d{5})_(?:.*)")
    taken = [int(m.group(1)) for p in target.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return target.parent / f"{target.name}_{max(taken, default=0) + 1:05d}_{suffix}"


class AceStepSaveAudio:
    DESCRIPTION = (
        "Saves audio in the official app's formats (WAV 32-bit float by default, for DAWs; FLAC, MP3, OGG) and, "
        "beside each file, <name>_input_params.json with the official keys when the audio comes from ACE-Step "
        "Decode of a sampler's latent (the official app can load it, and so can ACE-Step Load Params)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("paths",)
    OUTPUT_TOOLTIPS = ("The saved audio files, one per line.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": ("AUDIO", {"tooltip": "Audio to save, e.g. from ACE-Step Decode."}),
                "filename_prefix": ("STRING", {
                    "default": "acestep/song",
                    "tooltip": "Name in the output folder (+ _00001_1.wav, ...); may hold sub-folders.",
                }),
                "format": (list(app.AUDIO_FORMATS), {
                    "default": "wav",
                    "tooltip": "wav (32-bit float, the app's default), flac, mp3 or ogg.",
                }),
            },
            "optional": {
                "write_params": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Write <name>_input_params.json beside each file (when the audio carries settings).",
                }),
            },
        }

    def save(self, audio: dict, filename_prefix: str, format: str, write_params: bool = True):
        waveform, rate = wire.check_audio(audio, "audio")
        if format not in app.AUDIO_FORMATS:
            raise ValueError(f"format must be one of {app.AUDIO_FORMATS}, got {format!r:.200}")
        prefix = wire.check_filename_prefix(filename_prefix).strip() or "acestep/song"
        records = audio.get(PARAMS_KEY) if isinstance(audio.get(PARAMS_KEY), list) else None
        first = _next_path(prefix, f"1.{format}")
        stem = first.name[: -len(f"1.{format}")]
        ui = []
        root = output_folder().resolve()
        for i in range(waveform.shape[0]):
            path = first.parent / f"{stem}{i + 1}.{format}"
            write_audio(path, waveform[i], rate, format)
            if write_params and records is not None and i < len(records):
                record = dict(records[i])
                record.update(format=format, audio_path=str(path), sample_rate=rate)
                app.write_params(record, app.params_path_for(path))
            sub = path.parent.relative_to(root).as_posix()
            ui.append({"filename": path.name, "subfolder": "" if sub == "." else sub, "type": "output"})
        paths = "\n".join(str(first.parent / entry["filename"]) for entry in ui)
        return {"ui": {"audio": ui}, "result": (paths,)}


def sampler_record(cond, latent: torch.Tensor, options: tasks.SamplerOptions, seeds: list[int],
                   retake_seeds: list[int], mark: dict, variance: float) -> list[dict]:
    """The parameter-file record of each item a sampler made (the official keys; audio_path set when saved)."""
    from ..acestep_core.pipeline import Request

    task = mark.get("task", "text2music")
    if task == "text2music" and variance:
        task = "retake"
    seconds = round(wire.frames_to_seconds(latent.shape[-1]), 6)
    start = -wire.frames_to_seconds(mark.get("left_frames", 0)) if task == "extend" else \
        wire.frames_to_seconds(mark.get("start_frame", 0))
    end = wire.frames_to_seconds(mark.get("end_frame", 0)) if task == "repaint" else \
        seconds + wire.frames_to_seconds(mark.get("right_frames", 0)) if task == "extend" else \
        (seconds if task == "retake" else 0.0)
    request = Request(
        task=task, prompt=cond.tags, lyrics=cond.lyrics, audio_duration=seconds, infer_step=options.steps,
        scheduler_type=options.scheduler, guidance=options.guidance, oss_steps=options.oss_steps,
        retake_variance=float(mark.get("variance", variance)), repaint_start=round(start, 6), repaint_end=round(end, 6),
        ref_audio_strength=float(mark.get("ref_strength", 0.5)),
    )
    return [app.params_record(request, actual_seeds=[s], retake_seeds=[r], audio_path="")
            for s, r in zip(seeds, retake_seeds)]


def edit_record(source_cond, target_cond, latent: torch.Tensor, options: tasks.SamplerOptions, seeds: list[int],
                edit: tasks.EditOptions) -> list[dict]:
    """The parameter-file record of each item a flow edit made (the app's edit uses the retake seeds)."""
    from ..acestep_core.pipeline import Request

    request = Request(
        task="edit", prompt=source_cond.tags, lyrics=source_cond.lyrics,
        audio_duration=round(wire.frames_to_seconds(latent.shape[-1]), 6), infer_step=options.steps,
        scheduler_type=options.scheduler, guidance=options.guidance, edit_target_prompt=target_cond.tags,
        edit_target_lyrics=target_cond.lyrics, edit_n_min=edit.n_min, edit_n_max=edit.n_max, edit_n_avg=edit.n_avg,
    )
    return [app.params_record(request, actual_seeds=[s], retake_seeds=[s], audio_path="") for s in seeds]


def listed_seeds(text: str, batch: int) -> list[int] | None:
    """Per-item seeds of a sampler's `seeds` list (one per item, as the app's manual seeds), or None when empty;
    the seed rule (docs/seeds.md) then gives item i seed + i."""
    listed = app.parse_seed_list(text, "seeds")
    return None if listed is None else app.seeds_for_batch(listed, batch, "seeds")


class AceStepGenrePreset:
    DESCRIPTION = "The official app's genre presets: picks a preset's tags (Custom passes your own tags through)."
    CATEGORY = CATEGORY
    FUNCTION = "pick"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("tags",)
    OUTPUT_TOOLTIPS = ("The tags, for ACE-Step Text Encode's tags input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "preset": (list(PRESET_NAMES), {"default": "Custom", "tooltip": "A genre preset of the official app."}),
                "tags": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "Your own tags, used when the preset is Custom."}),
            },
        }

    def pick(self, preset: str, tags: str):
        return (preset_tags(preset, tags),)
