"""Songs longer than the 240 s the model was trained on: overlapping windows chained through extend (design §8).

The song is cut into windows of at most `window` frames (≤ MAX_FRAMES). The first is text2music; each next one
is an *extend* of the last `overlap` frames of the previous window (the official repaint/extend loop pins those
frames to the source, so the latent continues exactly and the model hears the music it continues). Every window
gets the lyric sections that fall in it, placed proportionally to their line counts. A window is decoded as
soon as it is sampled (overlapped decode, memory bounded by its chunks); only the overlap latent stays on the
device, the audio is assembled on the CPU.

The overlap frames are decoded twice (end of one window, start of the next) from the *same* latent values, so the
two renderings are coherent and are joined with an equal-gain raised-cosine crossfade (gains sin², cos², summing
to 1): an equal-power fade (sin, cos) suits uncorrelated material and would lift coherent material by up to
3 dB in the middle of the fade. Each rendering is least reliable at its own window edge, which is exactly where its
gain reaches 0.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import tasks
from .audio import resample
from .conditioning import Conditioning
from .fast import decode_with_fallback
from .latent import LATENT_RATE, SAMPLE_RATE, SAMPLES_PER_LATENT, seconds_at
from .latent import frames_covering as frames_for_long
from .lyric_timing import LineTiming, align_lyrics, collect_lyric_attention, to_lrc
from .noise import NoiseSource

CROSSFADES = ("equal_gain", "equal_power")
SECTION_TAG = re.compile(r"\[[^\[\]]*\]")
Decode = Callable[[Tensor], Tensor]
"""Latent window [1, 8, 16, T] → audio [1, C, T·4096] at 44.1 kHz."""
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# windows


@dataclass(frozen=True)
class Window:
    """Latent frames [start, end) of the song; the first `context` of them continue the previous window."""

    start: int
    end: int
    context: int

    @property
    def frames(self) -> int:
        """Length including the context."""
        return self.end - self.start


def plan_windows(total: int, window: int, overlap: int) -> list[Window]:
    """Fewest windows of at most `window` frames, each after the first re-using `overlap` frames of the previous
    one, covering [0, total) with (as nearly as integers allow) equal lengths."""
    for name, value in (("total", total), ("window", window), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "overlap" else 1):
            raise ValueError(f"{name} must be a whole number of latent frames >= {0 if name == 'overlap' else 1}, "
                             f"got {value!r}")
    if window > tasks.MAX_FRAMES:
        raise ValueError(f"window is {window} frames, past the model's {tasks.MAX_FRAMES} (240 s); use a shorter window")
    if total <= window:
        return [Window(0, total, 0)]
    if not 1 <= overlap <= window // 2:
        raise ValueError(f"overlap must be between 1 frame and half the window ({window // 2} frames), got {overlap}")
    count = math.ceil((total - overlap) / (window - overlap))
    base, extra = divmod(total + (count - 1) * overlap, count)                # every window's length incl. context
    windows, start = [], 0
    for i in range(count):
        length = base + (1 if i < extra else 0)
        context = 0 if i == 0 else overlap
        windows.append(Window(start, start + length, context))
        start += length - (overlap if i + 1 < count else 0)
    return windows


# --------------------------------------------------------------------------------------------------
# lyric sections


@dataclass(frozen=True)
class Section:
    """Consecutive lyric lines [first, last) of the text, starting at a structure tag or after a blank line."""

    first: int
    last: int
    sung_lines: int  # non-empty lines that are not a bare tag


def split_sections(lyrics: str) -> list[Section]:
    """Sections of `lyrics`: a line that is only a tag ([verse], [chorus], ...) starts one; without tags, blank
    lines separate them. Leading and trailing blank lines belong to their neighbours."""
    lines = lyrics.split("\n")
    tagged = any(SECTION_TAG.fullmatch(line.strip()) for line in lines)
    starts = [0]
    for i, line in enumerate(lines):
        text = line.strip()
        previous = lines[i - 1].strip() if i else ""
        if i and ((tagged and SECTION_TAG.fullmatch(text)) or (not tagged and text and not previous)):
            starts.append(i)
    starts = sorted(set(starts))
    bounds = list(zip(starts, starts[1:] + [len(lines)]))
    return [Section(a, b, sum(1 for line in lines[a:b] if line.strip() and not SECTION_TAG.fullmatch(line.strip())))
            for a, b in bounds if any(line.strip() for line in lines[a:b])]


def section_spans(sections: Sequence[Section], total: int) -> list[tuple[float, float]]:
    """Frames [start, end) each section is expected to fill: the song shared in proportion to the sections' line
    counts (a tag-only section, e.g. [intro] or [solo], counts as one line)."""
    weights = [max(1, s.sung_lines) for s in sections]
    scale = total / max(1, sum(weights))
    spans, start = [], 0.0
    for w in weights:
        spans.append((start, start + w * scale))
        start += w * scale
    return spans


def assign_sections(sections: Sequence[Section], windows: Sequence[Window], total: int) -> list[list[int]]:
    """Section indices per window: each section goes to every window holding at least half of it (or half of the
    window, for a section longer than the window), else to the window holding most of it."""
    spans = section_spans(sections, total)
    chosen: list[list[int]] = [[] for _ in windows]
    for index, (a, b) in enumerate(spans):
        shares = [max(0.0, min(b, w.end) - max(a, w.start)) for w in windows]
        hits = [i for i, (share, w) in enumerate(zip(shares, windows)) if share >= 0.5 * min(b - a, w.frames) - 1e-9]
        for i in hits or [max(range(len(windows)), key=shares.__getitem__)]:
            chosen[i].append(index)
    return chosen


def window_lyrics(lyrics: str, windows: Sequence[Window], total: int) -> list[list[int]]:
    """Line numbers of `lyrics` each window is given (whole sections, in order); [] means instrumental."""
    sections = split_sections(lyrics)
    if not sections:
        return [[] for _ in windows]
    return [[line for i in picked for line in range(sections[i].first, sections[i].last)]
            for picked in assign_sections(sections, windows, total)]


def conditioning_for(cond: Conditioning, tokenizer, lyrics: str) -> Conditioning:
    """`cond` with other lyrics (text states unchanged): ids as the tokenizer makes them, ([0], [0]) when empty."""
    ids, mask = tokenizer.encode_with_mask(lyrics) if lyrics.strip() else ([0], [0])
    device = cond.lyric_ids.device
    return replace(cond, lyrics=lyrics, lyric_ids=torch.tensor([ids], dtype=torch.long, device=device),
                   lyric_mask=torch.tensor([mask], dtype=torch.long, device=device))


# --------------------------------------------------------------------------------------------------
# audio joins


def crossfade_gains(length: int, law: str = "equal_gain") -> tuple[Tensor, Tensor]:
    """(fade_out, fade_in) [length]: raised cosine cos², sin² (equal gain) or cos, sin (equal power)."""
    if law not in CROSSFADES:
        raise ValueError(f"crossfade must be one of {CROSSFADES}, got {law!r:.200}")
    phase = (torch.arange(length, dtype=torch.float64) + 0.5) / length * (math.pi / 2)
    out, into = torch.cos(phase), torch.sin(phase)
    if law == "equal_gain":
        out, into = out.square(), into.square()
    return out.float(), into.float()


# --------------------------------------------------------------------------------------------------
# generation


@dataclass(frozen=True)
class LongSong:
    """A long generation: audio [1, C, N] (CPU), its rate, the whole latent [1, 8, 16, T] (CPU), the windows, the
    lyrics each window was given and, when timing was collected, every lyric line's timing in the song."""

    waveform: Tensor
    sample_rate: int
    latent: Tensor
    windows: tuple[Window, ...]
    lyrics: tuple[str, ...]
    lines: tuple[LineTiming, ...] | None = None

    def window_plan(self) -> str:
        """The lyrics each window was given, window by window with its time range (instrumental when none)."""
        return "\n\n".join(
            f"# window {i + 1}: {seconds_at(w.start):.1f}-{seconds_at(w.end):.1f} s\n"
            + (text if text.strip() else "(instrumental)")
            for i, (w, text) in enumerate(zip(self.windows, self.lyrics))
        )

    def lrc(self, seconds: float) -> str:
        """The LRC of the whole song when timing was collected, else an empty string."""
        return to_lrc(self.lines, float(seconds)) if self.lines is not None else ""


