"""ACE-Step 1.5 in the node pack: the model handle, the 1.5 branches of the shared nodes, and the 1.5 task nodes.

The shared nodes (Loader, Text Encode, Sampler, Repaint Region, Encode, Decode, Download, StemGen,
Singing2Accompaniment) call into this module when they are given a 1.5 model, conditioning or latent; the nodes
Cover, Lego, Extract and Complete exist for 1.5 only. Every function here reads its inputs, calls one function of
`acestep_core.v15.pipeline` and wraps the result (docs/acestep-15.md, "The pipeline").

On the wire (the same as ComfyUI's own ACE-Step 1.5 nodes, EmptyAceStep1.5LatentAudio):

- LATENT: ``{"samples": [B, 64, T] float32 CPU at 25 frames per second, "type": "audio"}``; Repaint Region adds
  ``{"acestep15": {"task": "repaint", "start_frame": s, "end_frame": e}}`` and ``noise_mask`` [B, 1, T].
- ACESTEP_MODEL: a `Model15Handle` (cache key); the bundle lives in the pack's one model cache (nodes/cache.py)
  under the same kind of key as a v1 model, and inside ComfyUI its DiT, text encoder and VAE are loaded by
  ComfyUI's memory manager (nodes/comfy_models.py, COMPONENTS_15).
- ACESTEP_COND: a `Cond15`, the caption, lyrics and metadata as text. 1.5 puts the task's instruction into the
  text the encoder reads, so the text is encoded where the task is known (the sampler and task nodes).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..acestep_core.audio import resample
from ..acestep_core.latent import check_latent_values
from ..acestep_core.v15 import hub
from ..acestep_core.v15 import pipeline as P
from ..acestep_core.v15.generate import MAX_SEED, SamplerOptions
from ..acestep_core.v15.loading import checkpoint_family
from ..acestep_core.v15.lora import MAX_STRENGTH as MAX_LORA_STRENGTH
from ..acestep_core.v15.lora import ensure_adapters, load_adapter_file
from ..acestep_core.v15.tasks import HANDLER_REPAINT_CROSSFADE_FRAMES, HANDLER_REPAINT_INJECTION_RATIO
from ..acestep_core.v15.prompts import (NOT_GIVEN, TRACK_NAMES, VALID_KEYSCALES, VALID_LANGUAGES,
                                        VALID_TIME_SIGNATURES, build_prompts)
from . import bridge, comfy_models, files
from . import model as v1_model
from .cache import ModelKey
from .wire import CATEGORY, COND, MODEL

MARK = "acestep15"
LATENT_RATE = P.LATENT_RATE  # 25 latent frames per second
CHANNELS = 64  # the 1.5 VAE's latent channels (official vae/config.json)
MAX_SECONDS = float(P.MAX_AUDIO_SECONDS)
TURBO_STEPS = 8
OUTPUT_RATES = ("44100", "48000")
V15_ONLY = "Applies to ACE-Step 1.5 models only (v1 ignores it)."
KEYSCALES = (NOT_GIVEN, *VALID_KEYSCALES)
TIME_SIGNATURES = (NOT_GIVEN, *VALID_TIME_SIGNATURES)
SCHEDULERS = {"euler": "euler", "heun": "heun"}
GUIDANCES = {"apg": "apg"}  # the official base guidance; v1's cfg and cfg_star have no 1.5 counterpart


# ------------------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class Model15Handle:
    """ACESTEP_MODEL for an ACE-Step 1.5 checkpoint: which cached bundle to use."""

    key: ModelKey
    variant: str = "turbo"
    model: object = field(default=None, compare=False, repr=False)  # holds the bundle while ComfyUI caches it
    loras: tuple = ()  # (Adapters15, strength) pairs, applied to the DiT just before it runs

    family = "1.5"


@dataclass(frozen=True)
class Cond15:
    """ACESTEP_COND for a 1.5 model: the texts and metadata, checked; encoded by the node that knows the task."""

    caption: str
    lyrics: str
    language: str = "en"
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: str | None = None


def is_handle(value) -> bool:
    return isinstance(value, Model15Handle)


def is_cond(value) -> bool:
    return isinstance(value, Cond15)


def is_latent(latent) -> bool:
    """A 1.5 LATENT ([B, C, T], C = 64 for the released models), as opposed to v1's [B, 8, 16, T]."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    return isinstance(samples, torch.Tensor) and samples.ndim == 3


