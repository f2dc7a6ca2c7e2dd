"""Multi-track training data for StemGen and singing-to-accompaniment: song folders, training pairs, the latent
cache and the dataset that crops pairs on the fly (docs/stemgen.md).

Song folder (one per song, anywhere under the dataset root):

    <song>/stems/<name>.wav      one file per stem (any rate, mono or stereo; .wav/.flac/.ogg/.aiff)
    <song>/labels.json           {"<name>": "<instrument label>", ...}; a stem without a label uses its name
    <song>/mix.wav               optional: the full mix (else the sum of the stems)
    <song>/tags.txt              optional: style tags of the song (singing-to-accompaniment prompt)

Pairs (reference → target, tags):
  stemgen                 for every stem s: (mix − s) → s, tags = label of s
  singing2accompaniment   for the vocal stem v: v → (mix − v), tags = tags.txt (else the other stems' labels)
The vocal stem is the one whose name or label contains `vocal_word` ("vocal" by default).

Cache: one safetensors file per song and task, `<cache_dir>/<task>/<sha>.safetensors` with `reference.i`,
`target.i` [8, 16, T] DCAE latents and `text.i` [Lt, Dt], `text_mask.i` [Lt] UMT5 states of pair i; the header
lists each pair's tags and timbre group. The name is the sha256 of the song's file identities, the task, the
vocal word and the checkpoint identity, so edited songs are re-encoded and nothing else is.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..audio import SAMPLE_RATE, encode_audio, resample
from .control import TASKS, timbre_vector

STEMS_DIR = "stems"
LABELS_FILE = "labels.json"
MIX_FILE = "mix.wav"
TAGS_FILE = "tags.txt"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")
CACHE_VERSION = 1
SILENCE_RMS = 1e-4


@dataclass(frozen=True)
class Song:
    """One multi-track song folder."""

    name: str
    folder: Path
    stems: dict[str, Path]
    labels: dict[str, str]
    mix: Path | None
    tags: str


@dataclass(frozen=True)
class PairSpec:
    """How to build one training pair from a song's audio."""

    target: tuple[str, ...]       # stems summed into the target
    tags: str                     # the text prompt
    group: str                    # timbre group: pairs of one group share an instrument


def read_songs(root: str | Path) -> list[Song]:
    """Every song folder (a folder with a stems/ sub-folder) under `root`, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--dataset_path {root} is not a folder of song folders (each with stems/ and labels.json)")
    songs = [_read_song(stems.parent, root) for stems in sorted(root.rglob(STEMS_DIR)) if stems.is_dir()]
    if not songs:
        raise ValueError(f"no song folders under {root}: each song needs a '{STEMS_DIR}/' folder of stem files")
    return songs


def _read_song(folder: Path, root: Path) -> Song:
    """Parse one song folder; ValueError naming the folder and the fix."""
    stems = {p.stem: p for p in sorted((folder / STEMS_DIR).iterdir())
             if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS}
    if not stems:
        raise ValueError(f"song folder {folder} has no audio files in {STEMS_DIR}/ ({', '.join(AUDIO_EXTENSIONS)})")
    labels_path = folder / LABELS_FILE
    labels: dict[str, str] = {}
    if labels_path.is_file():
        try:
            labels = json.loads(labels_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{labels_path} is not valid JSON ({err})") from None
        if not isinstance(labels, dict) or not all(isinstance(v, str) and v.strip() for v in labels.values()):
            raise ValueError(f"{labels_path} must map stem names to instrument labels, e.g. {{\"bass\": \"bass guitar\"}}")
        unknown = sorted(set(labels) - set(stems))
        if unknown:
            raise ValueError(f"{labels_path} labels stems {unknown} that are not in {folder / STEMS_DIR}")
    mix = next((p for p in (folder / MIX_FILE, *(folder / f"mix{e}" for e in AUDIO_EXTENSIONS)) if p.is_file()), None)
    tags_path = folder / TAGS_FILE
    tags = tags_path.read_text(encoding="utf-8").strip() if tags_path.is_file() else ""
    return Song(name=folder.relative_to(root).as_posix() if folder != root else folder.name, folder=folder,
                stems=stems, labels={name: labels.get(name, name).strip() for name in stems}, mix=mix, tags=tags)


def is_vocal(song: Song, stem: str, vocal_word: str) -> bool:
    """Whether a stem is the vocal: its name or label contains `vocal_word` (case-insensitive)."""
    word = vocal_word.lower()
    return word in stem.lower() or word in song.labels[stem].lower()


def song_pairs(song: Song, task: str, vocal_word: str = "vocal") -> list[PairSpec]:
    """The training pairs a song gives for `task` (module docstring)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    names = list(song.stems)
    if task == "stemgen":
        if len(names) < 2 and song.mix is None:
            return []
        return [PairSpec(target=(name,), tags=song.labels[name], group=song.labels[name]) for name in names]
    vocals = [n for n in names if is_vocal(song, n, vocal_word)]
    if not vocals or (len(vocals) == len(names) and song.mix is None):
        return []
    others = tuple(n for n in names if n not in vocals)
    tags = song.tags or ", ".join(song.labels[n] for n in others)
    return [PairSpec(target=others, tags=tags, group=tags)]


