"""Properties over arbitrary inputs (hypothesis): lyrics of any text condition the model within its vocabulary and
length, and audio of any length, rate, channel count and batch encodes to ceil(L·44100/sr / 4096) latent frames.

The tokenizer-level property (any text gives ids in 0..6692 with the [START]/[SPACE] framing) is
tests/test_lyrics.py::test_any_text_gives_valid_ids; these go through encode_conditioning and encode_audio.
"""
from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_FOLDER, VOCAB
from acestep_core import audio
from acestep_core.conditioning import MAX_LYRIC_TOKENS, encode_conditioning
from acestep_core.loading import load_acestep
from acestep_core.lyrics import LyricTokenizer
from acestep_core.lyrics.tokenizer import VOCAB_SIZE

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
STRUCTURE = ("[verse]", "[chorus]", "[bridge]", "[verse 2]", "[Intro]", "[", "]", "", "  ")


class StubTextEncoder:
    """Stands in for UMT5 (the lyric side is what is tested): zero states, one per character plus the end token."""

    def encode(self, texts, *, erg_tag_tau=None):
        length = len(texts[0]) + 1
        return torch.zeros(1, length, 8), torch.ones(1, length, dtype=torch.long)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny codec's ops are too small to split, and on a busy machine threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(vocab_path):
    return types.SimpleNamespace(text_encoder=StubTextEncoder(), lyric_tokenizer=LyricTokenizer(vocab_path))


@pytest.fixture(scope="module")
def codec():
    return load_acestep(TINY_FOLDER, components=("dcae", "vocoder"))


def conditioning_or_missing_helper(model, lyrics: str):
    """encode_conditioning's result, or None when a line needs a language helper that is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return encode_conditioning(model, "pop", lyrics)
    except ImportError as err:
        message = str(err)
        assert message.startswith("lyrics line ") and "pip install cutlet" in message, message
        return None


lines = st.one_of(st.text(max_size=40), st.sampled_from(STRUCTURE))


@PROPERTY
@given(lyrics=st.lists(lines, max_size=8).map("\n".join))
def test_any_lyrics_condition_within_the_vocabulary(model, lyrics):
    cond = conditioning_or_missing_helper(model, lyrics)
    if cond is None:
        return
    ids, mask = cond.lyric_ids[0].tolist(), cond.lyric_mask[0].tolist()
    assert len(ids) == len(mask) and 1 <= len(ids) <= MAX_LYRIC_TOKENS
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    if lyrics:
        assert mask == [1] * len(ids) and ids == model.lyric_tokenizer.encode(lyrics)[:MAX_LYRIC_TOKENS]
    else:
        assert cond.instrumental and ids == [0] and mask == [0]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.text(alphabet="abcdefghijklmnopqrstuvwxyz 0123456789", min_size=1, max_size=30),
       repeats=st.integers(1, 900))
def test_long_lyrics_are_cut_at_the_maximum(model, line, repeats):
    lyrics = "\n".join([line] * repeats)
    full = model.lyric_tokenizer.encode(lyrics)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cond = encode_conditioning(model, "pop", lyrics)
    cut = [str(w.message) for w in caught if "past the 4096" in str(w.message)]
    assert cond.lyric_ids[0].tolist() == full[:MAX_LYRIC_TOKENS]
    assert len(cut) == (len(full) > MAX_LYRIC_TOKENS)


@st.composite
def waveforms(draw):
    rate = draw(st.one_of(st.sampled_from(COMMON_RATES), st.integers(10, 1920).map(lambda k: k * 100)))
    length = draw(st.integers(1, rate))
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    return rate, length, batch, channels


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=waveforms())
def test_any_length_and_rate_encodes_to_the_right_latent_length(codec, case):
    rate, length, batch, channels = case
    waveform = 0.1 * torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(length))
    resampled = math.ceil(length * audio.SAMPLE_RATE / rate)
    assert audio.prepare_audio(waveform, rate).shape == (batch, 2, resampled)
    latents = audio.encode_audio(codec.dcae, codec.vocoder.mel_transform, waveform, rate)
    assert latents.shape == (batch, 8, 16, math.ceil(resampled / audio.SAMPLES_PER_LATENT))
    assert torch.isfinite(latents).all()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.integers(1, 3), rate=st.sampled_from((44100, 48000, 32000)))
def test_decoded_length_follows_the_latent_length(codec, frames, rate):
    latents = torch.randn(1, 8, 16, frames, generator=torch.Generator().manual_seed(frames))
    waveform = audio.decode_latents(codec.dcae, codec.vocoder, latents, sample_rate=rate)
    assert waveform.shape == (1, 2, math.ceil(frames * audio.SAMPLES_PER_LATENT * rate / audio.SAMPLE_RATE))
    assert torch.isfinite(waveform).all()
