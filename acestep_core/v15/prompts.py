"""Prompt and lyric texts of ACE-Step 1.5: task instructions, the caption template with its metadata block, and
the lyric template, formatted exactly as the official handler formats them.

Facts from ace-step/ACE-Step-1.5: `acestep/constants.py` (SFT_GEN_PROMPT, LYRIC_GEN_PROMPT, TASK_INSTRUCTIONS,
TRACK_NAMES, VALID_LANGUAGES, the keyscale/BPM/time-signature ranges) and the handler's prompt helpers
(`generate_instruction`, `_format_instruction`, `_format_lyrics`, `_build_metadata_dict`, `_dict_to_meta_string`,
`_prepare_text_conditioning_inputs`). The caption text goes through the full Qwen3 text encoder (at most 256
tokens), the lyric text only through its token embeddings (at most 2048 tokens); that is the text encoder's job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# The caption template: instruction, caption, metadata block (official SFT_GEN_PROMPT).
SFT_GEN_PROMPT = "# Instruction\n{}\n\n# Caption\n{}\n\n# Metas\n{}<|endoftext|>\n"
# The lyric template: language code, lyrics (official LYRIC_GEN_PROMPT).
LYRIC_GEN_PROMPT = "# Languages\n{}\n\n# Lyric\n{}<|endoftext|>"

DEFAULT_DIT_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
TASK_INSTRUCTIONS = {
    "text2music": "Fill the audio semantic mask based on the given conditions:",
    "repaint": "Repaint the mask area based on the given conditions:",
    "cover": "Generate audio semantic tokens based on the given conditions:",
    "extract": "Extract the {TRACK_NAME} track from the audio:",
    "extract_default": "Extract the track from the audio:",
    "lego": "Generate the {TRACK_NAME} track based on the audio context:",
    "lego_default": "Generate the track based on the audio context:",
    "complete": "Complete the input track with {TRACK_CLASSES}:",
    "complete_default": "Complete the input track:",
}
TASKS = ("text2music", "repaint", "cover", "extract", "lego", "complete")
# The 12 stems lego/extract/complete know (official TRACK_NAMES, in the official order).
TRACK_NAMES = (
    "woodwinds", "brass", "fx", "synth", "strings", "percussion",
    "keyboard", "guitar", "bass", "drums", "backing_vocals", "vocals",
)
VALID_LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en",
    "es", "fa", "fi", "fr", "he", "hi", "hr", "ht", "hu", "id",
    "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no",
    "pa", "pl", "pt", "ro", "ru", "sa", "sk", "sr", "sv", "sw",
    "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh",
    "unknown",
)
KEYSCALE_NOTES = ("A", "B", "C", "D", "E", "F", "G")
KEYSCALE_ACCIDENTALS = ("", "#", "b", "♯", "♭")
KEYSCALE_MODES = ("major", "minor")
VALID_KEYSCALES = tuple(f"{n}{a} {m}" for n in KEYSCALE_NOTES for a in KEYSCALE_ACCIDENTALS for m in KEYSCALE_MODES)
BPM_MIN, BPM_MAX = 30, 300
DURATION_MAX = 600
VALID_TIME_SIGNATURES = ("2", "3", "4", "6")
NOT_GIVEN = "N/A"
DEFAULT_META_DURATION = 30
MAX_CAPTION_CHARS = 20_000
MAX_LYRIC_CHARS = 100_000


def _check_track(name) -> str:
    if not isinstance(name, str) or name.strip().lower() not in TRACK_NAMES:
        raise ValueError(f"track name must be one of {', '.join(TRACK_NAMES)}; got {name!r}")
    return name.strip().lower()


def task_instruction(task: str, track_name: str | None = None, complete_track_classes=None) -> str:
    """The instruction line of a task (official `generate_instruction`): extract/lego name their track in upper
    case ("Extract the VOCALS track from the audio:"); complete joins its track classes with " | "; without a track
    the generic variant is used."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if task in ("extract", "lego"):
        if track_name:
            return TASK_INSTRUCTIONS[task].format(TRACK_NAME=_check_track(track_name).upper())
        return TASK_INSTRUCTIONS[f"{task}_default"]
    if task == "complete":
        if complete_track_classes:
            if isinstance(complete_track_classes, str):
                complete_track_classes = [complete_track_classes]
            classes = " | ".join(_check_track(c).upper() for c in complete_track_classes)
            return TASK_INSTRUCTIONS["complete"].format(TRACK_CLASSES=classes)
        return TASK_INSTRUCTIONS["complete_default"]
    return TASK_INSTRUCTIONS[task]


