"""ACE-Step v1 lyric tokenizer: lyrics text -> the official token ids (design §5.2)."""
from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path

from ..validation import MAX_LYRICS_CHARS, check_text
from .cleaners import clean_line
from .language import detect_line_language

# The 17 languages with a "[xx]" token; any other detected code is encoded as English (design §5.2 step 3).
SUPPORTED_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "pl", "tr", "ru", "cs", "nl", "ar", "zh", "ja", "hu", "ko", "hi")
STOP_ID = 0
UNK_ID = 1
SEPARATOR_ID = 2  # "[SPACE]": spaces inside a line and the end of every line
START_ID = 261
VOCAB_SIZE = 6693
MAX_LINE_CHARS = 128
"""Longest piece of a line read as one line. Language detection and some cleaners (pypinyin, number expansion) take
time that grows faster than the length of a line, so a longer line is split at spaces into pieces of at most this
many characters, each read as its own line (docs/bad-inputs.md); sung lines are far shorter."""
STRUCTURE_TAG = re.compile(r"\[.*?\]")
LANGUAGE_TAG = re.compile(r"\[(" + "|".join(SUPPORTED_LANGUAGES) + r"|zh-cn)\]")


def language_token(lang: str) -> str:
    """The vocabulary token that starts a line of language `lang` (zh uses "[zh-cn]")."""
    return "[zh-cn]" if lang == "zh" else f"[{lang}]"


def encoding_language(detected: str) -> str:
    """Official mapping of a detected code: unsupported codes -> en (design §5.2 step 3)."""
    return detected if detected in SUPPORTED_LANGUAGES else "en"


def split_long_line(line: str, limit: int = MAX_LINE_CHARS) -> list[str]:
    """`line` itself when it has at most `limit` characters, else pieces of at most `limit` cut at the last space
    (anywhere when a piece has none), stripped, empty ones dropped. Linear in the length of the line."""
    if len(line) <= limit:
        return [line]
    pieces = []
    start = 0
    while len(line) - start > limit:
        cut = line.rfind(" ", start + 1, start + limit + 1)
        end = cut if cut > start else start + limit
        pieces.append(line[start:end].strip())
        start = end
    pieces.append(line[start:].strip())
    return [piece for piece in pieces if piece]


