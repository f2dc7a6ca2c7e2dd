"""Lyric tokenizer (design §5): official token ids for every fixture string, vocab lookup, properties."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, VOCAB, Case
from acestep_core.lyrics import LyricTokenizer, detect_line_language, find_lyric_vocab
from acestep_core.lyrics import cleaners, language, vocab as vocab_module
from acestep_core.lyrics.tokenizer import START_ID, STRUCTURE_TAG, VOCAB_SIZE, encoding_language

CASE_DIR = FIXTURES / "lyric_tokenizer"


def _fixture_strings() -> list:
    if not (CASE_DIR / "case.json").is_file():
        raise RuntimeError(f"lyric tokenizer fixture missing at {CASE_DIR}; set ACESTEP_FIXTURES_DIR")
    strings = json.loads((CASE_DIR / "case.json").read_text())["args"]["strings"]
    return [pytest.param(s, id=f"{s['index']:03d}") for s in strings]


STRINGS = _fixture_strings()


@pytest.fixture(scope="module")
def case() -> Case:
    return Case(CASE_DIR)


@pytest.fixture(scope="module")
def tokenizer(vocab_path) -> LyricTokenizer:
    return LyricTokenizer(vocab_path)


@pytest.mark.parametrize("entry", STRINGS)
def test_fixture_token_ids(tokenizer, case, entry):
    """ids equal the official tokenize_lyrics output exactly (the tensor and the JSON copy)."""
    official = case.outputs[f"ids_{entry['index']:03d}"].tolist()
    assert official == entry["token_ids"]
    assert tokenizer.encode(entry["lyrics"]) == official


@pytest.mark.parametrize("entry", STRINGS)
def test_fixture_line_languages(tokenizer, entry):
    """Raw per-line detection equals official get_lang; line_languages applies the official mapping."""
    lines = entry["detected_lang_per_line"]
    assert [detect_line_language(x["line"]) for x in lines] == [x["get_lang"] for x in lines]
    expected = [
        (x["line"], "en" if STRUCTURE_TAG.match(x["line"]) else encoding_language(x["get_lang"])) for x in lines
    ]
    assert tokenizer.line_languages(entry["lyrics"]) == expected


@pytest.mark.parametrize("entry", STRINGS)
def test_fixture_mask(tokenizer, entry):
    """The pipeline feeds ids [0] / mask [0] only for the empty string, else the ids with a mask of ones."""
    ids, mask = tokenizer.encode_with_mask(entry["lyrics"])
    if entry["pipeline_uses_this"]:
        assert ids == entry["token_ids"] and mask == [1] * len(ids)
    else:
        assert entry["lyrics"] == ""
        assert (ids, mask) == ([0], [0])


@pytest.mark.parametrize("entry", STRINGS)
def test_language_tags_option_keeps_official_ids(vocab_path, tokenizer, entry):
    """The opt-in [xx] line override changes nothing for lyrics without such lines."""
    assert LyricTokenizer(vocab_path, language_tags=True).encode(entry["lyrics"]) == tokenizer.encode(entry["lyrics"])


def test_language_tags_override(vocab_path, tokenizer):
    """[xx] at the start of a line forces that language and is dropped; without the option it is a tag line."""
    tagged = LyricTokenizer(vocab_path, language_tags=True)
    line = "東京の空"
    detected = tokenizer.line_languages(line)[0][1]
    forced = "zh" if detected != "zh" else "ja"
    assert tagged.line_languages(f"[{forced}] {line}") == [(f"[{forced}] {line}", forced)]
    assert tagged.encode(f"[{detected}]{line}") == tokenizer.encode(line)
    assert tokenizer.line_languages(f"[{forced}]{line}") == [(f"[{forced}]{line}", "en")]


def test_empty_lyrics(tokenizer):
    assert tokenizer.encode_with_mask("") == ([0], [0])
    assert tokenizer.encode("") == [START_ID, 2]
    assert tokenizer.encode(" \n\t") == [START_ID, 2, 2]
    assert tokenizer.line_languages("\n  \n") == []


def test_unknown_structure_tags(tokenizer):
    lyrics = "[Verse 1]\nhello\n[CHORUS]\n[instrumental]\n[verse 1]\nword [x] inside\n[Verse 1]\n[pre-chorus]"
    assert tokenizer.unknown_structure_tags(lyrics) == ["[Verse 1]", "[instrumental]", "[verse 1]"]
    assert tokenizer.unknown_structure_tags("[verse]\n[chorus]\nla la") == []


def test_bad_input(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="lyrics must be text"):
        tokenizer.encode(None)
    other = tmp_path / "tokenizer.json"
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(other))
    with pytest.raises(ValueError, match="not the ACE-Step lyric vocabulary"):
        LyricTokenizer(other)
    with pytest.raises(FileNotFoundError):
        LyricTokenizer(tmp_path / "missing.json")


# -- vocabulary lookup ------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(vocab_module.ENV_VAR, raising=False)
    monkeypatch.setattr(vocab_module, "_comfy_vocab", lambda: None)


def test_find_vocab_explicit_and_env(tmp_path, monkeypatch, vocab_path):
    other = tmp_path / "v.json"
    shutil.copy(vocab_path, other)
    monkeypatch.setenv(vocab_module.ENV_VAR, str(vocab_path))
    assert find_lyric_vocab(other, checkpoint_dir=tmp_path) == other
    assert find_lyric_vocab(checkpoint_dir=tmp_path) == vocab_path
    with pytest.raises(FileNotFoundError, match="argument"):
        find_lyric_vocab(tmp_path / "nope.json")
    monkeypatch.setenv(vocab_module.ENV_VAR, str(tmp_path / "gone.json"))
    with pytest.raises(FileNotFoundError, match=vocab_module.ENV_VAR):
        find_lyric_vocab()


def test_find_vocab_checkpoint_folder_order(tmp_path, no_env, vocab_path):
    (tmp_path / "vocab.json").write_text('{"model": {"vocab": {"a": 0}}}')
    with pytest.raises(FileNotFoundError):
        find_lyric_vocab(checkpoint_dir=tmp_path)  # a generic vocab.json is not the lyric vocabulary
    nested = tmp_path / "lyrics_utils" / "vocab.json"
    nested.parent.mkdir()
    shutil.copy(vocab_path, nested)
    assert find_lyric_vocab(checkpoint_dir=tmp_path) == nested
    first = tmp_path / vocab_module.CHECKPOINT_CANDIDATES[0]
    shutil.copy(vocab_path, first)
    assert find_lyric_vocab(checkpoint_dir=tmp_path) == first


def test_find_vocab_comfy_copy_without_importing_comfy(tmp_path, monkeypatch, vocab_path):
    monkeypatch.delenv(vocab_module.ENV_VAR, raising=False)
    package = tmp_path / "site" / "comfy"
    target = package / vocab_module.COMFY_RELATIVE
    target.parent.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('comfy must not be imported')\n")
    shutil.copy(vocab_path, target)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    assert find_lyric_vocab(checkpoint_dir=tmp_path / "empty") == target
    assert "comfy" not in sys.modules


def test_find_vocab_error_message(tmp_path, no_env):
    with pytest.raises(FileNotFoundError) as err:
        find_lyric_vocab(checkpoint_dir=tmp_path)
    message = str(err.value)
    for needle in (
        vocab_module.ENV_VAR,
        "argument",
        str(tmp_path),
        "ace_lyrics_vocab.json",
        "ComfyUI",
        "comfy/text_encoders/ace_lyrics_tokenizer/vocab.json",
        "acestep/models/lyrics_utils/vocab.json",
    ):
        assert needle in message


# -- helpers and dependencies -----------------------------------------------------------------------


def test_import_loads_no_helper():
    code = (
        "import sys, acestep_core.lyrics; "
        "print([m for m in ('py3langid', 'pypinyin', 'cutlet', 'num2words', 'hangul_romanize') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_cutlet_is_a_clear_error(monkeypatch):
    cleaners._cutlet.cache_clear()
    monkeypatch.setitem(sys.modules, "cutlet", None)
    try:
        with pytest.raises(ImportError, match="pip install cutlet fugashi unidic-lite"):
            cleaners.clean_line("こんにちは", "ja")
    finally:
        cleaners._cutlet.cache_clear()


def test_wrong_py3langid_is_a_clear_error(monkeypatch):
    fake = types.ModuleType("py3langid.langid")
    fake.MODEL_FILE = "data/model.npz.xz"
    fake.LanguageIdentifier = type("LanguageIdentifier", (), {})
    language._identifier.cache_clear()
    language.classify.cache_clear()
    monkeypatch.setitem(sys.modules, "py3langid.langid", fake)
    try:
        with pytest.raises(ImportError, match="py3langid==0.3.0"):
            detect_line_language("hello there")
    finally:
        monkeypatch.undo()
        language._identifier.cache_clear()
        language.classify.cache_clear()


def test_four_minute_song_is_fast(tokenizer):
    """A ~90-line multilingual song encodes in under 0.5 s by a fresh tokenizer once the helpers are loaded."""
    lines = [entry.values[0]["lyrics"] for entry in STRINGS if entry.values[0]["pipeline_uses_this"]]
    song = "\n".join(lines * 2)
    tokenizer.encode(song)
    timings = []
    for _ in range(3):  # best of three: the machine may be busy
        fresh = LyricTokenizer(VOCAB)
        start = time.perf_counter()
        fresh.encode(song)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.5, timings


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=80))
def test_any_text_gives_valid_ids(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == START_ID and ids[-1] == 2
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert ids.count(2) >= text.count("\n") + 1