def format_instruction(instruction: str) -> str:
    """An instruction ends with a colon (official `_format_instruction`)."""
    return instruction if instruction.endswith(":") else instruction + ":"


def format_metas(bpm=None, keyscale: str | None = None, timesignature=None, duration: float | None = None) -> str:
    """The metadata block (official `_build_metadata_dict` + `_dict_to_meta_string`): four "- name: value" lines,
    "N/A" for what is not given, the duration as whole seconds ("30 seconds" when not given)."""
    if bpm is None or bpm == 0 or bpm == "":
        bpm_text = NOT_GIVEN
    else:
        if isinstance(bpm, bool) or not isinstance(bpm, int) or not BPM_MIN <= bpm <= BPM_MAX:
            raise ValueError(f"bpm must be an integer in [{BPM_MIN}, {BPM_MAX}] (0 or empty: not given), got {bpm!r}")
        bpm_text = str(bpm)
    key = "" if keyscale is None else str(keyscale).strip()
    if key and key != NOT_GIVEN and key not in VALID_KEYSCALES:
        raise ValueError(
            f"keyscale must look like 'C major', 'F# minor' or 'B♭ major' (or be empty), got {keyscale!r}"
        )
    key_text = key if key and key != NOT_GIVEN else NOT_GIVEN
    ts = "" if timesignature is None else str(timesignature).strip()
    if ts and ts != NOT_GIVEN and ts not in VALID_TIME_SIGNATURES:
        raise ValueError(
            f"timesignature must be one of {', '.join(VALID_TIME_SIGNATURES)} (beats per bar; or empty), "
            f"got {timesignature!r}"
        )
    ts_text = ts if ts and ts != NOT_GIVEN else NOT_GIVEN
    if duration is None:
        seconds = DEFAULT_META_DURATION
    else:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
                or not 0 < duration <= DURATION_MAX:
            raise ValueError(f"duration must be a number of seconds in (0, {DURATION_MAX}], got {duration!r}")
        seconds = int(duration)
    return (
        f"- bpm: {bpm_text}\n"
        f"- timesignature: {ts_text}\n"
        f"- keyscale: {key_text}\n"
        f"- duration: {seconds} seconds\n"
    )


def format_caption(caption: str, instruction: str, metas: str) -> str:
    """The caption-branch text (official SFT_GEN_PROMPT.format(instruction, caption, metas))."""
    if not isinstance(caption, str) or len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"caption must be a text of at most {MAX_CAPTION_CHARS} characters")
    return SFT_GEN_PROMPT.format(format_instruction(instruction), caption, metas)


def format_lyrics(lyrics: str, language: str = "en") -> str:
    """The lyric-branch text (official `_format_lyrics`: LYRIC_GEN_PROMPT.format(language, lyrics))."""
    if not isinstance(lyrics, str) or len(lyrics) > MAX_LYRIC_CHARS:
        raise ValueError(f"lyrics must be a text of at most {MAX_LYRIC_CHARS} characters")
    if language not in VALID_LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(VALID_LANGUAGES)}; got {language!r}")
    return LYRIC_GEN_PROMPT.format(language, lyrics)


@dataclass(frozen=True)
class Prompts:
    """The texts of one item: `caption` and `lyrics` for the two text branches, and `non_cover_caption`, the
    text2music caption the cover-strength switch moves to (official `_prepare_text_conditioning_inputs`)."""

    caption: str
    lyrics: str
    non_cover_caption: str


def build_prompts(
    task: str,
    caption: str,
    lyrics: str = "",
    language: str = "en",
    *,
    bpm=None,
    keyscale: str | None = None,
    timesignature=None,
    duration: float | None = None,
    track_name: str | None = None,
    complete_track_classes=None,
    instruction: str | None = None,
) -> Prompts:
    """Caption and lyric texts for a task. `instruction` overrides the task's instruction (official
    `instructions[i]`); `duration` is the seconds written into the metadata (the handler uses the source audio's
    length when there is one, else the requested duration)."""
    metas = format_metas(bpm, keyscale, timesignature, duration)
    instr = instruction if instruction else task_instruction(task, track_name, complete_track_classes)
    return Prompts(
        caption=format_caption(caption, instr, metas),
        lyrics=format_lyrics(lyrics, language),
        non_cover_caption=format_caption(caption, DEFAULT_DIT_INSTRUCTION, metas),
    )
