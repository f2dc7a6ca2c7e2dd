"""The official app's side of ACE-Step: its UI defaults, seed lists, random duration and parameter files.

The official Gradio app (acestep/ui/components.py) sets several values differently from the defaults of
``ACEStepPipeline.__call__``; what its users heard came from the UI, so the nodes and the command line start
from :data:`APP_DEFAULTS`. The parity tests keep the pipeline's arguments (``pipeline.request_from_official_args``).

Beside every song the official pipeline writes ``<name>_input_params.json`` (its ``__call__``, end): the keys of
:data:`OFFICIAL_KEYS`. :func:`read_params` reads such a file (also the older, shorter ones of the app's examples),
:func:`official_args` turns it into ``__call__`` arguments and :func:`params_record` writes one back.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .noise import MAX_SEED

PARAMS_SUFFIX = "_input_params.json"
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")  # the app's Format dropdown (components.py)
RANDOM_DURATION = (30.0, 240.0)  # __call__: audio_duration <= 0 -> random.uniform(30.0, 240.0)


@dataclass(frozen=True)
class AppDefault:
    """One value the official app's UI sets differently from the pipeline's ``__call__`` default."""

    app: Any
    pipeline: Any
    source: str  # the official line it follows


APP_DEFAULTS: dict[str, AppDefault] = {
    "use_erg_lyric": AppDefault(
        False, True, 'acestep/ui/components.py: use_erg_lyric = gr.Checkbox(label="use ERG for lyric", value=False)'),
    "audio_duration": AppDefault(
        -1.0, 60.0, "acestep/ui/components.py: audio_duration = gr.Slider(-1, 240.0, value=-1) "
                    '("-1 means random duration (30 ~ 240)")'),
    "sample_rate": AppDefault(
        48000, 44100, "acestep/pipeline_ace_step.py: latents2audio(sample_rate=48000), the rate the app saves "
                      "(the vocoder's own rate is 44100)"),
    "retake_variance": AppDefault(
        0.2, 0.5, 'acestep/ui/components.py, retake tab: gr.Slider(..., value=0.2, label="variance")'),
    "repaint_variance": AppDefault(
        0.2, 0.5, 'acestep/ui/components.py, repainting tab: gr.Slider(..., value=0.2, label="variance")'),
    "extend_variance": AppDefault(
        1.0, 0.5, "acestep/ui/components.py, extend_process_func: retake_variance=1.0"),
    "edit_n_min": AppDefault(
        0.6, 0.0, 'acestep/ui/components.py, edit tab: edit_n_min = gr.Slider(..., value=0.6) ("only_lyrics")'),
}


def app_default(name: str) -> Any:
    """The app's value of a setting listed in :data:`APP_DEFAULTS`."""
    return APP_DEFAULTS[name].app


def variance_for(task: str) -> float:
    """The variance the app uses for a task (retake / repaint 0.2, extend 1.0; 0 for the others)."""
    return {"retake": app_default("retake_variance"), "repaint": app_default("repaint_variance"),
            "extend": app_default("extend_variance")}.get(task, 0.0)


# edit tab: edit_type_change_func -> (edit_n_min, edit_n_max)
EDIT_TYPES: dict[str, tuple[float, float]] = {"only_lyrics": (0.6, 1.0), "remix": (0.2, 0.4)}


def edit_range(edit_type: str, n_min: float, n_max: float) -> tuple[float, float]:
    """(n_min, n_max) of an edit type as the app sets them; ``custom`` keeps the given values."""
    if edit_type == "custom":
        return float(n_min), float(n_max)
    if edit_type not in EDIT_TYPES:
        raise ValueError(f"edit_type must be one of {(*EDIT_TYPES, 'custom')}, got {edit_type!r:.200}")
    return EDIT_TYPES[edit_type]


