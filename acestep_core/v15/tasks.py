"""Task inputs of ACE-Step 1.5: chunk masks, source latents, cover flags and the repaint mask, built as the
official handler builds them (`acestep/core/generation/handler/conditioning_masks.py`
`_build_chunk_masks_and_src_latents`, and `service_generate_execute.py` for `clean_src_latents`).

Tasks and what they feed the model:
- text2music: silence as the source, chunk mask 1, not a cover.
- cover: the source latents (the model turns them into 5 Hz hints: tokenize → detokenize), chunk mask 1, cover.
- repaint: the source with the span silenced, chunk mask 1 on the span and 0 elsewhere, a repaint mask for the
  step injection and crossfade (clean source = the unsilenced source).
- lego: like repaint when a span is given but the source is kept whole; without a span like extract.
- extract, complete: the source latents, chunk mask 1, not a cover (only the instruction text differs).
With `chunk_mask_mode="auto"` (the official handler default, `acestep/inference.py`) every item's chunk mask is
the 2.0 "model decides" value, repaint items included; "explicit" keeps the 0/1 masks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TASKS = ("text2music", "cover", "repaint", "lego", "extract", "complete")
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete")
SPAN_TASKS = ("repaint", "lego")
CHUNK_MASK_MODES = ("auto", "explicit")
AUTO_CHUNK_VALUE = 2.0
SAMPLE_RATE = 48_000
HOP = 1920  # audio samples per latent frame (25 latent frames per second)
# The handler's resolved repaint defaults: injection 0.5 and a crossfade of round(25·(1 − 0.5)) = 12 frames
# (repaint_mode "balanced", repaint_strength 0.5; tests/data/fixtures-15/README.md, turbo_repaint_auto_mask).
HANDLER_REPAINT_INJECTION_RATIO = 0.5
HANDLER_REPAINT_CROSSFADE_FRAMES = 12


@dataclass
class TaskInputs:
    """The task tensors of `generate_audio` (official argument names); `repaint_mask`/`clean_src_latents` are
    None unless an item has a span. `spans` lists ("repainting", start, end) or ("full", 0, T) per item."""

    src_latents: Tensor
    chunk_masks: Tensor
    is_covers: Tensor
    repaint_mask: Tensor | None
    clean_src_latents: Tensor | None
    spans: list[tuple[str, int, int]]


def seconds_to_frames(start: float | None, end: float | None, length: int) -> tuple[int, int]:
    """A span in seconds as latent frames [start, end) the way the handler converts it: a negative start shifts
    both ends right (the caller padded the source by that much on the left), frame = int(s·48000 // 1920), then
    start is clamped into [0, T − 1] and end into [start + 1, T]. `end` None or negative (the UI's −1) means the
    end of the latent."""
    start = 0.0 if start is None else start
    if end is None or (isinstance(end, (int, float)) and not isinstance(end, bool) and end < 0):
        end = max(length * HOP / SAMPLE_RATE, start + HOP / SAMPLE_RATE)
    for name, value in (("span start", start), ("span end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if end <= start:
        raise ValueError(f"a span needs end > start, got start={start}, end={end} seconds")
    shift = max(0.0, -start)
    first = int((start + shift) * SAMPLE_RATE // HOP)
    last = int((end + shift) * SAMPLE_RATE // HOP)
    first = max(0, min(first, length - 1))
    last = max(first + 1, min(last, length))
    return first, last


def _tile(silence_latent: Tensor, length: int) -> Tensor:
    """[T, C]: the silence latent's first T frames, repeated when it is shorter."""
    s = silence_latent[0] if silence_latent.ndim == 3 else silence_latent
    if s.shape[0] < length:
        s = s.repeat(-(-length // s.shape[0]), 1)
    return s[:length]


def build_task_inputs(
    task: str,
    *,
    batch: int,
    length: int,
    silence_latent: Tensor,
    source_latents: Tensor | None = None,
    spans: Sequence[tuple[int, int] | None] | None = None,
    chunk_mask_mode: str | Sequence[str] = "auto",
    code_hints: Sequence[bool] | None = None,
) -> TaskInputs:
    """Task tensors for a batch of `batch` items of `length` latent frames.

    `source_latents` [B, T, C] (or [1, T, C], shared) is the encoded source audio; `spans` gives each item's
    repaint/lego span in latent frames (see `seconds_to_frames`) or None; `chunk_mask_mode` is "auto" or
    "explicit", for all items or per item; `code_hints[i]` marks items that carry audio codes (they are covers,
    as in the official handler)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    for name, value in (("batch", batch), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(silence_latent, Tensor) or silence_latent.ndim not in (2, 3):
        raise ValueError("silence_latent must be a tensor [1, L, C] or [L, C]")
    channels = silence_latent.shape[-1]
    modes = [chunk_mask_mode] * batch if isinstance(chunk_mask_mode, str) else list(chunk_mask_mode)
    if len(modes) != batch or any(m not in CHUNK_MASK_MODES for m in modes):
        raise ValueError(f"chunk_mask_mode must be one of {CHUNK_MASK_MODES} (one value or one per item)")
    hints = [False] * batch if code_hints is None else [bool(h) for h in code_hints]
    if len(hints) != batch:
        raise ValueError(f"code_hints needs one flag per item ({batch})")

    if task in SOURCE_TASKS and source_latents is None and not all(hints):
        raise ValueError(f"task {task!r} needs source audio (source_latents)")
    if task == "text2music" and source_latents is not None:
        raise ValueError("text2music takes no source audio; use cover, repaint, lego, extract or complete")
    if source_latents is not None:
        if not isinstance(source_latents, Tensor) or source_latents.ndim != 3 or source_latents.shape[1] != length \
                or source_latents.shape[2] != channels or source_latents.shape[0] not in (1, batch):
            raise ValueError(
                f"source_latents must be [B={batch} or 1, T={length}, C={channels}], got "
                f"{tuple(source_latents.shape) if isinstance(source_latents, Tensor) else type(source_latents)}"
            )
        source_latents = source_latents.expand(batch, -1, -1)

    item_spans = [None] * batch if spans is None else list(spans)
    if len(item_spans) != batch:
        raise ValueError(f"spans needs one entry (a (start, end) frame pair or None) per item ({batch})")
    if task == "repaint" and any(s is None for s in item_spans):
        raise ValueError("repaint needs a span (start, end) for every item")
    if task not in SPAN_TASKS and any(s is not None for s in item_spans):
        raise ValueError(f"spans apply to repaint and lego only, not to {task!r}")
    checked: list[tuple[int, int] | None] = []
    for s in item_spans:
        if s is None:
            checked.append(None)
            continue
        a, b = s
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (a, b)) or not 0 <= a < b <= length:
            raise ValueError(f"a span must be integer frames 0 <= start < end <= {length}, got {s!r}")
        checked.append((a, b))

    silence = _tile(silence_latent, length)
    device, dtype = silence.device, silence.dtype
    chunk = torch.ones(batch, length, dtype=torch.float32, device=device)
    is_covers, out_spans, src = [], [], []
    for i, span in enumerate(checked):
        if span is not None:
            a, b = span
            chunk[i] = 0.0
            chunk[i, a:b] = 1.0
            out_spans.append(("repainting", a, b))
            is_covers.append(False)
        else:
            out_spans.append(("full", 0, length))
            is_covers.append(task == "cover" or hints[i])
        if source_latents is None:
            src.append(silence.clone())
        else:
            item = source_latents[i].to(device=device, dtype=dtype).clone()
            if span is not None and task != "lego":
                item[span[0]:span[1]] = silence[span[0]:span[1]]
            src.append(item)
    for i, mode in enumerate(modes):
        if mode == "auto":
            chunk[i] = AUTO_CHUNK_VALUE
    repaint_mask = clean = None
    if any(s is not None for s in checked):
        repaint_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        for i, span in enumerate(checked):
            if span is not None:
                repaint_mask[i] = False
                repaint_mask[i, span[0]:span[1]] = True
        clean = source_latents.to(device=device, dtype=dtype).clone()
    return TaskInputs(
        src_latents=torch.stack(src),
        chunk_masks=chunk.unsqueeze(-1).expand(batch, length, channels).to(dtype).contiguous(),
        is_covers=torch.tensor(is_covers, dtype=torch.bool, device=device),
        repaint_mask=repaint_mask,
        clean_src_latents=clean,
        spans=out_spans,
    )
