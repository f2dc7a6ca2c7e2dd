"""Long-form node: songs past 240 s (up to an hour) as overlapping windows chained by extend (acestep_core.longform)."""
from __future__ import annotations

import torch

from ..acestep_core import longform, tasks
from ..acestep_core.params import app_default
from ..acestep_core.cancel import checked_calls
from . import bridge, wire
from .sampling import DEFAULTS, sampler_widgets
from .model import ModelHandle, model_for, on_device, transformer_for
from .wire import CATEGORY, COND, MODEL, OPTIONS

OUTPUT_RATES = ("44100", "48000")
MAX_LONG_SECONDS = 3600.0


class AceStepLongForm:
    DESCRIPTION = (
        "Generates a song of any length (past the model's 240 s) in windows: each window extends the last "
        "overlap_seconds of the previous one, gets the lyric sections that fall in it, and is decoded as soon as it "
        "is done; the audio is joined with a crossfade over the overlap."
    )
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("AUDIO", "LATENT", "STRING", "STRING")
    RETURN_NAMES = ("audio", "latent", "window_lyrics", "lrc")
    OUTPUT_TOOLTIPS = (
        "The whole song, stereo, exactly `seconds` long at the chosen rate.",
        "The whole song's latent (longer than 240 s: decode it, but edit it only in windows).",
        "The lyrics each window was given, window by window with their time ranges.",
        "With lyric_timing on: the LRC of the whole song (else empty).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model (with its LoRAs)."}),
                "conditioning": (COND, {
                    "tooltip": "Tags and the whole song's lyrics from ACE-Step Text Encode; put structure tags "
                               "([verse], [chorus], ...) on their own lines so the lyrics split at sections.",
                }),
                "seconds": ("FLOAT", {
                    "default": 360.0, "min": 1.0, "max": MAX_LONG_SECONDS, "step": 1.0,
                    "tooltip": "Length of the song in seconds.",
                }),
                "window_seconds": ("FLOAT", {
                    "default": 240.0, "min": 10.0, "max": 240.0, "step": 1.0,
                    "tooltip": "Longest stretch generated at once (the model was trained on up to 240 s).",
                }),
                "overlap_seconds": ("FLOAT", {
                    "default": 20.0, "min": 1.0, "max": 120.0, "step": 0.5,
                    "tooltip": "Music of the previous window each window continues from (and the crossfade length); "
                               "at most half a window.",
                }),
                **sampler_widgets(
                    seed="Seed of the noise of every window (the extension noise uses seed + 1).",
                    steps="Sampling steps per window (official default 60).",
                    scheduler="Sampler of the first window; the extension windows step with Euler, as official extend.",
                    cfg_type="Guidance: apg (official), cfg, or cfg_star.",
                    omega_scale="Granularity scale of the first window's Euler/Heun steps (official 10).",
                ),
                "sample_rate": (list(OUTPUT_RATES), {
                    "default": str(app_default("sample_rate")),
                    "tooltip": "Output rate: 48000 (resampled once at the end, as the official app saves) or "
                               "44100 (the model's).",
                }),
            },
            "optional": {
                "options": (OPTIONS, {"tooltip": "Advanced settings from ACE-Step Sampler Options (else defaults)."}),
                "crossfade": (list(longform.CROSSFADES), {
                    "default": "equal_gain",
                    "tooltip": "Join law over the overlap: equal_gain suits the two renderings of the same latent "
                               "frames (coherent); equal_power would lift them by up to 3 dB mid-fade.",
                }),
                "lyric_timing": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Collect the lyric cross-attention of every window and return the song's LRC.",
                }),
            },
        }

    def generate(self, model: ModelHandle, conditioning, seconds: float, window_seconds: float, overlap_seconds: float,
                 seed: int, steps: int, scheduler: str, cfg_type: str, guidance_scale: float, omega_scale: float,
                 sample_rate: str, options=None, crossfade: str = "equal_gain", lyric_timing: bool = False):
        cond = wire.check_conditioning(conditioning, "conditioning")
        if str(sample_rate) not in OUTPUT_RATES:
            raise ValueError(f"sample_rate must be one of {OUTPUT_RATES}, got {sample_rate!r:.200}")
        if not 0 < float(seconds) <= MAX_LONG_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_LONG_SECONDS:.0f}], got {seconds}")
        if options is not None and not isinstance(options, tasks.SamplerOptions):
            raise ValueError("options must come from the ACE-Step Sampler Options node")
        settings = tasks.with_options(
            options or DEFAULTS, steps=int(steps), scheduler=scheduler, cfg_type=cfg_type,
            guidance_scale=float(guidance_scale), omega_scale=float(omega_scale),
        )
        transformer = transformer_for(model)
        loaded = model_for(model)
        noise = wire.noise_for(transformer, seed, 1)
        progress = bridge.Progress(int(steps))
        cancel = None if settings.speed.compile else wire.cancel_check()  # before every layer; compiled blocks excepted

        def decode(z):  # low VRAM: the decoder's own phase, the transformer waits in CPU memory meanwhile
            with on_device(model, loaded.dcae, loaded.vocoder):
                return longform.decode_window(loaded, z)

        with on_device(model, transformer), checked_calls(cancel, loaded.transformer, loaded.dcae, loaded.vocoder):
            song = longform.generate_long(
                loaded, cond, float(seconds), noise=noise, window_seconds=float(window_seconds),
                overlap_seconds=float(overlap_seconds), options=settings, sample_rate=int(sample_rate),
                crossfade=crossfade, timing=bool(lyric_timing), decode=decode, callback=progress.update,
            )
        audio = {"waveform": song.waveform.to(torch.float32), "sample_rate": song.sample_rate}
        return (audio, {"samples": song.latent, "type": "audio"}, song.window_plan(), song.lrc(seconds))
