"""Training data of ACE-Step v1: the official record format, where records come from, audio loading and the
prompt/lyric preparation of the official `Text2MusicDataset` (design §11).

A record has the keys of the official Hugging Face dataset written by `convert2hf_dataset.py`: `keys` (name),
`filename` (audio path), `tags` (list of prompt tags), `speaker_emb_path` ("" = zeros), `norm_lyrics` and
`recaption` (dict of alternative captions: simplified, expanded, descriptive, use_cases, analysis, ...).
Records are read from (a) a Hugging Face dataset saved with `save_to_disk` (needs the optional `datasets`
package), (b) a records JSONL file (one record per line, relative filenames resolved from the file's folder, as
written by `python -m acestep_core.train.convert`), or (c) a plain folder of audio files with official sidecars
`name_prompt.txt` (tags separated by ", ") and `name_lyrics.txt`, or a `name.json` record.

Audio (official `get_audio`): read with soundfile, mono duplicated to stereo, first two channels kept, resampled
to 48 kHz, clamped to ±1, right-padded to 3 s, dropped when more than 95 % of the samples are exactly 0, cropped
to 240 s. Lyric ids follow the inference tokenizer (`LyricTokenizer.encode`, what the model sees when generating)
rather than the official training-time language segmentation, with the training conventions: lyrics matching
"write a .* song that genre is" or blank give ids [0] with mask [1]; at most 4096 ids.
"""
from __future__ import annotations

import json
import random
import re
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..audio import resample

TRAIN_SAMPLE_RATE = 48000
"""The official loader brings every file to 48 kHz; the DCAE encode resamples it to 44.1 kHz (design §11)."""
MIN_SECONDS = 3
MAX_SECONDS = 240
SILENT_FRACTION = 0.95
MAX_PROMPT_CHARS = 256
MAX_LYRIC_TOKENS = 4096
SPEAKER_DIM = 512
AUDIO_EXTENSIONS = (".mp3", ".flac", ".wav", ".ogg", ".opus", ".aiff", ".aif")
PROMPT_SUFFIX = "_prompt.txt"
LYRICS_SUFFIX = "_lyrics.txt"
RECAPTION_KEYS = ("simplified", "expanded", "descriptive", "use_cases", "analysis")
_NO_LYRICS = re.compile(r"write a .* song that genre is")


@dataclass(frozen=True)
class Record:
    """One training item in the official dataset format (design §11)."""

    keys: str
    filename: str
    tags: tuple[str, ...]
    speaker_emb_path: str = ""
    norm_lyrics: str = ""
    recaption: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, item: Mapping, base_dir: Path | None = None, source: str = "record") -> Record:
        """Check the official keys and types; a relative filename is resolved from `base_dir`."""
        if not isinstance(item, Mapping):
            raise ValueError(f"{source} must be an object with keys/filename/tags/..., got {type(item).__name__}")
        missing = [k for k in ("filename", "tags") if k not in item]
        if missing:
            raise ValueError(f"{source} lacks {missing}; a record needs at least 'filename' and 'tags'")
        tags = item["tags"]
        if isinstance(tags, str):
            tags = tags.split(", ")
        if not isinstance(tags, Sequence) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{source}: 'tags' must be a list of strings (or one string split on ', '), got {tags!r:.80}")
        recaption = item.get("recaption") or {}
        if not isinstance(recaption, Mapping):
            raise ValueError(f"{source}: 'recaption' must be an object of caption strings, got {type(recaption).__name__}")
        filename = Path(str(item["filename"])).expanduser()
        if base_dir is not None and not filename.is_absolute():
            filename = base_dir / filename
        lyrics = item.get("norm_lyrics", item.get("lyrics", ""))
        if not isinstance(lyrics, str):
            raise ValueError(f"{source}: 'norm_lyrics' must be text, got {type(lyrics).__name__}")
        return cls(
            keys=str(item.get("keys") or filename.stem),
            filename=str(filename),
            tags=tuple(t.strip() for t in tags if t.strip()),
            speaker_emb_path=str(item.get("speaker_emb_path") or ""),
            norm_lyrics=lyrics,
            recaption={str(k): v for k, v in recaption.items() if isinstance(v, str)},
        )

    def to_json(self) -> dict:
        """The record as a JSON object with the official keys."""
        return {"keys": self.keys, "filename": self.filename, "tags": list(self.tags),
                "speaker_emb_path": self.speaker_emb_path, "norm_lyrics": self.norm_lyrics,
                "recaption": dict(self.recaption)}


