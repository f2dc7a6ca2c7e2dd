"""Preview node: a spectrogram / waveform / latent picture of AUDIO and/or an ACE-Step LATENT, as an IMAGE."""
from __future__ import annotations

import hashlib

import torch

from ..acestep_core.preview import PreviewConfig, Region, mask_regions, png_bytes, render
from . import bridge, wire
from .wire import CATEGORY, MAX_SECONDS


def latent_regions(latent: dict, item: int) -> list[Region]:
    """The region a latent marks for regeneration: a Repaint Region mark, else its noise_mask's runs, else none."""
    mark = wire.mark_of(latent)
    if mark is not None:
        if mark["task"] != "repaint":
            return []
        return [(wire.frames_to_seconds(mark["start_frame"]), wire.frames_to_seconds(mark["end_frame"]))]
    mask = latent.get("noise_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        return []
    return mask_regions(mask[min(item, mask.shape[0] - 1)], latent["samples"].shape[-1])


def save_png(image: torch.Tensor) -> dict:
    """Write one image to ComfyUI's temp folder; the ui entry that shows it on the node."""
    data = png_bytes(image)
    folder, kind = bridge.temp_folder()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"acestep_preview_{hashlib.sha1(data).hexdigest()[:16]}.png"
    if not (folder / name).is_file():
        (folder / name).write_bytes(data)
    return {"filename": name, "subfolder": "", "type": kind}


class AceStepPreviewImage:
    DESCRIPTION = (
        "Draws audio as a log-mel spectrogram with its waveform envelope below, and/or an ACE-Step latent as its 8 "
        "channels, on one time axis in seconds. A region (start/end, or the one a Repaint Region latent marks) is "
        "highlighted. Shows the picture on the node and returns it as an IMAGE."
    )
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("One picture per batch item [batch, height, width, 3], values 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {
                    "default": 1024, "min": 256, "max": 4096, "step": 8,
                    "tooltip": "Image width in pixels; the whole duration is spread across it.",
                }),
                "height": ("INT", {
                    "default": 256, "min": 64, "max": 2048, "step": 8,
                    "tooltip": "Height of the spectrogram in pixels (the envelope strip, latent strip and time axis "
                               "are added below it).",
                }),
                "start_seconds": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": MAX_SECONDS, "step": 0.01,
                    "tooltip": "Start of the region to highlight. Leave start and end at 0 to highlight the region "
                               "a Repaint Region latent marks (or nothing).",
                }),
                "end_seconds": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": MAX_SECONDS, "step": 0.01,
                    "tooltip": "End of the region to highlight (after start_seconds); 0 with start 0 = take the "
                               "region from the latent.",
                }),
            },
            "optional": {
                "audio": ("AUDIO", {
                    "tooltip": "Audio to draw as spectrogram + waveform (any sample rate, mono or stereo).",
                }),
                "latent": ("LATENT", {
                    "tooltip": "ACE-Step latent to draw as its 8 channels x 16 rows (no model needed); its repaint "
                               "region is highlighted.",
                }),
            },
        }

    def preview(self, width: int, height: int, start_seconds: float, end_seconds: float, audio: dict | None = None,
                latent: dict | None = None):
        if audio is None and latent is None:
            raise ValueError("connect audio, latent or both to AceStepPreviewImage; there is nothing to draw")
        start = wire.check_seconds("start_seconds", start_seconds)
        end = wire.check_seconds("end_seconds", end_seconds)
        if (start, end) != (0.0, 0.0) and end <= start:
            raise ValueError(
                f"end_seconds ({end}) must be after start_seconds ({start}); set both to 0 to use the latent's region"
            )
        waveform, rate = wire.check_audio(audio, "audio") if audio is not None else (None, None)
        samples = wire.samples_of(latent, "latent") if latent is not None else None
        batch = max(x.shape[0] for x in (waveform, samples) if x is not None)
        config = PreviewConfig(width=int(width), spectrogram_height=int(height))
        images = []
        for item in range(batch):
            regions = [(start, end)] if end > start else latent_regions(latent, item) if latent is not None else []
            images.append(render(
                waveform[min(item, waveform.shape[0] - 1)].cpu() if waveform is not None else None, rate,
                samples[min(item, samples.shape[0] - 1)].cpu() if samples is not None else None, regions, config,
            ))
        image = torch.stack(images)                                                     # [B, H, W, 3]
        return {"ui": {"images": [save_png(i) for i in images]}, "result": (image,)}