def load_audio(path: str | Path) -> Tensor:
    """Stereo float32 [2, L] at 44.1 kHz (mono duplicated, first two channels kept)."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)            # [L, C]
    except Exception as err:
        raise ValueError(f"audio file {path} cannot be read ({err}); convert it to WAV or FLAC") from None
    audio = torch.from_numpy(data.T.copy())
    if audio.shape[0] == 1:
        audio = audio.repeat(2, 1)
    return resample(audio[:2], int(rate), SAMPLE_RATE)


def _padded_sum(waves: Sequence[Tensor], length: int) -> Tensor:
    """Sum of [2, L_i] waves, each right-padded (or cut) to `length`."""
    total = torch.zeros(2, length)
    for wave in waves:
        total[:, : min(length, wave.shape[-1])] += wave[:, :length]
    return total


def pair_audio(song: Song, spec: PairSpec, stems: dict[str, Tensor], mix: Tensor | None) -> tuple[Tensor, Tensor]:
    """(reference, target) waveforms [2, L] of one pair: target = sum of spec.target, reference = mix − target."""
    length = max([w.shape[-1] for w in stems.values()] + ([mix.shape[-1]] if mix is not None else []))
    target = _padded_sum([stems[n] for n in spec.target], length)
    if mix is not None:
        reference = _padded_sum([mix], length) - target
    else:
        reference = _padded_sum([w for n, w in stems.items() if n not in spec.target], length)
    return reference, target


def checkpoint_identity(checkpoint: str | Path) -> list:
    """What the cached latents and text states depend on: the checkpoint's weight files (path, size, mtime)."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        return [str(checkpoint)]
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def cache_path(song: Song, task: str, vocal_word: str, cache_dir: str | Path, checkpoint_id: list) -> Path:
    """The cache file of a song for a task (name = sha256 of everything it depends on)."""
    files = [*song.stems.values(), *([song.mix] if song.mix else []),
             *(p for p in (song.folder / LABELS_FILE, song.folder / TAGS_FILE) if p.is_file())]
    identity = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, task, vocal_word, identity, checkpoint_id]).encode())
    return Path(cache_dir) / task / f"{digest.hexdigest()[:32]}.safetensors"


@dataclass
class Encoders:
    """The frozen models that fill the cache: DCAE with its mel front end, and the UMT5 text encoder."""

    dcae: torch.nn.Module
    mel: torch.nn.Module
    text_encoder: object


def encode_song(song: Song, task: str, vocal_word: str, encoders: Encoders, path: Path) -> int:
    """Encode every pair of a song into `path`; returns the number of pairs (0: nothing written)."""
    from safetensors.torch import save_file

    specs = song_pairs(song, task, vocal_word)
    if not specs:
        return 0
    stems = {name: load_audio(p) for name, p in song.stems.items()}
    mix = load_audio(song.mix) if song.mix is not None else None
    param = next(encoders.dcae.parameters())
    tensors: dict[str, Tensor] = {}
    kept = []
    for spec in specs:
        reference, target = pair_audio(song, spec, stems, mix)
        if target.pow(2).mean().sqrt() < SILENCE_RMS:
            continue
        i = len(kept)
        with torch.no_grad():
            latents = encode_audio(encoders.dcae, encoders.mel, torch.stack([reference, target]).to(param.device),
                                   SAMPLE_RATE)                                              # [2, 8, 16, T]
            states, mask = encoders.text_encoder.encode([spec.tags])                         # [1, Lt, Dt], [1, Lt]
        tensors[f"reference.{i}"], tensors[f"target.{i}"] = latents[0].float().cpu(), latents[1].float().cpu()
        tensors[f"text.{i}"], tensors[f"text_mask.{i}"] = states[0].float().cpu(), mask[0].long().cpu()
        kept.append({"tags": spec.tags, "group": spec.group, "target": list(spec.target)})
    if not kept:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"song": song.name, "pairs": json.dumps(kept)})
    tmp.replace(path)
    return len(kept)


