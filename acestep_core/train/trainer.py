"""The ACE-Step v1 trainer: LoRA (DDP) or full fine-tuning (DDP, or FSDP with --fsdp) of the transformer on
cached latents/conditions, with the official optimiser, schedule and objective (design §11).

Per optimiser step: for each of `accumulate_grad_batches` micro-batches draw σ (logit-normal through the shifted
table, CPU generator), noise (device generator) and condition dropout (device generator), run the transformer
(bf16 autocast for bf16-mixed; gradient checkpointing per block), take the x0-preconditioned masked MSE (+
ssl_coeff × REPA), backward; then clip, AdamW (betas 0.8/0.9, weight decay 1e-2) and the warm-up/linear-decay
schedule (lr·step/warmup for the first `warmup_steps` steps, then linear to 0 at max_steps, as the official
`lr_lambda`). Rank 0 logs `metrics.jsonl` and writes checkpoints; every rank keeps its own generators so a
resumed run (`--ckpt_path`) continues the same loss trajectory.

Memory of a rank-16 LoRA on the real 3.5B model (why it fits in 16 GB): the frozen transformer is held in bf16
with the never-used `cross_attn.add_*`/`to_add_out` (629 M params) and, without REPA, the projectors (88 M)
deleted: 2.59 B params = 4.8 GiB. UMT5, DCAE and vocoder never reach the GPU during training (conditions and
latents come from the cache). LoRA r=16 on to_q/to_k/to_v/to_out.0 of both attentions in 24 blocks is 15.7 M
fp32 params: 60 MiB, plus 60 MiB of gradients and 120 MiB of AdamW moments (5.06 GiB static in all, counted by
`bench/train_memory.py --random-weights`). Gradient checkpointing keeps only each block's input [B, T, 2560] in
bf16 (240 s, T = 2583: 13 MB per block, 0.32 GB for 24) and each Conformer block's input [B, Ll, 1024]; the
backward pass recomputes one block at a time (GLUMBConv 12 800 × T in bf16 ≈ 66 MB per intermediate, a few of
them; the cross-attention scores 20 × T × S are not stored by the memory-efficient SDPA kernel; a recomputed
Conformer block holds a few 16 × Ll × Ll maps, ≈ 0.5 GB each in bf16 at the 4096-token limit). That leaves the
peak well under 16 GB for batch 1; bench/train_memory.py on a GPU measures it (bench/results/).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from ..loading import DEFAULT_REPO, load_acestep
from .cache import CachedDataset, Encoders, SSLExtractor, build_cache, checkpoint_ids, collate, plan_cache, usable_entries
from .checkpoint import (
    checkpoint_params,
    load_full_transformer,
    read_training_state,
    restore_training_state,
    save_full_transformer,
    save_training_state,
)
from .dataset import read_records
from .distributed import DistEnv, barrier, broadcast_object, init_distributed, mean_over_ranks, unwrap, wrap_model
from .evaluation import EvalAudioWriter, validation_loss
from .lora_layers import LoraSpec, drop_unused_modules, inject_lora, load_lora_parameters, lora_parameters, save_lora
from .objective import TrainingModule, add_noise, denoising_loss, drop_conditions, repa_loss, sample_sigmas, training_sigmas

PRECISIONS = ("bf16-mixed", "fp32", "32")
CLIP_ALGORITHMS = ("norm", "value")
UNUSED_SUFFIXES = ("cross_attn.add_q_proj", "cross_attn.add_k_proj", "cross_attn.add_v_proj", "cross_attn.to_add_out")


@dataclass
class TrainConfig:
    """Every trainer option; the names and defaults of the official trainer.py flags where it has them (design §11)."""

    dataset_path: str
    checkpoint_dir: str = DEFAULT_REPO
    lora_config_path: str | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 10
    max_steps: int = 2_000_000
    epochs: int = -1
    precision: str = "32"
    accumulate_grad_batches: int = 1
    num_workers: int = 8
    every_n_train_steps: int = 2000
    every_plot_step: int = 2000
    plot_seconds: float = 10.0
    plot_steps: int = 27
    exp_name: str = "chinese_rap_lora"
    logger_dir: str = "./exps/logs/"
    shift: float = 3.0
    gradient_clip_val: float = 0.5
    gradient_clip_algorithm: str = "norm"
    val_check_interval: int | None = None
    val_dataset_path: str | None = None
    ckpt_path: str | None = None
    devices: int | None = None
    num_nodes: int | None = None
    accelerator: str = "auto"
    fsdp: bool = False
    batch_size: int = 1
    seed: int = 42
    gradient_checkpointing: bool = True
    cache_dir: str = "./exps/cache"
    prompt_shuffles: int = 4
    lyric_vocab: str | None = None
    ssl_coeff: float = 1.0
    repa_extractor: str | None = None
    repa_trust_remote_code: bool = False
    log_every_n_steps: int = 10
    prepare_only: bool = False
    reload_dataloaders_every_n_epochs: int = 1  # official flag; accepted, no effect here (train.__main__ notes it)

    def __post_init__(self) -> None:
        positive = ("max_steps", "accumulate_grad_batches", "batch_size", "prompt_shuffles", "plot_steps",
                    "log_every_n_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        for name in ("num_workers", "warmup_steps", "every_n_train_steps", "every_plot_step",
                     "reload_dataloaders_every_n_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name} must be an integer >= 0 (0 disables), got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.gradient_clip_algorithm not in CLIP_ALGORITHMS:
            raise ValueError(f"--gradient_clip_algorithm must be norm or value, got {self.gradient_clip_algorithm!r}")
        for name in ("learning_rate", "shift", "plot_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "gradient_clip_val", "ssl_coeff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)!r}")
        if self.val_check_interval is not None and self.val_check_interval < 1:
            raise ValueError(f"--val_check_interval must be >= 1 step, got {self.val_check_interval!r}")
        if self.fsdp and self.lora_config_path:
            raise ValueError("--fsdp shards full fine-tuning; LoRA training uses DDP (drop --fsdp)")

    @property
    def mode(self) -> str:
        """'lora' with a LoRA config, else 'full' (fine-tune the whole transformer)."""
        return "lora" if self.lora_config_path else "full"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a run did: final step, the logged loss per optimiser step, where it wrote."""

    step: int
    losses: dict[int, float]
    log_dir: Path
    checkpoints: list[Path] = field(default_factory=list)
    eval_audio: list[Path] = field(default_factory=list)
    validation: dict[int, float] = field(default_factory=dict)
    seconds_per_step: float = 0.0