def edit_texts(source_tags: str, source_lyrics: str, target_tags: str, target_lyrics: str) -> tuple[str, str]:
    """Target tags and lyrics of an edit: an empty one falls back to the source's, as the app's edit tab."""
    return (target_tags if target_tags and target_tags.strip() else source_tags,
            target_lyrics if target_lyrics and target_lyrics.strip() else source_lyrics)


# --------------------------------------------------------------------------------------------------
# seeds and duration


def parse_seed_list(text: Any, name: str = "seeds") -> list[int] | None:
    """Seeds written as the app's manual seeds ('1,2,3,4' or '1 2 3'); empty = None (use the seed widget)."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise ValueError(f"{name} must be whole numbers separated by commas, e.g. '1,2,3,4'")
    if isinstance(text, int):
        values = [text]
    elif isinstance(text, (list, tuple)):
        values = list(text)
    else:
        parts = [p for p in str(text).replace(",", " ").split() if p]
        if not parts:
            return None
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name} must be whole numbers separated by commas, e.g. '1,2,3,4'; "
                             f"got {text!r:.200}") from None
    if not values:
        return None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED:
            raise ValueError(f"{name}: {v!r:.200} is not a seed in [0, {MAX_SEED}]")
    return values


def seeds_for_batch(seeds: list[int], batch: int, name: str = "seeds") -> list[int]:
    """One seed per batch item; a shorter list repeats its last seed (official ``set_seeds``)."""
    if len(seeds) > batch:
        raise ValueError(f"{name} lists {len(seeds)} seeds for a batch of {batch}; give at most one per item")
    return [seeds[min(i, len(seeds) - 1)] for i in range(batch)]


def resolve_duration(seconds: float, rng: random.Random | None = None, *, maximum: float = 240.0) -> float:
    """Seconds of a new song; -1 draws a random length in 30-240 s as the app (its ``__call__``)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ValueError(f"duration must be a number of seconds (or -1 for random), got {seconds!r:.200}")
    if seconds == -1:
        return (rng or random).uniform(*RANDOM_DURATION)
    if seconds <= 0:
        raise ValueError(f"duration must be > 0 seconds, or -1 for a random 30-240 s, got {seconds}")
    if seconds > maximum:
        raise ValueError(f"duration {seconds} s is past {maximum:g} s; use long-form generation for longer songs")
    return float(seconds)


# --------------------------------------------------------------------------------------------------
# parameter files

# the keys the official ``__call__`` writes, in its order (audio_path is added per file)
OFFICIAL_KEYS = (
    "format", "lora_name_or_path", "lora_weight", "task", "prompt", "lyrics", "audio_duration", "infer_step",
    "guidance_scale", "scheduler_type", "cfg_type", "omega_scale", "guidance_interval", "guidance_interval_decay",
    "min_guidance_scale", "use_erg_tag", "use_erg_lyric", "use_erg_diffusion", "oss_steps", "timecosts",
    "actual_seeds", "retake_seeds", "retake_variance", "guidance_scale_text", "guidance_scale_lyric",
    "repaint_start", "repaint_end", "edit_n_min", "edit_n_max", "edit_n_avg", "src_audio_path",
    "edit_target_prompt", "edit_target_lyrics", "audio2audio_enable", "ref_audio_strength", "ref_audio_input",
    "audio_path",
)
# keys we add (the app ignores unknown keys): the edit source's texts, which the official file overwrites
# with the target's in "prompt"/"lyrics", and the rate the file was written at
EXTRA_KEYS = ("source_prompt", "source_lyrics", "sample_rate", "batch_size")

_NUMBERS = ("audio_duration", "guidance_scale", "omega_scale", "guidance_interval", "guidance_interval_decay",
            "min_guidance_scale", "retake_variance", "guidance_scale_text", "guidance_scale_lyric", "repaint_start",
            "repaint_end", "edit_n_min", "edit_n_max", "ref_audio_strength", "lora_weight")