def generate_long(
    model, cond: Conditioning, seconds: float, *, noise: NoiseSource, window_seconds: float = 240.0,
    overlap_seconds: float = 20.0, options: tasks.SamplerOptions = tasks.SamplerOptions(), sample_rate: int = SAMPLE_RATE,
    crossfade: str = "equal_gain", timing: bool = False, decode: Decode | None = None, callback: Progress | None = None,
) -> LongSong:
    """A song of `seconds` (any length) from windows of `window_seconds` chained by extend over `overlap_seconds`.

    `model` needs .transformer, .lyric_tokenizer and (unless `decode` is given) .dcae and .vocoder. The audio is
    exactly round(seconds·44100) samples at 44.1 kHz (or that resampled to `sample_rate`). `timing` collects the
    lyric cross-attention of every window and returns each line's time in the song. `callback(done, total)`
    counts sampling steps over all windows.
    """
    crossfade_gains(1, crossfade)
    total = frames_for_long(seconds)
    if not 0 < float(window_seconds) <= 240.0:
        raise ValueError(f"window_seconds must be in (0, 240] (the model's training length), got {window_seconds}")
    if not (math.isfinite(float(overlap_seconds)) and overlap_seconds >= 0):
        raise ValueError(f"overlap_seconds must be a number >= 0, got {overlap_seconds}")
    windows = plan_windows(total, tasks.frames_for_seconds(window_seconds), round(float(overlap_seconds) * LATENT_RATE))
    lines = cond.lyrics.split("\n")
    given = window_lyrics(cond.lyrics, windows, total)
    texts = tuple("\n".join(lines[i] for i in picked) for picked in given)
    decode = decode or _decoder(model)
    transformer = model.transformer
    steps, n = options.steps, len(windows)
    audio: Tensor | None = None
    latent = torch.zeros(1, tasks.LATENT_CHANNELS, tasks.LATENT_HEIGHT, total)
    timings: dict[int, LineTiming] = {}
    tail = None
    for index, (w, text, picked) in enumerate(zip(windows, texts, given)):
        window_cond = conditioning_for(cond, model.lyric_tokenizer, text)

        def step(i: int, count: int, x: Tensor, index: int = index) -> None:
            if callback is not None:
                callback(index * steps + min(i + 1, steps), n * steps)

        collect = timing and not window_cond.instrumental
        with torch.no_grad(), _maybe_collect(collect, transformer, window_cond) as collector:
            if w.context == 0:
                z = tasks.text2music(transformer, window_cond, w.frames, options=options, noise=noise, callback=step)
            else:
                z = tasks.extend(transformer, window_cond, tail, 0, w.frames - w.context, variance=1.0,
                                 options=options, noise=noise, callback=step)
            wave = decode(z).detach().to("cpu", torch.float32)[0]                  # [C, frames·4096]
        if collector is not None:
            _merge_timings(timings, collector.result(), model.lyric_tokenizer, picked, w.start)
        tail = z[..., z.shape[-1] - windows[index + 1].context:] if index + 1 < n else None
        latent[..., w.start:w.end] = z.detach().to("cpu", torch.float32)
        del z
        audio = _place(audio, wave, w, total, crossfade)
    audio = audio[:, :round(float(seconds) * SAMPLE_RATE)]
    if sample_rate != SAMPLE_RATE:
        audio = resample(audio, SAMPLE_RATE, sample_rate)
    ordered = tuple(timings[k] for k in sorted(timings)) if timing else None
    return LongSong(audio[None], int(sample_rate), latent, tuple(windows), texts, ordered)


