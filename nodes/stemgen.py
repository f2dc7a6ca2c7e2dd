"""StemGen nodes: load a StemGen control file, generate a stem that fits a mix, generate an accompaniment for a
vocal (docs/stemgen.md). The math lives in acestep_core.stemgen; these nodes only wire it.

No pretrained StemGen weights exist yet: the loader lists the files `python -m acestep_core.stemgen.train`
writes (recognised by their `acestep_stemgen` header) in models/loras and models/ace_step.
"""
from __future__ import annotations

import functools
import weakref
from pathlib import Path

import torch

from ..acestep_core import tasks
from ..acestep_core.params import app_default
from ..acestep_core.stemgen.control import StemGenControl
from ..acestep_core.stemgen.generate import generate_accompaniment, generate_stem
from ..acestep_core.stemgen.weights import StemGenWeights, is_stemgen_file, load_stemgen
from . import bridge, files, v15, wire
from .sampling import DEFAULTS, sampler_widgets
from .model import LoraEntry, ModelHandle, model_for, on_device, transformer_for
from .wire import CATEGORY, MODEL, OPTIONS

STEMGEN = "ACESTEP_STEMGEN"
OUTPUT_RATES = ("44100", "48000")
NO_FILE = "(no StemGen file yet: see docs/stemgen.md)"  # the list's only entry until one is trained
NO_WEIGHTS = (
    "No pretrained StemGen weights exist yet: train a file with python -m acestep_core.stemgen.train "
    "(docs/stemgen.md) and put it in models/loras."
)


@functools.lru_cache(maxsize=4096)
def _is_stemgen(path: str, mtime_ns: int, size: int) -> bool:
    return is_stemgen_file(path)


def _stemgen_file(path: Path) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    return path.suffix == bridge.SAFETENSORS and _is_stemgen(str(path), stat.st_mtime_ns, stat.st_size)


def stemgen_files() -> dict[str, Path]:
    """StemGen control files in the `loras` folders, then in the `ace_step` folders."""
    found = files.scan(bridge.model_folders("loras"), _stemgen_file, lambda path: False)
    for name, path in files.scan(bridge.model_folders(bridge.ACE_STEP_CATEGORY), _stemgen_file,
                                 lambda path: False).items():
        found.setdefault(name, path)
    return found


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> StemGenWeights:
    return load_stemgen(path)


_CONTROLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_for(weights: StemGenWeights, transformer: torch.nn.Module) -> StemGenControl:
    """The control branch of `weights` on the transformer's device/dtype (built once per transformer and file)."""
    parameter = next(transformer.parameters())
    key = (weights.fingerprint, parameter.device, parameter.dtype)
    cached = _CONTROLS.get(transformer)
    if cached is not None and cached[0] == key:
        return cached[1]
    control = weights.build_control(transformer)
    _CONTROLS[transformer] = (key, control)
    return control


def _sampling_inputs() -> dict:
    """The sampling widgets shared by both generation nodes (defaults of the ACE-Step Sampler)."""
    return {
        **sampler_widgets(
            seed="Seed of the noise (item i of a batch uses seed + i).",
            scheduler="euler (default), heun or pingpong.",
            cfg_type="Guidance: apg (official default), cfg, or cfg_star.",
            guidance_scale="Guidance towards the tags (official 15; 0 or 1 = off). The reference steers every branch.",
            omega_scale="Granularity scale of the Euler/Heun step (official 10).",
        ),
        "control_scale": ("FLOAT", {
            "default": 1.0, "min": 0.0, "max": 3.0, "step": 0.01,
            "tooltip": "Strength of the control branch (1 = as trained; 0 = the base model ignores the reference).",
        }),
        "lora_strength": ("FLOAT", {
            "default": 1.0, "min": -3.0, "max": 3.0, "step": 0.01,
            "tooltip": "Strength of the LoRA stored in the StemGen file (1 = as trained; 0 = off).",
        }),
        "sample_rate": (list(OUTPUT_RATES), {"default": str(app_default("sample_rate")),
                                             "tooltip": "Output rate: 44100 (the vocoder's) or 48000 (official app)."}),
    }