def is_path(path: Path) -> bool:
    """A 1.5 checkpoint folder or file, judged by its weights (`checkpoint_family`)."""
    try:
        return checkpoint_family(path) == "1.5"
    except Exception:  # unreadable or not a checkpoint: the v1 loader says what is wrong
        return False


_FAMILY_HINTS: dict[tuple, bool] = {}


def _stamp(path: Path) -> tuple:
    """What changes when the weights at `path` change: its own mtime and size, and those of a folder's entries."""
    entries = [path] + (sorted(path.iterdir()) if path.is_dir() else [])
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in entries)


def is_path_listed(path: Path) -> bool:
    """`is_path` for the Loader's list (asked on every /object_info and prompt validation): cached per file or
    folder state, so an unchanged checkpoint's header is read once."""
    try:
        key = _stamp(Path(path))
    except OSError:
        return False
    if key not in _FAMILY_HINTS:
        if len(_FAMILY_HINTS) > 1024:
            _FAMILY_HINTS.clear()
        _FAMILY_HINTS[key] = is_path(Path(path))
    return _FAMILY_HINTS[key]


def is_repo(repo_id: str) -> bool:
    return hub.is_known_repo(repo_id)


def known_repos() -> list[str]:
    """The Hugging Face repo ids the loader downloads as ACE-Step 1.5."""
    return list(hub.KNOWN_REPOS_15)


def _handle(model, name: str = "model") -> Model15Handle:
    if isinstance(model, Model15Handle):
        return model
    raise ValueError(f"{name} is an ACE-Step v1 model but this needs an ACE-Step 1.5 model; load a 1.5 checkpoint "
                     f"(e.g. {hub.DEFAULT_DIT} of {hub.MAIN_REPO}) with the ACE-Step Loader")


def _same_family(model, **inputs) -> None:
    """A v1 model given 1.5 inputs: one message that names each of them, not only the model."""
    named = [name for name, value in inputs.items() if is_latent(value) or is_cond(value)]
    if named and not is_handle(model):
        raise ValueError(f"{' and '.join(named)} {'is' if len(named) == 1 else 'are'} for ACE-Step 1.5 but model is "
                         f"an ACE-Step v1 model; load a 1.5 checkpoint for {', '.join(named)}, or make "
                         f"{'it' if len(named) == 1 else 'them'} with the v1 model")


def _cond(cond, name: str = "conditioning") -> Cond15:
    if isinstance(cond, Cond15):
        return cond
    raise ValueError(f"{name} was not encoded for an ACE-Step 1.5 model; connect ACE-Step Text Encode fed with the "
                     "same 1.5 model")


def _latent(latent, name: str = "latent") -> torch.Tensor:
    if not is_latent(latent):
        shape = tuple(latent["samples"].shape) if isinstance(latent, dict) and isinstance(
            latent.get("samples"), torch.Tensor) else type(latent).__name__
        raise ValueError(f"{name} is not an ACE-Step 1.5 latent [batch, {CHANNELS}, frames] (got {shape}); make it "
                         "with ACE-Step 1.5 Empty Latent or ACE-Step Encode Audio on a 1.5 model")
    samples = latent["samples"]
    if not samples.is_floating_point() or samples.shape[0] < 1 or samples.shape[-1] < 1:
        raise ValueError(f"{name} must be a non-empty float latent, got {samples.dtype} {tuple(samples.shape)}")
    if samples.shape[0] > P.MAX_BATCH:
        raise ValueError(f"{name} has a batch of {samples.shape[0]}; ACE-Step 1.5 takes 1 to {P.MAX_BATCH} at once")
    if samples.shape[-1] > MAX_SECONDS * LATENT_RATE:
        raise ValueError(f"{name} is longer than {MAX_SECONDS:.0f} s; ACE-Step 1.5 takes at most that")
    check_latent_values(samples, name)  # NaN, infinities and magnitude (as for a v1 latent)
    return samples


def _wrap(latents: torch.Tensor, frames: int) -> dict:
    """Pipeline latents [B, T', C] -> a 1.5 LATENT of `frames` frames."""
    return {"samples": latents[:, :frames].transpose(1, 2).detach().to("cpu", torch.float32).contiguous(),
            "type": "audio"}


