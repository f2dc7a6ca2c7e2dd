"""Training of a StemGen / singing-to-accompaniment control branch plus a LoRA of the frozen base transformer
(docs/stemgen.md; objective of design §11).

Per step: a batch of cached (reference, target, tags) pairs cropped to `max_seconds`; σ from the official
logit-normal table (shift 3), noise ε, x_σ = σ·ε + (1 − σ)·target; the tags' UMT5 states are zeroed per item
with probability `text_dropout` (so classifier-free guidance works at inference); the velocity comes from
`controlled_decode` (reference → control branch, timbre vector when the item has one); loss = the masked MSE
between x0̂ = x_σ − σ·v and the target. AdamW (betas 0.8/0.9, weight decay 1e-2), warm-up then linear decay,
gradient clipping. Only the control branch and the LoRA matrices train; the base weights stay frozen.

Command line (one process, or `torchrun --nproc_per_node N -m acestep_core.stemgen.train ...` for DDP, gloo on
CPUs): `python -m acestep_core.stemgen.train --dataset_path songs/ --checkpoint_dir ACE-Step/ACE-Step-v1-3.5B
--task stemgen --output models/loras/acestep-stemgen.safetensors`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from ..latent import frames_at
from ..loading import DEFAULT_REPO, load_acestep
from ..models.transformer import AceStepTransformer
from ..train.distributed import DistEnv, barrier, init_distributed, mean_over_ranks, shutdown, wrap_model
from ..train.lora_layers import LoraSpec, drop_unused_modules, export_lora_tensors, inject_lora
from ..train.objective import add_noise, denoising_loss, sample_sigmas, training_sigmas
from ..train.trainer import optimizer_and_schedule
from .control import TASKS, ControlConfig, StemGenControl, controlled_decode
from .dataset import Encoders, PairBatch, PairDataset, build_cache, checkpoint_identity, collate, read_songs
from .weights import save_stemgen

PRECISIONS = ("fp32", "bf16-mixed")


@dataclass
class StemGenTrainConfig:
    """Every option of `python -m acestep_core.stemgen.train` (docs/stemgen.md)."""

    dataset_path: str
    output: str
    checkpoint_dir: str = DEFAULT_REPO
    task: str = "stemgen"
    control_blocks: int = 6
    freeze_control_embedding: bool = False
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    max_steps: int = 20000
    batch_size: int = 1
    max_seconds: float = 30.0
    text_dropout: float = 0.15
    timbre_dropout: float = 0.5
    vocal_word: str = "vocal"
    shift: float = 3.0
    gradient_clip_val: float = 0.5
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    every_n_train_steps: int = 1000
    log_every_n_steps: int = 10
    cache_dir: str = "./exps/stemgen_cache"
    num_workers: int = 2
    accelerator: str = "auto"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("control_blocks", "max_steps", "batch_size", "log_every_n_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        for name in ("lora_rank", "warmup_steps", "every_n_train_steps", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name} must be an integer >= 0, got {value!r}")
        for name in ("learning_rate", "lora_alpha", "max_seconds", "shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("text_dropout", "timbre_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if not (self.weight_decay >= 0 and self.gradient_clip_val >= 0):
            raise ValueError("--weight_decay and --gradient_clip_val must be >= 0")
        if self.lora_rank and not self.targets:
            raise ValueError("--lora_targets is empty; give module names like to_q,to_k,to_v,to_out.0 or set --lora_rank 0")

    @property
    def targets(self) -> tuple[str, ...]:
        """The LoRA target module names."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


@dataclass
class StemGenTrainResult:
    """What a run did: steps, the loss of every step (mean over ranks), the files it wrote."""

    step: int
    losses: dict[int, float]
    output: Path
    checkpoints: list[Path] = field(default_factory=list)
    seconds_per_step: float = 0.0


class StemGenModule(nn.Module):
    """Frozen base transformer (with LoRA layers) + control branch behind one forward, for DDP."""

    def __init__(self, transformer: nn.Module, control: StemGenControl, *, checkpointing: bool):
        super().__init__()
        self.transformer = transformer
        self.control = control
        self.checkpointing = checkpointing

    def forward(self, x: Tensor, frame_mask: Tensor, reference: Tensor, timbre: Tensor, text: Tensor,
                text_mask: Tensor, timestep: Tensor) -> Tensor:
        """Velocity [B,8,16,T] for noisy targets x with instrumental (no lyrics) conditioning."""
        batch, device = x.shape[0], x.device
        speaker = torch.zeros(batch, self.transformer.config.speaker_embedding_dim, device=device)
        lyric_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        lyric_mask = torch.zeros(batch, 1, dtype=torch.long, device=device)
        states, mask = self.transformer.encode(text, text_mask, speaker, lyric_ids, lyric_mask)
        return controlled_decode(self.transformer, self.control, x, frame_mask, states, mask, timestep,
                                 reference=reference, timbre=timbre, linear_ff=True,
                                 checkpointing=self.checkpointing)


