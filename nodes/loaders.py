"""Loader nodes: the checkpoint loader and the LoRA loader (both return an ACESTEP_MODEL handle)."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..acestep_core import fast
from ..acestep_core.loading import ALL_COMPONENTS, DEFAULT_REPO, _valid_repo_id, download_repo
from . import bridge, files, v15
from .model import DEVICES, DTYPES, LoraEntry, ModelHandle, choose_device, choose_dtype, make_key, model_for, read_lora
from .wire import CATEGORY, MODEL

V15_OPTION = "acestep_v15"  # extra option key read by web/js/v15_fields.js (ComfyUI passes it to the editor)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_repo_id(text: str) -> bool:
    """owner/name in Hugging Face's shape and within its rules (length, no '..' or '--', ends)."""
    return bool(REPO_ID.match(text)) and _valid_repo_id(text)


def repo_path(repo_id: str) -> Path:
    """The local folder of a Hugging Face repo id in the download folder, downloaded when missing."""
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id {repo_id!r:.200} is not a Hugging Face repo id like {DEFAULT_REPO!r:.200}; clear it to use checkpoint")
    target = bridge.download_folder() / repo_id.split("/")[-1]
    if files.is_checkpoint_folder(target):
        return target
    return download_repo(repo_id, target, ALL_COMPONENTS)


