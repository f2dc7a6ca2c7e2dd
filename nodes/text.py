"""Text node: tags and lyrics -> ACESTEP_COND (UMT5 states, ERG-tag states, lyric ids; design §4, §5)."""
from __future__ import annotations

import torch

from ..acestep_core.conditioning import encode_conditioning
from . import v15
from .model import ModelHandle, model_for, on_device
from .wire import CATEGORY, COND, MODEL


class AceStepTextEncode:
    DESCRIPTION = (
        "Encodes the style tags with the UMT5 text encoder and tokenizes the lyrics (per-line language detection, "
        "as the official app). Empty lyrics give an instrumental. With an ACE-Step 1.5 model the tags are the "
        "caption, and bpm, key, time signature and language are read too."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (COND,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Tags and lyrics encoded for the ACE-Step sampler and flow edit.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model (its text encoder and lyric tokenizer are used)."}),
                "tags": ("STRING", {
                    "multiline": True, "default": "pop, piano, upbeat, female vocals, 120 bpm",
                    "tooltip": "Comma-separated style description: genre, instruments, mood, tempo, voice.",
                }),
                "lyrics": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Lyrics with structure tags on their own lines ([verse], [chorus], [bridge], ...). "
                               "Leave empty for an instrumental.",
                }),
            },
            "optional": {  # ACE-Step 1.5 metadata (nodes/v15.py); appended last so v1 widget positions stay
                "bpm": ("INT", {"default": 0, "min": 0, "max": 300,
                                "tooltip": "Tempo in beats per minute (30-300; 0 = not given). " + v15.V15_ONLY}),
                "keyscale": (list(v15.KEYSCALES), {"default": v15.NOT_GIVEN,
                                                   "tooltip": "Key and scale, e.g. C major. " + v15.V15_ONLY}),
                "timesignature": (list(v15.TIME_SIGNATURES), {
                    "default": v15.NOT_GIVEN, "tooltip": "Beats per bar (2, 3, 4 or 6). " + v15.V15_ONLY}),
                "language": (list(v15.VALID_LANGUAGES), {
                    "default": "en", "tooltip": "Language of the lyrics. " + v15.V15_ONLY}),
            },
        }

    def encode(self, model: ModelHandle, tags: str, lyrics: str, bpm: int = 0, keyscale: str = v15.NOT_GIVEN,
               timesignature: str = v15.NOT_GIVEN, language: str = "en"):
        if v15.is_handle(model):  # ACE-Step 1.5
            return v15.text_encode(model, tags, lyrics, bpm, keyscale, timesignature, language)
        v15.check_v1_text_fields(bpm, keyscale, timesignature, language)
        loaded = model_for(model, ("text",))
        with torch.no_grad(), on_device(model, loaded.text_encoder):
            cond = encode_conditioning(loaded, tags, lyrics)
        return (cond.to("cpu"),)
