"""The only module that touches ComfyUI: progress, interrupt, device/dtype, memory, model folders, temp files.

Every ComfyUI module (`comfy.utils`, `comfy.model_management`, `folder_paths`) is imported inside the function
that needs it, so the pack imports and runs without ComfyUI; each function then falls back to plain PyTorch
behaviour: no progress bar, no interrupt, cuda when available, folders from $ACESTEP_MODELS_DIR and ./models
(docs/comfyui.md, ComfyUI facts §C5, §C6, §C12).
"""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType

import torch

MODELS_DIR_ENV = "ACESTEP_MODELS_DIR"
ACE_STEP_CATEGORY = "ace_step"
SAFETENSORS = ".safetensors"


def comfy_module(name: str) -> ModuleType | None:
    """A ComfyUI module (`comfy.utils`, `folder_paths`, ...) when running inside ComfyUI, else None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# progress and interruption


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (design §6); no-op outside ComfyUI."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """A progress bar for the running node that checks for interruption at every update (design §6)."""

    def __init__(self, total: int):
        utils = comfy_module("comfy.utils")
        self._bar = utils.ProgressBar(int(total)) if utils is not None else None

    def update(self, done: int, total: int) -> None:
        """Report `done` of `total` units finished (one sampling step or codec chunk), then check for Cancel."""
        if self._bar is not None:
            self._bar.update_absolute(int(done), int(total))
        check_interrupt()

    def step_callback(self):
        """A tasks callback `(index, total, x)` reporting step `index` as finished."""
        return lambda index, total, x: self.update(index + 1, total)

    def chunk_callback(self):
        """An audio codec callback `(done, total)`."""
        return lambda done, total: self.update(done, total)


def progress_text(text: str) -> None:
    """Show a status line (e.g. the torch.compile first-call notice) under the running node in ComfyUI's UI; the
    log always gets it too."""
    print(f"[ACE-Step] {text}")
    server, utils = comfy_module("server"), comfy_module("comfy_execution.utils")
    context = utils.get_executing_context() if utils is not None and hasattr(utils, "get_executing_context") else None
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if context is not None and instance is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, context.node_id)


# ---------------------------------------------------------------------------------------------------------------
# devices, dtypes and memory


def default_device() -> torch.device:
    """ComfyUI's compute device, else cuda when available, else cpu."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        return torch.device(mm.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device runs it well (ComfyUI's should_use_bf16, else any cuda device), fp32 otherwise."""
    if device.type == "cpu":
        return torch.float32
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32


def free_memory(num_bytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until `num_bytes` are free on `device` (design §6); no-op elsewhere."""
    mm = comfy_module("comfy.model_management")
    if mm is not None and device.type != "cpu":
        mm.free_memory(int(num_bytes), device)


def empty_cache() -> None:
    """Return cached accelerator memory to the driver (ComfyUI's soft_empty_cache, else torch's)."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# model folders


def _fallback_roots() -> list[Path]:
    """Outside ComfyUI: $ACESTEP_MODELS_DIR (when set), then ./models."""
    roots = []
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path.cwd() / "models")
    return roots


def register_ace_step_folder(folder_paths: ModuleType) -> None:
    """Add models/ace_step to the `ace_step` category, keeping folders a user configured (design §5); idempotent."""
    default = os.path.join(folder_paths.models_dir, ACE_STEP_CATEGORY)
    entry = folder_paths.folder_names_and_paths.get(ACE_STEP_CATEGORY)
    if entry is None:
        folder_paths.folder_names_and_paths[ACE_STEP_CATEGORY] = ([default], set(folder_paths.supported_pt_extensions))
        return
    folders, extensions = entry
    if default not in folders:
        folders.append(default)
    if not extensions:
        extensions.update(folder_paths.supported_pt_extensions)


def model_folders(category: str) -> list[Path]:
    """Folders of a model category: ComfyUI's (`ace_step`, `checkpoints`, `loras`), else the fallback roots.

    Outside ComfyUI each root is searched itself and in its `<category>` sub-folder.
    """
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        if category == ACE_STEP_CATEGORY:
            register_ace_step_folder(folder_paths)
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(category)]
        except KeyError:  # a category this ComfyUI does not have (an older one without `text_encoders`)
            return []
    folders = []
    for root in _fallback_roots():
        folders.extend([root, root / category])
    return folders


def comfy_qwen_tokenizer() -> Path | None:
    """The Qwen tokenizer folder ComfyUI ships (comfy/text_encoders/qwen25_tokenizer: ComfyUI's own 1.5 tokenizer,
    `ACE15Tokenizer` in comfy/text_encoders/ace15.py, reads it through its `Qwen3Tokenizer`), or None outside ComfyUI or when
    this ComfyUI has none. Only the package's location is read: nothing of ComfyUI is imported beyond `comfy`."""
    comfy = comfy_module("comfy")
    origin = getattr(comfy, "__file__", None) if comfy is not None else None
    if not origin:
        return None
    folder = Path(origin).parent / "text_encoders" / "qwen25_tokenizer"
    return folder if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file() else None


