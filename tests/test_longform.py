"""Long-form generation: window plan, lyric sections per window, crossfades, and runs on the tiny checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from acestep_core import longform as lf
from acestep_core import tasks
from acestep_core.audio import LATENT_RATE, SAMPLE_RATE, SAMPLES_PER_LATENT
from acestep_core.conditioning import encode_conditioning
from acestep_core.loading import load_acestep
from acestep_core.noise import SeededNoise
from acestep_core.sampling.denoiser import GuidanceConfig
from conftest import TINY_FOLDER, VOCAB

UNGUIDED = tasks.SamplerOptions(steps=1, guidance=GuidanceConfig(guidance_scale=1.0))


# --------------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("total,window,overlap", [
    (3230, 2583, 215), (6460, 2583, 215), (6460, 1000, 300), (2584, 2583, 1), (100, 40, 20), (2000, 2583, 500),
])
def test_windows_cover_the_song_within_the_model_length(total, window, overlap):
    windows = lf.plan_windows(total, window, overlap)
    assert windows[0].start == 0 and windows[0].context == 0 and windows[-1].end == total
    assert all(w.frames <= window for w in windows)
    assert all(b.start == a.end - overlap and b.context == overlap for a, b in zip(windows, windows[1:]))
    assert max(w.frames for w in windows) - min(w.frames for w in windows) <= 1
    fewer = len(windows) - 1
    assert fewer == 0 or window + (fewer - 1) * (window - overlap) < total, "not the fewest windows"


def test_bad_window_plans_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        lf.plan_windows(5000, 2000, 1500)
    with pytest.raises(ValueError, match="240 s"):
        lf.plan_windows(5000, 3000, 100)
    with pytest.raises(ValueError, match="total"):
        lf.plan_windows(0, 2000, 100)


# --------------------------------------------------------------------------------------------------
# lyric sections


LYRICS = "\n".join([
    "[intro]", "",
    "[verse]", "one a", "one b", "one c", "one d", "",
    "[chorus]", "two a", "two b", "",
    "[verse]", "three a", "three b", "three c", "three d", "",
    "[bridge]", "four a", "four b", "",
    "[chorus]", "five a", "five b", "",
    "[outro]",
])


def test_sections_start_at_tags_or_blank_lines():
    sections = lf.split_sections(LYRICS)
    lines = LYRICS.split("\n")
    assert [lines[s.first] for s in sections] == ["[intro]", "[verse]", "[chorus]", "[verse]", "[bridge]", "[chorus]",
                                                  "[outro]"]
    assert [s.sung_lines for s in sections] == [0, 4, 2, 4, 2, 2, 0]
    assert sections[0].first == 0 and sections[-1].last == len(lines)
    assert all(a.last == b.first for a, b in zip(sections, sections[1:]))
    plain = lf.split_sections("a\nb\n\n\nc\nd\n\ne")
    assert [(s.first, s.last, s.sung_lines) for s in plain] == [(0, 4, 2), (4, 7, 2), (7, 8, 1)]
    assert lf.split_sections("") == [] and lf.split_sections("\n \n") == []


def test_each_section_lands_in_the_windows_that_cover_it():
    total = 6460
    windows = lf.plan_windows(total, 2583, 215)
    sections = lf.split_sections(LYRICS)
    spans = lf.section_spans(sections, total)
    assert spans[0][0] == 0 and math.isclose(spans[-1][1], total)
    chosen = lf.assign_sections(sections, windows, total)
    assert sorted({i for picked in chosen for i in picked}) == list(range(len(sections))), "a section got lost"
    for picked, w in zip(chosen, windows):
        assert picked == sorted(picked)
        for i in picked:
            a, b = spans[i]
            inside = max(0.0, min(b, w.end) - max(a, w.start))
            assert inside >= 0.5 * min(b - a, w.frames) - 1e-9, "a window got a section it hardly covers"
    for i, (a, b) in enumerate(spans):
        for picked, w in zip(chosen, windows):
            if w.start <= a and b <= w.end:
                assert i in picked, "a window lacks a section it fully covers"
    given = lf.window_lyrics(LYRICS, windows, total)
    lines = LYRICS.split("\n")
    assert [lines[i] for i in given[0]][:3] == ["[intro]", "", "[verse]"]
    assert lines[given[-1][-1]] == "[outro]"
    assert lf.window_lyrics("", windows, total) == [[] for _ in windows]


def test_one_long_section_goes_to_every_window_it_fills():
    lyrics = "[verse]\n" + "\n".join(f"line {i}" for i in range(40))
    windows = lf.plan_windows(6000, 2583, 200)
    assert all(picked == [0] for picked in lf.assign_sections(lf.split_sections(lyrics), windows, 6000))


def test_crossfade_laws():
    out, into = lf.crossfade_gains(4096, "equal_gain")
    torch.testing.assert_close(out + into, torch.ones(4096))
    assert out[0] > 0.99 and into[-1] > 0.99 and torch.all(out[1:] <= out[:-1])
    out, into = lf.crossfade_gains(4096, "equal_power")
    torch.testing.assert_close(out.square() + into.square(), torch.ones(4096))
    with pytest.raises(ValueError, match="crossfade"):
        lf.crossfade_gains(8, "linear")


# --------------------------------------------------------------------------------------------------
# generation on the tiny checkpoint


@pytest.fixture(scope="module")
def model():
    return load_acestep(TINY_FOLDER, lyric_vocab=VOCAB)


@pytest.fixture(scope="module")
def cond(model):
    return encode_conditioning(model, "ambient, piano", LYRICS)


def sketch_decode(seen: list):
    """A stand-in for the codec at the right rate: each latent frame's channel means, linearly interpolated to
    4096 samples per frame (smooth; records the windows it is given)."""
    def decode(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.detach().clone())
        level = z[0].mean(dim=1)[:2]                                          # [2, T]
        return torch.nn.functional.interpolate(level[None], scale_factor=SAMPLES_PER_LATENT, mode="linear",
                                               align_corners=False)[0][None]
    return decode


def test_a_300_second_song_is_exactly_300_seconds_and_windows_continue_the_latent(model, cond):
    seen: list[torch.Tensor] = []
    calls = []
    song = lf.generate_long(model, cond, 300.0, noise=SeededNoise.from_seeds(5, 1, retake_seed=6),
                            window_seconds=200.0, overlap_seconds=10.0, options=UNGUIDED,
                            decode=sketch_decode(seen), callback=lambda done, total: calls.append((done, total)))
    assert song.waveform.shape == (1, 2, 300 * SAMPLE_RATE) and song.sample_rate == SAMPLE_RATE
    assert torch.isfinite(song.waveform).all() and song.waveform.abs().max() > 0
    assert song.latent.shape[-1] == lf.frames_for_long(300.0) == math.ceil(300 * LATENT_RATE)
    assert len(song.windows) == len(seen) == 2 and all(w.frames <= tasks.frames_for_seconds(200.0) for w in song.windows)
    for w, previous, z in zip(song.windows[1:], seen, seen[1:]):
        assert torch.equal(z[..., :w.context], previous[..., -w.context:]), "extend must keep the context frames"
    assert calls[-1] == (2, 2) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(song.lyrics) == 2 and all(text.strip() for text in song.lyrics)


def test_joins_are_continuous_and_timing_covers_every_line(model, cond):
    noise = SeededNoise.from_seeds(9, 1, retake_seed=10)
    song = lf.generate_long(model, cond, 7.0, noise=noise, window_seconds=3.0, overlap_seconds=1.0,
                            options=UNGUIDED, timing=True)
    wave = song.waveform[0]
    assert wave.shape == (2, 7 * SAMPLE_RATE) and torch.isfinite(wave).all()
    steps = (wave[:, 1:] - wave[:, :-1]).abs()                                # [2, N-1]
    typical = torch.quantile(steps.flatten()[::7], 0.99)
    for w in song.windows[1:]:
        for edge in (w.start, w.start + w.context):
            at = edge * SAMPLES_PER_LATENT
            assert steps[:, at - 3:at + 3].max() <= typical, f"step at the join near sample {at}"
    lyric_lines = [i for i, line in enumerate(LYRICS.split("\n")) if line.strip() and not line.startswith("[")]
    timed = {line.number: line for line in song.lines if line.kind == "lyric"}
    assert sorted(timed) == lyric_lines
    assert all(0 <= line.start <= line.end <= 7.0 + 1e-6 for line in timed.values())
    resampled = lf.generate_long(model, cond, 1.5, noise=SeededNoise.from_seeds(1, 1, retake_seed=2),
                                 options=UNGUIDED, sample_rate=48000, decode=sketch_decode([]))
    assert resampled.waveform.shape[-1] == 72000 and len(resampled.windows) == 1


def test_bad_long_requests_are_named(model, cond):
    noise = SeededNoise.from_seeds(1, 1)
    with pytest.raises(ValueError, match="window_seconds"):
        lf.generate_long(model, cond, 300.0, noise=noise, window_seconds=300.0)
    with pytest.raises(ValueError, match="seconds"):
        lf.generate_long(model, cond, -1.0, noise=noise)
    with pytest.raises(ValueError, match="crossfade"):
        lf.generate_long(model, cond, 30.0, noise=noise, crossfade="hard")


# --------------------------------------------------------------------------------------------------
# the node (imported from the pack as ComfyUI imports it)


def test_long_form_node_returns_the_song_its_latent_and_the_window_plan(monkeypatch):
    import importlib

    from pack_loader import load_pack

    pack = load_pack()
    node_longform, loaders, node_model, pcond = (
        importlib.import_module(f"{pack.__name__}.{name}")
        for name in ("nodes.longform", "nodes.loaders", "nodes.model", "acestep_core.conditioning"))
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY_FOLDER.parent))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    (handle,) = loaders.AceStepLoader().load(checkpoint=TINY_FOLDER.name, dtype="fp32", device="cpu")
    cond = pcond.encode_conditioning(node_model.model_for(handle), "ambient", LYRICS)
    node = node_longform.AceStepLongForm()
    # the node's smallest window is 10 s (its inputs are checked against their declared ranges, nodes/guard.py)
    args = dict(model=handle, conditioning=cond, seconds=14.0, window_seconds=10.0, overlap_seconds=2.0, seed=3, steps=1,
                scheduler="euler", cfg_type="apg", guidance_scale=1.0, omega_scale=10.0, sample_rate="48000")
    audio, latent, plan, lrc = node.generate(**args, lyric_timing=True)
    assert audio["sample_rate"] == 48000 and audio["waveform"].shape == (1, 2, 14 * 48000)
    assert torch.isfinite(audio["waveform"]).all()
    assert latent["samples"].shape == (1, 8, 16, lf.frames_for_long(14.0))
    windows = lf.plan_windows(lf.frames_for_long(14.0), tasks.frames_for_seconds(10.0), round(2.0 * LATENT_RATE))
    assert plan.count("# window") == len(windows) > 1
    assert lrc.startswith("[re:") and "[#:verse]" in lrc
    assert node.generate(**{**args, "seconds": 1.0})[3] == ""
    with pytest.raises(ValueError, match="seconds"):
        node.generate(**{**args, "seconds": 99999.0})
