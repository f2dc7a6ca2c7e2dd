"""ACE-Step 1.5 speed: per-phase times, real-time factor and peak GPU memory for turbo (8 steps) and base (50 steps,
APG guidance, so two rows per item) (bench/README-15.md).

CPU, the tiny configuration (the parity fixtures' DiT, a tiny Oobleck VAE at the real strides, a tiny Qwen3):
    python -m bench.rtf15 --tiny --seconds 2 --threads 1
GPU, the real configuration with random weights (2B DiT, the 48 kHz Oobleck VAE, Qwen3-Embedding-0.6B; speed
does not depend on the values; nothing downloaded):
    python -m bench.rtf15 --random-weights --seconds 30 120 240 --variants turbo base

Phases, as the official handler runs them: text encoding (caption through the whole Qwen3, lyric token
embeddings), condition encoder (`prepare_condition`: text projector, lyric and timbre encoders), diffusion loop
(every decoder call and update), VAE decode (tiled, 512-frame windows). The caption is 120 tokens and the lyrics
500 tokens, given as token ids; the timbre reference is the silence latent (no reference audio). RTF = seconds of
audio produced (batch x duration) / seconds of compute. The JSON goes to bench/results/rtf15-<device>-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from acestep_core.v15.config import AceStepConfig
from acestep_core.v15.generate import SamplerOptions, generate_audio
from acestep_core.v15.model import build_model
from acestep_core.v15.tasks import build_task_inputs
from acestep_core.v15.text_encoder import QWEN3_EMBEDDING_06B, TextEncoder15, build_text_model
from acestep_core.v15.vae import AudioVAE, OobleckConfig

RESULTS = Path(__file__).resolve().parent / "results"
CAPTION_TOKENS = 120
LYRIC_TOKENS = 500
LATENT_RATE = 25
SAMPLE_RATE = 48_000
STEPS = {"turbo": 8, "base": 50}
TINY_DIT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fixtures-15" / "config.json"
TINY_VAE = dict(encoder_hidden_size=16, downsampling_ratios=[2, 4, 4, 6, 10], channel_multiples=[1, 1, 1, 1, 1],
                decoder_channels=8, decoder_input_channels=8)
TINY_TEXT = dict(QWEN3_EMBEDDING_06B, vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _init_(module: torch.nn.Module, seed: int) -> None:
    """Random values of a sensible size: norm and weight-norm gains 1, Snake alpha/beta 0.1·N (log scale, as the
    VAE tests), the rest 0.02·N."""
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight_g") or (p.ndim == 1 and name.endswith("weight")):
                p.fill_(1.0)
            else:
                scale = 0.1 if name.endswith((".alpha", ".beta")) else 0.02
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def build(tiny: bool, variant: str, device: torch.device, dtype: torch.dtype):
    """(model, vae, text encoder, silence latent) at the tiny or the real configuration, random weights."""
    if tiny:
        cfg = AceStepConfig.from_dict(dict(json.loads(TINY_DIT.read_text()), model_version=variant))
        vae_cfg, text_cfg = OobleckConfig(**TINY_VAE), TINY_TEXT
    else:
        cfg, vae_cfg, text_cfg = AceStepConfig(model_version=variant), OobleckConfig(), QWEN3_EMBEDDING_06B
    model = build_model(cfg, device=device, dtype=dtype)
    _init_(model, 0)
    with torch.device(device):
        vae = AudioVAE(vae_cfg)
    vae = vae.to(dtype)
    _init_(vae, 1)
    text = build_text_model(text_cfg, device=device).to(dtype)
    _init_(text, 2)
    g = torch.Generator("cpu").manual_seed(3)
    silence = (torch.randn(1, 15000 if not tiny else 800, cfg.audio_acoustic_hidden_dim, generator=g) * 0.1)
    return (model.eval().requires_grad_(False), vae.eval().requires_grad_(False),
            TextEncoder15(text.eval().requires_grad_(False)), silence.to(device, dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device):
        self.device, self.phases = device, {}

    def __call__(self, name):
        timer = self

        class _Phase:
            def __enter__(self):
                _sync(timer.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                _sync(timer.device)
                timer.phases[name] = timer.phases.get(name, 0.0) + time.perf_counter() - self.start

        return _Phase()


@torch.no_grad()
def run_once(parts, variant: str, seconds: float, batch: int, seed: int = 0) -> dict:
    model, vae, text, silence = parts
    device, dtype = silence.device, silence.dtype
    timer = Timer(device)
    g = torch.Generator("cpu").manual_seed(seed)
    vocab = int(text.model.config.vocab_size)
    caption_ids = torch.randint(0, vocab, (batch, CAPTION_TOKENS), generator=g).to(device)
    lyric_ids = torch.randint(0, vocab, (batch, LYRIC_TOKENS), generator=g).to(device)
    with timer("text_encode"):
        text_states = text.encode_text(caption_ids).to(dtype)
        lyric_states = text.embed_lyrics(lyric_ids).to(dtype)
    length = max(128, int(seconds * LATENT_RATE))
    inputs = build_task_inputs("text2music", batch=batch, length=length, silence_latent=silence)
    ones_t = torch.ones(batch, CAPTION_TOKENS, dtype=torch.long, device=device)
    ones_l = torch.ones(batch, LYRIC_TOKENS, dtype=torch.long, device=device)
    refer = silence[:, :750].expand(batch, -1, -1).contiguous()
    order = torch.arange(batch, device=device)
    original = model.prepare_condition

    def timed_condition(*a, **k):
        with timer("condition_encoder"):
            return original(*a, **k)

    model.prepare_condition = timed_condition
    opts = SamplerOptions(variant=variant) if variant == "turbo" else SamplerOptions(variant="base",
                                                                                       steps=STEPS["base"])
    try:
        with timer("generate"):
            latents = generate_audio(
                model, text_hidden_states=text_states, text_attention_mask=ones_t, lyric_hidden_states=lyric_states,
                lyric_attention_mask=ones_l, refer_audio_acoustic_hidden_states_packed=refer,
                refer_audio_order_mask=order, src_latents=inputs.src_latents, chunk_masks=inputs.chunk_masks,
                is_covers=inputs.is_covers, silence_latent=silence, options=opts,
                seed=list(range(seed, seed + batch)))
    finally:
        del model.prepare_condition
    with timer("vae_decode"):
        audio = vae.decode(latents.transpose(1, 2).contiguous())
    phases = dict(timer.phases)
    phases["diffusion_loop"] = phases.pop("generate") - phases["condition_encoder"]
    total = sum(phases.values())
    return {"phases_s": phases, "total_s": total, "rtf": batch * seconds / total,
            "audio_samples": int(audio.shape[-1]), "finite": bool(torch.isfinite(audio).all())}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="the tiny configuration (CPU)")
    which.add_argument("--random-weights", action="store_true", help="the real configuration, random weights")
    p.add_argument("--variants", nargs="+", default=["turbo", "base"], choices=sorted(STEPS))
    p.add_argument("--seconds", nargs="+", type=float, default=[30.0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if any(not 1 <= s <= 600 for s in args.seconds):
        p.error("--seconds must lie in [1, 600]")
    if not 1 <= args.batch <= 16 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch must lie in [1, 16], --repeats >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": label, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "config": "tiny" if args.tiny else "real (random weights)",
              "caption_tokens": CAPTION_TOKENS, "lyric_tokens": LYRIC_TOKENS, "batch": args.batch, "runs": []}
    for variant in args.variants:
        parts = build(args.tiny, variant, device, dtype)
        for seconds in args.seconds:
            for _ in range(args.warmup):
                run_once(parts, variant, seconds, args.batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs = [run_once(parts, variant, seconds, args.batch, seed=i) for i in range(args.repeats)]
            phases = {k: statistics.median(r["phases_s"][k] for r in runs) for k in runs[0]["phases_s"]}
            total = statistics.median(r["total_s"] for r in runs)
            entry = {"variant": variant, "steps": STEPS[variant], "seconds": seconds, "batch": args.batch,
                     "phases_s": phases, "total_s": total, "rtf": args.batch * seconds / total,
                     "finite": all(r["finite"] for r in runs),
                     "peak_gpu_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                      if device.type == "cuda" else None)}
            report["runs"].append(entry)
            print(f"{variant:5s} {seconds:6.1f}s x{args.batch}  " + "  ".join(f"{k} {v:.3f}s" for k, v in
                  phases.items()) + f"  total {total:.3f}s  RTF {entry['rtf']:.1f}"
                  + (f"  peak {entry['peak_gpu_gib']:.2f} GiB" if entry["peak_gpu_gib"] is not None else ""))
        del parts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = "".join(c if c.isalnum() else "-" for c in (device.type if device.type == "cpu" else label)).lower()
    path = args.out / f"rtf15-{name}-{'tiny' if args.tiny else 'real'}-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    report["path"] = str(path)
    print(f"written {path}")
    return report


if __name__ == "__main__":
    main()
