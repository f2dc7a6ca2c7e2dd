"""Audio ⇄ latent conversion of ACE-Step v1: resampling, input preparation, DCAE encode and decode (design §1, §6)."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .latent import (  # noqa: F401  (the latent format and its conversions, re-exported for callers)
    FRAMES_PER_LATENT, HOP, LATENT_RATE, SAMPLE_RATE, SAMPLES_PER_LATENT, latent_frames_for_samples,
    latent_frames_to_seconds, seconds_to_latent_frames,
)
from .models.dcae import DCAE
from .models.vocoder import LogMelSpectrogram, Vocoder

SCALE = 0.1786
SHIFT = -1.9091
"""Latent normalisation `z = (e − SHIFT)·SCALE` (design §1)."""
MEL_MIN = -11.0
MEL_MAX = 3.0
"""Nominal log-mel range mapped to [−1, 1] for the DCAE (design §6.1)."""

MAX_SOURCE_SECONDS = 600.0
"""Longest audio accepted for encoding (10 minutes). The model generates in 240 s windows, so repaint and extend
only need the part around the edit; longer files are refused before any work instead of exhausting memory."""

RESAMPLE_LOWPASS_WIDTH = 6
RESAMPLE_ROLLOFF = 0.99
RESAMPLE_MAX_KERNEL = 1 << 24
"""Largest sinc kernel (elements) we build; rates without a small common ratio are refused (design §1)."""

OVERLAP_WINDOW_FRAMES = 512
"""Official overlapped decode: DCAE window in latent frames (hop half of it, a quarter trimmed per inner edge)."""
VOCODER_WINDOW_FRAMES = 512
VOCODER_OVERLAP_SAMPLES = 1024
CROSSFADE_SAMPLES = 128
"""Official overlapped decode: vocoder windows of 512 mel frames, 1024-sample overlaps, 128-sample cross-fade."""

Progress = Callable[[int, int], None]
"""`callback(done, total)`, called after each chunk of work (used for progress and interruption)."""


def _check_rate(name: str, rate: object) -> int:
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer sample rate in Hz, got {rate!r}")
    return rate


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int) -> tuple[Tensor, int]:
    """Hann-windowed sinc filters [new, 1, 2·width + orig] in float64 and the half-width, for reduced rates (design §1)."""
    base = min(orig, new) * RESAMPLE_ROLLOFF
    width = math.ceil(RESAMPLE_LOWPASS_WIDTH * orig / base)
    if new * (2 * width + orig) > RESAMPLE_MAX_KERNEL:
        raise ValueError(
            f"resampling {orig}:{new} (after reducing the rates) needs a {new}x{2 * width + orig} filter; convert the "
            "audio to a common rate such as 44100 or 48000 Hz first"
        )
    taps = torch.arange(-width, width + orig, dtype=torch.float64, device="cpu")[None, None] / orig
    phases = torch.arange(0, -new, -1, dtype=torch.float32, device="cpu")[:, None, None] / new
    t = ((phases + taps) * base).clamp(-RESAMPLE_LOWPASS_WIDTH, RESAMPLE_LOWPASS_WIDTH)   # [new, 1, taps]
    window = torch.cos(t * math.pi / RESAMPLE_LOWPASS_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    return sinc * (window * (base / orig)), width


def resample(waveform: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """Band-limited (Hann sinc, width 6, rolloff 0.99) resampling of [..., L] to `ceil(L·new/orig)` samples, design §1."""
    orig_sr, new_sr = _check_rate("orig_sr", orig_sr), _check_rate("new_sr", new_sr)
    if not isinstance(waveform, Tensor) or not waveform.is_floating_point() or waveform.ndim == 0:
        raise ValueError("audio to resample must be a floating-point tensor [..., samples]")
    if orig_sr == new_sr:
        return waveform
    gcd = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // gcd, new_sr // gcd
    kernel, width = _sinc_kernel(orig, new)
    length = waveform.shape[-1]
    flat = waveform.reshape(-1, 1, length)                                               # [N, 1, L]
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded, kernel.to(device=waveform.device, dtype=waveform.dtype), stride=orig)  # [N, new, blocks]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : -(-new * length // orig)]
    return out.reshape(*waveform.shape[:-1], out.shape[-1])


def check_source_duration(num_samples: int, sample_rate: int, name: str = "audio") -> float:
    """Seconds of `num_samples` at `sample_rate`; a ValueError saying how to trim it past MAX_SOURCE_SECONDS."""
    seconds = num_samples / _check_rate("sample_rate", sample_rate)
    if seconds > MAX_SOURCE_SECONDS:
        minutes = f"{seconds / 60:.1f}"
        length = f"{minutes} minutes" if float(minutes) > MAX_SOURCE_SECONDS / 60 else f"{seconds:.1f} seconds"
        raise ValueError(
            f"{name} is {length} long; ACE-Step encodes at most {MAX_SOURCE_SECONDS / 60:.0f} "
            "minutes, since it generates in 240 s windows: trim it to the part you edit (for extend, the last "
            "4 minutes are enough) and join the result back afterwards"
        )
    return seconds


MAX_SAMPLE_MAGNITUDE = 1000.0
"""Largest |sample| accepted: audio lives in [-1, 1]; far past it the encoder's log-mel overflows to NaN."""


