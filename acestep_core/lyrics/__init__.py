"""Lyric front end of ACE-Step v1: vocabulary lookup, per-line language detection, cleaners, BPE (design §5)."""
from .language import detect_line_language
from .tokenizer import SUPPORTED_LANGUAGES, LyricTokenizer
from .vocab import find_lyric_vocab

__all__ = ["LyricTokenizer", "SUPPORTED_LANGUAGES", "detect_line_language", "find_lyric_vocab"]
