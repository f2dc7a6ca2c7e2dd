"""The ACESTEP_MODEL socket value: a small immutable handle (cache key + LoRA stack) and the model behind it.

A loader node returns `ModelHandle(key)`; a LoRA loader returns a new handle with one more `LoraEntry`, so
stacking, changing or removing LoRAs never reloads the checkpoint. Sampling nodes call `transformer_for`, which
makes exactly the handle's LoRAs active on the shared transformer (`acestep_core.lora.ensure_loras`) just before
sampling.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..acestep_core import fast
from ..acestep_core.loading import AceStepModel, load_acestep
from ..acestep_core.lora import LoraWeights, ensure_loras, load_lora_file
from . import bridge, comfy_models
from .cache import MODELS, ModelKey

SOCKET = "ACESTEP_MODEL"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA on the stack: its weights, strength and whether its training alpha is honoured."""

    weights: LoraWeights
    strength: float
    honour_alpha: bool


@dataclass(frozen=True)
class ModelHandle:
    """ACESTEP_MODEL: which cached model to use and which LoRAs to apply to its transformer."""

    key: ModelKey
    loras: tuple[LoraEntry, ...] = ()
    levers: fast.Levers = fast.Levers()  # the loader's low_vram / torch_compile switches
    # The loaded model, held while ComfyUI keeps this handle as a node output (after ComfyUI's memory manager has
    # unloaded the model, the cache lets go of it and this is what keeps it; see nodes/comfy_models.py).
    model: object = field(default=None, compare=False, repr=False)

    def with_lora(self, entry: LoraEntry) -> ModelHandle:
        """A new handle with `entry` stacked on top (this one is unchanged)."""
        return replace(self, loras=self.loras + (entry,))


def choose_device(device: str) -> torch.device:
    """'auto' -> ComfyUI's (or the best available) device; 'cuda' must exist."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r:.200}")
    if device == "auto":
        return bridge.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but PyTorch sees no CUDA GPU; choose 'auto' or 'cpu'")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a GPU that runs it, fp32 on cpu; else the named dtype."""
    if dtype == "auto":
        return bridge.default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {tuple(DTYPES)}, got {dtype!r:.200}")
    return DTYPES[dtype]


def make_key(path: Path, dtype: torch.dtype, device: torch.device) -> ModelKey:
    """Cache key of a checkpoint path loaded in dtype on device."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ModelKey(str(Path(path).resolve()), str(dtype).removeprefix("torch."), str(device))


def _weights_bytes(path: Path) -> int:
    """Size of the checkpoint's safetensors files: an upper bound of the memory the model needs."""
    files = [path] if path.is_file() else list(path.rglob("*" + bridge.SAFETENSORS))
    return sum(f.stat().st_size for f in files)


def _load(key: ModelKey, in_cpu_memory: bool = False) -> AceStepModel:
    """Load every component of a checkpoint, with a progress bar over the components (inside ComfyUI onto its offload
    device: `comfy_models.use` has ComfyUI move each component to key.device when a node runs it).

    `in_cpu_memory` (the loader's low_vram outside ComfyUI): the weights are read into CPU memory and stay there
    (low-VRAM mode, acestep_core.fast.placement), so the whole model is never on the GPU at once, not even while
    loading.
    """
    device = torch.device(key.device)
    if not in_cpu_memory:
        device = bridge.staging_device(device)
        bridge.free_memory(_weights_bytes(Path(key.path)), device)
    progress = bridge.Progress(4)
    model = load_acestep(
        key.path, dtype=key.dtype, device="cpu" if in_cpu_memory else device,
        progress=lambda name, done, total: progress.update(done, total),
    )
    if in_cpu_memory:
        model.device = device
        fast.placement(model, True)
    return model


def model_for(handle: ModelHandle, components=comfy_models.ALL, extra: dict | None = None) -> AceStepModel:
    """The loaded model of a handle (loaded again if the cache dropped it).

    Inside ComfyUI, `components` (and `extra` modules such as a StemGen branch) are then loaded by ComfyUI's memory
    manager on the handle's device: pass everything the node is about to run, in one call.
    """
    if getattr(handle, "family", None) == "1.5":
        raise ValueError("model is an ACE-Step 1.5 model; this node runs ACE-Step v1 models only (1.5 runs in the "
                         "Sampler, Encode, Decode, Repaint Region and the ACE-Step 1.5 nodes)")
    if not isinstance(handle, ModelHandle):
        raise ValueError(f"model must come from the ACE-Step Loader node, got {type(handle).__name__}")
    key = handle.key
    in_cpu_memory = handle.levers.cpu_offload and not _inside_comfyui()
    model = MODELS.get(key, (lambda: _load(key, in_cpu_memory=True)) if in_cpu_memory else (lambda: _load(key)))
    if handle.levers.cpu_offload and _inside_comfyui():
        # low VRAM inside ComfyUI: nothing up front; `on_device` has ComfyUI load each phase's components
        _mark_compute_device(model, torch.device(key.device))
        components, extra = (), None
    _comfy_load(model, key, components, extra)
    return model


