"""Static accounting of GPU memory per phase, on the CPU: the real configurations run on the meta device.

    python -m bench.memory --seconds 240 --batch 1 --dtype bfloat16

Every phase of a text-to-music generation (text encoding, diffusion, decode) runs its real modules on meta
tensors (shapes only, no data, no GPU) inside a dispatch mode that adds up the bytes of every tensor alive and
keeps the largest sum. A phase's peak is its weights plus that activation peak plus what it keeps from earlier
phases (the condition states, the latents). Low-VRAM mode (`--cpu-offload`, acestep_core.fast) holds only the
running phase's weights; the plain mode holds all of them all the time. What this leaves out, and what the GPU
run (bench/h100.sh, `peak_gpu_memory_gib`) includes: the CUDA context (~0.5 GiB, outside PyTorch's allocator),
the caching allocator's rounding and fragmentation, cuBLAS/cuDNN workspaces, and kernels choosing other
intermediates (e.g. flash attention keeps no score matrix; the meta math path may). The result is a lower
bound of `max_memory_allocated` to within those terms (bench/README.md compares both).
"""
from __future__ import annotations

import argparse
import json
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from acestep_core import audio as audio_io
from acestep_core import tasks
from acestep_core.conditioning import Conditioning
from acestep_core.loading import parameters_on_meta
from acestep_core.models.dcae import DCAE, DCAEConfig
from acestep_core.models.transformer import AceStepTransformer, TransformerConfig
from acestep_core.models.vocoder import Vocoder, VocoderConfig

GIB = 2**30
PROMPT_TOKENS = 40
LYRIC_TOKENS = 468
"""The official H100 baseline's prompt and lyric lengths (as bench.rtf)."""
BUDGET_GB = 8.0
"""The goal: 240 s at 27 steps in less than 8 GB (10^9 bytes) of GPU memory in low-VRAM mode."""


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of the storages of every tensor made inside it while any tensor on them lives."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()  # first: a freed storage's address may come back for an output
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.track(tensor)
        self.peak = max(self.peak, self.current)
        return out

    def track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        nbytes, refs = self._live.get(key, (storage.nbytes(), []))
        refs.append(weakref.ref(tensor))
        if key not in self._live:
            self.current += nbytes
        self._live[key] = (nbytes, refs)

    def _collect(self) -> None:
        for key, (nbytes, refs) in list(self._live.items()):
            alive = [r for r in refs if r() is not None]
            if alive:
                self._live[key] = (nbytes, alive)
            else:
                del self._live[key]
                self.current -= nbytes


def weight_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the parameters and buffers of `modules` (tied tensors once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()) if module is not None else ():
            seen.setdefault(id(tensor), tensor.numel() * tensor.element_size())
    return sum(seen.values())


@dataclass
class Phase:
    """One phase's accounting in bytes."""

    name: str
    weights: int
    activations_peak: int
    kept: int  # tensors from earlier phases that stay on the device (condition states, latents)

    @property
    def peak(self) -> int:
        return self.weights + self.activations_peak + self.kept


@dataclass
class Models:
    transformer: AceStepTransformer
    dcae: DCAE
    vocoder: Vocoder
    text: nn.Module | None


def meta_models(dtype: torch.dtype, *, transformer: TransformerConfig = TransformerConfig(),
                dcae: DCAEConfig = DCAEConfig(), vocoder: VocoderConfig = VocoderConfig(), text=None) -> Models:
    """The real configurations (defaults) on meta in `dtype`; UMT5-base sizes as bench.rtf builds them."""
    from transformers import UMT5EncoderModel

    from bench.rtf import UMT5_BASE_SHAPES
    from acestep_core.text import umt5_config_from_checkpoint

    text = text or umt5_config_from_checkpoint(None, UMT5_BASE_SHAPES)
    with parameters_on_meta():
        built = AceStepTransformer(transformer), DCAE(dcae), Vocoder(vocoder), UMT5EncoderModel(text)
    for module in built:
        module.to(device="meta", dtype=dtype).eval()
    return Models(*built)


