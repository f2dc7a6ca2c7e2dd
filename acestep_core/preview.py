"""Preview images of audio and ACE-Step latents: log-mel spectrogram, waveform envelope, latent channels, time axis.

Pure image math on CPU tensors; an image is float RGB [H, W, 3] in 0..1 (ComfyUI's IMAGE item layout). Every panel
shares one time scale, so an audio panel and the latent encoded from it line up, and a highlighted region (e.g. a
repaint region) is drawn across all panels. `png_bytes` encodes an image with the standard library only.
"""
from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .latent import LATENT_RATE
from .models.vocoder import slaney_mel_filterbank

if TYPE_CHECKING:
    from .lyric_timing import Alignment

Region = tuple[float, float]
"""A time region (start, end) in seconds, end > start."""

BACKGROUND = (0.07, 0.07, 0.08)
SEPARATOR = (0.22, 0.22, 0.25)
AXIS_TEXT = (0.80, 0.80, 0.82)
ENVELOPE_PEAK = (0.33, 0.58, 0.78)
ENVELOPE_RMS = (0.62, 0.84, 0.98)
HIGHLIGHT = (1.0, 0.93, 0.35)
HIGHLIGHT_ALPHA = 0.28
# Colour stops of the spectrogram map (dark violet -> magenta -> orange -> pale yellow), evenly spaced on 0..1.
SPECTRUM_STOPS = (
    (0.00, 0.00, 0.02), (0.20, 0.06, 0.40), (0.55, 0.12, 0.50), (0.86, 0.30, 0.36), (0.98, 0.62, 0.24),
    (0.99, 0.95, 0.70),
)
# Diverging stops of the latent map: -1 blue, 0 near black, +1 orange.
LATENT_STOPS = ((0.35, 0.70, 1.00), (0.12, 0.32, 0.65), (0.06, 0.06, 0.07), (0.70, 0.35, 0.10), (1.00, 0.78, 0.40))
POWER_FLOOR = 1e-12
SILENCE_DB = -120.0
"""Power floor (-120 dB): silence maps to the bottom of the colour map, never to its top."""
LATENT_QUANTILE = 0.99
NICE_STEPS = (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
GLYPH_ROWS = 5
# 3x5 bitmap glyphs of the axis labels, one string of 5 rows per character.
GLYPHS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"), "s": ("011", "100", "010", "001", "110"),
}


@dataclass(frozen=True)
class PreviewConfig:
    """Image layout and spectrogram settings."""

    width: int = 1024
    spectrogram_height: int = 256
    envelope_height: int = 64
    latent_row_pixels: int = 2
    n_fft: int = 2048
    n_mels: int = 128
    f_min: float = 40.0
    f_max: float = 16000.0
    top_db: float = 80.0
    font_scale: int = 2
    gap: int = 2

    def __post_init__(self) -> None:
        for name in ("width", "spectrogram_height", "envelope_height", "latent_row_pixels", "n_fft", "n_mels",
                     "font_scale", "gap"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PreviewConfig.{name} must be a positive int, got {value!r}")
        if self.width < 64 or self.spectrogram_height < 16 or self.envelope_height < 8:
            raise ValueError(
                f"preview too small: width {self.width} (min 64), spectrogram_height {self.spectrogram_height} "
                f"(min 16), envelope_height {self.envelope_height} (min 8)"
            )
        if not 0 <= self.f_min < self.f_max:
            raise ValueError(f"PreviewConfig needs 0 <= f_min < f_max, got f_min={self.f_min}, f_max={self.f_max}")
        if not self.top_db > 0:
            raise ValueError(f"PreviewConfig.top_db must be > 0, got {self.top_db}")

    @property
    def axis_height(self) -> int:
        """Tick marks plus one line of labels."""
        return (GLYPH_ROWS + 4) * self.font_scale


# ---------------------------------------------------------------------------------------------------------------
# colour and geometry


def colormap(values: Tensor, stops: Sequence[tuple[float, float, float]]) -> Tensor:
    """Values in 0..1 [...] -> RGB [..., 3] by linear interpolation between evenly spaced colour stops."""
    table = torch.tensor(stops, dtype=torch.float32)                                  # [S, 3]
    position = values.float().clamp(0, 1) * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)
    frac = (position - low).unsqueeze(-1)
    return table[low] * (1 - frac) + table[low + 1] * frac