def training_module(transformer: nn.Module, spec: LoraSpec | None, *, repa: bool, checkpointing: bool) -> TrainingModule:
    """Make a loaded transformer trainable: LoRA layers on a frozen base with the unused modules deleted, or every
    used weight trainable (the unused cross_attn.add_*/to_add_out and, without REPA, the projectors stay frozen)."""
    if spec is not None:
        drop_unused_modules(transformer, keep_projectors=repa)
        inject_lora(transformer, spec)
    else:
        for name, param in transformer.named_parameters():
            unused = any(s in name for s in UNUSED_SUFFIXES) or (name.startswith("projectors.") and not repa)
            param.requires_grad_(not unused)
    transformer.train()
    return TrainingModule(transformer, checkpointing=checkpointing, repa=repa)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Official lr_lambda: step/warmup during warm-up, then linear decay to 0 at max_steps."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, 1.0 - (step - warmup_steps) / max(1, max_steps - warmup_steps))


def optimizer_and_schedule(params, *, learning_rate: float, weight_decay: float, warmup_steps: int, max_steps: int,
                           **adamw) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The official optimiser: AdamW (betas 0.8/0.9) with the warm-up / linear-decay schedule of `lr_factor`
    (shared by LoRA training and StemGen training)."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=(0.8, 0.9), **adamw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, max_steps))
    return optimizer, scheduler


def _derived_seed(seed: int, rank: int, name: str) -> int:
    """A generator seed per (run seed, rank, purpose)."""
    return int(hashlib.sha256(f"{seed}:{rank}:{name}".encode()).hexdigest()[:15], 16)


class _SkipSampler(torch.utils.data.Sampler):
    """Drops the first `start` indices of a sampler (resuming mid-epoch)."""

    def __init__(self, sampler: torch.utils.data.Sampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)


