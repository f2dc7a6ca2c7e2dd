"""Encode every training item once (DCAE latent, UMT5 text states, lyric ids, optional REPA features) into
safetensors files under the cache folder, and the dataset that reads them back (design §11).

Files, each named by the sha256 of what it depends on, so a changed input gets a new file and epochs (and later
runs) never re-encode:
  latent/<h>.safetensors  `latent` [8, 16, T] float32; h = (audio file path, size, mtime, DCAE and vocoder
                          weight-file identities). A silent file leaves `latent/<h>.silent` and is skipped.
  cond/<h>.safetensors    `states.j` [Lt_j, Dt] and `mask.j` [Lt_j] for every prompt variant j, `lyric_ids`,
                          `lyric_mask`, `speaker`; h = (UMT5 weights, lyric vocabulary, prompt variants, lyrics,
                          speaker file identity).
  ssl/<h>.safetensors     `feature.i` [T_i, d_i] per REPA projector; h = (audio file identity, extractor cache_id).
Prompt variants: the official loader re-shuffles the tags (or picks a recaption) on every access. The cache
stores all recaptions plus `prompt_shuffles` orderings of the tags (file order first, then seeded permutations),
and training picks among them per item and epoch with the official odds (`dataset.choose_prompt`). Encoders run
in float32 as in the official trainer; after caching only the transformer is needed.
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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..audio import encode_audio
from .dataset import (
    TRAIN_SAMPLE_RATE,
    Record,
    choose_prompt,
    load_speaker_embedding,
    load_training_audio,
    prompt_variants,
    training_lyric_ids,
)
from .objective import Conditions

CACHE_VERSION = 1
SSLExtractor = Callable[[Tensor, int], Sequence[Tensor]]
"""REPA feature extractor: stereo waveform [2, L] at `sample_rate` → one feature tensor [T_i, d_i] per projector.
It may carry a `cache_id` string attribute naming the model (it keys the cache; default: its class name)."""


def file_identity(path: str | Path) -> list:
    """[absolute path, size, mtime_ns]: changes whenever the file is replaced or edited."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _digest(parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, parts], ensure_ascii=False).encode()).hexdigest()[:32]


def checkpoint_ids(checkpoint: str | Path, lyric_vocab: str | Path | None) -> dict[str, list]:
    """Identities of the encoder weight files (and the lyric vocabulary) of a local checkpoint; no weights read."""
    from ..loading import LAYOUTS, detect_layout, folder_sources, resolve_checkpoint
    from ..lyrics import find_lyric_vocab

    components = ("dcae", "vocoder", "text")
    root = resolve_checkpoint(checkpoint, models_dir=None, components=components)
    layout = detect_layout(root, components)
    if layout == "folder":
        files = {c: folder_sources(root, [c])[c].file for c in components}
    else:
        files = {c: root for c in components}
    ids = {c: [*file_identity(files[c]), LAYOUTS[c].prefix] for c in components}
    vocab_dir = root if layout == "folder" else root.parent
    ids["vocab"] = file_identity(find_lyric_vocab(lyric_vocab, vocab_dir))
    return ids


@dataclass(frozen=True)
class CacheEntry:
    """Where one record's encodings live and which prompts its text states hold."""

    record: Record
    latent: Path
    cond: Path
    ssl: Path | None
    prompts: tuple[str, ...]        # recaptions, then tag orderings
    n_recaptions: int

    @property
    def silent_marker(self) -> Path:
        return self.latent.with_suffix(".silent")

    def is_complete(self) -> bool:
        """Every file this entry needs exists (a silent marker counts as a finished latent)."""
        latent_done = self.latent.is_file() or self.silent_marker.is_file()
        return latent_done and self.cond.is_file() and (self.ssl is None or self.ssl.is_file())


def plan_cache(records: Sequence[Record], cache_dir: str | Path, ids: dict[str, list], *, prompt_shuffles: int = 4,
               seed: int = 0, ssl_id: str | None = None) -> list[CacheEntry]:
    """The cache files of every record (nothing is read or encoded here)."""
    root = Path(cache_dir)
    entries = []
    for record in records:
        audio = file_identity(record.filename) if Path(record.filename).is_file() else None
        if audio is None:
            raise ValueError(f"record {record.keys!r}: audio file {record.filename} does not exist")
        recaptions, tag_prompts = prompt_variants(record, prompt_shuffles, seed)
        prompts = tuple(recaptions + tag_prompts)
        speaker = file_identity(record.speaker_emb_path) if record.speaker_emb_path else None
        latent_key = _digest([audio, ids["dcae"], ids["vocoder"]])
        cond_key = _digest([ids["text"], ids["vocab"], prompts, record.norm_lyrics, speaker])
        ssl = root / "ssl" / f"{_digest([audio, ssl_id])}.safetensors" if ssl_id is not None else None
        entries.append(CacheEntry(record, root / "latent" / f"{latent_key}.safetensors",
                                  root / "cond" / f"{cond_key}.safetensors", ssl, prompts, len(recaptions)))
    return entries