def read_records(path: str | Path) -> list[Record]:
    """Records from a HF dataset folder, a .jsonl file or a folder of audio files with sidecars (design §11)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise ValueError(f"--dataset_path {path}: expected a .jsonl records file, a saved HF dataset or an audio folder")
        records = records_from_jsonl(path)
    elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        records = records_from_hf(path)
    elif path.is_dir():
        records = records_from_folder(path)
    else:
        raise ValueError(f"--dataset_path {path} does not exist")
    if not records:
        raise ValueError(f"--dataset_path {path} holds no training records (audio files need a {PROMPT_SUFFIX} or .json sidecar)")
    return records


def records_from_jsonl(path: Path) -> list[Record]:
    """One record per non-empty line; filenames relative to the file's folder."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not a JSON object ({err})") from None
        records.append(Record.from_mapping(item, path.parent, f"{path}:{number}"))
    return records


def records_from_hf(path: Path) -> list[Record]:
    """A Hugging Face dataset saved with save_to_disk (official convert2hf_dataset.py output)."""
    try:
        from datasets import load_from_disk
    except ImportError:
        raise ValueError(
            f"{path} is a Hugging Face dataset folder, which needs the optional 'datasets' package "
            "(pip install datasets); or convert the audio folder to JSONL with python -m acestep_core.train.convert"
        ) from None
    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):
        if "train" not in dataset:
            raise ValueError(f"{path} is a DatasetDict without a 'train' split (splits: {list(dataset.keys())})")
        dataset = dataset["train"]
    return [Record.from_mapping(item, None, f"{path}[{i}]") for i, item in enumerate(dataset)]


def records_from_folder(folder: Path) -> list[Record]:
    """Audio files with `name_prompt.txt` / `name_lyrics.txt` sidecars (official naming) or a `name.json` record."""
    records, skipped = [], []
    for audio in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        sidecar_json = _sidecar(audio, ".json")
        prompt_file = _sidecar(audio, PROMPT_SUFFIX)
        if sidecar_json.is_file():
            item = json.loads(sidecar_json.read_text(encoding="utf-8"))
            item = {**item, "filename": str(audio), "keys": item.get("keys") or audio.stem}
            records.append(Record.from_mapping(item, None, str(sidecar_json)))
        elif prompt_file.is_file():
            lyrics_file = _sidecar(audio, LYRICS_SUFFIX)
            lyrics = lyrics_file.read_text(encoding="utf-8").strip() if lyrics_file.is_file() else ""
            prompt = prompt_file.read_text(encoding="utf-8").strip()
            records.append(Record.from_mapping(
                {"keys": audio.stem, "filename": str(audio), "tags": prompt.split(", "), "norm_lyrics": lyrics},
                None, str(prompt_file)))
        else:
            skipped.append(audio.name)
    if skipped:
        warnings.warn(f"{folder}: {len(skipped)} audio file(s) without a {PROMPT_SUFFIX} or .json sidecar are skipped: "
                      f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}", stacklevel=2)
    return records


def _sidecar(audio: Path, suffix: str) -> Path:
    """`<stem><suffix>` next to the audio file, NFC-normalised as the official converter does."""
    return Path(unicodedata.normalize("NFC", str(audio.with_name(audio.stem + suffix))))


