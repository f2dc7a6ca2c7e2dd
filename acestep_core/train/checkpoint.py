"""Training checkpoints without pickles: tensors in safetensors, everything else in JSON (resume with --ckpt_path).

A checkpoint folder `<log_dir>/checkpoints/epoch=E-step=S_lora` (LoRA; the official name) or `epoch=E-step=S`
(full fine-tuning) holds
  pytorch_lora_weights.safetensors            LoRA mode: the official-format adapter (lora_layers.save_lora)
  ace_step_transformer/                        full mode: diffusion_pytorch_model.safetensors + config.json,
                                               loadable with load_acestep(components=("transformer",))
  training_state.safetensors                   `param.<name>` raw LoRA tensors (LoRA mode) and
                                               `optim.<name>.<key>` AdamW state (full state, gathered on rank 0)
  training_state.json                          step, epoch, batch position, optimizer param groups, scheduler
  rng_rank<r>.safetensors                      every rank's generator states (written by that rank)
Optimizer and model state go through torch.distributed.checkpoint's state-dict helpers, so the same files
serve single-process, DDP and FSDP runs; every rank reads them on resume.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .distributed import DistEnv, barrier

STATE_FORMAT = "acestep-train-state/1"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
TRANSFORMER_FOLDER = "ace_step_transformer"
TRANSFORMER_FILE = "diffusion_pytorch_model.safetensors"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def transformer_config_json(config) -> dict:
    """config.json of the official ACEStepTransformer2DModel for a TransformerConfig (design §2.1)."""
    return {
        "_class_name": "ACEStepTransformer2DModel", "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads, "attention_head_dim": config.attention_head_dim,
        "inner_dim": config.inner_dim, "mlp_ratio": config.mlp_ratio, "patch_size": list(config.patch_size),
        "rope_theta": config.rope_theta, "speaker_embedding_dim": config.speaker_embedding_dim,
        "text_embedding_dim": config.text_embedding_dim, "lyric_encoder_vocab_size": config.lyric_encoder_vocab_size,
        "lyric_hidden_size": config.lyric_hidden_size, "ssl_latent_dims": list(config.ssl_latent_dims),
        "ssl_encoder_depths": [8] * len(config.ssl_latent_dims), "ssl_names": ["mert", "m-hubert"][: len(config.ssl_latent_dims)],
        "max_position": 32768, "max_height": 16, "max_width": 32768,
    }


def save_full_transformer(model: nn.Module, folder: Path, env: DistEnv, config) -> None:
    """Gather the full transformer state (FSDP/DDP aware) and write it in the Hugging Face folder layout on rank 0."""
    state = get_model_state_dict(model, options=_FULL)
    if not env.is_main:
        return
    prefix = "transformer."
    tensors = {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}
    target = folder / TRANSFORMER_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / TRANSFORMER_FILE), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(transformer_config_json(config), indent=2))


def load_full_transformer(module: nn.Module, folder: Path) -> None:
    """Load a checkpoint's ace_step_transformer weights into the (unwrapped) training module, strictly."""
    file = Path(folder) / TRANSFORMER_FOLDER / TRANSFORMER_FILE
    if not file.is_file():
        raise ValueError(f"--ckpt_path {folder} has no {TRANSFORMER_FOLDER}/{TRANSFORMER_FILE}; is it a LoRA checkpoint?")
    state = load_file(str(file), device=str(next(module.parameters()).device))
    module.transformer.load_state_dict(state, strict=True)


def _flatten_optimizer(state: Mapping) -> tuple[dict[str, Tensor], dict]:
    """AdamW full state dict → (tensors `optim.<name>.<key>`, JSON param groups and non-tensor state)."""
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, Tensor], info: Mapping) -> dict:
    """Inverse of _flatten_optimizer."""
    names = [name for group in info["param_groups"] for name in group["params"]]
    state: dict[str, dict] = {name: dict(info["scalars"].get(name, {})) for name in names}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, _, field = key[len("optim."):].rpartition(".")
            state.setdefault(name, {})[field] = value
    return {"state": {k: v for k, v in state.items() if v}, "param_groups": list(info["param_groups"])}


def save_training_state(folder: Path, *, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LambdaLR, counters: Mapping[str, int],
                        params: Mapping[str, Tensor], generators: Mapping[str, torch.Generator],
                        info: Mapping) -> None:
    """Write training_state.{safetensors,json} (rank 0) and rng_rank<r>.safetensors (each rank); all ranks call it."""
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    folder.mkdir(parents=True, exist_ok=True)
    rng = {f"generator.{name}": g.get_state() for name, g in generators.items()}
    rng["torch_cpu"] = torch.get_rng_state()
    if env.device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(env.device)
    save_file(rng, str(folder / f"rng_rank{env.rank}.safetensors"))
    if env.is_main:
        tensors, optim_info = _flatten_optimizer(optim_state)
        tensors.update({f"param.{k}": v.detach().float().cpu().contiguous() for k, v in params.items()})
        save_file(tensors, str(folder / STATE_TENSORS))
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        document = {"format": STATE_FORMAT, **counters, "world_size": env.world_size, "optimizer": optim_info,
                    "scheduler": scheduler_state, **info}
        (folder / STATE_JSON).write_text(json.dumps(document, indent=1, default=str))
    barrier(env)


def read_training_state(folder: str | Path) -> tuple[dict, Path]:
    """The JSON document of a training checkpoint folder (ValueError when it is not one)."""
    folder = Path(folder).expanduser()
    file = folder / STATE_JSON
    if not file.is_file():
        raise ValueError(f"--ckpt_path {folder} is not a training checkpoint (no {STATE_JSON}); pass a folder "
                         "written by this trainer, e.g. <log_dir>/checkpoints/epoch=0-step=2000_lora")
    document = json.loads(file.read_text())
    if document.get("format") != STATE_FORMAT:
        raise ValueError(f"{file}: format {document.get('format')!r} is not {STATE_FORMAT!r}")
    return document, folder


def checkpoint_params(folder: Path) -> dict[str, Tensor]:
    """The `param.<name>` tensors of a checkpoint (raw LoRA tensors)."""
    with safe_open(str(folder / STATE_TENSORS), framework="pt") as f:
        return {k[len("param."):]: f.get_tensor(k) for k in f.keys() if k.startswith("param.")}


def restore_training_state(folder: Path, document: Mapping, *, env: DistEnv, model: nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                           generators: Mapping[str, torch.Generator]) -> None:
    """Load the optimizer, scheduler and this rank's generator states (every rank reads the files)."""
    tensors = load_file(str(folder / STATE_TENSORS))
    optim_state = _unflatten_optimizer(tensors, document["optimizer"])
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict({**document["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng_file = folder / f"rng_rank{env.rank}.safetensors"
    if not rng_file.is_file():
        raise ValueError(f"{folder} has no {rng_file.name}: it was saved by a run with {document['world_size']} "
                         f"process(es); resume with the same number of processes")
    rng = load_file(str(rng_file))
    for name, generator in generators.items():
        generator.set_state(rng[f"generator.{name}"])
    torch.set_rng_state(rng["torch_cpu"])
    if env.device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"], env.device)
