"""Speed and memory helpers around the pipeline: compiled transformer blocks, a decode that survives running out of
device memory, and low-VRAM offloading of idle components (bench/README.md). The fast-path switches themselves are
`sampling.options.SpeedOptions` (all off: `sampling.options.EAGER`)."""
from __future__ import annotations

import gc
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import audio
from .audio import OVERLAP_WINDOW_FRAMES, SAMPLE_RATE, Progress
from .models.dcae import DCAE
from .models.vocoder import Vocoder

MIN_WINDOW_FRAMES = 16
"""Smallest DCAE window the out-of-memory fallback tries (latent frames, 1.5 s)."""


Notify = Callable[[str], None]
"""`notify(text)`: a one-line status message (the CLI prints it, a node shows it as progress text)."""


@dataclass(frozen=True)
class Levers:
    """The speed and memory switches a user reaches from the nodes and the command line (docs/memory-and-speed.md).

    `cpu_offload` keeps every component in (pinned) CPU memory and moves each onto the device only for its phase
    (text encoding, diffusion, DCAE + vocoder decode); `torch_compile` compiles the transformer blocks (the first
    call pays the compile time; without a working compiler it falls back to eager with a warning);
    `overlapped_decode` forces the official windowed decode (without it the single-pass decode is tried first and
    the windowed one is the out-of-memory fallback). None of them changes the result beyond float rounding.
    """

    cpu_offload: bool = False
    torch_compile: bool = False
    overlapped_decode: bool = False

    def __post_init__(self) -> None:
        for name in ("cpu_offload", "torch_compile", "overlapped_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def compiler_problem(device: torch.device | str) -> str | None:
    """Why torch.compile cannot build kernels for `device` here (None when it can, as far as one can tell)."""
    device = torch.device(device)
    try:
        from torch import _dynamo
    except Exception as error:  # pragma: no cover - depends on the PyTorch build
        return f"this PyTorch has no torch.compile ({error})"
    if not _dynamo.is_dynamo_supported():  # pragma: no cover - e.g. a Python newer than the PyTorch build
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return f"torch.compile does not support Python {version} in this PyTorch"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            hint = "pip install triton-windows" if os.name == "nt" else "pip install triton"
            return f"Triton (the GPU kernel compiler torch.compile needs) is not installed; {hint}"
        return None
    if device.type == "cpu":
        names = (os.environ.get("CXX"), "cl") if os.name == "nt" else (os.environ.get("CXX"), "c++", "g++", "clang++")
        if not any(name and shutil.which(name) for name in names):
            what = "Visual Studio Build Tools (cl.exe)" if os.name == "nt" else "a C++ compiler (g++ or clang++)"
            return f"torch.compile on the CPU needs {what}, and none was found on PATH"
    return None


_COMPILE_FAILURES = ("torch._dynamo", "torch._inductor")
"""Modules whose exceptions mean "the compiler failed", not "the model failed": the guard falls back to eager."""


def compile_blocks(transformer: nn.Module, *, mode: str | None = None, notify: Notify | None = None,
                   device: torch.device | str | None = None, backend: str | Callable = "inductor") -> bool:
    """torch.compile each transformer block in place (state-dict names unchanged); a compiled block is kept.

    Returns whether the blocks are compiled. Without a usable compiler (`compiler_problem`) nothing is compiled
    and a warning says why (once per transformer). If compiling still fails at the first call (a broken
    toolchain), every block goes back to eager, the call is rerun eagerly and a warning names the error: a
    generation never dies of it.
    `notify` hears "compiling ..." before the first compiled call and the time it took after it.
    """
    blocks = list(transformer.transformer_blocks)
    if all(getattr(b, "_acestep_compiled", False) for b in blocks):
        return True
    if getattr(transformer, "_acestep_compile_failed", False):
        return False  # said once already; every later call runs eager quietly
    problem = compiler_problem(device if device is not None else next(transformer.parameters()).device)
    if problem is not None:
        transformer._acestep_compile_failed = True
        _fallback_warning(problem, notify)
        return False
    state = {"first": True, "announced": False, "failed": False, "seconds": 0.0}

    def revert(error: BaseException) -> None:
        state["failed"] = True
        transformer._acestep_compile_failed = True
        for b in blocks:
            b._compiled_call_impl = None
            b._acestep_compiled = False
        root = getattr(error, "inner_exception", None) or error.__cause__ or error
        lines = [line.strip() for line in str(root).splitlines() if line.strip()] or [""]
        _fallback_warning(f"compiling failed ({type(root).__name__}: {lines[0][:200]})", notify)

    for index, block in enumerate(blocks):
        block.compile(backend=backend, mode=mode, dynamic=False)
        compiled = block._compiled_call_impl

        def guarded(*args, _block=block, _compiled=compiled, _last=index == len(blocks) - 1, **kwargs):
            if state["failed"]:
                return _block._call_impl(*args, **kwargs)
            started = time.perf_counter()
            if not state["announced"] and notify is not None:
                state["announced"] = True
                notify("torch.compile: compiling the transformer blocks (first call only; can take a few minutes)")
            try:
                out = _compiled(*args, **kwargs)
            except Exception as error:
                if not type(error).__module__.startswith(_COMPILE_FAILURES):
                    raise
                out = _block._call_impl(*args, **kwargs)  # a model error raises here, as it would uncompiled
                revert(error)
                return out
            if state["first"]:
                state["seconds"] += time.perf_counter() - started
                if _last:
                    state["first"] = False
                    if notify is not None:
                        notify(f"torch.compile: compiled in {state['seconds']:.1f} s")
            return out

        block._compiled_call_impl = guarded
        block._acestep_compiled = True
    return True


def _fallback_warning(reason: str, notify: Notify | None) -> None:
    text = f"torch.compile is off, running eager (same result, no speed-up): {reason}"
    warnings.warn(text, RuntimeWarning, stacklevel=3)
    if notify is not None:
        notify(text)


def decode(dcae: DCAE, vocoder: Vocoder, latents: Tensor, *, levers: Levers = Levers(),
           sample_rate: int = SAMPLE_RATE, callback: Progress | None = None) -> Tensor:
    """The decode of every entry point (CLI, Decode node, long form): `decode_with_fallback`, overlapped from the
    start when `levers.overlapped_decode` asks for it (design §1, §6)."""
    return decode_with_fallback(dcae, vocoder, latents, sample_rate=sample_rate, overlapped=levers.overlapped_decode,
                                callback=callback)


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
            return audio.decode_latents(dcae, vocoder, latents, sample_rate=sample_rate, overlapped=overlapped,
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
                    "(--cpu-offload, low_vram=True on the loader: the transformer leaves the device before decoding), "
                    "decode one batch item at a time, "
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
        self._stack: list[list[tuple[dict, str, Tensor]]] = []  # the slots of each phase entered, outermost first

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
        """Inside, `modules` hold device copies of their parameters and buffers; afterwards their own tensors again.

        Phases nest one at a time: entering an inner phase sends the outer phase's modules home first and brings
        them back after it (e.g. long-form decodes each window inside the diffusion phase), so only the running
        phase's modules are ever on the device.
        """
        slots = [(table, name, tensor) for table, name, tensor in _tensor_slots(modules)] if self.active else []
        stack = self._stack
        outer = [slot for frame in stack for slot in frame]
        self._send_home(outer)
        self._bring_in(slots)
        stack.append(slots)
        try:
            yield
        finally:
            stack.pop()
            self._send_home(slots)
            self._bring_in(outer)
            if slots and self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _bring_in(self, slots: list[tuple[dict, str, Tensor]]) -> None:
        """Put device copies of the home tensors of `slots` in their places (tied tensors copied once)."""
        copies: dict[int, Tensor] = {}
        for table, name, tensor in slots:
            if id(tensor) not in copies:
                copies[id(tensor)] = self._copy(tensor)
            table[name] = copies[id(tensor)]

    @staticmethod
    def _send_home(slots: list[tuple[dict, str, Tensor]]) -> None:
        for table, name, tensor in reversed(slots):
            table[name] = tensor

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


# --------------------------------------------------------------------------------------------------------------
# low-VRAM mode on a loaded model (the AceStepModel of acestep_core.loading)


def _components(model) -> tuple[nn.Module | None, ...]:
    return model.text_encoder, model.transformer, model.dcae, model.vocoder


def placement(model, cpu_offload: bool) -> Offloader | None:
    """Put `model` in or out of low-VRAM mode; the Offloader its phases use, or None when it lives on its device.

    In low-VRAM mode every component sits in (pinned) CPU memory and `phase` moves it onto `model.device` for one
    phase only. The model remembers its mode, so a caller without the switch finds the weights back on the device
    (moved once) instead of silently computing on the CPU.
    """
    parked = getattr(model, "_acestep_parked", False)
    if not cpu_offload and not parked:
        return None
    device = torch.device(model.device)
    offloader = getattr(model, "_acestep_offloader", None)
    if offloader is None or offloader.device != device:
        offloader = Offloader(device)
        model._acestep_offloader = offloader
    if not offloader.active:
        return None
    if cpu_offload and not parked:
        offloader.park(*_components(model))
        for module in _components(model):
            if module is not None:
                module._acestep_device = device
        model._acestep_parked = True
    elif not cpu_offload and parked:
        for module in _components(model):
            for tensor in module_tensors(module) if module is not None else ():
                tensor.data = tensor.data.to(device)
            if module is not None:
                module.__dict__.pop("_acestep_device", None)
        model._acestep_parked = False
    return offloader if cpu_offload else None


def compute_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its parameters' device, or in low-VRAM mode the device its phases move it to
    (noise generators are made there, so a seed gives the same song with and without low-VRAM mode)."""
    return getattr(module, "_acestep_device", None) or next(module.parameters()).device


def phase(offloader: Offloader | None, *modules: nn.Module | None):
    """Context in which `modules` are on the compute device: a move-in with an Offloader, else nothing to do."""
    return offloader.use(*modules) if offloader is not None else nullcontext()


def prepare(model, levers: Levers, *, notify: Notify | None = None) -> Offloader | None:
    """Apply the levers to a loaded model before a generation: low-VRAM placement, compiled transformer blocks."""
    offloader = placement(model, levers.cpu_offload)
    if levers.torch_compile and model.transformer is not None:
        compile_blocks(model.transformer, notify=notify, device=model.device)
    return offloader