# ------------------------------------------------------------------------------------------------ model
def _load(key: ModelKey, variant: str | None) -> P.Bundle15:
    device = bridge.staging_device(torch.device(key.device))
    bridge.free_memory(v1_model._weights_bytes(Path(key.path)), device)  # as for a v1 model (nodes/model.py)
    path = Path(key.path)
    parts = files.parts15(path) if path.is_file() else {}  # ComfyUI's repackaged files (nodes/files.py)
    progress = bridge.Progress(3)
    return hub.load_bundle15(key.path, variant=variant, dtype=getattr(torch, key.dtype), device=device,
                             progress=lambda name, done, total: progress.update(done, total), **parts)


def bundle_for(handle: Model15Handle, components=comfy_models.ALL_15) -> P.Bundle15:
    """The loaded bundle of a handle (loaded again if the cache dropped it); inside ComfyUI its `components` are
    loaded by ComfyUI's memory manager on the handle's device."""
    handle = _handle(handle)
    key = handle.key
    models = v1_model.MODELS  # the pack's one model cache, shared with v1 models
    bundle = models.get(key, lambda: handle.model if handle.model is not None else _load(key, None))
    comfy_models.use(bundle, torch.device(key.device), components, lambda loaded: models.release(key, loaded),
                     table=comfy_models.COMPONENTS_15)
    return bundle


@functools.lru_cache(maxsize=8)
def _read_lora(path: str, version: tuple):
    return load_adapter_file(path)


def with_lora(model, path: Path, strength: float) -> tuple:
    """The LoRA Loader's 1.5 branch: a new handle with one more LoRA/LoKr (official PEFT folder or file, LyCORIS
    LoKr, ComfyUI names; acestep_core/v15/lora.py). The scale is always the file's own (PEFT lora_alpha / r), as
    the official 1.5 handler applies it."""
    handle = _handle(model)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or abs(strength) > MAX_LORA_STRENGTH:
        raise ValueError(f"strength must be a finite number in [-{MAX_LORA_STRENGTH:g}, {MAX_LORA_STRENGTH:g}] (the "
                         f"widget offers -3..3), got {strength!r:.200}")
    if strength == 0:
        return (handle,)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json"))
    version = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    adapters = _read_lora(str(path), version)
    return (replace(handle, loras=handle.loras + ((adapters, float(strength)),)),)


def load(path: Path, dtype: torch.dtype, device: torch.device) -> tuple:
    """The Loader's 1.5 branch: a handle holding the loaded bundle (cached under the same kind of key as v1)."""
    key = v1_model.make_key(path, dtype, device)
    models = v1_model.MODELS
    bundle = models.get(key, lambda: _load(key, None))
    comfy_models.use(bundle, torch.device(key.device), (), lambda loaded: models.release(key, loaded),
                     table=comfy_models.COMPONENTS_15)
    return (Model15Handle(key, bundle.variant, bundle),)


def repo_folder(repo_id: str) -> Path:
    """A known 1.5 repo in the download folder (fetched when missing); the folder the Loader reads."""
    paths = hub.resolve(repo_id, models_dir=bridge.download_folder())
    return paths.dit if repo_id != hub.MAIN_REPO else paths.vae


def download(repo_id: str) -> dict:
    """The Download node's 1.5 branch: a known repo (and, for a DiT repo, the main repo's VAE and text encoder)."""
    path = repo_folder(repo_id)
    return {"ui": {"text": [str(path)]}, "result": (str(path),)}


# ------------------------------------------------------------------------------------------------ text
def text_encode(model, tags: str, lyrics: str, bpm: int = 0, keyscale: str = NOT_GIVEN,
                timesignature: str = NOT_GIVEN, language: str = "en") -> tuple:
    """The Text Encode node's 1.5 branch: the checked texts and metadata (encoded later, with the task)."""
    _handle(model)
    if not isinstance(tags, str) or not isinstance(lyrics, str):
        raise ValueError("tags and lyrics must be text")
    if isinstance(bpm, bool) or not isinstance(bpm, int) or not (bpm == 0 or 30 <= bpm <= 300):
        raise ValueError(f"bpm must be 0 (not given) or an integer in [30, 300], got {bpm!r:.200}")
    if keyscale not in KEYSCALES:
        raise ValueError(f"keyscale must be {NOT_GIVEN} or a key like 'C major' / 'F# minor', got {keyscale!r:.200}")
    if timesignature not in TIME_SIGNATURES:
        raise ValueError(f"timesignature must be one of {', '.join(TIME_SIGNATURES)}, got {timesignature!r:.200}")
    if language not in VALID_LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(VALID_LANGUAGES)}, got {language!r:.200}")
    cond = Cond15(tags, lyrics, language, bpm or None, None if keyscale == NOT_GIVEN else keyscale,
                  None if timesignature == NOT_GIVEN else timesignature)
    build_prompts("text2music", cond.caption, cond.lyrics, cond.language, bpm=cond.bpm, keyscale=cond.keyscale,
                  timesignature=cond.timesignature, duration=30.0)  # the texts' own checks, before any sampling
    return (cond,)


