"""The ACESTEP_MODEL socket value: a small immutable handle (cache key + LoRA stack) and the model behind it.

A loader node returns `ModelHandle(key)`; a LoRA loader returns a new handle with one more `LoraEntry`, so
stacking, changing or removing LoRAs never reloads the checkpoint. Sampling nodes call `transformer_for`, which
makes exactly the handle's LoRAs active on the shared transformer (`acestep_core.lora.ensure_loras`) just before
sampling.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    # The loaded model, held while ComfyUI keeps this handle as a node output (after ComfyUI's memory manager has
    # unloaded the model, the cache lets go of it and this is what keeps it; see nodes/comfy_models.py).
    model: object = field(default=None, compare=False, repr=False)

    def with_lora(self, entry: LoraEntry) -> ModelHandle:
        """A new handle with `entry` stacked on top (this one is unchanged)."""
        return ModelHandle(self.key, self.loras + (entry,), self.model)


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


def _load(key: ModelKey) -> AceStepModel:
    """Load every component of a checkpoint, with a progress bar over the components (inside ComfyUI onto its offload
    device: `comfy_models.use` has ComfyUI move each component to key.device when a node runs it)."""
    device = bridge.staging_device(torch.device(key.device))
    bridge.free_memory(_weights_bytes(Path(key.path)), device)
    progress = bridge.Progress(4)
    return load_acestep(
        key.path, dtype=key.dtype, device=device, progress=lambda name, done, total: progress.update(done, total)
    )


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
    model = MODELS.get(key, lambda: _load(key))
    comfy_models.use(model, torch.device(key.device), components, lambda loaded: MODELS.release(key, loaded), extra)
    return model


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


@functools.lru_cache(maxsize=8)
def _read_lora(path: str, version: tuple) -> LoraWeights:
    return load_lora_file(path)


def read_lora(path: Path) -> LoraWeights:
    """A LoRA file or folder, read again only when its .safetensors files change."""
    files = [path] if path.is_file() else sorted(path.glob("*" + bridge.SAFETENSORS))
    version = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _read_lora(str(path), version)
