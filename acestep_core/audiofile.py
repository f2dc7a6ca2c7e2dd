"""Writing songs in the official app's formats (wav, flac, mp3, ogg) with soundfile (libsndfile >= 1.1 for mp3).

WAV is 32-bit float as the app writes it (torchaudio.save of a float tensor): no clipping, what a DAW imports.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .params import AUDIO_FORMATS

SUBTYPES = {"wav": "FLOAT", "flac": "PCM_24", "mp3": "MPEG_LAYER_III", "ogg": "VORBIS"}


def format_of(path: str | Path) -> str:
    """The audio format a file name asks for, from its suffix."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in AUDIO_FORMATS:
        raise ValueError(f"output {path} must end in one of {tuple('.' + f for f in AUDIO_FORMATS)}")
    return suffix


def write_audio(path: str | Path, waveform: torch.Tensor, sample_rate: int, audio_format: str | None = None) -> Path:
    """Write [C, N] audio; the format comes from `audio_format` or the suffix."""
    import soundfile

    path = Path(path)
    fmt = audio_format or format_of(path)
    if fmt not in AUDIO_FORMATS:
        raise ValueError(f"format must be one of {AUDIO_FORMATS}, got {fmt!r:.200}")
    if waveform.ndim != 2:
        raise ValueError(f"write_audio takes [channels, samples], got {tuple(waveform.shape)}")
    data = waveform.detach().to("cpu", torch.float32)
    if fmt != "wav":
        data = data.clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        soundfile.write(str(path), data.numpy().T, int(sample_rate), format=fmt.upper(), subtype=SUBTYPES[fmt])
    except (soundfile.LibsndfileError, ValueError) as error:
        raise ValueError(f"could not write {fmt} ({error}); soundfile needs libsndfile >= 1.1 for mp3") from None
    return path