def check_v1_text_fields(bpm: int = 0, keyscale: str = NOT_GIVEN, timesignature: str = NOT_GIVEN,
                         language: str = "en") -> None:
    """v1 has no metadata inputs: a 1.5 field set on a v1 model is an error, not silently dropped."""
    for name, value, unset in (("bpm", bpm, 0), ("keyscale", keyscale, NOT_GIVEN),
                               ("timesignature", timesignature, NOT_GIVEN), ("language", language, "en")):
        if value != unset:
            raise ValueError(f"{name} applies to ACE-Step 1.5 models only; this is a v1 model (write the tempo, key "
                             f"and language into the tags instead), or set {name} back to {unset!r:.200}")


def _text(cond: Cond15) -> dict:
    return dict(language=cond.language, bpm=cond.bpm, keyscale=cond.keyscale, timesignature=cond.timesignature)


# ------------------------------------------------------------------------------------------------ sampling
def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r:.200}")
    return seed


def options(bundle: P.Bundle15, steps: int, guidance_scale: float, shift: float = 0.0, scheduler: str = "euler",
            cfg_type: str = "apg") -> SamplerOptions:
    """The node widgets as 1.5 sampler options: turbo runs its fixed 8-step table (steps must be 8), base/sft run
    `steps` with guidance; shift 0 = the variant's official default (turbo 3, base 1); repaint and lego use the
    handler's step injection 0.5 and 12-frame crossfade (what `pipeline.run` uses without options)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)} for an ACE-Step 1.5 model, got "
                         f"{scheduler!r:.200}")
    if cfg_type not in GUIDANCES:
        raise ValueError(f"cfg_type must be one of {tuple(GUIDANCES)} for an ACE-Step 1.5 model, got {cfg_type!r:.200}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an integer in [1, 1000], got {steps!r:.200}")
    if bundle.variant == "turbo" and steps != TURBO_STEPS:
        raise ValueError(f"steps: the 1.5 turbo model runs its fixed {TURBO_STEPS}-step schedule; set steps to "
                         f"{TURBO_STEPS} (or load a base/sft model for other step counts)")
    if not isinstance(shift, (int, float)) or not math.isfinite(shift) or not 0 <= shift <= 100:
        raise ValueError(f"shift must be 0 (the model's default) or a number in (0, 100], got {shift!r:.200}")
    return SamplerOptions(variant=bundle.variant, steps=None if bundle.variant == "turbo" else steps,
                          shift=None if shift == 0 else float(shift), guidance_scale=float(guidance_scale),
                          guidance=GUIDANCES[cfg_type], sampler=SCHEDULERS[scheduler],
                          repaint_injection_ratio=HANDLER_REPAINT_INJECTION_RATIO,
                          repaint_crossfade_frames=HANDLER_REPAINT_CROSSFADE_FRAMES).validate()


def _progress(steps_total: int):
    bar = bridge.Progress(steps_total)

    def report(stage: str, done: int, total: int) -> None:
        if stage == "diffusion":
            bar.update(done, total)
        else:
            bridge.check_interrupt()

    return report


def _run(handle: Model15Handle, task: str, cond: Cond15, seed: int, batch_size: int, opts_args: dict, **kw):
    bundle = bundle_for(handle)
    ensure_adapters(bundle.model, list(handle.loras))  # exactly this handle's LoRAs (none: the base weights)
    opts = options(bundle, **opts_args)
    with torch.no_grad():
        return P.run(bundle, task, cond.caption, cond.lyrics, **_text(cond), seed=_seed(seed),
                     batch_size=batch_size, options=opts, decode=False,
                     progress=_progress(opts.steps or TURBO_STEPS), interrupt=bridge.check_interrupt, **kw)


def sample(model, conditioning, latent: dict, seed: int, steps: int, scheduler: str, cfg_type: str,
           guidance_scale: float, omega_scale: float = 10.0, options=None, retake_variance: float = 0.0,
           retake_seed: int = 0, collect_lyric_timing: bool = False, seeds: str = "") -> tuple:
    """The Sampler's 1.5 branch: text2music for a plain 1.5 latent, repaint for one marked by Repaint Region.
    omega_scale and retake_seed are v1 settings (no 1.5 counterpart) and are not read."""
    _same_family(model, conditioning=conditioning, latent=latent)
    handle, cond, samples = _handle(model), _cond(conditioning), _latent(latent)
    if options is not None:
        raise ValueError("options: ACE-Step Sampler Options hold v1 settings; disconnect them for a 1.5 model")
    if retake_variance:
        raise ValueError("retake_variance is a v1 setting; set it to 0 for a 1.5 model (use another seed)")
    if collect_lyric_timing:
        raise ValueError("collect_lyric_timing works with v1 models only; switch it off for a 1.5 model")
    if isinstance(seeds, str) and seeds.strip():
        raise ValueError("seeds (a per-item list) is a v1 setting; leave it empty for a 1.5 model (item i uses "
                         "seed + i)")
    batch, frames = samples.shape[0], samples.shape[-1]
    mark = latent.get(MARK)
    opts_args = dict(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, cfg_type=cfg_type)
    if mark is None:
        result = _run(handle, "text2music", cond, seed, batch, opts_args, frames=frames)
    else:
        start, end = _repaint_mark(mark, frames)
        if batch > 1 and not bool((samples == samples[:1]).all()):
            raise ValueError(f"latent holds {batch} different songs; a 1.5 repaint takes one source song (its batch "
                             "comes from copies of it): encode one clip")
        # seconds that land on the marked frames under the pipeline's int(s·48000 // 1920)
        span = ((start + 0.5) / LATENT_RATE, None if end >= frames else (end + 0.5) / LATENT_RATE)
        result = _run(handle, "repaint", cond, seed, batch, opts_args,
                      source_latents=samples[:1].transpose(1, 2), span=span)
    out = {k: v for k, v in latent.items() if k not in (MARK, "noise_mask")}
    out.update(_wrap(result.latents, frames))
    return (out,)


def _repaint_mark(mark, frames: int) -> tuple[int, int]:
    """The frames [start, end) a Repaint Region mark names, checked against the latent's `frames`."""
    def frame(key):
        value = mark.get(key) if isinstance(mark, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    start, end = frame("start_frame"), frame("end_frame")
    if not isinstance(mark, dict) or mark.get("task") != "repaint" or start is None or end is None \
            or not 0 <= start < end <= frames:
        raise ValueError(f"latent carries an unreadable ACE-Step 1.5 repaint mark {mark!r:.200} (for {frames} "
                         "frames); rebuild it with Repaint Region")
    return start, end


def empty_latent(seconds: float, batch_size: int) -> tuple:
    """An empty 1.5 latent: zeros [B, 64, round(seconds·25)] (ComfyUI's EmptyAceStep1.5LatentAudio)."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:.0f}], got {seconds!r:.200}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= P.MAX_BATCH:
        raise ValueError(f"batch_size must be an integer in [1, {P.MAX_BATCH}], got {batch_size!r:.200}")
    frames = max(1, round(seconds * LATENT_RATE))
    return ({"samples": torch.zeros(batch_size, CHANNELS, frames), "type": "audio"},)


def repaint_region(latent: dict, start_seconds: float, end_seconds: float, audio=None) -> dict:
    """The Repaint Region node's 1.5 branch: the latent marked for repaint over [start, end) seconds."""
    samples = _latent(latent)
    frames = samples.shape[-1]
    duration = frames / LATENT_RATE
    for name, value in (("start_seconds", start_seconds), ("end_seconds", end_seconds)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r:.200}")
    if end_seconds <= start_seconds:
        raise ValueError(f"end_seconds ({end_seconds}) must be after start_seconds ({start_seconds})")
    start, end = int(start_seconds * P.SAMPLE_RATE // P.HOP), int(end_seconds * P.SAMPLE_RATE // P.HOP)
    if end > frames:
        raise ValueError(f"end_seconds ({end_seconds}) is past the end of the source latent ({duration:.2f} s); set "
                         f"end_seconds to at most {duration:.2f}")
    if end <= start:
        raise ValueError(f"start_seconds to end_seconds ({start_seconds}-{end_seconds} s) is shorter than one latent "
                         "frame (0.04 s)")
    out = dict(latent)
    out[MARK] = {"task": "repaint", "start_frame": start, "end_frame": end}
    mask = torch.zeros(samples.shape[0], 1, frames)
    mask[..., start:end] = 1.0
    out["noise_mask"] = mask
    out["type"] = "audio"
    if audio is None:
        return (out,)
    from . import wire
    return {"ui": {"audio": [wire.audio_preview(audio)]}, "result": (out,)}


# ------------------------------------------------------------------------------------------------ codec
def encode(model, audio: dict) -> tuple:
    """The Encode node's 1.5 branch: each item through the 1.5 VAE (a posterior sample; generator seed 0, so the
    same audio always gives the same latent)."""
    from . import wire

    waveform, rate = wire.check_audio(audio, "audio")
    bundle = bundle_for(_handle(model), ("vae",))
    g = torch.Generator("cpu").manual_seed(0)
    report = _progress(1)
    with torch.no_grad():
        items = [P.encode_audio(bundle, P.prepare_audio(w, rate, "audio"), g, report) for w in waveform]
    return ({"samples": torch.cat(items).transpose(1, 2).to("cpu", torch.float32).contiguous(), "type": "audio"},)


def decode(model, latent: dict, sample_rate: str) -> tuple:
    """The Decode node's 1.5 branch: the 1.5 VAE (48 kHz) with the handler's anti-clipping; 44100 resamples."""
    if str(sample_rate) not in OUTPUT_RATES:
        raise ValueError(f"sample_rate must be one of {OUTPUT_RATES}, got {sample_rate!r:.200}")
    _same_family(model, latent=latent)
    samples = _latent(latent)
    bundle = bundle_for(_handle(model), ("vae",))
    channels = bundle.model.config.audio_acoustic_hidden_dim
    if samples.shape[1] != channels:
        raise ValueError(f"latent has {samples.shape[1]} channels but this model's VAE takes {channels}; decode it "
                         "with the model that made it")
    with torch.no_grad():
        wav = P.decode_latents(bundle, samples.transpose(1, 2).to(bundle.device, bundle.dtype),
                               progress=_progress(1))
    rate = int(sample_rate)
    if rate != P.SAMPLE_RATE:
        wav = resample(wav, P.SAMPLE_RATE, rate)
    wav = wav.to("cpu", torch.float32)
    if not torch.isfinite(wav).all():
        raise ValueError("decoded audio contains NaN or infinite samples; try dtype fp32 on the loader")
    return ({"waveform": wav, "sample_rate": rate},)


# ------------------------------------------------------------------------------------------------ task nodes
def _track(name: str, value) -> str:
    if not isinstance(value, str) or value.strip().lower() not in TRACK_NAMES:
        raise ValueError(f"{name} must be one of {', '.join(TRACK_NAMES)}; got {value!r:.200}")
    return value.strip().lower()


def track_list(name: str, text) -> list[str]:
    """A comma-separated list of track names, each checked."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} must list one or more of {', '.join(TRACK_NAMES)}, separated by commas")
    return [_track(name, part) for part in text.split(",") if part.strip()]


def _clip(audio, name: str) -> tuple[torch.Tensor, int]:
    """One checked clip [channels, samples] of an AUDIO input and its rate."""
    from . import wire

    waveform, rate = wire.check_audio(audio, name)
    if waveform.shape[0] != 1:
        raise ValueError(f"{name}: give one clip (got a batch of {waveform.shape[0]}); the batch comes from "
                         "batch_size")
    return waveform[0], rate


def _audio(audio, name: str) -> tuple[torch.Tensor, int]:
    """An AUDIO input as the pipeline takes it: stereo 48 kHz (`pipeline.prepare_audio`, which the pipeline applies
    again as a no-op), checked here so that every message names the node's input."""
    return P.prepare_audio(*_clip(audio, name), name), P.SAMPLE_RATE


def _sampling_inputs(default_steps: int = TURBO_STEPS) -> dict:
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                         "tooltip": "Seed of the noise (item i of a batch uses seed + i)."}),
        "steps": ("INT", {"default": default_steps, "min": 1, "max": 1000,
                          "tooltip": "Steps: turbo runs its fixed 8-step schedule (leave 8); base/sft take any "
                                     "count (official 30-50)."}),
        "guidance_scale": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                     "tooltip": "APG guidance of base/sft models (official 7; 1 or less = off). "
                                                "Turbo has no guidance and ignores it."}),
        "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                            "tooltip": "Timestep shift; 0 = the model's official default (turbo 3, base 1)."}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": P.MAX_BATCH,
                               "tooltip": "Versions generated at once (item i uses seed + i)."}),
    }