def _inputs(task: str, model: ModelHandle, stemgen: StemGenWeights, reference: dict, steps: int, scheduler: str,
            cfg_type: str, guidance_scale: float, omega_scale: float, lora_strength: float, sample_rate: str,
            options) -> tuple[tuple, dict]:
    """The checked inputs both nodes share: (model, transformer, control, waveform, rate) and the core settings."""
    if stemgen is None:
        raise ValueError("stemgen is required for an ACE-Step v1 model: connect an ACE-Step StemGen Loader")
    if not isinstance(stemgen, StemGenWeights):
        raise ValueError(f"stemgen must come from the ACE-Step StemGen Loader node, got {type(stemgen).__name__}")
    if stemgen.task != task:
        other = "ACE-Step StemGen" if stemgen.task == "stemgen" else "ACE-Step Singing2Accompaniment"
        raise ValueError(f"{Path(stemgen.source).name} was trained for {stemgen.task}, not {task}; use it with the "
                         f"{other} node or load a {task} file")
    if not isinstance(model, ModelHandle):
        raise ValueError(f"model must come from the ACE-Step Loader node, got {type(model).__name__}")
    if str(sample_rate) not in OUTPUT_RATES:
        raise ValueError(f"sample_rate must be one of {OUTPUT_RATES}, got {sample_rate!r:.200}")
    if options is not None and not isinstance(options, tasks.SamplerOptions):
        raise ValueError("options must come from the ACE-Step Sampler Options node")
    waveform, rate = wire.check_audio(reference, "reference")
    settings = tasks.with_options(options or DEFAULTS, steps=steps, scheduler=scheduler, cfg_type=cfg_type,
                                  guidance_scale=guidance_scale, omega_scale=omega_scale)
    handle = model
    if stemgen.lora is not None and lora_strength != 0:
        honour = model.loras[-1].honour_alpha if model.loras else False
        handle = model.with_lora(LoraEntry(stemgen.lora, float(lora_strength), honour))
    transformer = transformer_for(handle)
    control = control_for(stemgen, transformer)
    loaded = model_for(handle, extra={"stemgen": control})  # everything this node runs, in one call
    parts = (loaded, transformer, control, waveform, rate)
    # each phase (text, audio codec, transformer + control, decode) through on_device: in low-VRAM mode (the
    # loader's low_vram) only that phase's parts are on the device
    return parts, {"options": settings, "sample_rate": int(sample_rate),
                   "callback": bridge.Progress(steps).step_callback(),
                   "phase": lambda *modules: on_device(handle, *modules)}


def _audio_pair(part: torch.Tensor, mix: torch.Tensor, sample_rate: int) -> tuple[dict, dict]:
    """(generated part, reference + part) as AUDIO."""
    return ({"waveform": part.cpu(), "sample_rate": sample_rate}, {"waveform": mix.cpu(), "sample_rate": sample_rate})


