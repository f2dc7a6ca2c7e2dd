"""ACE-Step 1.5 prompt texts against diffusers 0.42.1 `AceStepPipeline` (its `_get_task_instruction`,
`_build_metadata_string` and `_format_prompt` follow the official handler's `generate_instruction`,
`_dict_to_meta_string`, SFT_GEN_PROMPT and `_format_lyrics`), plus the official rules diffusers does not state."""
from __future__ import annotations

import itertools

import pytest

from acestep_core.v15 import prompts as P

import diffusers  # diffusers==0.42.1: a test requirement (requirements-dev.txt); a parity oracle, never skipped
from diffusers import AceStepPipeline


def _pipe():
    # Only the string helpers are used: no weights, no tokenizer.
    return AceStepPipeline.__new__(AceStepPipeline)


def test_diffusers_is_the_pinned_oracle():
    assert diffusers.__version__ == "0.42.1"


@pytest.mark.parametrize("task", P.TASKS)
@pytest.mark.parametrize("track", [None, "vocals", "backing_vocals", "Drums"])
def test_task_instructions_match_diffusers(task, track):
    classes = None if track is None else [track, "bass"]
    ours = P.task_instruction(task, track_name=track, complete_track_classes=classes)
    theirs = AceStepPipeline._get_task_instruction(task, track_name=track, complete_track_classes=classes)
    assert ours == theirs


def test_all_twelve_tracks_name_their_instruction():
    assert len(P.TRACK_NAMES) == 12 == len(set(P.TRACK_NAMES))
    for track in P.TRACK_NAMES:
        for task in ("extract", "lego"):
            assert P.task_instruction(task, track) == AceStepPipeline._get_task_instruction(task, track_name=track)
    every = P.task_instruction("complete", complete_track_classes=list(P.TRACK_NAMES))
    assert every == AceStepPipeline._get_task_instruction("complete", complete_track_classes=list(P.TRACK_NAMES))


METAS = list(
    itertools.product(
        [None, 30, 120, 300],
        [None, "", "C major", "F# minor", "B♭ major"],
        [None, "", "3", "4", "6"],
        [None, 10.0, 30.7, 240, 600],
    )
)


@pytest.mark.parametrize("bpm, key, ts, duration", METAS[:: max(1, len(METAS) // 80)])
def test_metadata_block_matches_diffusers(bpm, key, ts, duration):
    ours = P.format_metas(bpm, key, ts, duration)
    theirs = AceStepPipeline._build_metadata_string(bpm=bpm, keyscale=key, timesignature=ts, audio_duration=duration)
    assert ours == theirs


@pytest.mark.parametrize("task", P.TASKS)
@pytest.mark.parametrize("language", ["en", "zh", "unknown"])
def test_caption_and_lyric_texts_match_diffusers(task, language):
    caption, lyrics = "lo-fi piano, rain, mellow", "[verse]\nfirst line\n\n[chorus]\nsecond line"
    track = "guitar" if task in ("extract", "lego", "complete") else None
    ours = P.build_prompts(
        task, caption, lyrics, language, bpm=92, keyscale="A minor", timesignature="4", duration=47.9,
        track_name=track, complete_track_classes=[track] if track else None,
    )
    instruction = AceStepPipeline._get_task_instruction(task, track, [track] if track else None)
    text, lyric = _pipe()._format_prompt(
        caption, lyrics, language, 47.9, instruction, bpm=92, keyscale="A minor", timesignature="4"
    )
    assert (ours.caption, ours.lyrics) == (text, lyric)
    # The cover-strength switch moves to the text2music instruction with the same caption and metas
    # (official _prepare_text_conditioning_inputs: SFT_GEN_PROMPT.format(DEFAULT_DIT_INSTRUCTION, ...)).
    t2m, _ = _pipe()._format_prompt(caption, lyrics, language, 47.9, None, bpm=92, keyscale="A minor",
                                    timesignature="4")
    assert ours.non_cover_caption == t2m


def test_instruction_gets_its_colon():
    # Official _format_instruction: a custom instruction without a trailing colon gets one.
    ours = P.build_prompts("text2music", "x", instruction="Make a song")
    assert "# Instruction\nMake a song:\n" in ours.caption
    text, _ = _pipe()._format_prompt("x", "", "en", None, "Make a song")
    assert ours.caption == text


def test_official_defaults_not_given():
    # Official _create_default_meta / _build_metadata_dict: every field "N/A", duration 30 seconds; an explicit
    # "N/A" time signature stays "N/A".
    assert P.format_metas() == AceStepPipeline._build_metadata_string()
    assert P.format_metas(timesignature="N/A", keyscale="N/A") == P.format_metas()
    assert P.format_metas(bpm=0) == P.format_metas()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bpm=500), "bpm"),
        (dict(bpm=12.5), "bpm"),
        (dict(keyscale="H major"), "keyscale"),
        (dict(timesignature="5/4"), "timesignature"),
        (dict(duration=-1), "duration"),
        (dict(duration=float("nan")), "duration"),
    ],
)
def test_bad_metadata_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.format_metas(**kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: P.task_instruction("remix"), "task"),
        (lambda: P.task_instruction("lego", "kazoo"), "track name"),
        (lambda: P.task_instruction("complete", complete_track_classes=["bass", "theremin"]), "track name"),
        (lambda: P.format_lyrics("la la", "xx"), "language"),
        (lambda: P.format_caption(None, "x", ""), "caption"),
    ],
)
def test_bad_prompt_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