def _opts(steps, guidance_scale, shift) -> dict:
    return dict(steps=steps, guidance_scale=guidance_scale, shift=shift)


def _source_task(task: str, model, conditioning, source, seed, steps, guidance_scale, shift, batch_size,
                 source_name: str = "source", **kw) -> tuple:
    handle, cond = _handle(model), _cond(conditioning)
    waveform, rate = _clip(source, source_name)
    prepared = P.prepare_audio(waveform, rate, source_name)  # checked here so that messages name the input
    result = _run(handle, task, cond, seed, batch_size, _opts(steps, guidance_scale, shift),
                  source_audio=prepared, source_sample_rate=P.SAMPLE_RATE, **kw)
    frames = int(round(waveform.shape[-1] / rate * P.SAMPLE_RATE)) // P.HOP
    return (_wrap(result.latents, max(1, frames)),)


def _common_inputs(source_tip: str) -> dict:
    return {
        "model": (MODEL, {"tooltip": "An ACE-Step 1.5 model from the ACE-Step Loader."}),
        "conditioning": (COND, {"tooltip": "Caption, lyrics and metadata from ACE-Step Text Encode (1.5 model)."}),
        "source": ("AUDIO", {"tooltip": source_tip}),
    }


class _TaskNode:
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The result's 1.5 latent [batch, 64, frames]; decode it with ACE-Step Decode.",)


