"""The ACESTEP_MODEL socket value: a small immutable handle (cache key + LoRA stack) and the model behind it.

A loader node returns `ModelHandle(key)`; a LoRA loader returns a new handle with one more `LoraEntry`, so
stacking, changing or removing LoRAs never reloads the checkpoint. Sampling nodes call `transformer_for`, which
makes exactly the handle's LoRAs active on the shared transformer (`acestep_core.lora.ensure_loras`) just before
sampling.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..acestep_core import fast
from ..acestep_core.loading import AceStepModel, load_acestep
from ..acestep_core.lora import LoraWeights, ensure_loras, load_lora_file
from . import bridge
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

    def with_lora(self, entry: LoraEntry) -> ModelHandle:
        """A new handle with `entry` stacked on top (this one is unchanged)."""
        return replace(self, loras=self.loras + (entry,))


def choose_device(device: str) -> torch.device:
    """'auto' -> ComfyUI's (or the best available) device; 'cuda' must exist."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
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
        raise ValueError(f"dtype must be 'auto' or one of {tuple(DTYPES)}, got {dtype!r}")
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
    """Load every component of a checkpoint, with a progress bar over the components.

    `in_cpu_memory` (the loader's low_vram): the weights are read into CPU memory and stay there (low-VRAM mode,
    acestep_core.fast.placement), so the whole model is never on the GPU at once, not even while loading.
    """
    device = torch.device(key.device)
    if not in_cpu_memory:
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


def model_for(handle: ModelHandle) -> AceStepModel:
    """The loaded model of a handle (loaded again if the cache dropped it)."""
    if not isinstance(handle, ModelHandle):
        raise ValueError(f"model must come from the ACE-Step Loader node, got {type(handle).__name__}")
    if handle.levers.cpu_offload:
        return MODELS.get(handle.key, lambda: _load(handle.key, in_cpu_memory=True))
    return MODELS.get(handle.key, lambda: _load(handle.key))


def transformer_for(handle: ModelHandle) -> torch.nn.Module:
    """The transformer with exactly the handle's LoRAs applied (no work when they already are)."""
    model = model_for(handle)
    modes = {entry.honour_alpha for entry in handle.loras}
    if len(modes) > 1:
        raise ValueError(
            "stacked LoRA loaders disagree on honour_alpha; set honour_alpha the same on every ACE-Step LoRA Loader"
        )
    pairs = [(entry.weights, entry.strength) for entry in handle.loras]
    ensure_loras(model.transformer, pairs, honour_alpha=bool(modes and modes.pop()))
    return model.transformer


def on_device(handle: ModelHandle, *modules: torch.nn.Module | None):
    """Context for a node's work with `modules` of the handle's model: in low-VRAM mode (the loader's low_vram)
    every component waits in CPU memory and only these are moved onto the device until the context ends; with
    torch_compile the transformer blocks are compiled (the first call shows its cost as progress text)."""
    model = model_for(handle)
    return fast.phase(fast.prepare(model, handle.levers, notify=bridge.progress_text), *modules)


@functools.lru_cache(maxsize=8)
def _read_lora(path: str, version: tuple) -> LoraWeights:
    return load_lora_file(path)


def read_lora(path: Path) -> LoraWeights:
    """A LoRA file or folder, read again only when its .safetensors files change."""
    files = [path] if path.is_file() else sorted(path.glob("*" + bridge.SAFETENSORS))
    version = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _read_lora(str(path), version)
