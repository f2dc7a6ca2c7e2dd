"""The ACE-Step v1 latent format and every conversion between seconds and latent frames (design §1).

A latent is [batch, 8, 16, frames]; one frame is 8 mel frames of 512 samples at 44.1 kHz (4096 samples,
≈ 0.093 s). Every module that turns a duration into frames (or back) uses the functions here, so the
official floor rounding is written once.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .validation import MAX_BATCH

SAMPLE_RATE = 44100
"""Rate of the DCAE mel front end and of the vocoder output (design §1)."""
HOP = 512
FRAMES_PER_LATENT = 8
SAMPLES_PER_LATENT = HOP * FRAMES_PER_LATENT
LATENT_RATE = SAMPLE_RATE / SAMPLES_PER_LATENT
"""Latent frames per second: 10.7666015625 (design §1)."""
LATENT_CHANNELS = 8
LATENT_HEIGHT = 16
MAX_SECONDS = 240.0
"""The longest stretch the model was trained on."""


def frames_at(seconds: float) -> int:
    """Latent frames before a time: `int(seconds·44100/512/8)`, the official floor (design §1, §8); no checks."""
    return int(float(seconds) * SAMPLE_RATE / HOP / FRAMES_PER_LATENT)


MAX_FRAMES = frames_at(MAX_SECONDS)
"""2583 frames = the 240 s the model was trained on."""


def seconds_at(frames: int) -> float:
    """Time of latent frame `frames`: `frames·4096/44100` seconds; no checks."""
    return frames * SAMPLES_PER_LATENT / SAMPLE_RATE


def seconds_to_latent_frames(seconds: float) -> int:
    """Latent length for a duration: `int(seconds·44100/512/8)` (floor), design §1."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    return frames_at(seconds)


def latent_frames_to_seconds(frames: int) -> float:
    """Duration of `frames` latent frames: `frames·4096/44100` seconds, design §1."""
    if not isinstance(frames, int) or frames < 0:
        raise ValueError(f"frames must be an int >= 0, got {frames!r}")
    return seconds_at(frames)


def latent_frames_for_samples(num_samples: int) -> int:
    """Latent length that encoding `num_samples` samples at 44.1 kHz gives: `ceil(L/4096)`, design §1."""
    return -(-num_samples // SAMPLES_PER_LATENT)


def frames_for_seconds(seconds: float) -> int:
    """Latent frames for a generated duration, floor(seconds·44100/4096) as official (design §1); at least one."""
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be a positive number of seconds, got {seconds}")
    frames = frames_at(seconds)
    if frames < 1:
        raise ValueError(f"duration {seconds} s is shorter than one latent frame (0.093 s)")
    return frames


def frames_covering(seconds: float) -> int:
    """Latent frames to cover `seconds` completely: ceil(round(seconds·44100)/4096) (the audio is then trimmed)."""
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a positive number, got {seconds}")
    return max(1, latent_frames_for_samples(round(seconds * SAMPLE_RATE)))


MAX_LATENT_MAGNITUDE = 1e6  # real latents stay within a few units; far past this the model overflows to NaN


def check_latent(latent: Tensor, name: str = "latent") -> Tensor:
    """An ACE latent must be [B, 8, 16, T] with finite values."""
    if not isinstance(latent, Tensor) or latent.ndim != 4 or latent.shape[1:3] != (LATENT_CHANNELS, LATENT_HEIGHT):
        shape = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
        raise ValueError(
            f"{name} must be an ACE-Step audio latent [batch, 8, 16, frames], got {shape}; "
            "make it with the ACE-Step empty-latent or encode node (an image latent does not fit)"
        )
    if latent.shape[-1] < 1:
        raise ValueError(f"{name} has no frames; give a duration of at least 0.1 s")
    if not 1 <= latent.shape[0] <= MAX_BATCH:
        raise ValueError(f"{name} has a batch of {latent.shape[0]}; ACE-Step takes 1 to {MAX_BATCH} items at once")
    check_latent_values(latent, name)
    return latent


def check_latent_values(latent: Tensor, name: str = "latent") -> None:
    """Refuse NaN, infinite and absurdly large latent values (one aminmax pass), naming `name`; any latent layout
    (v1 [B, 8, 16, T], 1.5 [B, C, T])."""
    low, high = (float(v) for v in torch.aminmax(latent.detach()))  # one pass: NaN, infinities and magnitude
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if max(-low, high) > MAX_LATENT_MAGNITUDE:
        raise ValueError(f"{name} values reach {max(-low, high):g}; ACE-Step latents stay within a few units: make "
                         "the latent with the ACE-Step nodes")