class AceStep15Cover(_TaskNode):
    DESCRIPTION = ("ACE-Step 1.5 cover: a new version of the source song in the style of the caption (official "
                   "'cover' task). audio_cover_strength below 1 finishes the last steps as plain text to music.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_common_inputs("The song to cover (any rate, mono or stereo; at most 600 s)."),
                **_sampling_inputs(),
                "audio_cover_strength": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Share of the steps that follow the source (official switch; 1 = all of them)."}),
            },
            "optional": {
                "reference": ("AUDIO", {"tooltip": "Optional timbre reference (its sound steers the voice and "
                                                   "instruments)."}),
                "audio_codes": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "Optional 5 Hz audio codes (<|audio_code_N|> tokens of the "
                                                      "5 Hz LM) used instead of the source's structure; empty = "
                                                      "none."}),
            },
        }

    def generate(self, model, conditioning, source, seed, steps, guidance_scale, shift, batch_size,
                 audio_cover_strength, reference=None, audio_codes: str = ""):
        extra = {}
        if reference is not None:
            extra["reference_audio"] = _audio(reference, "reference")
        if isinstance(audio_codes, str) and audio_codes.strip():
            extra["audio_codes"] = audio_codes
        return _source_task("cover", model, conditioning, source, seed, steps, guidance_scale, shift, batch_size,
                            audio_cover_strength=float(audio_cover_strength), **extra)


