"""Synthetic multi-track songs (bass, drums, lead) in the StemGen folder format, for tests and smoke runs.

Each song is a bar of `beats` notes at one tempo: the lead plays a sine melody, one note per beat, from
`pitches`; the bass plays the same notes two octaves lower as a band-limited sawtooth; the drums hit a
noise burst (plus a short low thump) on every beat. The bass is therefore predictable from the lead (and the
lead from the bass), and the drums from the note onsets: a StemGen model that listens to the reference can
beat one that only knows the instrument label. `python -m acestep_core.stemgen.synth --out songs --songs 64`
writes a folder of such songs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .dataset import LABELS_FILE, MIX_FILE, STEMS_DIR, TAGS_FILE

LABELS = {"bass": "bass", "drums": "drums", "lead": "lead synth"}


@dataclass(frozen=True)
class SynthSpec:
    """What a synthetic song can contain (docs/stemgen.md, "Testing")."""

    seconds: float = 2.0
    sample_rate: int = 44100
    tempos: tuple[float, ...] = (120.0,)
    pitches: tuple[float, ...] = (261.63, 329.63, 392.0, 523.25)
    bass_harmonics: int = 8

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds!r}")
        if not self.tempos or any(t <= 0 for t in self.tempos):
            raise ValueError(f"tempos must be positive beats per minute, got {self.tempos!r}")
        if not self.pitches or any(p <= 0 or p >= self.sample_rate / 2 for p in self.pitches):
            raise ValueError(f"pitches must be frequencies in (0, {self.sample_rate / 2}) Hz, got {self.pitches!r}")


def _envelope(t: Tensor, decay: float) -> Tensor:
    """5 ms linear attack then exponential decay with time constant `decay` seconds."""
    return torch.clamp(t / 0.005, max=1.0) * torch.exp(-t / decay)


def synth_song(spec: SynthSpec, generator: torch.Generator) -> dict[str, Tensor]:
    """One song's stems {"bass", "drums", "lead"}, each stereo [2, L] float32 at spec.sample_rate."""
    rate = spec.sample_rate
    length = int(spec.seconds * rate)
    t = torch.arange(length, dtype=torch.float64) / rate
    tempo = spec.tempos[int(torch.randint(len(spec.tempos), (1,), generator=generator))]
    beat = 60.0 / tempo
    beats = max(1, math.ceil(spec.seconds / beat))
    notes = torch.randint(len(spec.pitches), (beats,), generator=generator)
    lead, bass, drums = (torch.zeros(length, dtype=torch.float64) for _ in range(3))
    noise = torch.randn(length, generator=generator, dtype=torch.float64)
    for index in range(beats):
        start = int(index * beat * rate)
        local = t[start:] - t[start]
        frequency = spec.pitches[int(notes[index])]
        span = slice(start, min(length, start + int(beat * rate)))
        local = local[: span.stop - span.start]
        lead[span] += 0.35 * torch.sin(2 * math.pi * frequency * local) * _envelope(local, 0.4)
        saw = sum(((-1) ** (k + 1)) / k * torch.sin(2 * math.pi * k * frequency / 4 * local)
                  for k in range(1, spec.bass_harmonics + 1))
        bass[span] += 0.25 * saw * _envelope(local, 0.3)
        thump = torch.sin(2 * math.pi * 60 * local) * _envelope(local, 0.08)
        drums[span] += 0.5 * noise[span] * _envelope(local, 0.03) + 0.4 * thump
    return {name: wave.float()[None].repeat(2, 1) for name, wave in (("bass", bass), ("drums", drums), ("lead", lead))}


def write_song(folder: str | Path, stems: dict[str, Tensor], sample_rate: int, *, labels: dict[str, str] | None = None,
               tags: str = "", with_mix: bool = True) -> Path:
    """Write one song folder: stems/<name>.wav, labels.json, optional mix.wav (sum of stems) and tags.txt."""
    import soundfile

    folder = Path(folder)
    (folder / STEMS_DIR).mkdir(parents=True, exist_ok=True)
    for name, wave in stems.items():
        soundfile.write(str(folder / STEMS_DIR / f"{name}.wav"), wave.T.numpy(), sample_rate, subtype="FLOAT")
    labels = labels if labels is not None else {name: LABELS.get(name, name) for name in stems}
    (folder / LABELS_FILE).write_text(json.dumps(labels, indent=1))
    if with_mix:
        mix = torch.stack(list(stems.values())).sum(0)
        soundfile.write(str(folder / MIX_FILE), mix.T.numpy(), sample_rate, subtype="FLOAT")
    if tags:
        (folder / TAGS_FILE).write_text(tags)
    return folder


def write_dataset(root: str | Path, songs: int, spec: SynthSpec = SynthSpec(), *, seed: int = 0,
                  tags: str = "synth pop, 120 bpm") -> list[Path]:
    """`songs` synthetic song folders song_0000 … under root."""
    generator = torch.Generator().manual_seed(seed)
    return [write_song(Path(root) / f"song_{i:04d}", synth_song(spec, generator), spec.sample_rate, tags=tags)
            for i in range(songs)]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m acestep_core.stemgen.synth --out FOLDER --songs N [--seconds S] [--seed K]`."""
    parser = argparse.ArgumentParser(prog="python -m acestep_core.stemgen.synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the song folders into")
    parser.add_argument("--songs", type=int, default=64, help="number of songs")
    parser.add_argument("--seconds", type=float, default=SynthSpec.seconds, help="length of each song")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    try:
        if args.songs < 1:
            raise ValueError(f"--songs must be >= 1, got {args.songs}")
        written = write_dataset(args.out, args.songs, SynthSpec(seconds=args.seconds), seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} songs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