_INTS = ("infer_step", "edit_n_avg")
_BOOLS = ("use_erg_tag", "use_erg_lyric", "use_erg_diffusion", "audio2audio_enable")
_STRINGS = ("prompt", "lyrics", "scheduler_type", "cfg_type", "task", "format", "lora_name_or_path",
            "edit_target_prompt", "edit_target_lyrics", "src_audio_path", "ref_audio_input", "source_prompt",
            "source_lyrics", "audio_path")
TASKS = ("text2music", "retake", "repaint", "extend", "edit", "audio2audio", "stemgen", "singing2accompaniment")


def params_path_for(audio_path: str | Path) -> Path:
    """``song.wav`` -> ``song_input_params.json`` (the official name beside the audio)."""
    p = Path(audio_path)
    return p.with_name(p.stem + PARAMS_SUFFIX)


def check_params(data: Any, where: str = "parameter file") -> dict:
    """A parameter file's dict with each known key of the right type; a clear error naming the key otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object (the app's *_input_params.json), got {type(data).__name__}")
    if not isinstance(data.get("prompt"), str):
        raise ValueError(f"{where} has no 'prompt' text; is it an ACE-Step *_input_params.json?")
    out = dict(data)
    for key in _NUMBERS:
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{where}: '{key}' must be a number, got {v!r:.200}")
    for key in _INTS:
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1):
            raise ValueError(f"{where}: '{key}' must be a whole number >= 1, got {v!r:.200}")
    for key in _BOOLS:
        v = out.get(key)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{where}: '{key}' must be true or false, got {v!r:.200}")
    for key in _STRINGS:
        v = out.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}: '{key}' must be text or null, got {v!r:.200}")
    for key in ("actual_seeds", "retake_seeds"):
        if out.get(key) is not None:
            out[key] = parse_seed_list(out[key], f"{where}: '{key}'")
    oss = out.get("oss_steps")
    if oss is not None:
        if isinstance(oss, str):
            oss = [p for p in oss.replace(",", " ").split()]
        if not isinstance(oss, list) or not all(isinstance(s, (int, str)) and str(s).strip().isdigit() for s in oss):
            raise ValueError(f"{where}: 'oss_steps' must be a list of whole numbers, got {out['oss_steps']!r:.200}")
        out["oss_steps"] = [int(s) for s in oss]
    task = out.get("task", "text2music")
    if task not in TASKS:
        raise ValueError(f"{where}: 'task' must be one of {TASKS}, got {task!r:.200}")
    if out.get("format") is not None and out["format"] not in AUDIO_FORMATS:
        raise ValueError(f"{where}: 'format' must be one of {AUDIO_FORMATS}, got {out['format']!r:.200}")
    return out


def read_params(path: str | Path) -> dict:
    """Read and check an official (or our) ``*_input_params.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"parameter file {path} is not valid JSON: {error}") from None
    return check_params(data, f"parameter file {path.name}")


def find_audio(value: str | None, params_file: str | Path | None) -> str | None:
    """A path named in a parameter file: as written, else beside the parameter file (same name)."""
    if not value:
        return None
    p = Path(value)
    if p.is_file():
        return str(p)
    if params_file is not None:
        near = Path(params_file).parent / p.name
        if near.is_file():
            return str(near)
    raise FileNotFoundError(f"the parameter file names {value}, which is neither there nor beside the file")