def _seed(seed: int, rank: int, name: str) -> int:
    """A generator seed per (run seed, rank, purpose)."""
    return int(hashlib.sha256(f"{seed}:{rank}:{name}".encode()).hexdigest()[:15], 16)


def _lora_info(spec: LoraSpec) -> dict:
    return {"rank": spec.r, "target_modules": list(spec.target_modules), "trained_alpha": spec.lora_alpha,
            "scale_folded_into_lora_B": spec.scale}


def _save(config: StemGenTrainConfig, control: StemGenControl, transformer: nn.Module, spec: LoraSpec | None,
          step: int, path: Path) -> Path:
    """Write the StemGen file (control + LoRA with the scale folded into B)."""
    lora = export_lora_tensors(transformer) if spec is not None else None
    training = {"step": step, "task": config.task, "checkpoint": str(config.checkpoint_dir),
                "learning_rate": config.learning_rate, "batch_size": config.batch_size,
                "max_seconds": config.max_seconds, "text_dropout": config.text_dropout,
                "timbre_dropout": config.timbre_dropout}
    return save_stemgen(path, control, lora, lora_info=_lora_info(spec) if spec is not None else None,
                        training=training)


def _prepare(config: StemGenTrainConfig, env: DistEnv) -> tuple[nn.Module, PairDataset]:
    """Cache the dataset (each rank its share), load the frozen transformer; returns (transformer, dataset)."""
    songs = read_songs(config.dataset_path)
    checkpoint_id = checkpoint_identity(config.checkpoint_dir)

    def encoders() -> Encoders:
        model = load_acestep(config.checkpoint_dir, dtype=torch.float32, device=env.device,
                             components=("dcae", "vocoder", "text"))
        return Encoders(model.dcae, model.vocoder.mel_transform, model.text_encoder)

    paths = build_cache(songs, config.task, config.cache_dir, checkpoint_id, encoders, vocal_word=config.vocal_word,
                        rank=env.rank, world_size=env.world_size)
    barrier(env)
    frames = max(1, frames_at(config.max_seconds))
    dataset = PairDataset(paths, max_frames=frames, timbre_dropout=config.timbre_dropout, seed=config.seed)
    transformer = load_acestep(config.checkpoint_dir, dtype=torch.float32, device=env.device,
                               components=("transformer",)).transformer
    return transformer, dataset


def train(config: StemGenTrainConfig) -> StemGenTrainResult:
    """Cache the songs, load the base transformer and `fit` (module docstring); rank 0 writes `config.output`."""
    env = init_distributed(config.accelerator)
    try:
        transformer, dataset = _prepare(config, env)
        return fit(config, transformer, dataset, env)
    finally:
        shutdown()


def fit(config: StemGenTrainConfig, transformer: AceStepTransformer, dataset: PairDataset,
        env: DistEnv | None = None) -> StemGenTrainResult:
    """Train a new control branch and LoRA on `dataset`; rank 0 writes `config.output` every `every_n_train_steps`
    steps and at the end. `transformer` is changed in place: frozen, its unused modules (cross_attn.add_*, REPA
    projectors) dropped and LoRA layers injected — pass a copy to keep the original."""
    env = env or DistEnv(0, 1, 0, next(transformer.parameters()).device)
    torch.manual_seed(_seed(config.seed, 0, "init"))
    transformer.requires_grad_(False)
    drop_unused_modules(transformer, keep_projectors=False)
    control = StemGenControl.from_base(transformer, ControlConfig.for_transformer(
        transformer.config, task=config.task, control_blocks=config.control_blocks))
    control.proj_in.requires_grad_(not config.freeze_control_embedding)
    spec = None
    if config.lora_rank:
        spec = LoraSpec(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.targets)
        inject_lora(transformer, spec)
    if config.precision == "bf16-mixed":
        for parameter in transformer.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    module = StemGenModule(transformer, control, checkpointing=config.gradient_checkpointing).to(env.device)
    model = wrap_model(module, env, fsdp=False)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(trainable, learning_rate=config.learning_rate,
                                                  weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                                                  max_steps=config.max_steps, foreach=True)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                  shuffle=True, seed=config.seed, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                         num_workers=config.num_workers, collate_fn=collate)
    table = training_sigmas(config.shift)
    sigma_generator = torch.Generator().manual_seed(_seed(config.seed, env.rank, "sigma"))
    noise_generator = torch.Generator(device=env.device).manual_seed(_seed(config.seed, env.rank, "noise"))
    output = Path(config.output)
    result = StemGenTrainResult(step=0, losses={}, output=output)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16-mixed")
    started, epoch = time.perf_counter(), 0
    model.train()
    while result.step < config.max_steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            loss = _step(model, batch.to(env.device), table, sigma_generator, noise_generator,
                         config.text_dropout, autocast)
            loss.backward()
            if config.gradient_clip_val > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.gradient_clip_val)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.step += 1
            result.losses[result.step] = float(mean_over_ranks(env, loss.detach().float().reshape(1))[0])
            if env.is_main and result.step % config.log_every_n_steps == 0:
                print(f"step {result.step}/{config.max_steps} loss {result.losses[result.step]:.5f}", flush=True)
            if env.is_main and config.every_n_train_steps and result.step % config.every_n_train_steps == 0 \
                    and result.step < config.max_steps:
                result.checkpoints.append(_save(config, control, transformer, spec, result.step, output))
            if result.step >= config.max_steps:
                break
        epoch += 1
    result.seconds_per_step = (time.perf_counter() - started) / max(1, result.step)
    if env.is_main:
        result.checkpoints.append(_save(config, control, transformer, spec, result.step, output))
    barrier(env)
    return result


