"""Values on the wire between nodes: socket names, LATENT and AUDIO dicts, the task mark, seeds (design §3).

LATENT is ComfyUI's dict: ``{"samples": [B, 8, 16, T] float32 CPU, "type": "audio", ...}`` as
EmptyAceStepLatentAudio makes it; nodes copy the dict, replace ``samples`` and keep unknown keys
(``noise_mask``, ``batch_index``). The repaint/extend/audio2audio nodes do not sample: they return the source
latent with a private mark that tells the ACE-Step Sampler which task to run::

    latent["acestep"] = {"task": "repaint", "start_frame": s, "end_frame": e, "variance": v}
    latent["acestep"] = {"task": "extend", "left_frames": l, "right_frames": r, "variance": v}
    latent["acestep"] = {"task": "audio2audio", "ref_strength": a}

(frames are latent frames, ``int(seconds·44100/4096)``). A latent without the mark is text2music. Repaint also
sets ``noise_mask`` [B, 1, T] (1 = regenerate) so ComfyUI's KSampler can inpaint the same region. The sampler's
output carries no mark. AUDIO is ``{"waveform": [B, C, N] float32 CPU, "sample_rate": int}``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from ..acestep_core import fast
from ..acestep_core.audio import check_sample_values, check_source_duration
from ..acestep_core.conditioning import Conditioning
from ..acestep_core.latent import MAX_SECONDS, check_latent  # noqa: F401  (the latent format, design §1)
from ..acestep_core.latent import frames_at as seconds_to_frames  # noqa: F401  (latent frames before a time)
from ..acestep_core.latent import seconds_at as frames_to_seconds  # noqa: F401  (seconds of latent frames)
from ..acestep_core.noise import MAX_SEED, item_seeds, noise_for_seed  # noqa: F401
from . import bridge

CATEGORY = "audio/ACE-Step"
MODEL = "ACESTEP_MODEL"
COND = "ACESTEP_COND"
OPTIONS = "ACESTEP_OPTIONS"
MARK = "acestep"
TASKS = ("repaint", "extend", "audio2audio")
MAX_SAMPLE_RATE = 768_000  # the highest rate audio files use
MAX_REGION_SECONDS = 840.0  # validation.MAX_REGION_SECONDS: a 10-minute source and one 240 s extension


def check_filename_prefix(prefix: str, name: str = "filename_prefix") -> str:
    """A file-name prefix a node writes under: text of at most 200 characters without NUL."""
    if not isinstance(prefix, str) or "\x00" in prefix or len(prefix) > 200:
        raise ValueError(f"{name} must be a file name of at most 200 characters without NUL, got {prefix!r:.80}")
    return prefix


def samples_of(latent: Any, name: str = "latent") -> torch.Tensor:
    """The [B, 8, 16, T] samples of an ACE-Step LATENT, with a clear error for anything else."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{name} must be a LATENT dict with 'samples'; connect an ACE-Step latent")
    return check_latent(latent["samples"], name)


def with_samples(latent: dict, samples: torch.Tensor, *, drop: tuple[str, ...] = ()) -> dict:
    """A copy of `latent` with new samples (float32 CPU), without the task mark and the `drop` keys."""
    out = {k: v for k, v in latent.items() if k != MARK and k not in drop}
    out["samples"] = samples.detach().to("cpu", torch.float32)
    out["type"] = "audio"
    return out


def marked(latent: dict, mark: dict) -> dict:
    """A copy of `latent` carrying a task mark for the sampler."""
    if mark.get("task") not in TASKS:
        raise ValueError(f"unknown ACE-Step task mark {mark!r:.200}")
    out = dict(latent)
    out[MARK] = dict(mark)
    out["type"] = "audio"
    return out


def mark_of(latent: dict) -> dict | None:
    """The task mark of a latent, or None for a plain (text2music) latent."""
    mark = latent.get(MARK)
    if mark is None:
        return None
    if not isinstance(mark, dict) or mark.get("task") not in TASKS:
        raise ValueError(f"latent carries an unreadable ACE-Step task mark {mark!r:.200}; rebuild it with the ACE-Step nodes")
    return mark