class AceStep15Lego(_TaskNode):
    DESCRIPTION = ("ACE-Step 1.5 lego: generates one instrument's track that fits the source (official 'lego' "
                   "task; best on the base model), over the whole song or a region.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_common_inputs("The song (or the tracks so far) the new track must fit."),
                "track_name": (list(TRACK_NAMES), {"default": "bass", "tooltip": "The track to generate."}),
                **_sampling_inputs(),
                "start_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_SECONDS, "step": 0.01,
                                            "tooltip": "Start of the region that gets the track."}),
                "end_seconds": ("FLOAT", {"default": -1.0, "min": -1.0, "max": MAX_SECONDS, "step": 0.01,
                                          "tooltip": "End of the region; -1 = the end of the song."}),
            },
        }

    def generate(self, model, conditioning, source, track_name, seed, steps, guidance_scale, shift, batch_size,
                 start_seconds, end_seconds):
        track = _track("track_name", track_name)
        span = None
        if start_seconds != 0 or end_seconds != -1:
            span = (float(start_seconds), None if end_seconds == -1 else float(end_seconds))
        return _source_task("lego", model, conditioning, source, seed, steps, guidance_scale, shift, batch_size,
                            track_name=track, span=span)


class AceStep15Extract(_TaskNode):
    DESCRIPTION = "ACE-Step 1.5 extract: pulls one instrument's track out of the source (official 'extract' task)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_common_inputs("The song to take the track from."),
                "track_name": (list(TRACK_NAMES), {"default": "vocals", "tooltip": "The track to extract."}),
                **_sampling_inputs(),
            },
        }

    def generate(self, model, conditioning, source, track_name, seed, steps, guidance_scale, shift, batch_size):
        return _source_task("extract", model, conditioning, source, seed, steps, guidance_scale, shift,
                            batch_size, track_name=_track("track_name", track_name))


