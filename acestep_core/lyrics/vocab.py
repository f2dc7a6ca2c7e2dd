"""Where the lyric vocabulary (a HF `tokenizers` JSON, design §5.1) is found."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ENV_VAR = "ACESTEP_LYRIC_VOCAB"
# Looked for inside a checkpoint folder, in this order.
CHECKPOINT_CANDIDATES = (
    "ace_lyrics_vocab.json",
    "lyrics_utils/vocab.json",
    "ace_lyrics_tokenizer/vocab.json",
    "vocab.json",
)
COMFY_RELATIVE = Path("text_encoders") / "ace_lyrics_tokenizer" / "vocab.json"
# Tokens only the ACE-Step lyric vocabulary has; a generic vocab.json in a checkpoint folder is skipped.
_SIGNATURE = ('"[zh-cn]"', '"[verse]"', '"[SPACE]"')


def _looks_like_lyric_vocab(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return all(token in text for token in _SIGNATURE)


def _comfy_vocab() -> Path | None:
    """ComfyUI's bundled copy, located without importing comfy."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / COMFY_RELATIVE
        if path.is_file():
            return path
    return None


def find_lyric_vocab(explicit: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """The lyric vocab.json: `explicit`, else $ACESTEP_LYRIC_VOCAB, else the checkpoint folder, else ComfyUI's copy.

    Checkpoint folder candidates, in order: ``ace_lyrics_vocab.json``, ``lyrics_utils/vocab.json``,
    ``ace_lyrics_tokenizer/vocab.json``, ``vocab.json`` (a file there is used only if it is the ACE-Step lyric
    vocabulary). ComfyUI's copy is ``comfy/text_encoders/ace_lyrics_tokenizer/vocab.json``.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"lyric vocabulary {path} (given as argument) does not exist")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"lyric vocabulary {path} (from ${ENV_VAR}) does not exist")
        return path
    if checkpoint_dir is not None:
        for name in CHECKPOINT_CANDIDATES:
            path = Path(checkpoint_dir) / name
            if path.is_file() and _looks_like_lyric_vocab(path):
                return path
    comfy = _comfy_vocab()
    if comfy is not None:
        return comfy
    folder = f"the checkpoint folder {Path(checkpoint_dir)}" if checkpoint_dir is not None else "the checkpoint folder"
    raise FileNotFoundError(
        "ACE-Step lyric vocabulary (vocab.json, a HuggingFace tokenizers file of 364 005 bytes) not found. "
        f"Either pass its path as an argument, or set the environment variable {ENV_VAR}=/path/to/vocab.json, "
        f"or copy it into {folder} as ace_lyrics_vocab.json. "
        "It ships with ComfyUI (comfy/text_encoders/ace_lyrics_tokenizer/vocab.json) and with the official "
        "ACE-Step repository (acestep/models/lyrics_utils/vocab.json)."
    )