def official_args(data: dict) -> dict:
    """``__call__`` arguments (as ``pipeline.request_from_official_args`` takes them) of a checked parameter file.

    The file's ``actual_seeds`` become ``manual_seeds`` (reproducing the song); for an edit, the official file
    keeps the target's texts in ``prompt``/``lyrics``, so the source texts are ``source_prompt``/``source_lyrics``
    when we wrote the file, else the target's (the only ones the app kept).
    """
    args = {k: v for k, v in data.items() if k in OFFICIAL_KEYS and v is not None}
    task = data.get("task", "text2music")
    if data.get("audio2audio_enable") and data.get("ref_audio_input"):
        task = "audio2audio"
    args["task"] = task
    args.pop("timecosts", None)
    if data.get("actual_seeds"):
        args["manual_seeds"] = list(data["actual_seeds"])
    args.pop("actual_seeds", None)
    if data.get("retake_seeds"):
        args["retake_seeds"] = list(data["retake_seeds"])
    args["oss_steps"] = ",".join(str(s) for s in data.get("oss_steps") or [])
    if task == "edit":
        args["edit_target_prompt"] = data.get("edit_target_prompt") or data.get("prompt", "")
        args["edit_target_lyrics"] = data.get("edit_target_lyrics") or data.get("lyrics", "")
        args["prompt"] = data.get("source_prompt") or data.get("prompt", "")
        args["lyrics"] = data.get("source_lyrics") if data.get("source_lyrics") is not None else data.get("lyrics", "")
    seeds = args.get("manual_seeds") or []
    args["batch_size"] = int(data.get("batch_size") or max(1, len(seeds)))
    for key in ("infer_step", "edit_n_avg"):
        if key in args:
            args[key] = int(args[key])
    return args


def params_record(
    request, *, actual_seeds: list[int], retake_seeds: list[int], audio_path: str, audio_format: str = "wav",
    timecosts: dict | None = None, lora_name_or_path: str = "none", lora_weight: float = 1.0,
    src_audio_path: str | None = None, ref_audio_input: str | None = None,
) -> dict:
    """The parameter file of one output, with the official keys and values as the official ``__call__`` writes."""
    r = request
    g = r.guidance
    edit = r.task == "edit"
    a2a = r.task == "audio2audio"
    record = {
        "format": audio_format,
        "lora_name_or_path": lora_name_or_path,
        "lora_weight": lora_weight,
        "task": "text2music" if a2a else r.task,
        "prompt": r.edit_target_prompt if edit else r.prompt,
        "lyrics": r.edit_target_lyrics if edit else r.lyrics,
        "audio_duration": r.audio_duration,
        "infer_step": r.infer_step,
        "guidance_scale": g.guidance_scale,
        "scheduler_type": r.scheduler_type,
        "cfg_type": g.cfg_type,
        "omega_scale": g.omega_scale,
        "guidance_interval": g.guidance_interval,
        "guidance_interval_decay": g.guidance_interval_decay,
        "min_guidance_scale": g.min_guidance_scale,
        "use_erg_tag": g.use_erg_tag,
        "use_erg_lyric": g.use_erg_lyric,
        "use_erg_diffusion": g.use_erg_diffusion,
        "oss_steps": [int(s) for s in r.oss_steps],
        "timecosts": dict(timecosts or {}),
        "actual_seeds": list(actual_seeds),
        "retake_seeds": list(retake_seeds),
        "retake_variance": r.retake_variance,
        "guidance_scale_text": g.guidance_scale_text,
        "guidance_scale_lyric": g.guidance_scale_lyric,
        "repaint_start": r.repaint_start,
        "repaint_end": r.repaint_end,
        "edit_n_min": r.edit_n_min,
        "edit_n_max": r.edit_n_max,
        "edit_n_avg": r.edit_n_avg,
        "src_audio_path": src_audio_path,
        "edit_target_prompt": r.edit_target_prompt if edit else None,
        "edit_target_lyrics": r.edit_target_lyrics if edit else None,
        "audio2audio_enable": a2a,
        "ref_audio_strength": r.ref_audio_strength,
        "ref_audio_input": ref_audio_input,
        "audio_path": audio_path,
        "sample_rate": r.sample_rate,
        "batch_size": r.batch_size,
    }
    if edit:
        record["source_prompt"] = r.prompt
        record["source_lyrics"] = r.lyrics
    return record


def write_params(record: dict, path: str | Path) -> Path:
    """Write a parameter file as the app does (UTF-8, indent 4, non-ASCII kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=4, ensure_ascii=False), encoding="utf-8")
    return path