def check_sample_values(waveform: Tensor, name: str = "audio") -> None:
    """Refuse NaN, infinite and absurdly loud samples (one aminmax pass), naming `name`."""
    if waveform.numel() == 0 or not waveform.is_floating_point():
        return
    low, high = (float(v) for v in torch.aminmax(waveform.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite samples; clean or re-export the file")
    if max(-low, high) > MAX_SAMPLE_MAGNITUDE:
        raise ValueError(
            f"{name} samples reach {max(-low, high):g}; audio is expected within [-1, 1]: lower its volume or "
            "re-export the file"
        )


def prepare_audio(waveform: Tensor, sample_rate: int) -> Tensor:
    """Float audio [B, C, L] or [C, L] at any rate → stereo [B, 2, L'] at 44.1 kHz, design §1.

    Mono is duplicated. More than two channels are folded down: channels 0 and 1 are front left/right (WAV/SMPTE
    order) and the mean of the remaining channels is added to both at −3 dB (×1/√2); no level normalisation.
    Audio longer than MAX_SOURCE_SECONDS is refused before anything is computed.
    """
    if not isinstance(waveform, Tensor) or waveform.ndim not in (2, 3):
        shape = tuple(waveform.shape) if isinstance(waveform, Tensor) else type(waveform).__name__
        raise ValueError(f"audio must be a tensor [batch, channels, samples] or [channels, samples], got {shape}")
    if not waveform.is_floating_point():
        raise ValueError(f"audio must be floating point in [-1, 1], got {waveform.dtype}; convert PCM integers first")
    if waveform.numel() == 0:
        raise ValueError(f"audio is empty (shape {tuple(waveform.shape)}); load a file with at least one sample")
    sample_rate = _check_rate("sample_rate", sample_rate)
    check_source_duration(waveform.shape[-1], sample_rate)
    check_sample_values(waveform)
    audio = waveform if waveform.ndim == 3 else waveform.unsqueeze(0)                   # [B, C, L]
    channels = audio.shape[1]
    if channels == 1:
        audio = audio.expand(-1, 2, -1)
    elif channels > 2:
        rest = audio[:, 2:].mean(dim=1, keepdim=True) * math.sqrt(0.5)
        audio = audio[:, :2] + rest
    return resample(audio, sample_rate, SAMPLE_RATE)


def normalise_mel(mel: Tensor) -> Tensor:
    """Log-mel → DCAE input: `((m − MEL_MIN)/(MEL_MAX − MEL_MIN) − 0.5)/0.5`, no clipping (design §6.1)."""
    return ((mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5


def denormalise_mel(mel: Tensor) -> Tensor:
    """DCAE output → log-mel: `(d·0.5 + 0.5)·(MEL_MAX − MEL_MIN) + MEL_MIN` (design §6.1)."""
    return (mel * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN


def _plan_windows(total: int, window: int) -> list[tuple[int, int, int, int]]:
    """Official overlapped windows over `total` frames: (start, end, keep_start, keep_end); keeps tile 0..total.

    Windows of `window` frames start every window/2 frames; a quarter window is dropped at each inner edge.
    """
    quarter, half = window // 4, window // 2
    anchors = list(range(quarter, total - quarter, half)) or [quarter]
    plan = []
    for i, anchor in enumerate(anchors):
        start = max(0, anchor - quarter)
        end = min(total, start + window)
        keep_start = start if i == 0 else start + quarter
        keep_end = end if i == len(anchors) - 1 else end - quarter
        plan.append((start, end, keep_start, keep_end))
    return plan


def _check_window(name: str, frames: object) -> int:
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 4 or frames % 4:
        raise ValueError(f"{name} must be a multiple of 4 latent frames (>= 4), got {frames!r}")
    return frames


def _param(module: torch.nn.Module) -> Tensor:
    return next(module.parameters())


def encode_audio(
    dcae: DCAE,
    mel_frontend: LogMelSpectrogram,
    waveform: Tensor,
    sample_rate: int,
    *,
    chunk_frames: int | None = None,
    callback: Progress | None = None,
) -> Tensor:
    """Audio [B, C, L] / [C, L] at any rate → latents [B, 8, 16, ceil(L'/4096)] (official MusicDCAE.encode), design §1.

    Resample to 44.1 kHz, right-pad with zeros to a multiple of 4096, log-mel per item (`vocoder.mel_transform`),
    normalise, DCAE encoder, `(e − SHIFT)·SCALE`; runs in the DCAE's dtype/device. `chunk_frames=None` is the
    official single pass. An int encodes windows of that many latent frames (multiple of 4) with the overlapped
    windowing (hop ½ window, ¼ window of context dropped at inner edges): the mel is still computed on the whole
    song and the local convolutions see real context, but the encoder's global attention only sees its window,
    so latents differ slightly from the single pass, in exchange for memory bounded by the window.
    `callback(done, total)` runs after each encoder call.
    """
    if chunk_frames is not None:
        _check_window("chunk_frames", chunk_frames)
    param = _param(dcae)
    audio = prepare_audio(waveform, sample_rate).to(device=param.device, dtype=param.dtype)   # [B, 2, L']
    frames = latent_frames_for_samples(audio.shape[-1])
    audio = F.pad(audio, (0, frames * SAMPLES_PER_LATENT - audio.shape[-1]))
    plan = [(0, frames, 0, frames)] if chunk_frames is None else _plan_windows(frames, chunk_frames)
    total, done = audio.shape[0] * len(plan), 0
    latents = []
    with torch.no_grad():
        for item in audio:
            mel = normalise_mel(mel_frontend(item)).unsqueeze(0)                       # [1, 2, 128, 8T]
            pieces = []
            for start, end, keep_start, keep_end in plan:
                raw = dcae.encode(mel[..., start * FRAMES_PER_LATENT:end * FRAMES_PER_LATENT])
                pieces.append(raw[..., keep_start - start:keep_end - start])           # [1, 8, 16, kept]
                done += 1
                if callback is not None:
                    callback(done, total)
            latents.append(torch.cat(pieces, dim=-1))
    return (torch.cat(latents, dim=0) - SHIFT) * SCALE                                 # [B, 8, 16, T]


def _vocode_overlapped(vocoder: Vocoder, mel: Tensor, step: Callable[[], None]) -> Tensor:
    """Official overlapped vocoding of log-mel [C, 128, M] → [C, ≥ M·512] (design §6.2, end)."""
    window_samples = VOCODER_WINDOW_FRAMES * HOP
    hop_samples = window_samples - 2 * VOCODER_OVERLAP_SAMPLES
    total_samples = mel.shape[-1] * HOP
    fade_out = torch.linspace(1, 0, CROSSFADE_SAMPLES, device=mel.device)
    fade_in = torch.linspace(0, 1, CROSSFADE_SAMPLES, device=mel.device)
    pieces: list[Tensor] = []
    start = 0
    while True:
        block = mel[..., start // HOP:start // HOP + VOCODER_WINDOW_FRAMES]
        block = F.pad(block, (0, VOCODER_WINDOW_FRAMES - block.shape[-1]))            # zero-padded tail window
        wav = vocoder.decode(block).squeeze(1)                                         # [C, window_samples]
        step()
        is_last = start + hop_samples >= total_samples
        if not pieces:
            pieces.append(wav[..., :-VOCODER_OVERLAP_SAMPLES])
        else:
            head = wav[..., VOCODER_OVERLAP_SAMPLES - CROSSFADE_SAMPLES:VOCODER_OVERLAP_SAMPLES]
            tail = pieces[-1][..., -CROSSFADE_SAMPLES:]
            pieces[-1] = torch.cat([pieces[-1][..., :-CROSSFADE_SAMPLES], tail * fade_out + head * fade_in], dim=-1)
            end = None if is_last else -VOCODER_OVERLAP_SAMPLES
            pieces.append(wav[..., VOCODER_OVERLAP_SAMPLES:end])
        start += hop_samples
        if start >= total_samples:
            return torch.cat(pieces, dim=-1)


def decode_latents(
    dcae: DCAE,
    vocoder: Vocoder,
    latents: Tensor,
    *,
    sample_rate: int = SAMPLE_RATE,
    overlapped: bool = False,
    window_frames: int = OVERLAP_WINDOW_FRAMES,
    callback: Progress | None = None,
) -> Tensor:
    """Latents [B, 8, 16, T] → float32 stereo waveform [B, 2, N] on the DCAE's device (official decode), design §1, §6.

    `z/SCALE + SHIFT` → DCAE decoder → mel de-normalise → vocoder (both stereo channels in one call) → resample
    to `sample_rate` if not 44.1 kHz (N = T·4096, or ceil(T·4096·sr/44100)). `overlapped=True` is the official `decode_overlap`:
    DCAE windows of `window_frames` latent frames (512 officially; smaller windows bound memory further, in steps
    of 4) and vocoder windows of 512 mel frames with cross-fades; its length is floor(T·4096·sr/44100).
    `callback(done, total)` runs after each DCAE or vocoder call.
    """
    sample_rate = _check_rate("sample_rate", sample_rate)
    window_frames = _check_window("window_frames", window_frames)
    c = dcae.config.latent_channels
    if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != c or 0 in latents.shape:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a non-empty tensor [batch, {c}, 16, frames], got {shape}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values; the sampler diverged or the input is corrupt")
    param, voc_param = _param(dcae), _param(vocoder)
    frames = latents.shape[-1]
    plan = _plan_windows(frames, window_frames) if overlapped else [(0, frames, 0, frames)]
    vocoder_calls = (
        -(-(frames * FRAMES_PER_LATENT * HOP) // (VOCODER_WINDOW_FRAMES * HOP - 2 * VOCODER_OVERLAP_SAMPLES))
        if overlapped else 1
    )
    total, done = latents.shape[0] * (len(plan) + vocoder_calls), 0

    def step() -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, total)

    waves = []
    with torch.no_grad():
        for z in latents:
            raw = z.unsqueeze(0).to(device=param.device, dtype=param.dtype) / SCALE + SHIFT   # [1, 8, 16, T]
            pieces = []
            for start, end, keep_start, keep_end in plan:
                mel = dcae.decode(raw[..., start:end])                                  # [1, 2, 128, 8·(end−start)]
                pieces.append(mel[..., (keep_start - start) * FRAMES_PER_LATENT:(keep_end - start) * FRAMES_PER_LATENT])
                step()
            mel = denormalise_mel(torch.cat(pieces, dim=-1))[0].to(device=voc_param.device, dtype=voc_param.dtype)
            if overlapped:
                wav = _vocode_overlapped(vocoder, mel, step)                            # [2, ≥ T·4096]
            else:
                # both stereo channels in one vocoder call, as a batch of two mono mels (the official
                # decoder calls it once per channel; each batch item is computed on its own, design §6.3)
                wav = vocoder.decode(mel).squeeze(1)                                    # [2, T·4096]
                step()
            wav = resample(wav.float().to(param.device), SAMPLE_RATE, sample_rate)
            if overlapped:
                wav = wav[..., : frames * SAMPLES_PER_LATENT * sample_rate // SAMPLE_RATE]
            waves.append(wav)
    return torch.stack(waves, dim=0)                                                    # [B, 2, N]
