"""The pack's models in ComfyUI's memory manager (nodes/comfy_models.py), against a small stand-in for
`comfy.model_management` / `comfy.model_patcher` that keeps ComfyUI's contract (load_models_gpu puts patchers in its
loaded list, unload_all_models detaches them); tests/test_comfyui_real.py checks the same against a real ComfyUI.
Outside ComfyUI the plain cache is unchanged.
"""
from __future__ import annotations

import gc
import sys
import types
import weakref

import pytest
import torch

from conftest import TINY, VOCAB
from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
nodes = sys.modules[f"{pack.__name__}.nodes"]
bridge, cache, model_mod, comfy_models = nodes.bridge, nodes.cache, nodes.model, nodes.comfy_models
FAST = dict(steps=2, scheduler="euler", cfg_type="apg", guidance_scale=15.0, omega_scale=10.0)
TEXT2MUSIC = ["dcae", "text", "transformer", "vocoder"]


def run(name: str, **inputs):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    monkeypatch.setattr(model_mod, "MODELS", cache.ModelCache())


@pytest.fixture
def comfy(monkeypatch):
    """`comfy.model_management` + `comfy.model_patcher` stand-ins; state.loaded is the memory manager's list, which
    (as ComfyUI's LoadedModel) holds the patchers weakly."""
    state = types.SimpleNamespace(loaded=[], full_loads=[])

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

        def partially_unload(self, device_to, memory_to_free=0):
            raise AssertionError("the pack's patchers must be unloaded whole")

        def detach(self, unpatch_all=True):
            self.model.to(self.offload_device)
            return self.model

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        state.full_loads.append(force_full_load)
        for patcher in models:
            if patcher not in loaded_models():
                patcher.model.to(patcher.load_device)
                state.loaded.insert(0, weakref.ref(patcher))

    def loaded_models(only_currently_used=False):
        return [ref() for ref in state.loaded if ref() is not None]

    def unload_all_models():
        # LoadedModel.model_unload: a partial unload first; when it frees too little, detach; then (as ComfyUI's
        # free_memory does) the patcher is read again
        for ref in list(state.loaded):
            if ref().partially_unload(ref().offload_device, 1e30) < 1e30:
                ref().detach()
            state.unloaded.append(type(ref().model).__name__)
        state.loaded.clear()

    state.unloaded = []
    mm = types.ModuleType("comfy.model_management")
    mm.load_models_gpu, mm.unload_all_models, mm.loaded_models = load_models_gpu, unload_all_models, loaded_models
    for name in ("unet_offload_device", "text_encoder_offload_device", "vae_offload_device"):
        setattr(mm, name, lambda: torch.device("cpu"))
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.soft_empty_cache = lambda force=False: None
    mm.should_use_bf16 = lambda device=None: False
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = ModelPatcher
    root = types.ModuleType("comfy")
    root.model_management, root.model_patcher = mm, patcher
    for name, module in (("comfy", root), ("comfy.model_management", mm), ("comfy.model_patcher", patcher)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(bridge, "_PATCHER_CLASS", None)
    state.mm = mm
    return state


def loaded_names(state, model) -> list[str]:
    return sorted(comfy_models.loaded_components(model))


def text2music(handle):
    (cond,) = run("AceStepTextEncode", model=handle, tags="pop", lyrics="[verse]\nla la")
    (latent,) = run("AceStepEmptyLatent", seconds=1.0, batch_size=1)
    (out,) = run("AceStepSampler", model=handle, conditioning=cond, latent=latent, seed=3, **FAST)
    (audio,) = run("AceStepDecode", model=handle, latent=out, sample_rate="44100")
    return audio["waveform"]


def test_each_node_has_comfyui_load_the_components_it_runs(comfy):
    (handle,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    model = model_mod.model_for(handle, components=())
    # nothing of it is in ComfyUI's memory manager yet: the handle (a node output) holds it, not the cache
    assert comfy.mm.loaded_models() == [] and len(model_mod.MODELS) == 0
    run("AceStepTextEncode", model=handle, tags="pop", lyrics="")
    assert loaded_names(comfy, model) == ["text"] and model_mod.MODELS.keys() == [handle.key]
    assert model_mod.model_for(handle, components=()) is model
    text2music(handle)
    assert loaded_names(comfy, model) == TEXT2MUSIC
    assert all(comfy.full_loads)
    assert {type(p.model).__name__ for p in comfy.mm.loaded_models()} == {
        "AceStepPackTextEncoder", "AceStepPackTransformer", "AceStepPackDCAE", "AceStepPackVocoder"}
    assert {id(p.model.component) for p in comfy.mm.loaded_models()} == {
        id(model.text_encoder), id(model.transformer), id(model.dcae), id(model.vocoder)}


def test_unload_all_models_releases_the_model_and_the_next_run_loads_it_again(comfy):
    (handle,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    first = text2music(handle)
    model = weakref.ref(model_mod.model_for(handle, components=()))
    comfy.mm.unload_all_models()
    assert comfy.mm.loaded_models() == [] and len(model_mod.MODELS) == 0
    # a node output ComfyUI still caches (the handle) keeps the model: it is taken back, not read again
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_mod, "_load", lambda key: pytest.fail("read from disk again"))
        assert model_mod.model_for(handle, ("text",)) is model() and len(model_mod.MODELS) == 1
    comfy.mm.unload_all_models()
    assert len(model_mod.MODELS) == 0
    del handle
    gc.collect()
    assert model() is None, "nothing may keep a released model once ComfyUI dropped its node outputs"
    (handle,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    assert torch.equal(text2music(handle), first)


def test_a_model_with_a_component_still_loaded_stays_cached(comfy):
    (handle,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    model = model_mod.model_for(handle, ("text", "dcae"))
    (text,) = [r for r in comfy.loaded if type(r().model).__name__ == "AceStepPackTextEncoder"]
    comfy.loaded.remove(text)
    text().detach()
    assert len(model_mod.MODELS) == 1 and loaded_names(comfy, model) == ["dcae"]


def test_outside_comfyui_nothing_is_registered():
    assert bridge.memory_manager() is None and bridge.loaded_patchers() == []
    (handle,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    model = model_mod.model_for(handle)
    assert comfy_models.loaded_components(model) == [] and len(model_mod.MODELS) == 1


def test_a_failing_load_leaves_the_cached_model():
    models = cache.ModelCache(capacity=1)
    a, b = cache.ModelKey("/a", "float32", "cpu"), cache.ModelKey("/b", "float32", "cpu")
    kept = models.get(a, object)

    def broken():
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        models.get(b, broken)
    assert models.keys() == [a] and models.get(a, lambda: pytest.fail("evicted")) is kept
    assert not models.release(a, object()) and models.release(a, kept) and len(models) == 0


def test_a_model_freed_while_comfyui_unloads_it_frees_its_weights_and_its_patchers_outlive_the_unload(comfy):
    (handle,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    model = model_mod.model_for(handle, ("text", "dcae"))
    freed = [weakref.ref(model), weakref.ref(model.text_encoder), weakref.ref(model.dcae)]
    del model, handle
    gc.collect()
    assert all(ref() is not None for ref in freed)  # the cache holds it while ComfyUI holds some of it loaded
    comfy.mm.unload_all_models()  # the last detach frees the model: ComfyUI then still reads its patcher
    assert sorted(comfy.unloaded) == ["AceStepPackDCAE", "AceStepPackTextEncoder"]
    gc.collect()
    assert all(ref() is None for ref in freed) and len(model_mod.MODELS) == 0


def test_inside_comfyui_a_gpu_model_is_read_onto_comfyuis_offload_device(comfy):
    cuda = torch.device("cuda", 0)
    assert bridge.staging_device(cuda) == torch.device("cpu")  # ComfyUI moves each component when a node runs it
    assert bridge.offload_device("text", cuda) == torch.device("cpu")
    comfy.mm.unet_offload_device = lambda: cuda  # --highvram: ComfyUI keeps models on the GPU
    assert bridge.staging_device(cuda) == cuda and bridge.staging_device(torch.device("cpu")) == torch.device("cpu")


def test_outside_comfyui_a_model_is_read_onto_its_own_device():
    cuda = torch.device("cuda", 0)
    assert bridge.staging_device(cuda) == cuda and bridge.offload_device("unet", cuda) == cuda


def test_inside_comfyui_low_vram_has_comfyui_load_each_phase_and_moves_no_weight_itself(comfy, monkeypatch):
    """The Loader's low_vram inside ComfyUI: ComfyUI's memory manager does all placement (the pack's offloader
    never parks or moves a weight); each phase asks ComfyUI for just its components, and a Long Form window's
    decode inside the transformer phase has the transformer loaded again after it. Same audio as without."""
    fast = sys.modules[f"{pack.__name__}.acestep_core.fast"]
    (plain,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    expected = text2music(plain)
    comfy.mm.unload_all_models()
    requests: list[list[str]] = []
    load_models_gpu = comfy.mm.load_models_gpu

    def recorded(models, **kwargs):
        requests.append(sorted(type(p.model).__name__.removeprefix("AceStepPack") for p in models))
        return load_models_gpu(models, **kwargs)

    def moved(*args, **kwargs):
        raise AssertionError("inside ComfyUI the pack's offloader must not move weights")

    monkeypatch.setattr(comfy.mm, "load_models_gpu", recorded)
    monkeypatch.setattr(fast.Offloader, "park", moved)
    monkeypatch.setattr(fast.Offloader, "use", moved)
    (handle,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu", low_vram=True)
    assert handle.levers.cpu_offload and requests == []
    assert torch.equal(text2music(handle), expected)
    assert requests == [["TextEncoder"], ["Transformer"], ["DCAE", "Vocoder"]]
    model = model_mod.model_for(handle, components=())
    assert not getattr(model, "_acestep_parked", False)

    requests.clear()
    (cond,) = run("AceStepTextEncode", model=handle, tags="pop", lyrics="")
    requests.clear()
    run("AceStepLongForm", model=handle, conditioning=cond, seconds=14.0, window_seconds=10.0, overlap_seconds=2.0,
        seed=3, steps=1, scheduler="euler", cfg_type="apg", guidance_scale=1.0, omega_scale=10.0,
        sample_rate="44100")
    transformer, decoder = ["Transformer"], ["DCAE", "Vocoder"]
    assert requests[0] == transformer and requests.count(decoder) >= 2
    for before, after in zip(requests, requests[1:]):
        if before == decoder:
            assert after == transformer, "the outer (transformer) phase is loaded again after each decode"