def _inside_comfyui() -> bool:
    return bridge.memory_manager() is not None


def _comfy_load(model: AceStepModel, key: ModelKey, components, extra: dict | None = None) -> None:
    comfy_models.use(model, torch.device(key.device), components, lambda loaded: MODELS.release(key, loaded), extra)


def _mark_compute_device(model: AceStepModel, device: torch.device) -> None:
    """Inside ComfyUI in low-VRAM mode a component may be parked on ComfyUI's offload device while a node makes its
    noise: the noise is still made where the component computes (acestep_core.fast.compute_device)."""
    for attribute, _, _ in comfy_models.COMPONENTS.values():
        module = getattr(model, attribute, None)
        if module is not None:
            module._acestep_device = device


def transformer_for(handle: ModelHandle) -> torch.nn.Module:
    """The transformer with exactly the handle's LoRAs applied (no work when they already are)."""
    model = model_for(handle, ("transformer",))
    modes = {entry.honour_alpha for entry in handle.loras}
    if len(modes) > 1:
        raise ValueError(
            "stacked LoRA loaders disagree on honour_alpha; set honour_alpha the same on every ACE-Step LoRA Loader"
        )
    pairs = [(entry.weights, entry.strength) for entry in handle.loras]
    ensure_loras(model.transformer, pairs, honour_alpha=bool(modes and modes.pop()))
    return model.transformer


def on_device(handle: ModelHandle, *modules: torch.nn.Module | None):
    """Context for a node's work with `modules` of the handle's model (a phase); with torch_compile the transformer
    blocks are compiled first (the first call shows its cost as progress text).

    Low-VRAM mode (the loader's low_vram, docs/memory-and-speed.md): outside ComfyUI every component waits in CPU
    memory and only `modules` are moved onto the device until the context ends (acestep_core.fast.Offloader).
    Inside ComfyUI its memory manager does all placement: this asks it to load just `modules` (ComfyUI unloads the
    others when it needs the room) and moves no weight itself.
    """
    model = model_for(handle, components=())
    if not _inside_comfyui():
        return fast.phase(fast.prepare(model, handle.levers, notify=bridge.progress_text), *modules)
    fast.prepare(model, replace(handle.levers, cpu_offload=False), notify=bridge.progress_text)
    if not handle.levers.cpu_offload:
        return contextlib.nullcontext()
    return _comfy_phase(handle, model, modules)


_COMFY_PHASES: dict[int, list] = {}  # id(model) -> the modules of its open phases, outermost first (low VRAM)


@contextlib.contextmanager
def _comfy_phase(handle: ModelHandle, model: AceStepModel, modules):
    """Low VRAM inside ComfyUI: ComfyUI loads the phase's modules; when an inner phase ends (Long Form decodes a
    window inside its transformer phase) the outer phase's modules are loaded again, since ComfyUI may have
    unloaded them to make room."""

    def load(phase_modules) -> None:
        names, extra = [], {}
        for module in phase_modules:
            if module is None:
                continue
            name = next((n for n, (attribute, _, _) in comfy_models.COMPONENTS.items()
                         if getattr(model, attribute, None) is module), None)
            if name is not None:
                names.append(name)
            else:
                extra[comfy_models.STEMGEN[0]] = module  # the one module a node runs beside the model's own
        _comfy_load(model, handle.key, names, extra)

    stack = _COMFY_PHASES.setdefault(id(model), [])
    load(modules)
    stack.append(modules)
    try:
        yield
    finally:
        stack.pop()
        if stack:
            load(stack[-1])
        else:
            _COMFY_PHASES.pop(id(model), None)


@functools.lru_cache(maxsize=8)
def _read_lora(path: str, version: tuple) -> LoraWeights:
    return load_lora_file(path)


def read_lora(path: Path) -> LoraWeights:
    """A LoRA file or folder, read again only when its .safetensors files change."""
    files = [path] if path.is_file() else sorted(path.glob("*" + bridge.SAFETENSORS))
    version = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _read_lora(str(path), version)
