"""The fast path equals the eager (official call pattern) path on the tiny model: batched guidance branches with
a per-item ERG temperature, cross-attention K/V once per generation, the feed-forward as matrix products and
unmasked calls; the out-of-memory decode fallback; low-VRAM offloading."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import TINY_FOLDER, VOCAB

from acestep_core import audio as audio_io
from acestep_core import fast, tasks
from acestep_core.conditioning import ERG_TAU, encode_conditioning
from acestep_core.loading import load_acestep
from acestep_core.models.transformer import ERG_DIFFUSION_LAYERS
from acestep_core.noise import SeededNoise
from acestep_core.sampling.denoiser import GuidanceConfig
from acestep_core.sampling.options import EAGER, SPEED_FIELDS

LYRICS = "[verse]\nhello bright morning\nwe sing along\n[chorus]\nla la la"
FRAMES = 24
STEPS = 6  # guidance interval 0.5 -> steps 1..3 guided, the rest conditional only


@pytest.fixture(scope="module")
def model():
    return load_acestep(TINY_FOLDER, lyric_vocab=VOCAB)


@pytest.fixture(scope="module")
def cond(model):
    return encode_conditioning(model, "upbeat pop, piano, female vocals", LYRICS)


def _text2music(model, cond, options, batch=2):
    noise = SeededNoise.from_seeds([11, 12][:batch], batch, retake_seed=[5, 6][:batch])
    with torch.no_grad():
        return tasks.text2music(model.transformer, cond, FRAMES, batch_size=batch, options=options, noise=noise)


def _count_calls(transformer, monkeypatch) -> list[int]:
    """Batch sizes of every transformer.decode call from now on."""
    sizes: list[int] = []
    original = transformer.decode

    def counted(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(transformer, "decode", counted)
    return sizes


@pytest.mark.parametrize("guidance", [
    GuidanceConfig(),  # APG + ERG tag/lyric/diffusion, the official default
    GuidanceConfig(cfg_type="cfg", use_erg_lyric=False),
    GuidanceConfig(guidance_scale_text=5.0, guidance_scale_lyric=1.5),  # double condition: three branches
], ids=["apg_erg", "cfg_erg_diffusion_only", "double_condition"])
def test_fast_text2music_equals_eager(model, cond, guidance, monkeypatch):
    fast_options = tasks.SamplerOptions(steps=STEPS, guidance=guidance)
    assert all(getattr(fast_options.speed, name) for name in SPEED_FIELDS if name != "compile"), "fast path is default"
    eager = _text2music(model, cond, replace(fast_options, speed=EAGER))
    sizes = _count_calls(model.transformer, monkeypatch)
    quick = _text2music(model, cond, fast_options)
    assert (quick - eager).abs().max().item() <= 1e-4
    branches = 3 if guidance.double_condition else 2
    assert sizes == [2, 2 * branches, 2 * branches, 2 * branches, 2, 2], "one batched call per step"


@pytest.mark.parametrize("name", [n for n in SPEED_FIELDS if n != "compile"])
def test_each_fast_option_alone_equals_eager(model, cond, name):
    eager_options = tasks.SamplerOptions(steps=STEPS, speed=EAGER)
    eager = _text2music(model, cond, eager_options, batch=1)
    alone = _text2music(model, cond, tasks.with_options(eager_options, **{name: True}), batch=1)
    assert (alone - eager).abs().max().item() <= 1e-4


def test_eager_options_make_the_official_separate_calls(model, cond, monkeypatch):
    sizes = _count_calls(model.transformer, monkeypatch)
    _text2music(model, cond, tasks.SamplerOptions(steps=STEPS, speed=EAGER))
    assert sizes == [2, 2, 2, 2, 2, 2, 2, 2, 2]


def test_fast_repaint_equals_eager(model, cond):
    source = torch.randn(1, 8, 16, FRAMES, generator=torch.Generator().manual_seed(3))
    out = {}
    for label, options in (("fast", tasks.SamplerOptions(steps=STEPS)),
                           ("eager", tasks.SamplerOptions(steps=STEPS, speed=EAGER))):
        noise = SeededNoise.from_seeds([4], 1, retake_seed=[9])
        with torch.no_grad():
            out[label] = tasks.repaint(model.transformer, cond, source, 5, 15, variance=0.7, options=options,
                                       noise=noise)
    assert (out["fast"] - out["eager"]).abs().max().item() <= 1e-4


def _decode_inputs(model, batch: int):
    g = torch.Generator().manual_seed(batch)
    transformer = model.transformer
    x = torch.randn(batch, 8, 16, FRAMES, generator=g)
    states = torch.randn(batch, 30, transformer.config.inner_dim, generator=g)
    mask = torch.ones(batch, 30)
    t = torch.full((batch,), 700.0)
    return x, states, mask, t


def test_per_item_erg_tau_batched_equals_separate_calls(model):
    transformer = model.transformer
    x, states, mask, t = _decode_inputs(model, 2)
    frames = torch.ones(2, FRAMES)
    with torch.no_grad():
        plain = transformer.decode(x[:1], frames[:1], states[:1], mask[:1], t[:1])
        tempered = transformer.decode(x[1:], frames[1:], states[1:], mask[1:], t[1:], erg_tau=ERG_TAU)
        both = transformer.decode(x, frames, states, mask, t, erg_tau=torch.tensor([1.0, ERG_TAU]))
    assert (tempered - plain).abs().max() > 1e-3, "the temperature must matter for this test to mean anything"
    torch.testing.assert_close(both, torch.cat([plain, tempered]), atol=1e-5, rtol=1e-5)


def test_per_item_erg_tau_is_checked(model):
    x, states, mask, t = _decode_inputs(model, 2)
    with pytest.raises(ValueError, match=r"one float temperature per batch item, shape \[2\]"):
        model.transformer.decode(x, None, states, mask, t, erg_tau=torch.tensor([1.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="erg_tau"):
        model.transformer.decode(x, None, states, mask, t, erg_tau=torch.tensor([1, 0]))


def test_linear_ff_cross_kv_and_unmasked_decode_equal_the_plain_call(model):
    transformer = model.transformer
    x, states, mask, t = _decode_inputs(model, 2)
    with torch.no_grad():
        plain = transformer.decode(x, torch.ones(2, FRAMES), states, mask, t, erg_tau=ERG_TAU)
        quick = transformer.decode(x, None, states, None, t, erg_tau=ERG_TAU, linear_ff=True,
                                   cross_kv=transformer.cross_kv(states))
    torch.testing.assert_close(quick, plain, atol=1e-5, rtol=1e-5)
    assert max(ERG_DIFFUSION_LAYERS) < transformer.config.num_layers


def test_glumbconv_as_linear_equals_conv(model):
    ff = model.transformer.transformer_blocks[0].ff
    h = torch.randn(3, 17, model.transformer.config.inner_dim)
    with torch.no_grad():
        torch.testing.assert_close(ff(h, as_linear=True), ff(h), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# out-of-memory decode fallback


def _failing_above(monkeypatch, dcae, limit: int) -> list[int]:
    """dcae.decode raising torch.OutOfMemoryError on windows over `limit` frames; returns the lengths tried."""
    tried: list[int] = []
    original = dcae.decode

    def decode(z):
        tried.append(z.shape[-1])
        if z.shape[-1] > limit:
            raise torch.OutOfMemoryError(f"simulated: {z.shape[-1]} frames do not fit")
        return original(z)

    monkeypatch.setattr(dcae, "decode", decode)
    return tried


def test_decode_falls_back_to_smaller_windows_on_out_of_memory(model, monkeypatch):
    latents = torch.randn(1, 8, 16, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = audio_io.decode_latents(model.dcae, model.vocoder, latents, overlapped=True, window_frames=16)
    tried = _failing_above(monkeypatch, model.dcae, limit=20)
    got = fast.decode_with_fallback(model.dcae, model.vocoder, latents)
    assert tried[:6] == [40, 40, 40, 40, 40, 32], "single pass, then overlapped windows 512, 256, 128, 64, 32"
    assert max(tried[6:]) <= 16
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_decode_fallback_fails_with_settings_that_fit(model, monkeypatch):
    latents = torch.randn(1, 8, 16, 40, generator=torch.Generator().manual_seed(2))
    tried = _failing_above(monkeypatch, model.dcae, limit=8)
    with pytest.raises(torch.OutOfMemoryError, match=r"windows of 16 latent frames.*low_vram=True.*to\('cpu'\)"):
        fast.decode_with_fallback(model.dcae, model.vocoder, latents)
    assert tried[-1] == 16


def test_decode_fallback_without_memory_trouble_is_the_plain_decode(model):
    latents = torch.randn(1, 8, 16, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = audio_io.decode_latents(model.dcae, model.vocoder, latents, sample_rate=48000)
    got = fast.decode_with_fallback(model.dcae, model.vocoder, latents, sample_rate=48000)
    torch.testing.assert_close(got, plain, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# low-VRAM offloading


def test_offloader_moves_modules_for_a_phase_and_back(model):
    text = model.text_encoder.model
    modules = (model.transformer, text)
    before = {id(t): (t.device, t.data_ptr(), t.clone()) for m in modules for t in fast.module_tensors(m)}
    offloader = fast.Offloader("meta", pin_memory=False)
    with offloader.use(*modules, None):
        assert all(t.is_meta for m in modules for t in fast.module_tensors(m))
        assert text.shared.weight is text.encoder.embed_tokens.weight, "tied weights stay tied"
    for m in modules:
        for t in fast.module_tensors(m):
            device, pointer, value = before[id(t)]
            assert t.device == device and t.data_ptr() == pointer and torch.equal(t, value)


def test_offloader_restores_home_weights_after_an_error(model):
    offloader = fast.Offloader("meta", pin_memory=False)
    with pytest.raises(RuntimeError, match="boom"):
        with offloader.use(model.dcae):
            raise RuntimeError("boom")
    assert not any(t.is_meta for t in fast.module_tensors(model.dcae))


def test_low_vram_generation_gives_the_same_output(model):
    from bench.rtf import Models, Setting, make_inputs, run_once

    models = Models(model.transformer, model.dcae, model.vocoder, model.text_encoder.model, torch.device("cpu"),
                    torch.float32, "tiny")
    inputs = make_inputs(models, 12, 30, seed=0)
    setting = Setting(seconds=1.0, steps=3, batch=1)
    options = tasks.SamplerOptions(steps=3)
    offloader = fast.Offloader("cpu")
    offloader.park(models.text_model, models.transformer, models.dcae, models.vocoder)
    plain = run_once(models, inputs, setting, options, fast_decode=True, offloader=None, seed=1)
    parked = run_once(models, inputs, setting, options, fast_decode=True, offloader=offloader, seed=1)
    assert torch.equal(plain["latents"], parked["latents"]) and torch.equal(plain["audio"], parked["audio"])
    assert parked["phases_s"]["offload"] >= 0 and plain["phases_s"]["offload"] == 0
