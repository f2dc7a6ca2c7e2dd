"""Text node: tags and lyrics -> ACESTEP_COND (UMT5 states, ERG-tag states, lyric ids; design §4, §5)."""
from __future__ import annotations

import torch

from ..acestep_core.conditioning import encode_conditioning
from .model import ModelHandle, model_for, on_device
from .wire import CATEGORY, COND, MODEL


class AceStepTextEncode:
    DESCRIPTION = (
        "Encodes the style tags with the UMT5 text encoder and tokenizes the lyrics (per-line language detection, "
        "as the official app). Empty lyrics give an instrumental."
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
        }

    def encode(self, model: ModelHandle, tags: str, lyrics: str):
        loaded = model_for(model, ("text",))
        with torch.no_grad(), on_device(model, loaded.text_encoder):
            cond = encode_conditioning(loaded, tags, lyrics)
        return (cond.to("cpu"),)