def decode_window(model, z: Tensor) -> Tensor:
    """One window's audio at 44.1 kHz: the overlapped (chunked) decode, with smaller windows on out-of-memory
    (`fast.decode_with_fallback`, the decode of every entry point)."""
    return decode_with_fallback(model.dcae, model.vocoder, z, overlapped=True)


def _decoder(model) -> Decode:
    """The model's overlapped (chunked) decode at 44.1 kHz."""
    return lambda z: decode_window(model, z)


def _maybe_collect(enabled: bool, transformer, cond: Conditioning):
    """collect_lyric_attention when enabled, else a context yielding None."""
    return collect_lyric_attention(transformer, cond) if enabled else nullcontext()


def _place(audio: Tensor | None, wave: Tensor, w: Window, total: int, law: str) -> Tensor:
    """Write one window's audio into the song buffer [C, total·4096], crossfading over its context."""
    if audio is None:
        audio = torch.zeros(wave.shape[0], total * SAMPLES_PER_LATENT)
    a, n = w.start * SAMPLES_PER_LATENT, w.context * SAMPLES_PER_LATENT
    if n:
        fade_out, fade_in = crossfade_gains(n, law)
        audio[:, a:a + n] = audio[:, a:a + n] * fade_out + wave[:, :n] * fade_in
    audio[:, a + n:w.end * SAMPLES_PER_LATENT] = wave[:, n:]
    return audio


def _merge_timings(timings: dict[int, LineTiming], attention, tokenizer, picked: list[int], offset: int) -> None:
    """Add one window's line timings, moved to song time and numbered as lines of the whole lyrics; a line given to
    two windows keeps the timing of the first window that sang it."""
    alignment = align_lyrics(attention, tokenizer)
    shift = offset / LATENT_RATE
    for line in alignment.lines:
        number = picked[line.number]
        moved = replace(line, number=number, start=None if line.start is None else line.start + shift,
                        end=None if line.end is None else line.end + shift)
        if number not in timings or (not timings[number].sung and (moved.sung or moved.score > timings[number].score)):
            timings[number] = moved