class Trainer:
    """One training run; `run()` caches, builds the model, resumes if asked and loops to max_steps."""

    def __init__(self, config: TrainConfig, *, ssl_extractor: SSLExtractor | None = None,
                 log: Callable[[str], None] = print):
        self.config = config
        self.ssl_extractor = ssl_extractor
        self.repa = ssl_extractor is not None or config.repa_extractor is not None
        self.log_fn = log
        self.env: DistEnv = init_distributed(config.accelerator)

    def log(self, message: str) -> None:
        if self.env.is_main:
            self.log_fn(message)

    # -- data ---------------------------------------------------------------------------------------
    def prepare_cache(self, dataset_path: str) -> list:
        """Plan the cache for a dataset and encode what is missing (sharded over ranks); encoders freed after."""
        cfg, env = self.config, self.env
        records = read_records(dataset_path)
        ids = checkpoint_ids(cfg.checkpoint_dir, cfg.lyric_vocab)
        ssl_id = cfg.repa_extractor
        if self.ssl_extractor is not None:
            ssl_id = getattr(self.ssl_extractor, "cache_id", None) or type(self.ssl_extractor).__name__
        entries = plan_cache(records, cfg.cache_dir, ids, prompt_shuffles=cfg.prompt_shuffles, seed=cfg.seed,
                             ssl_id=ssl_id)
        barrier(env)                                            # no rank writes before every rank has looked
        pending = {(e.latent, e.cond, e.ssl): e for e in entries if not e.is_complete()}   # repeated records once
        todo = list(pending.values())[env.rank::env.world_size]
        if todo:
            extractor = self.ssl_extractor
            if self.repa and extractor is None and any(not e.ssl.is_file() for e in todo):
                from .repa import load_extractor

                extractor = load_extractor(cfg.repa_extractor, env.device, trust_remote_code=cfg.repa_trust_remote_code)
            encoders = Encoders.load(
                cfg.checkpoint_dir, env.device, cfg.lyric_vocab, ssl_extractor=extractor,
                latents=any(not (e.latent.is_file() or e.silent_marker.is_file()) for e in todo),
                conditions=any(not e.cond.is_file() for e in todo))
            started = time.perf_counter()
            build_cache(todo, encoders, progress=lambda d, t: self.log(f"cache: {d}/{t}") if d % 50 == 0 else None)
            self.log(f"cache: {len(todo)} item(s) encoded on rank 0 in {time.perf_counter() - started:.1f} s")
            del encoders
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
        barrier(env)
        usable = usable_entries(entries)
        if len(usable) < len(entries):
            warnings.warn(f"{len(entries) - len(usable)} silent audio file(s) are skipped", stacklevel=2)
        if not usable:
            raise ValueError(f"--dataset_path {dataset_path}: every audio file is silent")
        return usable

    # -- model --------------------------------------------------------------------------------------
    def build_model(self) -> tuple[TrainingModule, LoraSpec | None]:
        """Load the transformer, make it trainable (LoRA layers or all used weights) and wrap it for training."""
        cfg, env = self.config, self.env
        lora = cfg.mode == "lora"
        dtype = torch.bfloat16 if lora and cfg.precision == "bf16-mixed" else torch.float32
        load_device = "cpu" if cfg.fsdp else env.device
        transformer = load_acestep(cfg.checkpoint_dir, dtype=dtype, device=load_device,
                                   components=("transformer",)).transformer
        spec = LoraSpec.from_json(cfg.lora_config_path) if lora else None
        return training_module(transformer, spec, repa=self.repa, checkpointing=cfg.gradient_checkpointing), spec

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for bf16-mixed, nothing for fp32."""
        if self.config.precision == "bf16-mixed":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Cache, build, resume if asked, train to max_steps (or epochs), checkpoint the end."""
        cfg, env = self.config, self.env
        document, ckpt = read_training_state(cfg.ckpt_path) if cfg.ckpt_path else (None, None)
        if document is not None and document["mode"] != cfg.mode:
            raise ValueError(f"--ckpt_path {ckpt} is a {document['mode']} checkpoint but this run is {cfg.mode}")
        entries = self.prepare_cache(cfg.dataset_path)
        val_entries = []
        if cfg.val_check_interval:
            val_entries = self.prepare_cache(cfg.val_dataset_path) if cfg.val_dataset_path else entries[:16]
        stamp = broadcast_object(env, datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        log_dir = Path(cfg.logger_dir) / "lightning_logs" / f"{stamp}{cfg.exp_name}"
        result = TrainResult(step=0, losses={}, log_dir=log_dir)
        if cfg.prepare_only:
            return result
        if env.is_main:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "hparams.json").write_text(json.dumps(cfg.to_json(), indent=1))
        state = self._setup(log_dir, document, ckpt)
        started, first_step = time.perf_counter(), state.counters["step"]
        self._loop(state, result, CachedDataset(entries, seed=cfg.seed, with_ssl=self.repa),
                   CachedDataset(val_entries, seed=cfg.seed))
        result.step = state.counters["step"]
        result.seconds_per_step = (time.perf_counter() - started) / max(1, result.step - first_step)
        if state.saved_step != result.step:
            result.checkpoints.append(self._save(state))
        self.log(f"finished at step {result.step}: {result.seconds_per_step:.3f} s/step, checkpoint {result.checkpoints[-1]}")
        return result

    def _setup(self, log_dir: Path, document: dict | None, ckpt: Path | None) -> _LoopState:
        """Model (seeded LoRA init or checkpoint weights), DDP/FSDP wrapper, AdamW, schedule, generators, resume."""
        cfg, env = self.config, self.env
        torch.manual_seed(cfg.seed)
        module, spec = self.build_model()
        if document is not None:
            if cfg.mode == "lora":
                load_lora_parameters(module.transformer, checkpoint_params(ckpt))
            else:
                load_full_transformer(module, ckpt)
        model = wrap_model(module, env, fsdp=cfg.fsdp)
        if cfg.fsdp:
            model.to(env.device)
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
        self.log(f"{cfg.mode}: {trainable:,} trainable parameters, {env.world_size} process(es) on {env.device.type}")
        optimizer, scheduler = optimizer_and_schedule(params, learning_rate=cfg.learning_rate,
                                                      weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                                      max_steps=cfg.max_steps)
        generators = {
            "timestep": torch.Generator().manual_seed(_derived_seed(cfg.seed, env.rank, "timestep")),
            "noise": torch.Generator(env.device).manual_seed(_derived_seed(cfg.seed, env.rank, "noise")),
            "dropout": torch.Generator(env.device).manual_seed(_derived_seed(cfg.seed, env.rank, "dropout")),
        }
        counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        if document is not None:
            restore_training_state(ckpt, document, env=env, model=model, optimizer=optimizer, scheduler=scheduler,
                                   generators=generators)
            counters = {k: int(document[k]) for k in counters}
            self.log(f"resumed from {ckpt} at step {counters['step']}")
        writer = EvalAudioWriter(cfg.checkpoint_dir, log_dir, seconds=cfg.plot_seconds, steps=cfg.plot_steps,
                                 seed=cfg.seed) if cfg.every_plot_step else None
        return _LoopState(model, optimizer, scheduler, generators, training_sigmas(cfg.shift), params, spec, log_dir,
                          counters, writer)

    def _loop(self, state: _LoopState, result: TrainResult, dataset: CachedDataset, val_dataset: CachedDataset) -> None:
        """Epochs of a DistributedSampler order (resumed mid-epoch if needed) until max_steps or epochs."""
        cfg, env = self.config, self.env
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                                  shuffle=True, seed=cfg.seed)
        while state.counters["step"] < cfg.max_steps and (cfg.epochs < 0 or state.counters["epoch"] < cfg.epochs):
            epoch = state.counters["epoch"]
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers,
                sampler=_SkipSampler(sampler, state.counters["batch_in_epoch"] * cfg.batch_size),
                pin_memory=env.device.type == "cuda")
            micro: list = []
            for batch in loader:
                state.counters["batch_in_epoch"] += 1
                micro.append(batch)
                if len(micro) == cfg.accumulate_grad_batches:
                    self._optimizer_step(state, micro, result, dataset, val_dataset)
                    micro = []
                    if state.counters["step"] >= cfg.max_steps:
                        break
            else:
                if micro:                                       # the epoch's last, shorter accumulation
                    self._optimizer_step(state, micro, result, dataset, val_dataset)
                state.counters.update(epoch=epoch + 1, batch_in_epoch=0)

    def _optimizer_step(self, state: _LoopState, micro: list, result: TrainResult, dataset: CachedDataset,
                        val_dataset: CachedDataset) -> None:
        """Forward/backward every micro-batch (gradient sync only on the last), clip, step, log, checkpoint."""
        cfg, env = self.config, self.env
        sums = torch.zeros(3, dtype=torch.float64)                  # loss, denoising loss, REPA loss
        for i, batch in enumerate(micro):
            with self._no_sync(state.model, last=i == len(micro) - 1):
                loss, denoise, repa = self._micro_step(state, batch.to(env.device))
                (loss / len(micro)).backward()
            sums += torch.tensor([loss.item(), denoise.item(), repa], dtype=torch.float64) / len(micro)
        grad_norm = self._clip(state.params)
        lr = state.optimizer.param_groups[0]["lr"]
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.counters["step"] += 1
        step = state.counters["step"]
        loss, denoise, repa = mean_over_ranks(env, sums).tolist()
        result.losses[step] = loss
        if env.is_main:
            record = {"step": step, "epoch": state.counters["epoch"], "loss": loss, "denoising_loss": denoise,
                      "lr": lr, "time": time.time()}
            if self.repa:
                record["repa_loss"] = repa
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            with open(state.log_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if step % cfg.log_every_n_steps == 0 or step == 1:
                self.log(f"step {step}/{cfg.max_steps} loss {loss:.5f} lr {lr:.3g}")
        if cfg.val_check_interval and step % cfg.val_check_interval == 0:
            result.validation[step] = validation_loss(state.model, val_dataset, state.table, env,
                                                      batch_size=cfg.batch_size, autocast=self.autocast)
            self.log(f"step {step} val/loss {result.validation[step]:.5f}")
        if state.writer is not None and step % cfg.every_plot_step == 0:
            path = self._plot(state, dataset, step)
            if path is not None:
                result.eval_audio.append(path)
        if cfg.every_n_train_steps and step % cfg.every_n_train_steps == 0:
            result.checkpoints.append(self._save(state))

    def _micro_step(self, state: _LoopState, batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One micro-batch: σ, noise, dropout, forward, loss (design §11)."""
        env, cfg = self.env, self.config
        x0 = batch.latents
        sigma = sample_sigmas(x0.shape[0], state.table, state.generators["timestep"])
        noise = torch.randn(x0.shape, generator=state.generators["noise"], device=env.device)
        sigma_device = sigma.to(env.device)
        x_sigma = add_noise(x0, noise, sigma_device)
        cond = drop_conditions(batch.cond, state.generators["dropout"])
        with self.autocast():
            velocity, projected = state.model(x_sigma, batch.frame_mask, cond.text_states, cond.text_mask,
                                              cond.speaker, cond.lyric_ids, cond.lyric_mask, sigma_device * 1000)
        denoise = denoising_loss(velocity, x_sigma, x0, sigma_device, batch.frame_mask).mean()
        if not self.repa:
            return denoise, denoise.detach(), 0.0
        repa = torch.stack(repa_loss(projected, batch.ssl, batch.frame_mask)).mean()
        return denoise + cfg.ssl_coeff * repa, denoise.detach(), float(repa.item())

    @staticmethod
    def _no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2 requires_gradient_sync)."""
        if last:
            return contextlib.nullcontext()
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            return _fsdp_no_sync(model)
        return contextlib.nullcontext()

    def _clip(self, params: list) -> float | None:
        """Clip by global norm (returns it) or by value (returns None); 0 disables."""
        cfg = self.config
        if cfg.gradient_clip_val <= 0:
            return None
        if cfg.gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, cfg.gradient_clip_val)
            return None
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clip_val)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _plot(self, state: _LoopState, dataset: CachedDataset, step: int) -> Path | None:
        """Evaluation clip: rank 0 alone under DDP, every rank under FSDP (the forward needs all shards)."""
        module = unwrap(state.model)
        if self.config.fsdp and self.env.distributed:
            module.unshard()
            path = state.writer.write(module.transformer, dataset, step, self.env, self.autocast)
            module.reshard()
        elif self.env.is_main:
            path = state.writer.write(module.transformer, dataset, step, self.env, self.autocast)
        else:
            path = None
        barrier(self.env)
        return path

    def _save(self, state: _LoopState) -> Path:
        """Write a checkpoint folder (LoRA file or full transformer, plus the training state); every rank calls it."""
        cfg, env = self.config, self.env
        step, epoch = state.counters["step"], state.counters["epoch"]
        lora = cfg.mode == "lora"
        folder = state.log_dir / "checkpoints" / (f"epoch={epoch}-step={step}" + ("_lora" if lora else ""))
        module = unwrap(state.model)
        if env.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        barrier(env)
        if lora:
            if env.is_main:
                save_lora(module.transformer, folder, state.spec, adapter_name=cfg.exp_name, step=step)
        else:
            save_full_transformer(state.model, folder, env, module.transformer.config)
        params = lora_parameters(module.transformer) if lora else {}
        save_training_state(folder, env=env, model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                            counters=state.counters, params=params, generators=state.generators,
                            info={"mode": cfg.mode, "config": cfg.to_json()})
        state.saved_step = step
        return folder


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@dataclass
class _LoopState:
    """The mutable pieces of a run shared by the step helpers."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generators: dict
    table: torch.Tensor
    params: list
    spec: LoraSpec | None
    log_dir: Path
    counters: dict
    writer: EvalAudioWriter | None
    saved_step: int = -1


def train(config: TrainConfig, *, ssl_extractor: SSLExtractor | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run one training job in this process (under torchrun each rank calls this)."""
    return Trainer(config, ssl_extractor=ssl_extractor, log=log).run()