class MetaNoise:
    """A noise source of meta tensors (shapes only), for the accounting."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def draw(self, stream: str, shape: Sequence[int]) -> Tensor:
        return torch.zeros(tuple(shape), device="meta", dtype=self.dtype)

    draw_shared = draw


@contextmanager
def meta_values():
    """Run value-reading checks on meta tensors: truth tests pass (finite, all ones), the condition encoder's token
    range check is skipped. Only for the accounting: meta tensors have no values to check."""
    with mock.patch.object(Tensor, "__bool__", lambda self: True), \
            mock.patch.object(AceStepTransformer, "_check_conditions", lambda *args, **kwargs: None):
        yield


def _measure(run: Callable[[], object]) -> tuple[int, object]:
    with torch.no_grad(), meta_values(), LiveBytes() as live:
        result = run()
        return live.peak, result


def account(models: Models, seconds: float, batch: int = 1, *, options: tasks.SamplerOptions | None = None,
            overlapped_decode: bool = False, sample_rate: int = 48000) -> list[Phase]:
    """Per-phase accounting of one text-to-music generation, the pack's own code run on meta tensors.

    Text encoding: UMT5 on the prompt, plain and ERG-tag tempered. Diffusion: `tasks.text2music` with `options`
    (default: the fast path and the official guidance; two steps, enough for a guided, batched call: the peak
    does not grow with the step count). Decode: `audio.decode_latents`, single pass or the official overlapped
    windows, resampled to `sample_rate`.
    """
    t, dtype = models.transformer, next(models.transformer.parameters()).dtype
    width = models.text.config.d_model if models.text is not None else 768  # UMT5-base: 768
    options = options or tasks.SamplerOptions(steps=2)
    frames = tasks.frames_for_seconds(seconds)
    phases = []

    def text_phase():
        ids = torch.zeros(1, PROMPT_TOKENS, dtype=torch.long, device="meta")
        mask = torch.ones(1, PROMPT_TOKENS, dtype=torch.long, device="meta")
        return [models.text(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2)]

    text_peak, text_states = (0, []) if models.text is None else _measure(text_phase)
    phases.append(Phase("text_encoding", weight_bytes(models.text), text_peak, 0))

    def diffusion_phase():
        cond = Conditioning(
            tags="", lyrics="",
            text_states=torch.zeros(1, PROMPT_TOKENS, width, dtype=dtype, device="meta"),
            text_mask=torch.ones(1, PROMPT_TOKENS, dtype=torch.long, device="meta"),
            lyric_ids=torch.zeros(1, LYRIC_TOKENS, dtype=torch.long, device="meta"),
            lyric_mask=torch.ones(1, LYRIC_TOKENS, dtype=torch.long, device="meta"),
            text_states_erg=torch.zeros(1, PROMPT_TOKENS, width, dtype=dtype, device="meta"),
        )
        return tasks.text2music(t, cond, frames, batch_size=batch, options=options, noise=MetaNoise(dtype))

    kept = sum(s.numel() * s.element_size() for s in text_states)
    diffusion_peak, latents = _measure(diffusion_phase)
    phases.append(Phase("diffusion", weight_bytes(t), diffusion_peak, kept))

    def decode_phase():
        return audio_io.decode_latents(models.dcae, models.vocoder, latents, sample_rate=sample_rate,
                                       overlapped=overlapped_decode)

    decode_peak, _ = _measure(decode_phase)
    latent_bytes = latents.numel() * latents.element_size()
    phases.append(Phase("decode", weight_bytes(models.dcae, models.vocoder), decode_peak, latent_bytes))
    return phases


def summary(phases: Sequence[Phase], all_weights: int) -> dict:
    """Low-VRAM peak (the largest phase) and the plain peak (every weight resident throughout)."""
    low = max(p.peak for p in phases)
    plain = max(all_weights + p.activations_peak + p.kept for p in phases)
    return {
        "phases": [{**asdict(p), "peak": p.peak, "peak_gib": p.peak / GIB} for p in phases],
        "low_vram_peak_bytes": low,
        "low_vram_peak_gib": low / GIB,
        "low_vram_peak_gb": low / 1e9,
        "plain_peak_bytes": plain,
        "plain_peak_gib": plain / GIB,
        "within_budget": low / 1e9 < BUDGET_GB,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 240:
        p.error("--seconds must be in (0, 240]")
    models = meta_models(getattr(torch, args.dtype))
    all_weights = weight_bytes(models.transformer, models.dcae, models.vocoder, models.text)
    report = {"seconds": args.seconds, "batch": args.batch, "dtype": args.dtype, "weights_gib": all_weights / GIB,
              "what": "static accounting on meta tensors (bench/memory.py docstring: what it leaves out)"}
    for label, overlapped in (("single_pass_decode", False), ("overlapped_decode", True)):
        phases = account(models, args.seconds, args.batch, overlapped_decode=overlapped)
        report[label] = summary(phases, all_weights)
    for label in ("single_pass_decode", "overlapped_decode"):
        r = report[label]
        print(f"{label}: " + ", ".join(f"{ph['name']} {ph['peak_gib']:.2f} GiB" for ph in r["phases"])
              + f"; low-VRAM peak {r['low_vram_peak_gib']:.2f} GiB ({r['low_vram_peak_gb']:.2f} GB), "
              f"all resident {r['plain_peak_gib']:.2f} GiB")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
