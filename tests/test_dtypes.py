"""bfloat16 and float16 end to end on the CPU, the stand-in for a GPU: every task in both dtypes gives finite audio
within a stated tolerance of float32, with no dtype error at the seams (LoRA, low-VRAM offload, StemGen, lyric
timing). The tolerances are relative RMS differences (docs/memory-and-speed.md, "Precision"):

    rel(x, ref) = RMS(x - ref) / RMS(ref)

on the tiny checkpoint, 1.5 s, 3 steps, official guidance (APG 15, ERG). Half precision rounds every product
(bf16 keeps 8 bits of mantissa, fp16 11), and guidance amplifies the rounding of the branch difference, so the
latents move more than the audio (the decoder smooths them).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINY_FOLDER, TINY_LORA, VOCAB

from acestep_core import fast, pipeline, tasks
from acestep_core.conditioning import encode_conditioning
from acestep_core.lora import ensure_loras, load_lora_file
from acestep_core.lyric_timing import align_lyrics, collect_lyric_attention
from acestep_core.noise import SeededNoise
from acestep_core.loading import load_acestep
from acestep_core.models.transformer import patch_conv_as_matmul
from acestep_core.stemgen.control import ControlConfig, StemGenControl
from acestep_core.stemgen.generate import generate_latent
from acestep_core.tasks import SamplerOptions

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_TOL = {"bf16": 0.15, "fp16": 0.025}
"""Largest relative RMS difference of the final latents from float32, any task (measured at most 0.067 / 0.011)."""
AUDIO_TOL = {"bf16": 0.015, "fp16": 0.0025}
"""Largest relative RMS difference of the decoded audio from float32, any task (measured 0.0056 / 0.0010)."""
ATTENTION_TOL = {"bf16": 0.15, "fp16": 0.03}
"""Largest relative RMS difference of the collected lyric attention (measured 0.074 / 0.011)."""
LYRICS = "[verse]\nhello bright morning\nwe sing along\n[chorus]\nla la la"


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.fixture(scope="module")
def models():
    return {name: load_acestep(TINY_FOLDER, lyric_vocab=VOCAB, dtype=dtype)
            for name, dtype in {"fp32": torch.float32, **HALF}.items()}


def _source() -> torch.Tensor:
    """1.5 s of stereo broadband audio (noise: a pure tone's silent bands would only measure input rounding)."""
    return torch.randn(2, int(1.5 * 44100), generator=torch.Generator().manual_seed(9)) * 0.1


def request(task: str) -> pipeline.Request:
    r = pipeline.Request(task=task, prompt="pop, piano", lyrics=LYRICS, audio_duration=1.5, infer_step=3,
                         manual_seeds=[1], retake_seeds=[2], sample_rate=44100)
    if task in ("repaint", "extend", "edit"):
        r.src_audio, r.src_sample_rate = _source(), 44100
    if task == "audio2audio":
        r.ref_audio, r.ref_sample_rate = _source(), 44100
    r.retake_variance = {"retake": 0.3, "repaint": 0.7, "extend": 1.0}.get(task, 0.5)
    r.repaint_start, r.repaint_end = {"repaint": (0.4, 1.1), "extend": (-0.5, 2.0)}.get(task, (0.0, 0.0))
    if task == "edit":
        r.edit_target_prompt, r.edit_target_lyrics, r.edit_n_min = "rock, guitar", "[verse]\nbye bye", 0.3
    return r


_RUNS: dict[tuple[str, str], pipeline.Result] = {}


def run(models, task: str, dtype: str) -> pipeline.Result:
    if (task, dtype) not in _RUNS:
        _RUNS[task, dtype] = pipeline.generate(models[dtype], request(task))
    return _RUNS[task, dtype]


@pytest.mark.parametrize("dtype", sorted(HALF))
@pytest.mark.parametrize("task", pipeline.TASKS)
def test_every_task_in_half_precision_is_close_to_float32(models, task, dtype):
    half, full = run(models, task, dtype), run(models, task, "fp32")
    assert half.latents.dtype == HALF[dtype] and half.waveform.dtype == torch.float32
    assert torch.isfinite(half.latents).all() and torch.isfinite(half.waveform).all()
    assert half.latents.shape == full.latents.shape and half.waveform.shape == full.waveform.shape
    assert rel(half.latents, full.latents) <= LATENT_TOL[dtype]
    assert rel(half.waveform, full.waveform) <= AUDIO_TOL[dtype]
    assert half.waveform.abs().max() > 0.01


def test_patch_embedding_is_right_in_bfloat16_on_the_cpu(models):
    """The CPU bf16 convolution is wrong for the patch embedding's shape; the matrix product used instead is not."""
    conv = models["fp32"].transformer.proj_in.early_conv_layers[0]
    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = conv(x)
        ours = patch_conv_as_matmul(copy.deepcopy(conv).to(torch.bfloat16), x.bfloat16())
        torch.testing.assert_close(patch_conv_as_matmul(conv, x), reference, atol=1e-5, rtol=1e-5)
        for length in (8, 16, 40, 100):  # the model's bf16 embedding on CPU for lengths the conv kernel gets wrong
            z = torch.randn(1, 8, 16, length, generator=torch.Generator().manual_seed(length))
            full = models["fp32"].transformer.proj_in(z)
            assert rel(models["bf16"].transformer.proj_in(z.bfloat16()), full) <= 0.01
    assert rel(ours, reference) <= 0.01


# --------------------------------------------------------------------------------------------------------------
# the seams


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_lora_on_a_half_precision_model(models, dtype):
    lora = load_lora_file(TINY_LORA)
    outs = {}
    for name in ("fp32", dtype):
        transformer = models[name].transformer
        ensure_loras(transformer, [(lora, 1.0)])
        try:
            outs[name] = pipeline.generate(models[name], request("text2music"))
        finally:
            ensure_loras(transformer, [])
        assert all(p.dtype == models[name].dtype for p in transformer.parameters())
    assert torch.isfinite(outs[dtype].waveform).all()
    assert rel(outs["fp32"].latents, run(models, "text2music", "fp32").latents) > 0.01, "the LoRA must matter"
    assert rel(outs[dtype].latents, outs["fp32"].latents) <= LATENT_TOL[dtype]
    assert rel(outs[dtype].waveform, outs["fp32"].waveform) <= AUDIO_TOL[dtype]


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_low_vram_offload_in_half_precision_is_exact(models, dtype, monkeypatch):
    def copy(self, tensor):  # on the CPU the device is the home: make the phase copies real copies
        moved = tensor.detach().clone()
        return nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved

    monkeypatch.setattr(fast.Offloader, "active", property(lambda self: True))
    monkeypatch.setattr(fast.Offloader, "_copy", copy)
    model = models[dtype]
    try:
        out = pipeline.generate(model, request("repaint"), levers=fast.Levers(cpu_offload=True, overlapped_decode=True))
    finally:
        fast.placement(model, False)
    assert all(p.dtype == HALF[dtype] for p in model.transformer.parameters())
    plain = run(models, "repaint", dtype)
    torch.testing.assert_close(out.latents, plain.latents, atol=0, rtol=0)
    n = min(out.waveform.shape[-1], plain.waveform.shape[-1])
    assert rel(out.waveform[..., :n], plain.waveform[..., :n]) <= 0.05, "overlapped decode: only the end differs"


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_stemgen_in_half_precision(models, dtype):
    outs = {}
    for name in ("fp32", dtype):
        model = models[name]
        control = StemGenControl.from_base(model.transformer, ControlConfig.for_transformer(model.transformer.config))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in (control.control_in, control.timbre_proj, *control.control_out):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
        control = control.to(model.dtype)
        reference = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(2))
        cond = encode_conditioning(model, "bass", "")
        noise = SeededNoise.from_seeds([3], 1, dtype=model.dtype)
        with torch.no_grad():
            outs[name] = generate_latent(model.transformer, control, cond, reference, timbre=None,
                                         options=SamplerOptions(steps=3), noise=noise)
    assert outs[dtype].dtype == HALF[dtype] and torch.isfinite(outs[dtype]).all()
    assert rel(outs[dtype], outs["fp32"]) <= LATENT_TOL[dtype]


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_lyric_timing_in_half_precision(models, dtype):
    found = {}
    for name in ("fp32", dtype):
        model = models[name]
        r = request("text2music")
        cond = encode_conditioning(model, r.prompt, r.lyrics)
        noise = SeededNoise.from_seeds([1], 1, dtype=model.dtype)
        with torch.no_grad(), collect_lyric_attention(model.transformer, cond) as collector:
            tasks.text2music(model.transformer, cond, 16, options=SamplerOptions(steps=3), noise=noise)
        attention = collector.result()
        found[name] = attention, align_lyrics(attention, model.lyric_tokenizer)
    (half, half_lines), (full, full_lines) = found[dtype], found["fp32"]
    assert half.weights.dtype == torch.float32 and torch.isfinite(half.weights).all()
    assert rel(half.weights, full.weights) <= ATTENTION_TOL[dtype]
    assert [line.text for line in half_lines.lines] == [line.text for line in full_lines.lines]