def build_cache(songs: Sequence[Song], task: str, cache_dir: str | Path, checkpoint_id: list,
                encoders: Callable[[], Encoders], *, vocal_word: str = "vocal", rank: int = 0, world_size: int = 1,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Encode this rank's share of the songs whose cache file is missing; returns every song's cache path.

    `encoders()` is called only when something has to be encoded (so a warm cache needs no codec or UMT5).
    """
    paths = [cache_path(song, task, vocal_word, cache_dir, checkpoint_id) for song in songs]
    todo = [(song, path) for i, (song, path) in enumerate(zip(songs, paths))
            if i % world_size == rank and not (path.is_file() or path.with_suffix(".empty").is_file())]
    loaded = encoders() if todo else None
    for done, (song, path) in enumerate(todo, 1):
        if encode_song(song, task, vocal_word, loaded, path) == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".empty").write_text(song.name)
        if progress is not None:
            progress(done, len(todo))
    return paths


def _read_pairs(path: Path) -> list[dict]:
    """The pair list in a cache file's header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["pairs"])


class PairDataset(torch.utils.data.Dataset):
    """Training pairs from cache files, cropped to `max_frames` and given an instrument reference (docs/stemgen.md).

    Item i of epoch e is drawn from `random.Random((seed, e, i))`: a crop offset shared by reference and target,
    and, unless dropped (probability `timbre_dropout`), the timbre vector of the whole target of another pair of
    the same group (another song when there is one).
    """

    def __init__(self, paths: Sequence[Path], *, max_frames: int, timbre_dropout: float = 0.5, seed: int = 0):
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if not 0.0 <= timbre_dropout <= 1.0:
            raise ValueError(f"timbre_dropout must lie in [0, 1], got {timbre_dropout}")
        self.items: list[tuple[Path, int, str]] = []
        for path in paths:
            if path.is_file():
                self.items.extend((path, i, pair["group"]) for i, pair in enumerate(_read_pairs(path)))
        if not self.items:
            raise ValueError("the dataset has no usable pairs (every target stem silent, or no stems to pair)")
        self.groups: dict[str, list[int]] = {}
        for index, (_, _, group) in enumerate(self.items):
            self.groups.setdefault(group, []).append(index)
        self.max_frames = max_frames
        self.timbre_dropout = timbre_dropout
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the crops and timbre references of another epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _tensor(self, index: int, name: str) -> Tensor:
        from safetensors import safe_open

        path, pair, _ = self.items[index]
        with safe_open(str(path), "pt") as handle:
            return handle.get_tensor(f"{name}.{pair}")

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        reference, target = self._tensor(index, "reference"), self._tensor(index, "target")
        frames = target.shape[-1]
        start = rng.randint(0, max(0, frames - self.max_frames))
        stop = start + min(frames, self.max_frames)
        timbre = torch.zeros(target.shape[0] * target.shape[1])
        if rng.random() >= self.timbre_dropout:
            group = self.groups[self.items[index][2]]
            others = [j for j in group if self.items[j][0] != self.items[index][0]] or group
            timbre = timbre_vector(self._tensor(rng.choice(others), "target")[None])[0]
        return {"reference": reference[..., start:stop], "target": target[..., start:stop],
                "text": self._tensor(index, "text"), "text_mask": self._tensor(index, "text_mask"), "timbre": timbre}


@dataclass
class PairBatch:
    """A padded batch of pairs."""

    reference: Tensor     # [B, 8, 16, T]
    target: Tensor        # [B, 8, 16, T]
    frame_mask: Tensor    # [B, T] 1 = real frame
    text: Tensor          # [B, Lt, Dt]
    text_mask: Tensor     # [B, Lt]
    timbre: Tensor        # [B, 128] zeros = no instrument reference

    def to(self, device: torch.device) -> PairBatch:
        """The batch on `device`."""
        return PairBatch(*(t.to(device) for t in (self.reference, self.target, self.frame_mask, self.text,
                                                   self.text_mask, self.timbre)))


def _pad(tensors: Sequence[Tensor]) -> Tensor:
    """Stack along a new batch axis, right-padding the last axis with zeros."""
    length = max(t.shape[-1] for t in tensors)
    return torch.stack([torch.nn.functional.pad(t, (0, length - t.shape[-1])) for t in tensors])


def collate(items: Sequence[dict[str, Tensor]]) -> PairBatch:
    """Pad latents (frame mask) and text states (text mask) to the longest item."""
    frames = [item["target"].shape[-1] for item in items]
    frame_mask = _pad([torch.ones(n) for n in frames])
    texts = _pad([item["text"].T for item in items]).transpose(1, 2)                         # [B, Lt, Dt]
    return PairBatch(reference=_pad([i["reference"] for i in items]), target=_pad([i["target"] for i in items]),
                     frame_mask=frame_mask, text=texts, text_mask=_pad([i["text_mask"] for i in items]),
                     timbre=torch.stack([i["timbre"] for i in items]))
