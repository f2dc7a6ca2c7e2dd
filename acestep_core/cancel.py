"""Cancel checks inside long model calls (docs/bad-inputs.md, Interrupts).

A single decoder or vocoder call on a long song takes seconds on a CPU; checking for cancel only between calls
lets a Cancel wait that long. :func:`checked_calls` runs a check before every sub-module call of the given modules
while inside, so a cancel stops the work within one layer. It changes no number: the hooks only call `check`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def checked_calls(check: Callable[[], None] | None, *modules: torch.nn.Module) -> Iterator[None]:
    """While inside, `check()` runs before the forward of every sub-module of `modules` (nothing when check is None).

    `check` raises to cancel (ComfyUI: InterruptProcessingException); the hooks are removed on the way out.
    """
    if check is None:
        yield
        return

    def hook(_module: torch.nn.Module, _args: tuple) -> None:
        check()

    handles = [sub.register_forward_pre_hook(hook) for module in modules for sub in module.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