class AceStep15Complete(_TaskNode):
    DESCRIPTION = ("ACE-Step 1.5 complete: completes the source (e.g. a lone vocal) with the listed tracks "
                   "(official 'complete' task; best on the base model).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_common_inputs("The partial song, e.g. a vocal recording."),
                "track_classes": ("STRING", {"default": "drums, bass, guitar, keyboard",
                                             "tooltip": "Tracks to add, separated by commas, from: "
                                                        + ", ".join(TRACK_NAMES) + "."}),
                **_sampling_inputs(),
            },
        }

    def generate(self, model, conditioning, source, track_classes, seed, steps, guidance_scale, shift, batch_size):
        return _source_task("complete", model, conditioning, source, seed, steps, guidance_scale, shift,
                            batch_size, complete_track_classes=track_list("track_classes", track_classes))


class AceStep15EmptyLatent:
    DESCRIPTION = ("An empty ACE-Step 1.5 latent of a given duration (the same as ComfyUI's Empty Ace Step 1.5 "
                   "Latent Audio); the sampler turns it into a new song.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros [batch, 64, frames] at 25 frames per second.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seconds": ("FLOAT", {"default": 60.0, "min": 1.0, "max": MAX_SECONDS, "step": 0.1,
                                      "tooltip": "Song length in seconds (25 latent frames per second; at most "
                                                 "600 s)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": P.MAX_BATCH,
                                       "tooltip": "Songs generated at once (item i uses seed + i)."}),
            },
        }

    def make(self, seconds: float, batch_size: int):
        return empty_latent(seconds, batch_size)


# --------------------------------------------------------------------------------- StemGen on a 1.5 model
def _no_v1_extras(stemgen, options) -> None:
    if stemgen is not None:
        raise ValueError("stemgen: a StemGen file is a v1 control branch; disconnect it for an ACE-Step 1.5 model "
                         "(1.5 runs its own lego / complete task)")
    if options is not None:
        raise ValueError("options: ACE-Step Sampler Options hold v1 settings; disconnect them for a 1.5 model")


def stemgen(model, reference: dict, instrument: str, seed: int, steps: int, guidance_scale: float,
            sample_rate: str, stemgen=None, options=None, instrument_audio=None) -> tuple:
    """StemGen's 1.5 branch: the lego task for `instrument` (a 1.5 track name), the instrument sample as the
    timbre reference; (stem, reference + stem). The v1 widgets scheduler, cfg_type, omega_scale, control_scale and
    lora_strength have no 1.5 counterpart."""
    _no_v1_extras(stemgen, options)
    track = _track("instrument", instrument)
    extra = {} if instrument_audio is None else {"reference_audio": _audio(instrument_audio, "instrument_audio")}
    (latent,) = _source_task("lego", model, Cond15(caption=track, lyrics=""), reference, seed, steps,
                             guidance_scale, 0.0, 1, source_name="reference", track_name=track, **extra)
    return _pair(model, latent, reference, sample_rate)


def singing2accompaniment(model, vocal: dict, tags: str, seed: int, steps: int, guidance_scale: float,
                          sample_rate: str, stemgen=None, options=None) -> tuple:
    """Singing2Accompaniment's 1.5 branch: the complete task with every instrument track (not the vocal ones).
    The complete task returns the whole song, vocal included, so both outputs are that song."""
    _no_v1_extras(stemgen, options)
    classes = [t for t in TRACK_NAMES if t not in ("vocals", "backing_vocals")]
    (latent,) = _source_task("complete", model, Cond15(caption=tags, lyrics=""), vocal, seed, steps,
                             guidance_scale, 0.0, 1, source_name="vocal", complete_track_classes=classes)
    (song,) = decode(model, latent, sample_rate)
    return (song, song)


def _pair(model, latent: dict, source: dict, sample_rate: str) -> tuple:
    """(decoded part, source + part), the source brought to the output rate and stereo as the pipeline does."""
    (part,) = decode(model, latent, sample_rate)
    src, _ = _audio(source, "reference")
    if int(sample_rate) != P.SAMPLE_RATE:
        src = resample(src, P.SAMPLE_RATE, int(sample_rate))
    n = min(src.shape[-1], part["waveform"].shape[-1])
    mix = part["waveform"][..., :n] + src[..., :n].unsqueeze(0)
    return ({"waveform": part["waveform"][..., :n], "sample_rate": part["sample_rate"]},
            {"waveform": mix, "sample_rate": part["sample_rate"]})
