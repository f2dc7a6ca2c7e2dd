"""Lyric timing node: LRC, per-line scores and a picture from the cross-attention the sampler collected.

The ACE-Step Sampler (or Flow Edit) collects the timing while it samples when asked to: it wraps its task call in
:func:`sample_collecting` and stores the result in the output latent under ``latent["acestep_timing"]``
(a :class:`~acestep_core.lyric_timing.LyricAttention`). This node reads it; no model call is made here.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..acestep_core.conditioning import Conditioning
from ..acestep_core.lyric_timing import DEFAULT_THRESHOLD, LyricAttention, align_lyrics, collect_lyric_attention, to_lrc
from ..acestep_core.preview import draw_alignment
from . import bridge, wire
from .model import ModelHandle, model_for
from .wire import CATEGORY, MODEL

TIMING_KEY = "acestep_timing"
"""Latent key under which a sampler that collected lyric timing stores its LyricAttention."""


def sample_collecting(enabled: bool, transformer, cond: Conditioning,
                      run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, LyricAttention | None]:
    """`run()` (one task call), collecting the lyric cross-attention of `cond` when `enabled` (the samplers' hook)."""
    if not enabled:
        return run(), None
    if cond.instrumental:
        raise ValueError("lyric timing needs lyrics, but this conditioning is instrumental; turn collect_lyric_timing off")
    with collect_lyric_attention(transformer, cond) as collector:
        out = run()
    return out, collector.result()


def timing_of(latent) -> LyricAttention:
    """The collected timing of a LATENT, or an error saying how to get one."""
    timing = latent.get(TIMING_KEY) if isinstance(latent, dict) else None
    if not isinstance(timing, LyricAttention):
        raise ValueError(
            "this latent carries no lyric timing; turn collect_lyric_timing on in the ACE-Step Sampler (or Flow "
            "Edit) that made it and connect its latent output here"
        )
    return timing


def save_text(prefix: str, suffix: str, text: str) -> Path:
    """Write `text` to <output>/<prefix>_NNNNN<suffix> with the next free number; the prefix may hold folders."""
    wire.check_filename_prefix(prefix)
    root = bridge.output_folder().resolve()
    target = (root / prefix).resolve()
    if root not in target.parents:
        raise ValueError(f"filename_prefix {prefix!r:.200} points outside the output folder; use a relative name")
    target.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(target.name) + r"_(\d{5})" + re.escape(suffix))
    taken = [int(m.group(1)) for p in target.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    path = target.parent / f"{target.name}_{max(taken, default=0) + 1:05d}{suffix}"
    path.write_text(text, encoding="utf-8")
    return path


def _save_text_named(prefix: str, suffix: str, text: str) -> Path:
    """save_text, with file-system refusals (a name part too long, not allowed here) named as filename_prefix."""
    try:
        return save_text(prefix, suffix, text)
    except OSError as err:
        raise ValueError(f"filename_prefix {prefix!r:.80} cannot be used as a file name here: {err.strerror}") from None


class AceStepLyricTiming:
    DESCRIPTION = (
        "Times every lyric line of a generated song from the cross-attention the ACE-Step Sampler collected "
        "(collect_lyric_timing on): an LRC file, per-line start/end and 'sung' scores (lines the model probably "
        "skipped are flagged), and a picture of the alignment."
    )
    CATEGORY = CATEGORY
    FUNCTION = "time"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("lrc", "lines", "image")
    OUTPUT_TOOLTIPS = (
        "The LRC text: [mm:ss.xx] per sung line; structure tags and unsung lines as [#:...] comments.",
        "JSON list, one entry per line: text, kind, start and end in seconds, score 0..1, sung.",
        "Attention over time (lyric tokens top to bottom) with the alignment path; bars: green sung, red not sung.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The ACE-Step model that generated the song (its lyric tokenizer)."}),
                "latent": ("LATENT", {
                    "tooltip": "Latent output of an ACE-Step Sampler or Flow Edit run with collect_lyric_timing on.",
                }),
                "threshold": ("FLOAT", {
                    "default": DEFAULT_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Lines scoring below this are flagged as probably not sung (0 = flag only lines with "
                               "no time at all).",
                }),
                "filename_prefix": ("STRING", {
                    "default": "acestep/lyrics",
                    "tooltip": "The .lrc file is saved in the output folder under this name (+ a number); empty = "
                               "do not save.",
                }),
            },
            "optional": {
                "batch_index": ("INT", {
                    "default": 0, "min": 0, "max": 63,
                    "tooltip": "Which song of a batch to time.",
                }),
                "keep_unsung": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also give flagged lines a time in the LRC (else they are written as comments).",
                }),
            },
        }

    def time(self, model: ModelHandle, latent: dict, threshold: float, filename_prefix: str, batch_index: int = 0,
             keep_unsung: bool = False):
        attention = timing_of(latent)
        frames = latent["samples"].shape[-1] if isinstance(latent.get("samples"), torch.Tensor) else attention.frames
        if frames != attention.frames:
            raise ValueError(
                f"the lyric timing covers {attention.frames} latent frames but the latent has {frames}; use the "
                "latent straight from the sampler that collected it"
            )
        if not 0 <= int(batch_index) < attention.weights.shape[0]:
            raise ValueError(f"batch_index must be in [0, {attention.weights.shape[0]}) (the latent's batch), "
                             f"got {batch_index}")
        alignment = align_lyrics(attention, model_for(model, components=()).lyric_tokenizer, item=int(batch_index),
                                 threshold=float(threshold))
        lrc = to_lrc(alignment.lines, alignment.duration, keep_unsung=bool(keep_unsung))
        image = draw_alignment(alignment)
        result = (lrc, alignment.to_json(), image)
        if not filename_prefix.strip():
            return result
        path = _save_text_named(filename_prefix.strip(), ".lrc", lrc)
        return {"ui": {"text": [str(path)]}, "result": result}
