"""Tags and lyrics -> the tensors the transformer is conditioned on (design §4, §5, §7.6 ERG-tag)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from .validation import MAX_LYRICS_CHARS, MAX_TAGS_CHARS, check_text

ERG_TAU = 0.01
MAX_LYRIC_TOKENS = 4096
"""Longest lyric id sequence given to the model: the official training truncation (design §5.2 step 7, §11)."""


@dataclass(frozen=True)
class Conditioning:
    """One prompt's text states and lyric ids (batch 1; tasks repeat them over the batch)."""

    tags: str
    lyrics: str
    text_states: torch.Tensor  # [1, Lt, Dt] UMT5 last_hidden_state
    text_mask: torch.Tensor  # [1, Lt] long
    lyric_ids: torch.Tensor  # [1, Ll] long
    lyric_mask: torch.Tensor  # [1, Ll] long
    text_states_erg: torch.Tensor | None = None  # [1, Lt, Dt] ERG-tag (tempered) states, or None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        """A copy on `device`, float tensors in `dtype` (ids and masks stay integer)."""

        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

        return replace(
            self,
            text_states=f(self.text_states),
            text_states_erg=f(self.text_states_erg),
            text_mask=self.text_mask.to(device),
            lyric_ids=self.lyric_ids.to(device),
            lyric_mask=self.lyric_mask.to(device),
        )

    @property
    def instrumental(self) -> bool:
        """True when there are no lyrics (the lyric mask is all zero)."""
        return not bool(self.lyric_mask.any())


def _check_text(name: str, value: object) -> str:
    """Text of bounded length and valid Unicode (validation.check_text); None is ""."""
    return check_text(name, value, MAX_LYRICS_CHARS if name == "lyrics" else MAX_TAGS_CHARS)


def truncate_lyric_ids(tokenizer, lyrics: str, ids: list[int], limit: int = MAX_LYRIC_TOKENS) -> list[int]:
    """The first `limit` ids, with a warning naming the line where the cut falls (design §5.2 step 7, §11).

    The official inference has no maximum, but the model never saw more than 4096 lyric tokens in training and
    the lyric encoder's attention grows with the square of the length, so longer lyrics are cut as in training.
    """
    if len(ids) <= limit:
        return ids
    used = 1  # [START]
    lines = lyrics.split("\n")
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        with warnings.catch_warnings():  # a long line was already reported by the full encode
            warnings.simplefilter("ignore")
            used += len(tokenizer.encode(stripped)) - 1 if stripped else 1  # the line's ids and its [SPACE]
        if used > limit:
            break
    warnings.warn(
        f"lyrics are {len(ids)} tokens, past the {limit} the model was trained with; they are cut in line "
        f"{number} of {len(lines)} ({stripped[:40]!r}) and the rest is ignored. Shorten the lyrics, or generate "
        "the song in parts (extend) with the later lyrics",
        stacklevel=3,
    )
    return ids[:limit]


def encode_conditioning(model, tags: str, lyrics: str, *, erg_tag: bool = True) -> Conditioning:
    """Encode tags with UMT5 (and the ERG-tag variant) and tokenize lyrics, as the official pipeline.

    Empty lyrics are valid (instrumental): ids ``[0]`` with mask ``[0]``, as the official ``__call__``.
    Empty tags are encoded as the empty string (the model then sees only the end token) with a warning.
    Lyrics past MAX_LYRIC_TOKENS are cut there with a warning (:func:`truncate_lyric_ids`).
    """
    tags = _check_text("tags", tags)
    lyrics = _check_text("lyrics", lyrics)
    if not tags.strip():
        warnings.warn("tags are empty: the model gets no style description; describe genre, instruments, mood, tempo")
    text_states, text_mask = model.text_encoder.encode([tags])
    text_erg = model.text_encoder.encode([tags], erg_tag_tau=ERG_TAU)[0] if erg_tag else None

    if lyrics:
        tokenizer = model.lyric_tokenizer
        ids = truncate_lyric_ids(tokenizer, lyrics, tokenizer.encode(lyrics))
        mask = [1] * len(ids)
        unknown = tokenizer.unknown_structure_tags(lyrics)
    else:  # instrumental: the official __call__ uses ids [0] with mask [0]; no vocabulary needed
        ids, mask, unknown = [0], [0], []
    if unknown:
        warnings.warn(
            "lyrics: unknown structure tags " + ", ".join(unknown) + " are read by the model as [UNK] plus letters;"
            " use one of [verse] [chorus] [bridge] [intro] [outro] [pre-chorus] [hook] [inst] [solo] [break]"
        )
    device = text_states.device
    lyric_ids = torch.tensor([ids], dtype=torch.long, device=device)
    lyric_mask = torch.tensor([mask], dtype=torch.long, device=device)
    return Conditioning(
        tags=tags,
        lyrics=lyrics,
        text_states=text_states,
        text_mask=text_mask.to(torch.long),
        lyric_ids=lyric_ids,
        lyric_mask=lyric_mask,
        text_states_erg=text_erg,
    )