def filled(height: int, width: int, colour: tuple[float, float, float]) -> Tensor:
    """A [height, width, 3] image of one colour."""
    return torch.tensor(colour, dtype=torch.float32).expand(height, width, 3).clone()


def column_times(duration: float, width: int) -> Tensor:
    """Centre time in seconds of each of `width` columns spanning `duration` seconds, [W]."""
    return (torch.arange(width, dtype=torch.float64) + 0.5) * (duration / width)


def column_of(seconds: float, duration: float, width: int) -> int:
    """The column boundary nearest to a time (0..width)."""
    return int(min(max(round(seconds / duration * width), 0), width))


# ---------------------------------------------------------------------------------------------------------------
# audio panels


def mix_down(waveform: Tensor) -> Tensor:
    """One item's audio [C, N] (or [N]) -> mono float32 [N] (mean of the channels)."""
    if waveform.ndim == 1:
        return waveform.float()
    if waveform.ndim != 2:
        raise ValueError(f"audio item must be [channels, samples], got shape {tuple(waveform.shape)}")
    return waveform.float().mean(dim=0)


def mel_power(mono: Tensor, sample_rate: int, hop: int, config: PreviewConfig) -> Tensor:
    """Mel power spectrogram [n_mels, frames] of mono audio; frame k is centred on sample k·hop."""
    window = torch.hann_window(config.n_fft)
    spec = torch.stft(mono, config.n_fft, hop_length=hop, window=window, center=True, pad_mode="constant",
                      return_complex=True)                                             # [n_fft/2+1, frames]
    power = spec.abs().pow(2) / window.sum().pow(2)
    f_max = min(config.f_max, sample_rate / 2)
    f_min = min(config.f_min, f_max / 2)
    fb = slaney_mel_filterbank(config.n_fft // 2 + 1, f_min, f_max, config.n_mels, sample_rate)  # [freqs, mels]
    return fb.T @ power                                                                # [n_mels, frames]


def to_decibels(power: Tensor, top_db: float) -> Tensor:
    """Power -> 0..1 over the `top_db` below the loudest value (never above SILENCE_DB + top_db)."""
    db = 10 * torch.log10(power.clamp(min=POWER_FLOOR))
    ref = max(float(db.max()), SILENCE_DB + top_db)
    return ((db - (ref - top_db)) / top_db).clamp(0, 1)


def column_bounds(count: int, step: int, sample_rate: int, duration: float, width: int) -> Tensor:
    """Element ranges per column [W + 1]: column c holds elements bounds[c]..bounds[c+1]-1.

    Element k sits at sample k·step; the `width` columns split `duration` seconds evenly.
    """
    span = max(round(duration * sample_rate), 1)
    first_sample = torch.div(torch.arange(width + 1, dtype=torch.int64) * span + width - 1, width,
                             rounding_mode="floor")                                   # ceil(c·span / W)
    return torch.div(first_sample + step - 1, step, rounding_mode="floor").clamp(max=count)


def pool_columns(values: Tensor, bounds: Tensor, reduce: str) -> tuple[Tensor, Tensor]:
    """Reduce `values` [R, K] over each column's element range: ([R, W] "mean" / "amax" / "amin", filled [W])."""
    start, stop = bounds[:-1], bounds[1:]
    size = stop - start
    hit = size > 0
    if reduce == "mean":
        total = F.pad(values.double().cumsum(dim=1), (1, 0))                          # [R, K + 1]
        out = (total[:, stop] - total[:, start]) / size.clamp(min=1)
        return out.to(values.dtype), hit
    longest = max(int(size.max()), 1)
    index = (start[:, None] + torch.arange(longest)).clamp(max=(stop - 1).clamp(min=0)[:, None])  # [W, longest]
    index = index.clamp(0, max(values.shape[1] - 1, 0))
    gathered = values[:, index]                                                        # [R, W, longest]
    out = gathered.amax(dim=2) if reduce == "amax" else gathered.amin(dim=2)
    return out, hit


def spectrogram_panel(mono: Tensor, sample_rate: int, duration: float, config: PreviewConfig) -> Tensor:
    """Log-mel spectrogram [spectrogram_height, width, 3], low frequencies at the bottom, time on `duration` s."""
    width, height = config.width, config.spectrogram_height
    hop = int(min(max(duration * sample_rate / width, 1), config.n_fft))                # >= 1 frame per column
    power = mel_power(mono, sample_rate, hop, config)                                  # [n_mels, frames]
    frames = -(-mono.shape[0] // hop)                                                  # frames centred in the audio
    bounds = column_bounds(frames, hop, sample_rate, duration, width)
    pooled, hit = pool_columns(power[:, :frames], bounds, "mean")                      # [n_mels, W]
    level = to_decibels(pooled.float(), config.top_db)
    level = F.interpolate(level[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    image = colormap(level.flip(0), SPECTRUM_STOPS)                                    # [H, W, 3]
    image[:, ~hit] = torch.tensor(BACKGROUND)
    return image


def envelope_panel(waveform: Tensor, sample_rate: int, duration: float, config: PreviewConfig) -> Tensor:
    """Waveform envelope strip [envelope_height, width, 3]: peak band (all channels) and RMS band (mono mix)."""
    width, height = config.width, config.envelope_height
    audio = waveform.float() if waveform.ndim == 2 else waveform.float()[None]         # [C, N]
    bounds = column_bounds(audio.shape[-1], 1, sample_rate, duration, width)
    top, hit = pool_columns(audio.amax(dim=0, keepdim=True), bounds, "amax")
    bottom, _ = pool_columns(audio.amin(dim=0, keepdim=True), bounds, "amin")
    mean_square, _ = pool_columns(mix_down(audio).pow(2)[None], bounds, "mean")
    rms = mean_square[0].clamp(min=0).sqrt()

    def row(value: Tensor) -> Tensor:                                                   # amplitude -> pixel row
        return (1 - value.clamp(-1, 1)) / 2 * (height - 1)

    rows = torch.arange(height, dtype=torch.float32)[:, None]                          # [H, 1]
    peak = (rows >= row(top[0]).floor()) & (rows <= row(bottom[0]).ceil())             # [H, W]
    band = (rows >= row(rms).floor()) & (rows <= row(-rms).ceil())
    image = filled(height, width, BACKGROUND)
    image[peak & hit] = torch.tensor(ENVELOPE_PEAK)
    image[band & hit] = torch.tensor(ENVELOPE_RMS)
    return image


# ---------------------------------------------------------------------------------------------------------------
# latent panel


def latent_panel(samples: Tensor, duration: float, config: PreviewConfig) -> Tensor:
    """One latent [8, 16, T] as a strip: channel c in rows c·16..c·16+15, each scaled by its 99th abs percentile."""
    if samples.ndim != 3:
        raise ValueError(f"latent item must be [channels, height, frames], got shape {tuple(samples.shape)}")
    channels, rows, frames = samples.shape
    values = samples.float()
    scale = torch.quantile(values.abs().reshape(channels, -1), LATENT_QUANTILE, dim=1).clamp(min=1e-6)
    values = (values / scale[:, None, None]).clamp(-1, 1).reshape(channels * rows, frames)  # [8·16, T]
    frame = (column_times(duration, config.width) * LATENT_RATE).floor().long()        # [W]
    inside = frame < frames
    columns = values[:, frame.clamp(max=frames - 1)]                                   # [8·16, W]
    image = colormap((columns + 1) / 2, LATENT_STOPS)
    image[:, ~inside] = torch.tensor(BACKGROUND)
    image = image.repeat_interleave(config.latent_row_pixels, dim=0)
    image[torch.arange(1, channels) * rows * config.latent_row_pixels] = torch.tensor(SEPARATOR)
    return image


# ---------------------------------------------------------------------------------------------------------------
# time axis


def tick_step(duration: float, width: int, label_pixels: int) -> float:
    """The smallest nice step (seconds) whose labels fit, with a gap, between two ticks."""
    for step in NICE_STEPS:
        if step / duration * width >= label_pixels * 1.5:
            return step
    return NICE_STEPS[-1] * math.ceil(duration / NICE_STEPS[-1] / 4)


def label_text(seconds: float, step: float) -> str:
    """'12s' or '0.5s' (one decimal where the step needs it)."""
    text = f"{seconds:.0f}" if step >= 1 else f"{seconds:.2f}".rstrip("0").rstrip(".")
    return text + "s"


def draw_text(image: Tensor, text: str, top: int, left: int, scale: int, colour: tuple[float, float, float]) -> None:
    """Draw `text` (digits, '.', 's') with the 3x5 glyphs, clipped to the image, in place."""
    bitmap = torch.cat([torch.tensor([[c == "1" for c in row] + [False] for row in GLYPHS[ch]]) for ch in text], 1)
    bitmap = bitmap.repeat_interleave(scale, 0).repeat_interleave(scale, 1)            # [5·s, 4·len·s]
    height = min(bitmap.shape[0], image.shape[0] - top)
    width = min(bitmap.shape[1], image.shape[1] - left)
    if height <= 0 or width <= 0:
        return
    target = image[top:top + height, left:left + width]
    target[bitmap[:height, :width]] = torch.tensor(colour)


def axis_panel(duration: float, config: PreviewConfig) -> Tensor:
    """Tick marks and second labels [axis_height, width, 3] for `duration` seconds."""
    scale, width = config.font_scale, config.width
    image = filled(config.axis_height, width, BACKGROUND)
    longest = len(label_text(duration, 0.1)) * 4 * scale
    step = tick_step(duration, width, longest)
    for index in range(int(duration / step + 1e-9) + 1):
        seconds = index * step
        x = min(column_of(seconds, duration, width), width - 1)
        image[: 2 * scale, x] = torch.tensor(AXIS_TEXT)
        text = label_text(seconds, step)
        left = min(max(x - len(text) * 2 * scale, 0), width - len(text) * 4 * scale)
        draw_text(image, text, 3 * scale, left, scale, AXIS_TEXT)
    return image


# ---------------------------------------------------------------------------------------------------------------
# composition


def highlight(image: Tensor, regions: Sequence[Region], duration: float) -> Tensor:
    """A copy of `image` [H, W, 3] with each region tinted and its first and last columns drawn as lines."""
    out = image.clone()
    width = image.shape[1]
    colour = torch.tensor(HIGHLIGHT)
    for start, end in regions:
        left, right = column_of(start, duration, width), column_of(end, duration, width)
        if right <= left:
            continue
        out[:, left:right] = out[:, left:right] * (1 - HIGHLIGHT_ALPHA) + colour * HIGHLIGHT_ALPHA
        out[:, left] = colour
        out[:, right - 1] = colour
    return out


def render(
    waveform: Tensor | None = None,
    sample_rate: int | None = None,
    latent: Tensor | None = None,
    regions: Sequence[Region] = (),
    config: PreviewConfig = PreviewConfig(),
) -> Tensor:
    """One preview image [H, W, 3] in 0..1 of an audio item [C, N] and/or a latent item [8, 16, T], time axis below."""
    if waveform is None and latent is None:
        raise ValueError("nothing to preview: give audio, a latent, or both")
    durations = []
    if waveform is not None:
        if sample_rate is None or int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be a positive int with audio, got {sample_rate!r}")
        if waveform.shape[-1] == 0 or not torch.isfinite(waveform).all():
            raise ValueError("audio to preview must be non-empty and finite (no NaN or infinite samples)")
        durations.append(waveform.shape[-1] / int(sample_rate))
    if latent is not None:
        durations.append(latent.shape[-1] / LATENT_RATE)
    duration = max(durations)
    for start, end in regions:
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
            raise ValueError(f"region ({start}, {end}) must satisfy 0 <= start < end seconds")
    gap = filled(config.gap, config.width, SEPARATOR)
    panels = []
    if waveform is not None:
        panels += [spectrogram_panel(mix_down(waveform), int(sample_rate), duration, config), gap,
                   envelope_panel(waveform, int(sample_rate), duration, config)]
    if latent is not None:
        if panels:
            panels.append(gap)
        panels.append(latent_panel(latent, duration, config))
    body = highlight(torch.cat(panels), regions, duration)
    return torch.cat([body, gap, axis_panel(duration, config)]).clamp(0, 1)


def mask_regions(mask: Tensor, frames: int) -> list[Region]:
    """Runs of a time mask ([..., L], > 0.5 = inside), resized to `frames` latent frames, as regions in seconds."""
    if mask.numel() == 0 or frames < 1:
        return []
    line = mask.float().reshape(-1, mask.shape[-1]).mean(dim=0)                        # [L]
    line = F.interpolate(line[None, None], size=frames, mode="nearest")[0, 0] > 0.5      # [frames]
    edges = torch.diff(F.pad(line.int(), (1, 1))).nonzero().flatten().tolist()          # alternating start, end
    return [(s / LATENT_RATE, e / LATENT_RATE) for s, e in zip(edges[::2], edges[1::2])]


def png_bytes(image: Tensor) -> bytes:
    """An RGB [H, W, 3] image in 0..1 encoded as an 8-bit PNG (standard library zlib only)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [height, width, 3], got shape {tuple(image.shape)}")
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    height, width, _ = pixels.shape
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.reshape(height, width * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6))
            + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------
# lyric timing: the attention picture of an Alignment (acestep_core.lyric_timing)


HEAT = torch.tensor([[0.0, 0.0, 0.02], [0.28, 0.05, 0.45], [0.80, 0.22, 0.30], [0.98, 0.60, 0.15], [1.0, 0.98, 0.75]])
"""A dark-to-bright colour ramp (black, purple, red, orange, pale yellow) for the attention picture."""
SUNG, UNSUNG, SECTION = torch.tensor([0.25, 0.85, 0.35]), torch.tensor([0.95, 0.25, 0.2]), torch.tensor([0.35, 0.6, 1.0])
STRIP, GRID = 0.12, 0.55


def _colour(values: Tensor) -> Tensor:
    """[H, W] in 0..1 → [H, W, 3] along HEAT."""
    pos = values.clamp(0, 1) * (HEAT.shape[0] - 1)
    low = pos.floor().long().clamp(max=HEAT.shape[0] - 2)
    frac = (pos - low)[..., None]
    return HEAT[low] * (1 - frac) + HEAT[low + 1] * frac


def draw_alignment(alignment: Alignment, *, width: int | None = None, height: int = 320) -> Tensor:
    """Picture [1, H, W, 3] float 0..1 (ComfyUI IMAGE): the attention (lyric tokens top to bottom, time left to
    right) with the token path in white; below it one bar per lyric line (green sung, red not sung), a blue tick
    where a section tag's section starts, and a grid tick every 10 s (long every minute)."""
    probabilities = torch.from_numpy(alignment.probabilities).T                  # [Ll, T]
    tokens, frames = probabilities.shape
    width = int(width or min(max(frames, 512), 2048))
    if width < 16 or height < 64:
        raise ValueError(f"the picture needs width >= 16 and height >= 64, got {width}x{height}")
    strip = max(12, height // 10)
    top = height - strip
    heat = F.adaptive_max_pool2d(probabilities[None, None].sqrt(), (top, width))[0, 0]
    image = torch.full((height, width, 3), STRIP)
    image[:top] = _colour(heat / heat.max().clamp_min(1e-12))
    columns = torch.arange(width)
    column_frames = (columns * frames // width).clamp(max=frames - 1)
    rows = (torch.from_numpy(alignment.path)[column_frames] * top // tokens).clamp(max=top - 2)
    image[rows, columns] = 1.0
    image[rows + 1, columns] = 1.0

    def x_of(seconds: float) -> int:
        return min(width - 1, int(seconds * alignment.frame_rate * width / frames))

    bar = slice(top + 3, height - 3)
    for line in alignment.lines:
        if line.kind == "lyric":
            a = x_of(line.start)
            image[bar, a:max(a + 1, x_of(line.end))] = SUNG if line.sung else UNSUNG
    for i, line in enumerate(alignment.lines):
        later = [n.start for n in alignment.lines[i:] if n.kind == "lyric"]
        if line.kind == "structure" and later:
            x = x_of(later[0])
            image[top:, max(0, x - 1):x + 1] = SECTION
    for second in range(10, int(alignment.duration) + 1, 10):
        image[top:top + (strip if second % 60 == 0 else 3), x_of(second)] = GRID
    return image[None]