class AceStepLoader:
    DESCRIPTION = (
        "Loads an ACE-Step v1 checkpoint (Hugging Face folder from models/ace_step, or the all-in-one file from "
        "models/checkpoints) or ACE-Step 1.5 (a folder in models/ace_step, or ComfyUI's repackaged files: a diffusion "
        "model in models/diffusion_models with models/text_encoders and models/vae, or an all-in-one file in "
        "models/checkpoints), told apart by the weights. The model stays cached and is "
        "shared by every loader with the same checkpoint, dtype and device."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded ACE-Step model (transformer, audio codec, text encoder, lyric tokenizer).",)

    @classmethod
    def INPUT_TYPES(cls):
        listing = files.checkpoints()
        return {
            "required": {
                "checkpoint": (sorted(listing), {
                    # the listed ACE-Step 1.5 entries, told by their weights like load() does: the editor
                    # (web/js/v15_fields.js) shows the Text Encode node's 1.5 fields only for these
                    V15_OPTION: sorted(name for name, path in listing.items() if v15.is_path_listed(path)),
                    "tooltip": "ACE-Step v1 checkpoint: a folder with ace_step_transformer/, music_dcae_f8c8/, "
                               "music_vocoder/, umt5-base/ in models/ace_step, or ace_step_v1_3.5b.safetensors in "
                               "models/checkpoints; or ACE-Step 1.5: the Ace-Step1.5 folder (vae/, "
                               "Qwen3-Embedding-0.6B/, acestep-v15-turbo/) or a DiT folder such as acestep-v15-base "
                               "beside it, or ComfyUI's 1.5 files (acestep_v1.5_*.safetensors in "
                               "models/diffusion_models with qwen_0.6b_ace15.safetensors in models/text_encoders and "
                               "ace_1.5_vae.safetensors in models/vae; or an all-in-one file in models/checkpoints).",
                }),
                "dtype": (["auto", *DTYPES], {
                    "default": "auto",
                    "tooltip": "Weight precision. auto = bf16 on a GPU that supports it (the official setting), "
                               "fp32 on CPU. fp16 can overflow.",
                }),
                "device": (list(DEVICES), {
                    "default": "auto",
                    "tooltip": "Where the model runs. auto = ComfyUI's device (the GPU when there is one).",
                }),
            },
            "optional": {
                "repo_id": ("STRING", {
                    "default": "",
                    V15_OPTION: sorted(v15.known_repos()),  # the 1.5 repo ids load() downloads (web/js/v15_fields.js)
                    "tooltip": f"Optional Hugging Face repo id (e.g. {DEFAULT_REPO}); downloaded once into "
                               "models/ace_step/<name> and used instead of checkpoint (1.5: ACE-Step/Ace-Step1.5 or "
                               "a 1.5 DiT repo such as ACE-Step/acestep-v15-base). Leave empty to use checkpoint.",
                }),
                "low_vram": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Low VRAM: have ComfyUI load each part onto the GPU only for the step that runs it "
                               "(text encoder, transformer, audio decoder), never the whole model at once; ComfyUI "
                               "unloads the others when it needs the room. A 240 s song then needs under 8 GB of GPU "
                               "memory; each step pays a few seconds of copying.",
                }),
                "torch_compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Compile the transformer with torch.compile: faster sampling after a slow first run "
                               "(minutes). Needs Triton on a GPU; without a compiler it runs uncompiled and says so.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint):
        # One argument: ComfyUI repeats a failed check's message once per argument it passed (execution.py,
        # validate_inputs). With no checkpoint installed at all the value is free: load() downloads repo_id or
        # says what is missing.
        listing = files.checkpoints()
        if checkpoint in listing or not listing:
            return True
        return (f"checkpoint {checkpoint!r} is not in models/ace_step, models/checkpoints or (ACE-Step 1.5) "
                "models/diffusion_models; pick a listed one "
                "(with repo_id set, any listed value will do: the download is used instead)")

    def load(self, checkpoint: str, dtype: str, device: str, repo_id: str = "", low_vram: bool = False,
             torch_compile: bool = False):
        target = choose_device(device)
        repo_id = (repo_id or "").strip()
        if repo_id and v15.is_repo(repo_id):  # ACE-Step 1.5 (nodes/v15.py)
            path = v15.repo_folder(repo_id)
        else:
            path = repo_path(repo_id) if repo_id else files.resolve("checkpoint", checkpoint, files.checkpoints())
        if v15.is_path(path):  # told apart by the weights (low_vram / torch_compile apply to v1 models only)
            return v15.load(path, choose_dtype(dtype, target), target)
        levers = fast.Levers(cpu_offload=bool(low_vram), torch_compile=bool(torch_compile))
        handle = ModelHandle(make_key(path, choose_dtype(dtype, target), target), levers=levers)
        model = model_for(handle, components=())
        if bridge.memory_manager() is None:
            # low VRAM outside ComfyUI: off the GPU until a node needs a part (the cached model follows the last
            # loader's mode); inside ComfyUI its memory manager places every component (nodes/model.py, on_device)
            fast.placement(model, levers.cpu_offload)
        return (replace(handle, model=model),)


class AceStepLoraLoader:
    DESCRIPTION = (
        "Applies an ACE-Step LoRA (a .safetensors file or an official LoRA folder from models/loras) to the "
        "model. Chain several to stack them; changing or removing a LoRA never reloads the checkpoint."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA added to its LoRA stack.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "ACE-Step model from the loader (or another LoRA loader)."}),
                "lora_name": (sorted(files.loras()), {
                    "tooltip": "LoRA in models/loras: a .safetensors file or a folder holding "
                               "pytorch_lora_weights.safetensors (the official trainer's output).",
                }),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -3.0, "max": 3.0, "step": 0.01,
                    "tooltip": "LoRA weight (official range -3..3; 0 turns the LoRA off).",
                }),
                "honour_alpha": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off (official app and ComfyUI): apply strength x B.A and ignore the file's alpha. "
                               "On: apply the training scale alpha/r (alpha/sqrt(r) for rsLoRA) as well. Must be the "
                               "same on every stacked LoRA loader. ACE-Step 1.5 models always apply the file's "
                               "scale, as the official 1.5 handler does.",
                }),
            },
        }

    def load(self, model: ModelHandle, lora_name: str, strength: float, honour_alpha: bool):
        if v15.is_handle(model):  # ACE-Step 1.5 LoRA / LoKr (nodes/v15.py)
            return v15.with_lora(model, files.resolve("lora_name", lora_name, files.loras()), strength)
        if not isinstance(model, ModelHandle):
            raise ValueError(f"model must come from the ACE-Step Loader node, got {type(model).__name__}")
        if strength == 0:
            return (model,)
        weights = read_lora(files.resolve("lora_name", lora_name, files.loras()))
        return (model.with_lora(LoraEntry(weights, float(strength), bool(honour_alpha))),)
