"""Speed and memory helpers around the pipeline: compiled transformer blocks, a decode that survives running out of
device memory, and low-VRAM offloading of idle components (bench/README.md). The fast-path switches themselves are
`sampling.options.SpeedOptions` (all off: `sampling.options.EAGER`)."""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .audio import OVERLAP_WINDOW_FRAMES, SAMPLE_RATE, Progress, decode_latents
from .models.dcae import DCAE
from .models.vocoder import Vocoder

MIN_WINDOW_FRAMES = 16
"""Smallest DCAE window the out-of-memory fallback tries (latent frames, 1.5 s)."""


def compile_blocks(transformer: nn.Module, *, mode: str | None = None) -> None:
    """torch.compile each transformer block in place (state-dict names unchanged); a compiled block is kept."""
    for block in transformer.transformer_blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(mode=mode, dynamic=False)


def free_device_memory(device: torch.device) -> None:
    """Drop unreferenced tensors and hand cached blocks back (after an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_with_fallback(
    dcae: DCAE,
    vocoder: Vocoder,
    latents: Tensor,
    *,
    sample_rate: int = SAMPLE_RATE,
    overlapped: bool = False,
    window_frames: int = OVERLAP_WINDOW_FRAMES,
    min_window_frames: int = MIN_WINDOW_FRAMES,
    callback: Progress | None = None,
) -> Tensor:
    """`audio.decode_latents`, retried on out-of-memory: first as the official overlapped decode, then with the
    DCAE window halved down to `min_window_frames`; then an OutOfMemoryError naming what would fit (design §1, §6)."""
    device = next(dcae.parameters()).device
    while True:
        try:
            return decode_latents(dcae, vocoder, latents, sample_rate=sample_rate, overlapped=overlapped,
                                  window_frames=window_frames, callback=callback)
        except torch.OutOfMemoryError:
            free_device_memory(device)
            if not overlapped:
                overlapped = True
            elif window_frames // 2 >= min_window_frames and (window_frames // 2) % 4 == 0:
                window_frames //= 2
            else:
                raise torch.OutOfMemoryError(
                    f"decoding latents {list(latents.shape)} ran out of memory on {device} even with overlapped "
                    f"windows of {window_frames} latent frames; settings that fit: decode in low-VRAM mode "
                    "(low_vram=True moves the transformer off the device first), decode one batch item at a time, "
                    "or move the DCAE and vocoder to the CPU (dcae.to('cpu'), vocoder.to('cpu'))"
                ) from None


class Offloader:
    """Keeps components on `home` (the CPU) and moves each to `device` only for the phase that uses it.

    Entering `use` gives a module device copies of its parameters and buffers; leaving it puts its own (home)
    tensors back, nothing is copied back, so weights must not be changed inside a phase: patch LoRAs before.
    """

    def __init__(self, device: torch.device | str, *, home: torch.device | str = "cpu", pin_memory: bool = True):
        self.device = torch.device(device)
        self.home = torch.device(home)
        self.pin_memory = pin_memory and self.device.type == "cuda" and self.home.type == "cpu"

    @property
    def active(self) -> bool:
        """Whether phases move anything (device and home differ)."""
        return self.device != self.home

    def park(self, *modules: nn.Module | None) -> None:
        """Move modules home now (pinned for fast copies when the device is a GPU)."""
        for module in modules:
            if module is None:
                continue
            for tensor in module_tensors(module):
                home = tensor.data.to(self.home)
                tensor.data = home.pin_memory() if self.pin_memory and not home.is_pinned() else home
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def use(self, *modules: nn.Module | None) -> Iterator[None]:
        """Inside, `modules` hold device copies of their parameters and buffers; afterwards their own tensors again."""
        saved: list[tuple[dict, str, Tensor]] = []
        copies: dict[int, Tensor] = {}
        for table, name, tensor in _tensor_slots(modules) if self.active else ():
            if id(tensor) not in copies:
                copies[id(tensor)] = self._copy(tensor)
            saved.append((table, name, tensor))
            table[name] = copies[id(tensor)]
        try:
            yield
        finally:
            for table, name, tensor in reversed(saved):
                table[name] = tensor
            if saved and self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _copy(self, tensor: Tensor) -> Tensor:
        """A device copy of a parameter (as a parameter) or buffer."""
        moved = tensor.detach().to(self.device, non_blocking=True)
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(moved, requires_grad=tensor.requires_grad)
        return moved


def _tensor_slots(modules: tuple[nn.Module | None, ...]) -> list[tuple[dict, str, Tensor]]:
    """(owning table, name, tensor) of every parameter and buffer of `modules` (skipping None)."""
    slots = []
    for module in modules:
        for owner in module.modules() if module is not None else ():
            for table in (owner._parameters, owner._buffers):
                slots.extend((table, name, t) for name, t in table.items() if t is not None)
    return slots


def module_tensors(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of `module` once (tied weights once)."""
    seen: dict[int, Tensor] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())
