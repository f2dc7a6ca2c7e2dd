"""Running out of memory, turned into a message that names the settings which would fit (docs/comfyui.md, ComfyUI facts §C6).

A generation that does not fit raises `torch.OutOfMemoryError` (accelerators) or a RuntimeError from the CPU
allocator deep inside the transformer. :func:`call_explaining_oom` lets the failed call's tensors go, returns the
cached accelerator memory, and raises a `torch.OutOfMemoryError` whose message lists what to change: ComfyUI still
recognises it as out-of-memory (it then unloads its own models), and the user reads what to do.
"""
from __future__ import annotations

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