def check_conditioning(cond: Any, name: str) -> Conditioning:
    """An ACESTEP_COND value, or a clear error."""
    if not isinstance(cond, Conditioning):
        raise ValueError(f"{name} must come from the ACE-Step Text Encode node, got {type(cond).__name__}")
    return cond


def batch_offsets(latent: dict, batch: int) -> list[int]:
    """The latent's ComfyUI batch indices when it has one per item, else 0 … batch − 1 (noise.noise_for_seed)."""
    offsets = latent.get("batch_index") or list(range(batch))
    return list(offsets) if len(offsets) == batch else list(range(batch))


def seeds_for(seed: int, latent: dict, batch: int) -> list[int]:
    """Per-item seeds: seed + i for item i (or + batch_index[i] when the latent has one), wrapped to 32 bits.

    Item 0 with seed s draws exactly the official pipeline's noise for seed s; the other items differ.
    """
    return item_seeds(seed, batch_offsets(latent, batch))


def noise_for(transformer, seed: int, batch: int, *, retake_seed: int | None = None, latent: dict | None = None,
              seeds: list[int] | None = None):
    """The node seed rule (noise.noise_for_seed, docs/seeds.md) on the model's compute device (in low-VRAM mode the
    device its phases run on, so a seed gives the same song either way), in its dtype; `seeds`, one per item,
    replace the manual stream's seed + i (the app's manual seed list)."""
    p = next(transformer.parameters())
    return noise_for_seed(seed, batch, retake_seed=retake_seed, offsets=batch_offsets(latent or {}, batch),
                          manual_seeds=seeds, device=fast.compute_device(transformer), dtype=p.dtype)


def check_audio(audio: Any, name: str = "audio") -> tuple[torch.Tensor, int]:
    """(waveform [B, C, N] float, sample rate) of an AUDIO dict, or a clear error."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError(f"{name} must be an AUDIO dict with 'waveform' and 'sample_rate'; connect e.g. Load Audio")
    waveform = audio["waveform"]
    if not isinstance(waveform, torch.Tensor) or waveform.ndim != 3 or waveform.shape[-1] == 0:
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise ValueError(f"{name} waveform must be a non-empty tensor [batch, channels, samples], got {shape}")
    rate = audio["sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{name} sample_rate must be a positive integer sample rate in Hz (at most {MAX_SAMPLE_RATE}), "
                         f"got {rate!r:.80}")
    if waveform.shape[1] == 0 or waveform.shape[0] == 0:
        raise ValueError(f"{name} waveform has no channels or no items: {tuple(waveform.shape)}")
    check_source_duration(waveform.shape[-1], rate, name)
    check_sample_values(waveform, name)
    return waveform, rate


def audio_preview(audio: dict) -> dict:
    """Write the first item of an AUDIO to the temp folder as FLAC; the ui entry naming it (for the region picker)."""
    import soundfile

    waveform, rate = check_audio(audio)
    item = waveform[0].detach().to("cpu", torch.float32).clamp(-1, 1)              # [C, N]
    digest = hashlib.sha1(item.numpy().tobytes() + str(rate).encode()).hexdigest()[:16]
    folder, kind = bridge.temp_folder()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"acestep_source_{digest}.flac"
    if not (folder / name).is_file():
        soundfile.write(str(folder / name), item.T.numpy(), rate, format="FLAC", subtype="PCM_16")
    return {"filename": name, "subfolder": "", "type": kind}


def cancel_check():
    """ComfyUI's cancel check, to run before every layer of a long model call (acestep_core.cancel.checked_calls);
    None outside ComfyUI, where there is nothing to check."""
    return bridge.check_interrupt if bridge.comfy_module("comfy.model_management") is not None else None


def check_seconds(name: str, value: float) -> float:
    """A finite number of seconds in [0, MAX_REGION_SECONDS] (past 240 s the task nodes explain what to do instead)."""
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r:.80}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value}")
    if value > MAX_REGION_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_REGION_SECONDS:.0f} seconds, got {value:g}")
    return value