def write_jsonl(records: Sequence[Record], path: str | Path) -> Path:
    """Write records one per line (absolute filenames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**r.to_json(), "filename": str(Path(r.filename).resolve())}, ensure_ascii=False)
             for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_training_audio(filename: str | Path) -> Tensor | None:
    """Stereo float32 [2, L] at 48 kHz as the official loader makes it; None when the file is (nearly) silent (design §11)."""
    import soundfile

    try:
        data, rate = soundfile.read(str(filename), dtype="float32", always_2d=True)       # [L, C]
    except Exception as err:
        raise ValueError(f"audio file {filename} cannot be read with soundfile ({err}); convert it to WAV or FLAC") from None
    if data.shape[0] == 0:
        raise ValueError(f"audio file {filename} has no samples")
    audio = torch.from_numpy(data.T.copy())                                              # [C, L]
    if audio.shape[0] == 1:
        audio = audio.repeat(2, 1)
    audio = resample(audio[:2], int(rate), TRAIN_SAMPLE_RATE).clamp(-1.0, 1.0)
    minimum = TRAIN_SAMPLE_RATE * MIN_SECONDS
    if audio.shape[-1] < minimum:
        audio = torch.nn.functional.pad(audio, (0, minimum - audio.shape[-1]))
    if (audio == 0).all(dim=0).float().mean().item() > SILENT_FRACTION:
        return None
    return audio[:, : TRAIN_SAMPLE_RATE * MAX_SECONDS]


def prompt_variants(record: Record, shuffles: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(recaptions, tag prompts): the non-empty recaption strings, and up to `shuffles` distinct orderings of the
    tags joined by ", " (the first in file order, the others seeded random permutations); all cut to 256 chars.

    The official loader draws a fresh shuffle every time; caching text states needs a fixed set, so training
    samples from these (see `choose_prompt`).
    """
    if shuffles < 1:
        raise ValueError(f"prompt shuffles must be >= 1, got {shuffles}")
    tags = list(record.tags) or ["music"]
    rng = random.Random(f"{seed}:{record.keys}")
    orders = [", ".join(tags)]
    for _ in range(8 * shuffles):
        if len(orders) >= shuffles:
            break
        rng.shuffle(tags)
        joined = ", ".join(tags)
        if joined not in orders:
            orders.append(joined)
    recaptions = [v for v in record.recaption.values() if v]
    return [r[:MAX_PROMPT_CHARS] for r in recaptions], [o[:MAX_PROMPT_CHARS] for o in orders]


def choose_prompt(n_recaptions: int, n_tag_prompts: int, rng: random.Random) -> int:
    """Index into recaptions + tag prompts: uniform over the recaptions and one 'tags' slot, as the official
    `random.choice(recaptions + [shuffled tags])`; the tags slot picks one cached ordering uniformly."""
    slot = rng.randrange(n_recaptions + 1)
    return slot if slot < n_recaptions else n_recaptions + rng.randrange(n_tag_prompts)


def training_lyric_ids(tokenizer, lyrics: str) -> tuple[list[int], list[int]]:
    """(ids, mask) with the official training conventions: no lyrics → [0]/[1]; at most 4096 ids (design §11)."""
    if not lyrics.strip() or _NO_LYRICS.search(lyrics):
        return [0], [1]
    ids = tokenizer.encode(lyrics)[:MAX_LYRIC_TOKENS]
    return ids, [1] * len(ids)


def load_speaker_embedding(path: str, dim: int = SPEAKER_DIM) -> Tensor:
    """[dim] float32: zeros for "", else the one tensor of a .safetensors / .npy / weights-only .pt file."""
    if not path:
        return torch.zeros(dim)
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"speaker_emb_path {file} does not exist; leave it empty for no speaker")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = list(load_file(str(file)).values())
        if len(tensors) != 1:
            raise ValueError(f"speaker embedding {file} must hold exactly one tensor, found {len(tensors)}")
        value = tensors[0]
    elif suffix == ".npy":
        import numpy

        value = torch.from_numpy(numpy.load(str(file), allow_pickle=False))
    elif suffix in (".pt", ".pth"):
        value = torch.load(str(file), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"speaker embedding {file}: use .safetensors, .npy or a weights-only .pt file")
    if not isinstance(value, Tensor) or value.numel() != dim:
        raise ValueError(f"speaker embedding {file} must hold {dim} values, got {getattr(value, 'shape', type(value))}")
    return value.reshape(dim).float()