def _save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Atomic safetensors write (other ranks may be reading the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


@dataclass
class Encoders:
    """The frozen models that fill the cache (float32): DCAE + mel front end, UMT5, lyric tokenizer, REPA extractor."""

    dcae: torch.nn.Module | None
    mel: torch.nn.Module | None
    text_encoder: object | None
    lyric_tokenizer: object | None
    ssl_extractor: SSLExtractor | None = None

    @classmethod
    def load(cls, checkpoint: str | Path, device: torch.device, lyric_vocab: str | Path | None, *,
             latents: bool = True, conditions: bool = True, ssl_extractor: SSLExtractor | None = None) -> Encoders:
        """The DCAE and vocoder (for its mel front end) when latents are needed, UMT5 and the lyric tokenizer
        when conditions are, all float32 on `device`."""
        from ..loading import load_acestep

        components = (("dcae", "vocoder") if latents else ()) + (("text",) if conditions else ())
        if not components:
            return cls(None, None, None, None, ssl_extractor)
        model = load_acestep(checkpoint, dtype=torch.float32, device=device, components=components,
                             lyric_vocab=lyric_vocab)
        return cls(model.dcae, model.vocoder.mel_transform if latents else None, model.text_encoder,
                   model.lyric_tokenizer if conditions else None, ssl_extractor)


def build_cache(entries: Sequence[CacheEntry], encoders: Encoders, *,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Encode the missing files of `entries` (a rank's share); returns how many entries were encoded."""
    for done, entry in enumerate(entries, 1):
        _encode_entry(entry, encoders)
        if progress is not None:
            progress(done, len(entries))
    return len(entries)


def _encode_entry(entry: CacheEntry, encoders: Encoders) -> None:
    """Write whichever of the entry's latent / cond / ssl files are missing."""
    record = entry.record
    needs_audio = not (entry.latent.is_file() or entry.silent_marker.is_file()) or (
        entry.ssl is not None and not entry.ssl.is_file())
    wav = load_training_audio(record.filename) if needs_audio else None
    if needs_audio and wav is None:
        entry.silent_marker.parent.mkdir(parents=True, exist_ok=True)
        entry.silent_marker.write_text(json.dumps({"filename": record.filename}))
        return
    meta = {"keys": record.keys, "filename": record.filename}
    if not entry.latent.is_file() and not entry.silent_marker.is_file():
        param = next(encoders.dcae.parameters())
        with torch.no_grad():
            latent = encode_audio(encoders.dcae, encoders.mel, wav.to(param.device), TRAIN_SAMPLE_RATE)[0]
        _save({"latent": latent.float()}, entry.latent, meta)
    if not entry.cond.is_file():
        _save(_encode_conditions(entry, encoders), entry.cond, {**meta, "prompts": json.dumps(entry.prompts)})
    if entry.ssl is not None and not entry.ssl.is_file():
        if encoders.ssl_extractor is None:
            raise ValueError("REPA features are missing from the cache and no feature extractor was given")
        with torch.no_grad():
            features = encoders.ssl_extractor(wav, TRAIN_SAMPLE_RATE)
        _save({f"feature.{i}": f.float() for i, f in enumerate(features)}, entry.ssl, meta)


def _encode_conditions(entry: CacheEntry, encoders: Encoders) -> dict[str, Tensor]:
    """UMT5 states of every prompt variant (each trimmed to its own length), lyric ids/mask and speaker."""
    states, mask = encoders.text_encoder.encode(list(entry.prompts))                   # [V, L, Dt], [V, L]
    tensors = {}
    for j in range(len(entry.prompts)):
        length = int(mask[j].sum())
        tensors[f"states.{j}"] = states[j, :length].float()
        tensors[f"mask.{j}"] = mask[j, :length].long()
    ids, lyric_mask = training_lyric_ids(encoders.lyric_tokenizer, entry.record.norm_lyrics)
    tensors["lyric_ids"] = torch.tensor(ids, dtype=torch.long)
    tensors["lyric_mask"] = torch.tensor(lyric_mask, dtype=torch.long)
    tensors["speaker"] = load_speaker_embedding(entry.record.speaker_emb_path)
    return tensors


def usable_entries(entries: Sequence[CacheEntry]) -> list[CacheEntry]:
    """Complete, non-silent entries; a ValueError names the incomplete ones."""
    incomplete = [e.record.keys for e in entries if not e.is_complete()]
    if incomplete:
        raise ValueError(f"the cache lacks {len(incomplete)} item(s) ({', '.join(incomplete[:5])}); build it first")
    return [e for e in entries if e.latent.is_file()]


class CachedDataset(torch.utils.data.Dataset):
    """Cached items; the prompt variant of item i in epoch e is a seeded draw, so it does not depend on workers."""

    def __init__(self, entries: Sequence[CacheEntry], *, seed: int = 0, with_ssl: bool = False):
        self.entries = list(entries)
        self.seed = seed
        self.with_ssl = with_ssl
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose prompt draws __getitem__ uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def prompt_index(self, index: int) -> int:
        """The prompt variant of item `index` in the current epoch (official odds, design §11)."""
        entry = self.entries[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        return choose_prompt(entry.n_recaptions, len(entry.prompts) - entry.n_recaptions, rng)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        variant = self.prompt_index(index)
        with safe_open(str(entry.latent), framework="pt") as f:
            latent = f.get_tensor("latent")
        with safe_open(str(entry.cond), framework="pt") as f:
            item = {name: f.get_tensor(name) for name in ("lyric_ids", "lyric_mask", "speaker")}
            item["text_states"] = f.get_tensor(f"states.{variant}")
            item["text_mask"] = f.get_tensor(f"mask.{variant}")
        item.update(latent=latent, index=index, prompt=entry.prompts[variant])
        if self.with_ssl:
            with safe_open(str(entry.ssl), framework="pt") as f:
                item["ssl"] = [f.get_tensor(f"feature.{i}") for i in range(len(list(f.keys())))]
        return item


@dataclass
class Batch:
    """A padded batch: latents [B,8,16,T] with frame_mask [B,T], conditions, REPA targets [projector][item]."""

    latents: Tensor
    frame_mask: Tensor
    cond: Conditions
    ssl: list[list[Tensor]] | None
    indices: list[int]
    prompts: list[str]

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`."""
        c = self.cond
        cond = Conditions(*(t.to(device, non_blocking=True) for t in (c.text_states, c.text_mask, c.speaker,
                                                                      c.lyric_ids, c.lyric_mask)))
        ssl = [[t.to(device) for t in per] for per in self.ssl] if self.ssl is not None else None
        return Batch(self.latents.to(device, non_blocking=True), self.frame_mask.to(device), cond, ssl,
                     self.indices, self.prompts)


def _pad_stack(tensors: Sequence[Tensor]) -> Tensor:
    """Right-pad the first dimension with zeros and stack."""
    length = max(t.shape[0] for t in tensors)
    return torch.stack([torch.nn.functional.pad(t, (0, 0) * (t.ndim - 1) + (0, length - t.shape[0])) for t in tensors])


def collate(items: Sequence[dict]) -> Batch:
    """Pad latents (frame mask marks real frames), text states/masks and lyric ids/masks with zeros (design §11)."""
    frames = [item["latent"].shape[-1] for item in items]
    latents = _pad_stack([item["latent"].permute(2, 0, 1) for item in items]).permute(0, 2, 3, 1)  # [B, C, H, T]
    frame_mask = (torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]).float()          # [B, T]
    cond = Conditions(
        text_states=_pad_stack([item["text_states"] for item in items]),
        text_mask=_pad_stack([item["text_mask"] for item in items]),
        speaker=torch.stack([item["speaker"] for item in items]),
        lyric_ids=_pad_stack([item["lyric_ids"] for item in items]),
        lyric_mask=_pad_stack([item["lyric_mask"] for item in items]),
    )
    ssl = None
    if "ssl" in items[0]:
        ssl = [[item["ssl"][i] for item in items] for i in range(len(items[0]["ssl"]))]
    return Batch(latents.contiguous(), frame_mask, cond, ssl, [item["index"] for item in items],
                 [item["prompt"] for item in items])
