"""Peak memory of a few ACE-Step training steps (LoRA or full fine-tuning), written as JSON to bench/results/.

GPU, real 3.5B configuration with random weights (speed and memory do not depend on the values):
    python -m bench.train_memory --random-weights --precision bf16-mixed --rank 16 --seconds 240
CPU, the tiny checkpoint (what runs without a GPU):
    python -m bench.train_memory --checkpoint tests/data/tiny/acestep-v1-tiny --seconds 10
CPU, real configuration built on the meta device: only the static part (weights, gradients, AdamW moments):
    python -m bench.train_memory --random-weights

It builds the model exactly as the trainer does (`training_module`: bf16 frozen base for bf16-mixed LoRA, unused
modules deleted, LoRA layers in fp32, gradient checkpointing per block) and runs `--steps` optimiser steps of the
trainer's objective on random latents and cached-condition-shaped inputs (`--text-tokens` UMT5 states,
`--lyric-tokens` lyric ids; the official limits are 256 and 4096). Reported: weights-only memory, peak during
the steps (CUDA: max_memory_allocated / reserved; CPU: peak resident set size), seconds per step.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from acestep_core.latent import frames_at
from acestep_core.loading import load_acestep
from acestep_core.models.transformer import AceStepTransformer, TransformerConfig
from acestep_core.train.lora_layers import LoraSpec
from acestep_core.train.objective import (
    Conditions,
    add_noise,
    denoising_loss,
    drop_conditions,
    sample_sigmas,
    training_sigmas,
)
from acestep_core.train.trainer import training_module

REPO = Path(__file__).resolve().parents[1]

GIB = 1024**3


def random_transformer(device: torch.device, dtype: torch.dtype) -> AceStepTransformer:
    """The real 3.5B configuration (design §2.1) with PyTorch's default random init, built on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return AceStepTransformer(TransformerConfig())
    finally:
        torch.set_default_dtype(previous)


def static_gib(module: torch.nn.Module) -> dict[str, float]:
    """Bytes that do not depend on the input: frozen weights, and for trainable ones weight + gradient + 2 AdamW moments."""
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return {"frozen_weights_gib": frozen / GIB, "trainable_weights_gib": trainable / GIB,
            "gradients_gib": trainable / GIB, "adamw_moments_gib": 2 * trainable / GIB,
            "static_total_gib": (frozen + 4 * trainable) / GIB}


def rss_gib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "tests" / "data" / "tiny" / "acestep-v1-tiny"))
    parser.add_argument("--random-weights", action="store_true", help="real config with random weights (GPU)")
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--targets", default="to_q,to_k,to_v,to_out.0")
    parser.add_argument("--precision", choices=("bf16-mixed", "32"), default="bf16-mixed")
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--lyric-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lora = args.mode == "lora"
    bf16 = args.precision == "bf16-mixed"
    dtype = torch.bfloat16 if lora and bf16 else torch.float32
    meta_only = args.random_weights and device.type != "cuda"
    if args.random_weights:
        transformer = random_transformer(torch.device("meta") if meta_only else device, dtype)
        source = "real config on the meta device (static memory only)" if meta_only else "random weights, real config"
    else:
        transformer = load_acestep(args.checkpoint, dtype=dtype, device=device, components=("transformer",)).transformer
        source = args.checkpoint
    spec = LoraSpec(r=args.rank, lora_alpha=args.alpha, target_modules=tuple(args.targets.split(","))) if lora else None
    module = training_module(transformer, spec, repa=False, checkpointing=not args.no_checkpointing)
    params = [p for p in module.parameters() if p.requires_grad]
    lora_note = {"rank": args.rank, "lora_alpha": args.alpha, "targets": args.targets} if lora else {}
    summary = {"mode": args.mode, "precision": args.precision, **lora_note, "source": source,
               "trainable_parameters": sum(p.numel() for p in params),
               "total_parameters": sum(p.numel() for p in module.parameters()), **static_gib(module)}
    if meta_only:
        return write(summary, args, "cpu", "meta")
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, betas=(0.8, 0.9))
    if device.type == "cuda":
        torch.cuda.synchronize()
        weights_gib = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    else:
        weights_gib = rss_gib()

    cfg = transformer.config
    frames = frames_at(args.seconds)
    batch = args.batch_size
    table = training_sigmas(3.0)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        x0 = torch.randn(batch, 8, 16, frames, device=device)
        text = torch.randn(batch, args.text_tokens, cfg.text_embedding_dim, device=device)
        ids = torch.randint(0, cfg.lyric_encoder_vocab_size, (batch, args.lyric_tokens), device=device)
        cond = Conditions(text, torch.ones(batch, args.text_tokens, device=device, dtype=torch.long),
                          torch.zeros(batch, cfg.speaker_embedding_dim, device=device), ids, torch.ones_like(ids))
        cond = drop_conditions(cond, torch.Generator(device).manual_seed(0))
        sigma = sample_sigmas(batch, table, generator).to(device)
        x_sigma = add_noise(x0, torch.randn_like(x0), sigma)
        frame_mask = torch.ones(batch, frames, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            velocity, _ = module(x_sigma, frame_mask, cond.text_states, cond.text_mask, cond.speaker, cond.lyric_ids,
                                 cond.lyric_mask, sigma * 1000)
        loss = denoising_loss(velocity, x_sigma, x0, sigma, frame_mask).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__, **summary, "gradient_checkpointing": not args.no_checkpointing,
        "seconds": args.seconds, "latent_frames": frames, "text_tokens": args.text_tokens,
        "lyric_tokens": args.lyric_tokens, "batch_size": batch, "steps": args.steps,
        "seconds_per_step": times, "final_loss": loss.item(),
    }
    if device.type == "cuda":
        result.update(weights_gib=weights_gib, peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    else:
        result.update(weights_rss_gib=weights_gib, peak_rss_gib=peak_rss_gib())
    return write(result, args, "gpu" if device.type == "cuda" else "cpu", "real" if args.random_weights else "ckpt")


def write(result: dict, args: argparse.Namespace, device: str, weights: str) -> int:
    """Print the result and save it as bench/results/train_memory_<device>_<mode>_<weights>_<seconds>s.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    length = "static" if weights == "meta" else f"{int(args.seconds)}s"
    (out / f"train_memory_{device}_{args.mode}_{weights}_{length}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
