"""Codec nodes: AUDIO -> LATENT (Music-DCAE encoder) and LATENT -> AUDIO (DCAE decoder + vocoder), design §1, §6."""
from __future__ import annotations

import torch

from ..acestep_core import audio as codec
from ..acestep_core import fast
from ..acestep_core.params import app_default
from ..acestep_core.cancel import checked_calls
from . import bridge, v15, wire
from .model import ModelHandle, model_for, on_device
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
        if v15.is_handle(model):  # ACE-Step 1.5
            return v15.encode(model, audio)
        waveform, rate = wire.check_audio(audio, "audio")
        loaded = model_for(model, ("dcae", "vocoder"))
        progress = bridge.Progress(waveform.shape[0])
        with on_device(model, loaded.dcae, loaded.vocoder), \
                checked_calls(wire.cancel_check(), loaded.dcae, loaded.vocoder):  # cancel within a layer
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
                    "default": str(app_default("sample_rate")),
                    "tooltip": "Output rate: 48000 (resampled, what the official app saves) or 44100 (the "
                               "vocoder's own rate).",
                }),
            },
            "optional": {
                "overlapped_decode": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Decode in overlapped windows from the start (least memory; the last ~0.1 s differs "
                               "slightly). Off, the one-pass decode is tried first and windows are only the "
                               "fallback when the GPU runs out of memory.",
                }),
            },
        }

    def decode(self, model: ModelHandle, latent: dict, sample_rate: str, overlapped_decode: bool = False):
        if v15.is_handle(model) or v15.is_latent(latent):  # ACE-Step 1.5
            return v15.decode(model, latent, sample_rate)
        if str(sample_rate) not in OUTPUT_RATES:
            raise ValueError(f"sample_rate must be one of {OUTPUT_RATES}, got {sample_rate!r:.200}")
        samples = wire.samples_of(latent, "latent")
        loaded = model_for(model, ("dcae", "vocoder"))
        progress = bridge.Progress(samples.shape[0] * 2)
        with on_device(model, loaded.dcae, loaded.vocoder), \
                checked_calls(wire.cancel_check(), loaded.dcae, loaded.vocoder):  # cancel within a layer
            waveform = fast.decode(loaded.dcae, loaded.vocoder, samples, sample_rate=int(sample_rate),
                                   levers=fast.Levers(overlapped_decode=bool(overlapped_decode)),
                                   callback=progress.chunk_callback())
        waveform = waveform.to("cpu", torch.float32)
        if not torch.isfinite(waveform).all():
            raise ValueError(
                "decoded audio contains NaN or infinite samples (the latent is out of range); try dtype fp32 on the "
                "loader or fewer extreme settings"
            )
        audio = {"waveform": waveform, "sample_rate": int(sample_rate)}
        if isinstance(latent.get("acestep_params"), list):  # the sampler's settings, for ACE-Step Save Audio
            audio["acestep_params"] = latent["acestep_params"]
        return (audio,)
