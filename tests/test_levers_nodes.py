"""The levers from the nodes: the Loader's low_vram switch moves only each node's parts onto the device (same
results), its torch_compile switch falls back to eager with progress text when no compiler is found, and the
Decode node never dies of an out-of-memory error (overlapped windows, then smaller ones)."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from conftest import TINY, VOCAB
from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
fast = sys.modules[f"{pack.__name__}.acestep_core.fast"]
audio = sys.modules[f"{pack.__name__}.acestep_core.audio"]
model_mod = sys.modules[f"{pack.__name__}.nodes.model"]
bridge = sys.modules[f"{pack.__name__}.nodes.bridge"]
FAST = dict(steps=2, scheduler="euler", cfg_type="apg", guidance_scale=15.0, omega_scale=10.0)


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))


def run(name: str, **inputs):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


def load(**switches):
    return run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu", **switches)[0]


def song(handle) -> tuple[dict, dict]:
    cond = run("AceStepTextEncode", model=handle, tags="rock, guitar", lyrics="[verse]\nhello there")[0]
    latent = run("AceStepEmptyLatent", seconds=1.0, batch_size=1)[0]
    out = run("AceStepSampler", model=handle, conditioning=cond, latent=latent, seed=3, **FAST)[0]
    return out, run("AceStepDecode", model=handle, latent=out, sample_rate="44100")[0]


def test_loader_low_vram_moves_each_nodes_parts_in_only_while_it_runs(monkeypatch):
    plain_latent, plain_audio = song(load())
    handle = load(low_vram=True)
    assert handle.levers == fast.Levers(cpu_offload=True) and load().levers == fast.Levers()
    model = model_mod.model_for(handle)
    parts = {"text": model.text_encoder, "transformer": model.transformer, "dcae": model.dcae,
             "vocoder": model.vocoder}

    def copy(self, tensor):  # on the CPU the device is the home: make phase copies real, marked copies
        moved = tensor.detach().clone()
        moved = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
        moved._phase_copy = True
        return moved

    seen: dict[str, set] = {}
    for owner, method, label in ((model.text_encoder, "encode", "text"), (model.transformer, "decode", "transformer"),
                                 (model.dcae, "decode", "dcae"), (model.vocoder, "decode", "vocoder")):
        original = getattr(owner, method)

        def recorded(*args, _original=original, _label=label, **kwargs):
            resident = {n for n, m in parts.items()
                        if any(getattr(t, "_phase_copy", False) for t in fast.module_tensors(m))}
            seen.setdefault(_label, set()).add(frozenset(resident))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, method, recorded)
    monkeypatch.setattr(fast.Offloader, "active", property(lambda self: True))
    monkeypatch.setattr(fast.Offloader, "_copy", copy)
    try:
        latent, decoded = song(handle)
        assert model._acestep_parked
    finally:
        fast.placement(model, False)
    assert seen == {"text": {frozenset({"text"})}, "transformer": {frozenset({"transformer"})},
                    "dcae": {frozenset({"dcae", "vocoder"})}, "vocoder": {frozenset({"dcae", "vocoder"})}}
    torch.testing.assert_close(latent["samples"], plain_latent["samples"], atol=0, rtol=0)
    torch.testing.assert_close(decoded["waveform"], plain_audio["waveform"], atol=0, rtol=0)


def test_loader_torch_compile_without_a_compiler_runs_eager_and_says_so(monkeypatch):
    monkeypatch.setattr(fast, "compiler_problem", lambda device: "no C++ compiler found (test)")
    shown: list[str] = []
    monkeypatch.setattr(bridge, "progress_text", shown.append)
    plain_latent, _ = song(load())
    with pytest.warns(RuntimeWarning, match="torch.compile is off"):
        latent, _ = song(load(torch_compile=True))
    assert any("torch.compile is off" in text and "no C++ compiler" in text for text in shown)
    torch.testing.assert_close(latent["samples"], plain_latent["samples"], atol=0, rtol=0)


def test_decode_node_falls_back_to_windows_on_out_of_memory(monkeypatch):
    handle = load()
    dcae = model_mod.model_for(handle).dcae
    latent = {"samples": torch.randn(1, 8, 16, 40, generator=torch.Generator().manual_seed(5)), "type": "audio"}
    with torch.no_grad():
        expected = audio.decode_latents(dcae, model_mod.model_for(handle).vocoder, latent["samples"],
                                        overlapped=True, window_frames=32)
    forced = run("AceStepDecode", model=handle, latent=latent, sample_rate="44100", overlapped_decode=True)[0]
    original = dcae.decode
    tried: list[int] = []

    def decode(z):
        tried.append(z.shape[-1])
        if z.shape[-1] > 32:
            raise torch.OutOfMemoryError("simulated: does not fit")
        return original(z)

    monkeypatch.setattr(dcae, "decode", decode)
    (decoded,) = run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")
    assert len(tried) > 3 and set(tried[:-2]) == {40} and tried[-2:] == [32, 24], \
        "the single pass and the windows of 512..64 frames fail (the whole latent), windows of 32 fit"
    torch.testing.assert_close(decoded["waveform"], expected, atol=0, rtol=0)
    n = min(forced["waveform"].shape[-1], decoded["waveform"].shape[-1])
    assert forced["waveform"].shape[-1] == 40 * 4096 and n == 40 * 4096


def test_low_vram_loads_into_cpu_memory_and_never_onto_the_device(monkeypatch):
    """A low_vram load reads the weights into CPU memory and leaves them there (here "meta" plays the GPU)."""
    freed: list[int] = []
    monkeypatch.setattr(bridge, "free_memory", lambda num_bytes, device: freed.append(num_bytes))
    cache = sys.modules[f"{pack.__name__}.nodes.cache"]
    key = cache.ModelKey(str((TINY / "acestep-v1-tiny").resolve()), "float32", "meta")
    model = model_mod._load(key, in_cpu_memory=True)
    assert model.device == torch.device("meta") and model._acestep_parked and not freed
    for part in (model.text_encoder, model.transformer, model.dcae, model.vocoder):
        assert all(t.device.type == "cpu" for t in fast.module_tensors(part))
        assert fast.compute_device(part) == torch.device("meta")
    with fast.phase(fast.placement(model, True), model.dcae):
        assert all(t.is_meta for t in fast.module_tensors(model.dcae))
        assert all(t.device.type == "cpu" for t in fast.module_tensors(model.transformer))