def _step(model: nn.Module, batch: PairBatch, table: Tensor, sigma_generator: torch.Generator,
          noise_generator: torch.Generator, text_dropout: float, autocast) -> Tensor:
    """Loss of one batch (module docstring)."""
    x0 = batch.target
    sigma = sample_sigmas(x0.shape[0], table, sigma_generator).to(x0.device)                    # [B]
    noise = torch.randn(x0.shape, generator=noise_generator, device=noise_generator.device).to(x0.device)
    x_sigma = add_noise(x0, noise, sigma)
    keep = torch.rand(x0.shape[0], generator=noise_generator, device=noise_generator.device) >= text_dropout
    text = batch.text * keep.to(batch.text.device, batch.text.dtype)[:, None, None]
    with autocast:
        velocity = model(x_sigma, batch.frame_mask, batch.reference, batch.timbre, text, batch.text_mask,
                         sigma * 1000)
    return denoising_loss(velocity, x_sigma, x0, sigma, batch.frame_mask).mean()


# ---------------------------------------------------------------------------------------------------------------
# command line

HELP = {
    "dataset_path": "folder of song folders (stems/<name>.wav, labels.json, optional mix.wav and tags.txt)",
    "output": "StemGen file to write (.safetensors), e.g. models/loras/acestep-stemgen.safetensors",
    "checkpoint_dir": "ACE-Step checkpoint: HF folder, ComfyUI all-in-one .safetensors, or repo id",
    "task": "stemgen (mix minus a stem -> that stem) or singing2accompaniment (vocal -> the other stems)",
    "control_blocks": "transformer blocks copied into the control branch (K)",
    "freeze_control_embedding": "keep the branch's copy of the patch embedding at the base weights (cheaper)",
    "lora_rank": "rank of the LoRA on the base transformer (0: no LoRA)", "lora_alpha": "LoRA alpha (scale alpha/r)",
    "lora_targets": "comma-separated module names the LoRA wraps (PEFT suffix match)",
    "learning_rate": "AdamW learning rate", "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps, then linear decay to 0 at --max_steps", "max_steps": "optimiser steps",
    "batch_size": "pairs per step and process", "max_seconds": "random crop length of each pair",
    "text_dropout": "probability of zeroing an item's tag states (for classifier-free guidance)",
    "timbre_dropout": "probability of training an item without an instrument reference",
    "vocal_word": "a stem whose name or label contains this word is the vocal (singing2accompaniment)",
    "shift": "flow-matching time shift of the training sigma table",
    "gradient_clip_val": "gradient-norm clip (0: off)", "precision": "fp32 | bf16-mixed",
    "gradient_checkpointing": "recompute each block in the backward pass (less memory)",
    "every_n_train_steps": "also write the output every N steps (0: only at the end)",
    "log_every_n_steps": "print the loss every N steps", "cache_dir": "where encoded latents and tag states are kept",
    "num_workers": "DataLoader worker processes", "accelerator": "auto | cpu | cuda", "seed": "run seed",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per StemGenTrainConfig field, same names and defaults."""
    parser = argparse.ArgumentParser(prog="python -m acestep_core.stemgen.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(StemGenTrainConfig)
    for f in fields(StemGenTrainConfig):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        required = f.default is MISSING
        default = None if required else f.default
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=HELP[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, required=required, help=HELP[f.name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and train; a ValueError becomes `error: ...` and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        config = StemGenTrainConfig(**vars(args))
        result = train(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.checkpoints:
        print(json.dumps({"steps": result.step, "output": str(result.output),
                          "final_loss": result.losses.get(result.step)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
