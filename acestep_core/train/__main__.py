"""`python -m acestep_core.train`: the command line of the trainer (flags of the official trainer.py, design §11).

Examples
  LoRA, one GPU:   python -m acestep_core.train --dataset_path ./data --checkpoint_dir ./ACE-Step-v1-3.5B \\
                       --lora_config_path config/lora.json --precision bf16-mixed --max_steps 2000
  LoRA, 4 GPUs:    add --devices 4 (re-launches itself with torchrun), or
                   torchrun --nproc_per_node 4 -m acestep_core.train ...
  Full fine-tune:  drop --lora_config_path; add --fsdp to shard it over several GPUs
  Resume:          --ckpt_path <log_dir>/checkpoints/epoch=0-step=2000_lora
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields

from .distributed import check_topology, relaunch_with_torchrun, under_torchrun
from .trainer import TrainConfig, train

HELP = {
    "dataset_path": "HF dataset folder (save_to_disk), records .jsonl, or a folder of audio + _prompt.txt/_lyrics.txt",
    "checkpoint_dir": "ACE-Step checkpoint: HF folder layout, ComfyUI all-in-one .safetensors, or repo id",
    "lora_config_path": "PEFT LoraConfig JSON (r, lora_alpha, target_modules, use_rslora); omit for full fine-tuning",
    "learning_rate": "AdamW learning rate", "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps, then linear decay to 0 at --max_steps",
    "max_steps": "optimiser steps to train", "epochs": "stop after this many epochs (-1: only --max_steps)",
    "precision": "bf16-mixed (bf16 autocast, frozen weights in bf16 for LoRA) | fp32 | 32",
    "accumulate_grad_batches": "micro-batches per optimiser step", "num_workers": "DataLoader worker processes",
    "every_n_train_steps": "write a checkpoint every N steps (0: only at the end)",
    "every_plot_step": "generate and save an evaluation clip every N steps (0: never)",
    "plot_seconds": "length of the evaluation clip", "plot_steps": "sampler steps of the evaluation clip",
    "exp_name": "run name (log folder suffix and adapter name)", "logger_dir": "where run folders are created",
    "shift": "flow-matching time shift of the training sigma table",
    "gradient_clip_val": "clip threshold (0: no clipping)", "gradient_clip_algorithm": "norm | value",
    "val_check_interval": "validation loss every N steps", "val_dataset_path": "validation records (default: 16 training items)",
    "ckpt_path": "training checkpoint folder to resume from", "devices": "processes per node (GPUs)",
    "num_nodes": "nodes (start torchrun on each)", "accelerator": "auto | cpu | cuda",
    "fsdp": "shard full fine-tuning with FSDP when several processes run", "batch_size": "items per micro-batch",
    "seed": "run seed", "gradient_checkpointing": "recompute each transformer block in the backward pass",
    "cache_dir": "where encoded latents / text states / lyric ids are cached",
    "prompt_shuffles": "cached orderings of each item's tags", "lyric_vocab": "lyric vocab.json (else found as at inference)",
    "ssl_coeff": "weight of the REPA loss", "repa_extractor": "REPA targets: 'official' (MERT + mHuBERT) or module:factory",
    "repa_trust_remote_code": "allow remote code for the REPA models (MERT needs it)",
    "log_every_n_steps": "print the loss every N steps", "prepare_only": "only build the cache, then exit",
    "reload_dataloaders_every_n_epochs": "official Lightning flag, accepted for compatibility: the loader draws a "
                                         "fresh shuffle every epoch here, whatever the value",
}
# official trainer.py flags that change nothing here, and why (printed once when given)
NO_EFFECT = {
    "reload_dataloaders_every_n_epochs": "the data loader reshuffles every epoch here; the value changes nothing",
}


def notes_for(argv: Sequence[str]) -> list[str]:
    """One line per official flag in `argv` that is accepted without effect."""
    given = {a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--")}
    return [f"note: --{flag} is accepted for the official trainer's command lines; {why}"
            for flag, why in NO_EFFECT.items() if flag in given]


def _argument_type(hint: object) -> type:
    """The scalar type of a TrainConfig annotation (`int | None` → int)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, same names and defaults."""
    parser = argparse.ArgumentParser(prog="python -m acestep_core.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = _argument_type(hints[f.name])
        required = f.default is MISSING
        default = None if required else f.default
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, required=required, help=HELP[f.name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for note in notes_for(argv):
        print(note, file=sys.stderr)
    try:
        config = TrainConfig(**vars(args))
        if under_torchrun():
            check_topology(config.devices, config.num_nodes)
        elif (config.devices or 1) * (config.num_nodes or 1) > 1:
            return relaunch_with_torchrun(config.devices or 1, config.num_nodes or 1, argv)
        train(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
