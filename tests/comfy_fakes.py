"""A stand-in for ComfyUI's `comfy.utils` / `comfy.model_management` for the interrupt tests (no ComfyUI needed)."""
from __future__ import annotations

import sys
import types

import torch


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


def install_interrupting_comfy(monkeypatch) -> types.SimpleNamespace:
    """Fake `comfy`, `comfy.utils` and `comfy.model_management` in sys.modules; the interrupt check counts its calls
    in `state.checks` and raises Interrupted once `state.interrupt_at` checks ran (then disarms)."""
    state = types.SimpleNamespace(checks=0, interrupt_at=None)

    def throw_exception_if_processing_interrupted():
        state.checks += 1
        if state.interrupt_at is not None and state.checks >= state.interrupt_at:
            state.interrupt_at = None
            raise Interrupted("Processing interrupted")

    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.soft_empty_cache = lambda force=False: None
    mm.free_memory = lambda num_bytes, device: None
    mm.get_torch_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: types.SimpleNamespace(update_absolute=lambda value, total=None: None)
    root = types.ModuleType("comfy")
    root.utils, root.model_management = utils, mm
    for name, module in (("comfy", root), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    return state