def download_folder() -> Path:
    """Where a Hugging Face repo id is downloaded: models/ace_step (ComfyUI), else the first fallback root."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        register_ace_step_folder(folder_paths)
        return Path(folder_paths.models_dir) / ACE_STEP_CATEGORY
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "models" / ACE_STEP_CATEGORY


def temp_folder() -> tuple[Path, str]:
    """(folder, ui type) for preview files: ComfyUI's temp directory ("temp"), else a folder in the system temp."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_temp_directory()), "temp"
    return Path(tempfile.gettempdir()) / "acestep_pack", "temp"


def output_folder() -> Path:
    """ComfyUI's output directory, else ./output."""
    folder_paths = comfy_module("folder_paths")
    return Path(folder_paths.get_output_directory()) if folder_paths is not None else Path.cwd() / "output"


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's memory manager (docs/comfyui.md, "Memory: the models live in ComfyUI's memory manager")

_PATCHER_CLASS: type | None = None


def memory_manager() -> ModuleType | None:
    """comfy.model_management when ComfyUI's memory manager (ModelPatcher + load_models_gpu) is there, else None."""
    mm = comfy_module("comfy.model_management")
    patcher = comfy_module("comfy.model_patcher")
    if mm is None or patcher is None:
        return None
    if not all(hasattr(mm, name) for name in ("load_models_gpu", "loaded_models", "unet_offload_device")):
        return None
    return mm if hasattr(patcher, "ModelPatcher") else None


def _patcher_class() -> type:
    """ComfyUI's ModelPatcher, unloaded whole, calling `on_detach(patcher)` after ComfyUI unloads it (built once)."""
    global _PATCHER_CLASS
    if _PATCHER_CLASS is None:
        base = comfy_module("comfy.model_patcher").ModelPatcher

        class AceStepPatcher(base):
            """A ComfyUI ModelPatcher that reports when ComfyUI's memory manager unloads it."""

            on_detach = None

            def partially_unload(self, *args, **kwargs):
                # The pack's modules cannot run split between two devices: freeing nothing here makes ComfyUI
                # unload the whole component instead (LoadedModel.model_unload then calls detach).
                return 0

            def detach(self, *args, **kwargs):
                result = super().detach(*args, **kwargs)
                if self.on_detach is not None:
                    self.on_detach(self)
                return result

        _PATCHER_CLASS = AceStepPatcher
    return _PATCHER_CLASS


def staging_device(device: torch.device) -> torch.device:
    """Where a model meant for `device` is read from disk: inside ComfyUI its offload device (the CPU, or the GPU
    itself under --highvram), and ComfyUI's memory manager moves each component to `device` when a node runs it;
    elsewhere `device` itself."""
    mm = memory_manager()
    if mm is None or device.type == "cpu":
        return device
    return torch.device(mm.unet_offload_device())


def offload_device(kind: str, load_device: torch.device) -> torch.device:
    """Where ComfyUI parks a model of `kind` ("unet", "text", "vae") it unloads: its own rule (the GPU itself under
    --highvram / --gpu-only, else the CPU); the load device itself when that is the CPU."""
    mm = memory_manager()
    if mm is None or load_device.type == "cpu":
        return load_device
    rule = {"unet": "unet_offload_device", "text": "text_encoder_offload_device", "vae": "vae_offload_device"}[kind]
    return torch.device(getattr(mm, rule)())


def model_patcher(module: torch.nn.Module, load_device: torch.device, offload: torch.device, on_detach):
    """A ComfyUI ModelPatcher for `module` (loaded on `load_device`, parked on `offload`) calling `on_detach(patcher)`
    whenever ComfyUI unloads it."""
    patcher = _patcher_class()(module, load_device=load_device, offload_device=offload)
    patcher.on_detach = on_detach
    return patcher


def load_models(patchers: list) -> None:
    """Have ComfyUI load these patchers' models on their load device (unloading others when memory is short).

    Whole components are loaded (force_full_load): the pack's modules are plain torch layers, which ComfyUI's
    per-layer partial loading cannot run from the offload device."""
    mm = memory_manager()
    if mm is not None and patchers:
        mm.load_models_gpu(list(patchers), force_full_load=True)


def loaded_patchers() -> list:
    """The ModelPatchers ComfyUI's memory manager holds loaded right now (empty outside ComfyUI)."""
    mm = memory_manager()
    return list(mm.loaded_models()) if mm is not None else []