class AceStepStemGenLoader:
    DESCRIPTION = (
        "Loads a StemGen or singing-to-accompaniment control file (control branch + LoRA) from models/loras or "
        "models/ace_step. " + NO_WEIGHTS
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (STEMGEN,)
    RETURN_NAMES = ("stemgen",)
    OUTPUT_TOOLTIPS = ("The control branch and its LoRA, for ACE-Step StemGen / Singing2Accompaniment.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_name": (sorted(stemgen_files()) or [NO_FILE], {
                    "tooltip": "A .safetensors file written by python -m acestep_core.stemgen.train (it carries an "
                               "acestep_stemgen header). " + NO_WEIGHTS,
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, control_name):
        listing = stemgen_files()
        if control_name in listing:
            return True
        if not listing:
            return f"no StemGen file in models/loras or models/ace_step. {NO_WEIGHTS}"
        return (f"control_name {control_name!r} is not in models/loras or models/ace_step (found: "
                f"{', '.join(sorted(listing))}); pick one, or train it: {NO_WEIGHTS}")

    def load(self, control_name: str):
        path = files.resolve("control_name", control_name, stemgen_files())
        stat = path.stat()
        return (_read(str(path), stat.st_mtime_ns, stat.st_size),)


class AceStepStemGen:
    DESCRIPTION = (
        "StemGen: generates one instrument's stem that fits a reference track (e.g. a bass line for a mix without "
        "bass), named by text and optionally by an instrument sample. Returns the stem and the mix of reference + "
        "stem. With an ACE-Step 1.5 model it runs the 1.5 lego task instead (no file needed; instrument is a 1.5 "
        "track name). " + NO_WEIGHTS
    )
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("AUDIO", "AUDIO")
    RETURN_NAMES = ("stem", "mix")
    OUTPUT_TOOLTIPS = ("The generated stem (stereo).", "The reference with the generated stem added.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model the StemGen file was trained on (with its LoRAs), "
                                             "or an ACE-Step 1.5 base model (runs the 1.5 lego task)."}),
                "reference": ("AUDIO", {"tooltip": "The track the stem must fit (the mix without that instrument)."}),
                "instrument": ("STRING", {
                    "multiline": False, "default": "bass",
                    "tooltip": "The instrument to generate, as labelled in the training data (e.g. bass, drums).",
                }),
                **_sampling_inputs(),
            },
            "optional": {
                "stemgen": (STEMGEN, {"tooltip": "A stemgen file from the ACE-Step StemGen Loader (v1 models; "
                                                 "needed there). Leave it empty for a 1.5 model."}),
                "instrument_audio": ("AUDIO", {
                    "tooltip": "Optional sample of the wanted instrument's sound (its average DCAE latent steers "
                               "the timbre).",
                }),
                "options": (OPTIONS, {"tooltip": "Advanced settings from ACE-Step Sampler Options (else defaults)."}),
            },
        }

    def generate(self, model, reference, instrument: str, seed: int, steps: int, scheduler: str,
                 cfg_type: str, guidance_scale: float, omega_scale: float, control_scale: float,
                 lora_strength: float, sample_rate: str, stemgen=None, instrument_audio=None, options=None):
        if v15.is_handle(model):  # ACE-Step 1.5: the lego task (nodes/v15.py)
            return v15.stemgen(model, reference, instrument, seed, steps, guidance_scale, sample_rate,
                               stemgen=stemgen, options=options, instrument_audio=instrument_audio)
        (loaded, transformer, control, waveform, rate), settings = _inputs(
            "stemgen", model, stemgen, reference, steps, scheduler, cfg_type, guidance_scale, omega_scale,
            lora_strength, sample_rate, options)
        timbre_audio = None if instrument_audio is None else wire.check_audio(instrument_audio, "instrument_audio")
        with torch.no_grad():
            stem, mix = generate_stem(loaded, transformer, control, instrument, waveform, rate, seed=int(seed),
                                      instrument_audio=timbre_audio, control_scale=float(control_scale), **settings)
        return _audio_pair(stem, mix, settings["sample_rate"])


class AceStepSinging2Accompaniment:
    DESCRIPTION = (
        "Singing to accompaniment: generates the backing track for a vocal recording in the style of the tags. "
        "Returns the accompaniment and the full mix (vocal + accompaniment). With an ACE-Step 1.5 model it runs the "
        "1.5 complete task instead (no file needed) and both outputs are the completed song. " + NO_WEIGHTS
    )
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("AUDIO", "AUDIO")
    RETURN_NAMES = ("accompaniment", "mix")
    OUTPUT_TOOLTIPS = ("The generated accompaniment (stereo).", "The vocal with the accompaniment added.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model the file was trained on (with its LoRAs), or an "
                                             "ACE-Step 1.5 base model (runs the 1.5 complete task)."}),
                "vocal": ("AUDIO", {"tooltip": "The vocal recording to accompany."}),
                "tags": ("STRING", {
                    "multiline": True, "default": "pop, piano, drums, bass, 120 bpm",
                    "tooltip": "Style of the accompaniment: genre, instruments, mood, tempo.",
                }),
                **_sampling_inputs(),
            },
            "optional": {
                "stemgen": (STEMGEN, {"tooltip": "A singing2accompaniment file from the ACE-Step StemGen Loader "
                                                 "(v1 models; needed there). Leave it empty for a 1.5 model."}),
                "options": (OPTIONS, {"tooltip": "Advanced settings from ACE-Step Sampler Options (else defaults)."}),
            },
        }

    def generate(self, model, vocal, tags: str, seed: int, steps: int, scheduler: str, cfg_type: str,
                 guidance_scale: float, omega_scale: float, control_scale: float, lora_strength: float,
                 sample_rate: str, stemgen=None, options=None):
        if v15.is_handle(model):  # ACE-Step 1.5: the complete task (nodes/v15.py)
            return v15.singing2accompaniment(model, vocal, tags, seed, steps, guidance_scale, sample_rate,
                                             stemgen=stemgen, options=options)
        (loaded, transformer, control, waveform, rate), settings = _inputs(
            "singing2accompaniment", model, stemgen, vocal, steps, scheduler, cfg_type, guidance_scale, omega_scale,
            lora_strength, sample_rate, options)
        with torch.no_grad():
            accompaniment, mix = generate_accompaniment(loaded, transformer, control, tags, waveform, rate,
                                                        seed=int(seed), control_scale=float(control_scale), **settings)
        return _audio_pair(accompaniment, mix, settings["sample_rate"])
