"""Codec nodes: AUDIO -> LATENT (Music-DCAE encoder) and LATENT -> AUDIO (DCAE decoder + vocoder), design §1, §6."""
from __future__ import annotations

import torch

from ..acestep_core import audio as codec
from ..acestep_core.cancel import checked_calls
from . import bridge, wire
from .model import ModelHandle, model_for
from .wire import CATEGORY, MODEL

OUTPUT_RATES = ("44100", "48000")


class AceStepEncode:
    DESCRIPTION = (
        "Encodes audio (any sample rate, mono or stereo) into an ACE-Step latent, as the official app: resampled "
        "to 44.1 kHz and padded at the end to whole latent frames (4096 samples)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The audio's latent [batch, 8, 16, frames] for repaint, extend, audio2audio or flow edit.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model (its audio encoder is used)."}),
                "audio": ("AUDIO", {"tooltip": "Audio to encode, e.g. from Load Audio."}),
            },
        }

    def encode(self, model: ModelHandle, audio: dict):
        waveform, rate = wire.check_audio(audio, "audio")
        loaded = model_for(model)
        progress = bridge.Progress(waveform.shape[0])
        with checked_calls(wire.cancel_check(), loaded.dcae, loaded.vocoder):  # cancel within a layer
            latents = codec.encode_audio(loaded.dcae, loaded.vocoder.mel_transform, waveform, rate,
                                         callback=progress.chunk_callback())
        return ({"samples": latents.to("cpu", torch.float32), "type": "audio"},)


class AceStepDecode:
    DESCRIPTION = (
        "Decodes an ACE-Step latent into stereo audio with the Music-DCAE decoder and vocoder (no loudness "
        "change). 48000 Hz is what the official app writes; 44100 Hz is the model's own rate."
    )
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    OUTPUT_TOOLTIPS = ("Stereo audio [batch, 2, samples] at the chosen sample rate.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model (its audio decoder and vocoder are used)."}),
                "latent": ("LATENT", {"tooltip": "Latent from the ACE-Step Sampler, Flow Edit or Encode Audio."}),
                "sample_rate": (list(OUTPUT_RATES), {
                    "default": "44100",
                    "tooltip": "Output rate: 44100 (the vocoder's rate) or 48000 (resampled, as the official app).",
                }),
            },
        }

    def decode(self, model: ModelHandle, latent: dict, sample_rate: str):
        if str(sample_rate) not in OUTPUT_RATES:
            raise ValueError(f"sample_rate must be one of {OUTPUT_RATES}, got {sample_rate!r:.200}")
        samples = wire.samples_of(latent, "latent")
        loaded = model_for(model)
        progress = bridge.Progress(samples.shape[0] * 3)
        with checked_calls(wire.cancel_check(), loaded.dcae, loaded.vocoder):  # cancel within a layer
            waveform = codec.decode_latents(loaded.dcae, loaded.vocoder, samples, sample_rate=int(sample_rate),
                                            callback=progress.chunk_callback())
        waveform = waveform.to("cpu", torch.float32)
        if not torch.isfinite(waveform).all():
            raise ValueError(
                "decoded audio contains NaN or infinite samples (the latent is out of range); try dtype fp32 on the "
                "loader or fewer extreme settings"
            )
        return ({"waveform": waveform, "sample_rate": int(sample_rate)},)
