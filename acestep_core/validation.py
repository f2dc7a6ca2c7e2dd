"""Running out of memory, turned into a message that names the settings which would fit (docs/comfyui.md, ComfyUI facts §C6).

A generation that does not fit raises `torch.OutOfMemoryError` (accelerators) or a RuntimeError from the CPU
allocator deep inside the transformer. :func:`call_explaining_oom` lets the failed call's tensors go, returns the
cached accelerator memory, and raises a `torch.OutOfMemoryError` whose message lists what to change: ComfyUI still
recognises it as out-of-memory (it then unloads its own models), and the user reads what to do.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")
CPU_OOM_MARKERS = ("can't allocate memory", "not enough memory")
"""Texts of the CPU allocator's RuntimeError when RAM runs out."""
SHORTEST_ADVISED_SECONDS = 10.0
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class MemorySettings:
    """The settings of one run that decide its memory, as the user set them."""

    stage: str  # what was running: "sampling", "decoding", ...
    seconds: float  # length of the song being processed
    batch_size: int = 1
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    batch_branches: bool = False
    offload_option: str | None = None  # name of the caller's setting that offloads weights, if it has one

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, (int, float)) or self.seconds < 0:
            raise ValueError(f"seconds must be a number >= 0, got {self.seconds!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError and for the CPU allocator's "can't allocate memory" RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in CPU_OOM_MARKERS)


def memory_advice(settings: MemorySettings) -> list[str]:
    """The changes that lower the memory of a run like `settings`, most effective first."""
    device = torch.device(settings.device)
    advice = []
    if settings.seconds > SHORTEST_ADVISED_SECONDS:
        shorter = max(SHORTEST_ADVISED_SECONDS, settings.seconds / 2)
        advice.append(f"a shorter song ({shorter:.0f} s instead of {settings.seconds:.0f} s; extend it afterwards)")
    if settings.batch_size > 1:
        advice.append(f"batch_size 1 instead of {settings.batch_size}")
    if settings.batch_branches:
        advice.append("batch_branches off (the guidance branches then run one after another)")
    if device.type != "cpu" and settings.dtype == torch.float32:
        advice.append("dtype bf16 on the loader (half the memory of fp32, the official setting)")
    if device.type != "cpu" and settings.offload_option:
        advice.append(f"{settings.offload_option} on (keeps the weights in RAM between uses)")
    if device.type != "cpu":
        advice.append("closing other programs that use the GPU, or device cpu (slow, but limited by RAM only)")
    else:
        advice.append("closing other programs to free RAM")
    return advice


def _free_memory_text(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return f"; {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free now"
    return ""


def out_of_memory_message(settings: MemorySettings, detail: str) -> str:
    """What ran out of memory, with which settings, and what to change (`detail`: the allocator's message)."""
    device = torch.device(settings.device)
    where = "GPU memory" if device.type != "cpu" else "memory (RAM)"
    dtype = DTYPE_NAMES.get(settings.dtype, str(settings.dtype).removeprefix("torch."))
    return (
        f"ACE-Step ran out of {where} while {settings.stage} {settings.seconds:.1f} s of audio "
        f"(batch_size {settings.batch_size}, {dtype} on {device}){_free_memory_text(device)}. "
        f"Settings that need less memory: {'; '.join(memory_advice(settings))}. [{detail}]"
    )


def call_explaining_oom(fn: Callable[[], T], settings: MemorySettings) -> T:
    """fn(); if it runs out of memory, free what it held and raise torch.OutOfMemoryError naming what would fit."""
    try:
        return fn()
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        lines = str(exc).strip().splitlines()
        detail = lines[0][:300] if lines else type(exc).__name__
    # outside the except block: the failed call's frames (and their tensors) are gone
    if torch.device(settings.device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise torch.OutOfMemoryError(out_of_memory_message(settings, detail))


# ---------------------------------------------------------------------------------------------------------------
# Bounds on what a user can give (docs/bad-inputs.md): every count and every text is limited where it enters, so
# that no input, however large, costs more than seconds before it is refused.

MAX_STEPS = 1000
"""Most sampling steps (and the largest oss step number): the nodes' widget maximum."""
MAX_BATCH = 64
"""Most items in one batch: the Empty Latent node's maximum."""
MAX_N_AVG = 16
"""Most flow-edit averaging passes: the Flow Edit node's maximum."""
MAX_TAGS_CHARS = 16_384
"""Longest tags text accepted; the text encoder reads 256 tokens (about 1,500 characters) of it anyway."""
MAX_LYRICS_CHARS = 20_000
"""Longest lyrics accepted: more than 4096 lyric tokens (the model's maximum) of any language hold."""
MAX_WEIGHT_MAGNITUDE = 1e6
"""Largest |value| accepted in a checkpoint or LoRA tensor; trained weights stay many orders of magnitude below."""


def check_count(name: str, value: object, high: int, low: int = 1) -> int:
    """`value` as an int in [low, high]; a ValueError naming `name` otherwise (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = f"{value!r}" if not isinstance(value, int) or abs(value) < 10**12 else f"an integer of {len(str(value))} digits"
        raise ValueError(f"{name} must be an integer >= {low} and <= {high}, got {shown}")
    return int(value)


def check_text(name: str, value: object, max_chars: int) -> str:
    """`value` as text of at most `max_chars` characters that is valid Unicode (None gives "").

    A lone surrogate code point (U+D800..U+DFFF, e.g. from a broken copy-paste or a JSON "\\ud800" escape) cannot be
    encoded as UTF-8, which every tokenizer needs; it is refused naming its position.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise ValueError(
            f"{name} are {len(value)} characters long; at most {max_chars} are accepted. Shorten them "
            "(a long text may be a file pasted by mistake)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} contain the lone surrogate code point U+{ord(value[err.start]):04X} at character {err.start + 1}, "
            "which is not valid Unicode; retype or re-paste that part"
        ) from None
    return value


def check_tensor_values(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN, infinite or absurdly large values in a floating tensor, in one pass (aminmax); `what` names it."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor.detach().reshape(-1))
    low, high = float(low), float(high)
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{what} contains NaN values; the file is corrupt or was saved from a diverged training run")
    if max(abs(low), abs(high)) > MAX_WEIGHT_MAGNITUDE:
        kind = "infinite" if math.isinf(low) or math.isinf(high) else "huge"
        raise ValueError(
            f"{what} contains {kind} values (from {low:g} to {high:g}, more than {MAX_WEIGHT_MAGNITUDE:g} in size); "
            "the file is corrupt or was saved from a diverged training run"
        )


MAX_REGION_SECONDS = 840.0
"""Largest |repaint_start| / |repaint_end|: a 10-minute source plus one 240 s extension."""


def check_request_counts(request: object) -> None:
    """The counts and seconds of a `pipeline.Request`, bounded before any work (the command line's entry point)."""
    check_count("batch_size", getattr(request, "batch_size", 1), MAX_BATCH)
    check_count("steps", getattr(request, "infer_step", 1), MAX_STEPS)
    check_count("edit_n_avg", getattr(request, "edit_n_avg", 1), MAX_N_AVG)
    for name in ("repaint_start", "repaint_end"):
        value = getattr(request, name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > MAX_REGION_SECONDS:
            raise ValueError(f"{name} must be a number of seconds within ±{MAX_REGION_SECONDS:.0f}, got {value!r}")