class LyricTokenizer:
    """Official ``tokenize_lyrics``: per-line language detection, cleaners, ``[lang]`` prefix, BPE (design §5.2).

    With ``language_tags=True`` a line may start with a language token (``[ja]``, ``[zh]``/``[zh-cn]``, any of the
    17 codes) that overrides detection for that line and is not itself encoded. This is off by default because
    the official pipeline encodes such a line as an English structure-tag line.
    """

    def __init__(self, vocab_path: str | os.PathLike, *, language_tags: bool = False):
        from tokenizers import Tokenizer

        self.vocab_path = Path(vocab_path)
        if not self.vocab_path.is_file():
            raise FileNotFoundError(f"lyric vocabulary {self.vocab_path} does not exist (see find_lyric_vocab)")
        try:
            self._bpe = Tokenizer.from_file(str(self.vocab_path))
        except Exception as err:
            raise ValueError(f"lyric vocabulary {self.vocab_path} is not a HuggingFace tokenizers JSON: {err}") from err
        self._check_vocab()
        self.language_tags = language_tags
        self._added = frozenset(t.content for t in self._bpe.get_added_tokens_decoder().values())
        self._encode_line = functools.lru_cache(maxsize=4096)(self._encode_line_uncached)

    def _check_vocab(self) -> None:
        expected = {"[STOP]": STOP_ID, "[UNK]": UNK_ID, "[SPACE]": SEPARATOR_ID, "[START]": START_ID}
        wrong = {tok: self._bpe.token_to_id(tok) for tok, i in expected.items() if self._bpe.token_to_id(tok) != i}
        missing = [language_token(lang) for lang in SUPPORTED_LANGUAGES if self._bpe.token_to_id(language_token(lang)) is None]
        size = self._bpe.get_vocab_size(with_added_tokens=True)
        if wrong or missing or size != VOCAB_SIZE:
            raise ValueError(
                f"{self.vocab_path} is not the ACE-Step lyric vocabulary (expected {VOCAB_SIZE} ids with "
                f"{expected}; got size {size}, wrong ids {wrong}, missing language tokens {missing}); "
                "use acestep/models/lyrics_utils/vocab.json or ComfyUI's ace_lyrics_tokenizer/vocab.json"
            )

    # -- per line ------------------------------------------------------------------------------------
    def _line_plan(self, line: str) -> tuple[str, str]:
        """(text to encode, language) for one stripped non-empty line."""
        if self.language_tags:
            tagged = LANGUAGE_TAG.match(line)
            rest = line[tagged.end():].strip() if tagged else ""
            if rest:
                return rest, "zh" if tagged.group(1) == "zh-cn" else tagged.group(1)
        if STRUCTURE_TAG.match(line):
            return line, "en"
        return line, encoding_language(detect_line_language(line))

    def _encode_line_uncached(self, line: str) -> tuple[int, ...]:
        text, lang = self._line_plan(line)
        prompt = language_token(lang) + clean_line(text, lang)
        return tuple(self._bpe.encode(prompt.replace(" ", "[SPACE]")).ids)

    # -- public --------------------------------------------------------------------------------------
    def encode(self, lyrics: str) -> list[int]:
        """Token ids: [START], then per line its ids and [SPACE]; an empty line is a lone [SPACE] (design §5.2).

        A line whose language needs a helper package that is missing (Japanese: cutlet) raises ImportError naming
        the line and the pip command.
        """
        if not isinstance(lyrics, str):
            raise ValueError(f"lyrics must be text, got {type(lyrics).__name__}")
        check_text("lyrics", lyrics, MAX_LYRICS_CHARS)
        ids = [START_ID]
        split: list[tuple[int, str, int]] = []
        for number, line in enumerate(lyrics.split("\n"), start=1):
            line = line.strip()
            if line:
                pieces = split_long_line(line)
                if len(pieces) > 1:
                    split.append((number, line, len(pieces)))
                for index, piece in enumerate(pieces):
                    if index:
                        ids.append(SEPARATOR_ID)
                    try:
                        ids += self._encode_line(piece)
                    except ImportError as err:  # a language helper that is not installed: say which line needs it
                        raise ImportError(f"lyrics line {number} ({line[:40]!r}): {err}") from err
            ids.append(SEPARATOR_ID)
        if split:
            number, line, count = split[0]
            more = f" (and {len(split) - 1} more long line(s))" if len(split) > 1 else ""
            warnings.warn(
                f"lyrics line {number} ({line[:40]!r}) is {len(line)} characters long: it is read as {count} lines of "
                f"at most {MAX_LINE_CHARS} characters, split at spaces{more}. Break long lines where the singing "
                "breaks",
                stacklevel=2,
            )
        return ids

    def encode_with_mask(self, lyrics: str) -> tuple[list[int], list[int]]:
        """(ids, mask) as the official pipeline feeds them: ``([0], [0])`` for an empty string, else mask of ones."""
        if lyrics == "":
            return [STOP_ID], [0]
        ids = self.encode(lyrics)
        return ids, [1] * len(ids)

    def line_languages(self, lyrics: str) -> list[tuple[str, str]]:
        """(line, language used to encode it) for every non-empty line (structure-tag lines are en)."""
        check_text("lyrics", lyrics, MAX_LYRICS_CHARS)
        lines = (raw.strip() for raw in lyrics.split("\n"))
        return [(piece, self._line_plan(piece)[1]) for line in lines if line for piece in split_long_line(line)]

    def unknown_structure_tags(self, lyrics: str) -> list[str]:
        """Line-leading ``[...]`` tags the vocabulary does not know (encoded as [UNK] + letters), first-seen order."""
        unknown: list[str] = []
        for raw in lyrics.split("\n"):
            tag = STRUCTURE_TAG.match(raw.strip())
            if tag and tag.group(0).lower() not in self._added and tag.group(0) not in unknown:
                unknown.append(tag.group(0))
        return unknown
