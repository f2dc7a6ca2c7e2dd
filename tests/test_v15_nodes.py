"""ACE-Step 1.5 in the node pack (nodes/v15.py and the dispatch at the top of the shared nodes), on the tiny 1.5
checkpoint written at test time in the official layout (tests/tiny15.py).

Each node is compared with the core call it stands for (acestep_core/v15/pipeline.py, itself checked against the
official fixtures in test_v15_pipeline.py) on the same loaded bundle, and every bad input gets one ValueError that
names the input.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, VOCAB
from pack_loader import load_pack
from test_comfy_memory import comfy  # noqa: F401,F811  (the ComfyUI memory-manager stand-in fixture)
from tiny15 import BASE, MAIN, write_tiny15

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
nodes = sys.modules[f"{pack.__name__}.nodes"]
v15, files, model_mod, cache, comfy_models = nodes.v15, nodes.files, nodes.model, nodes.cache, nodes.comfy_models
P = sys.modules[f"{pack.__name__}.acestep_core.v15.pipeline"]
SamplerOptions = sys.modules[f"{pack.__name__}.acestep_core.v15.generate"].SamplerOptions
TRACKS = sys.modules[f"{pack.__name__}.acestep_core.v15.prompts"].TRACK_NAMES
SR = 48000


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The tiny 1.5 folders, and the v1 tiny checkpoint beside them (both families in one models folder)."""
    root = write_tiny15(tmp_path_factory.mktemp("models15"))
    for entry in TINY.iterdir():
        (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return root


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch, models_dir):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))


def run(name: str, **inputs):
    cls = NODES[name]
    result = getattr(cls(), cls.FUNCTION)(**inputs)
    return result["result"] if isinstance(result, dict) else result


def load(checkpoint: str):
    return run("AceStepLoader", checkpoint=checkpoint, dtype="fp32", device="cpu")[0]


@pytest.fixture(scope="module")
def turbo(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        return load(MAIN)


@pytest.fixture(scope="module")
def base(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        return load(BASE)


@pytest.fixture(scope="module")
def v1(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        return load("acestep-v1-tiny")


def encode(model, tags="rock, guitar", lyrics="[verse]\nla la", **meta):
    return run("AceStepTextEncode", model=model, tags=tags, lyrics=lyrics, **meta)[0]


def tone(seconds=2.0, rate=SR, channels=2) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    wave = 0.4 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 677 * t)
    return {"waveform": wave.repeat(channels, 1)[None], "sample_rate": rate}


TURBO = dict(seed=4, steps=8, scheduler="euler", cfg_type="apg", guidance_scale=7.0, omega_scale=10.0)
TASK = dict(seed=5, steps=8, guidance_scale=7.0, shift=0.0, batch_size=1)
BASE_TASK = dict(TASK, steps=3)


def cut(result, frames):
    return result.latents[:, :frames].transpose(1, 2)


# ------------------------------------------------------------------------------------------------ loading
def test_the_loader_tells_the_families_apart_by_the_weights(turbo, base, v1, models_dir):
    listing = files.checkpoints()
    assert {MAIN, BASE, "acestep-v1-tiny"} <= set(listing)
    assert isinstance(turbo, v15.Model15Handle) and turbo.variant == "turbo"
    assert isinstance(base, v15.Model15Handle) and base.variant == "base"
    assert isinstance(v1, model_mod.ModelHandle)
    # a renamed 1.5 folder is still 1.5: the weights decide, not the name
    renamed = models_dir / "my-music-model"
    if not renamed.exists():
        shutil.copytree(models_dir / MAIN, renamed)
    assert "my-music-model" in files.checkpoints()
    assert isinstance(load("my-music-model"), v15.Model15Handle)


def test_the_bundle_lives_in_the_pack_cache_under_the_v1_key_rule(turbo):
    again = load(MAIN)
    assert again.key == turbo.key == model_mod.make_key(Path(turbo.key.path), torch.float32, torch.device("cpu"))
    bundle = v15.bundle_for(turbo)
    assert isinstance(bundle, P.Bundle15) and v15.bundle_for(again) is bundle
    assert turbo.key in model_mod.MODELS


def test_comfyui_memory_manager_loads_the_bundle_components(comfy, models_dir, monkeypatch):  # noqa: F811
    monkeypatch.setattr(model_mod, "MODELS", cache.ModelCache())
    handle = load(MAIN)
    bundle = handle.model
    assert comfy.mm.loaded_models() == [] and len(model_mod.MODELS) == 0  # the handle holds it, as for v1
    (cond,) = run("AceStepTextEncode", model=handle, tags="pop", lyrics="")
    (latent,) = run("AceStep15EmptyLatent", seconds=1.0, batch_size=1)
    run("AceStepSampler", model=handle, conditioning=cond, latent=latent, **TURBO)
    assert sorted(comfy_models.loaded_components(bundle)) == ["dit", "text", "vae"]
    assert {type(p.model).__name__ for p in comfy.mm.loaded_models()} == {
        "AceStep15PackDiT", "AceStep15PackTextEncoder", "AceStep15PackVAE"}
    assert {id(p.model.component) for p in comfy.mm.loaded_models()} == {
        id(bundle.model), id(bundle.text_encoder.model), id(bundle.vae)}
    comfy.mm.unload_all_models()
    assert len(model_mod.MODELS) == 0
    monkeypatch.setattr(v15, "_load", lambda key, variant: pytest.fail("read from disk again"))
    assert v15.bundle_for(handle) is bundle  # the handle (a cached node output) gives it back


def test_download_node_knows_the_1_5_repos(models_dir, tmp_path, monkeypatch):
    import huggingface_hub

    fetched = []

    def fake(repo_id, *, local_dir, allow_patterns):
        fetched.append(repo_id)
        source = models_dir / (MAIN if repo_id == "ACE-Step/Ace-Step1.5" else BASE)
        shutil.copytree(source, local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(nodes.bridge, "download_folder", lambda: tmp_path)
    (path,) = run("AceStepDownload", repo_id="ACE-Step/acestep-v15-base", target="ace_step")
    assert fetched == ["ACE-Step/Ace-Step1.5", "ACE-Step/acestep-v15-base"] and path == str(tmp_path / BASE)
    handle = run("AceStepLoader", checkpoint="whatever", dtype="fp32", device="cpu",
                 repo_id="ACE-Step/acestep-v15-base")[0]
    assert isinstance(handle, v15.Model15Handle) and handle.variant == "base"
    with pytest.raises(ValueError, match="target"):
        run("AceStepDownload", repo_id="ACE-Step/Ace-Step1.5", target="loras")


# ------------------------------------------------------------------------------------------------ text
def test_text_encode_reads_the_1_5_fields(turbo, v1):
    cond = encode(turbo, bpm=120, keyscale="F# minor", timesignature="3", language="de")
    assert cond == v15.Cond15("rock, guitar", "[verse]\nla la", "de", 120, "F# minor", "3")
    plain = encode(turbo)
    assert (plain.bpm, plain.keyscale, plain.timesignature, plain.language) == (None, None, None, "en")
    for name, value in (("bpm", 12), ("keyscale", "H major"), ("timesignature", "5"), ("language", "xx")):
        with pytest.raises(ValueError, match=name):
            encode(turbo, **{name: value})
    with pytest.raises(ValueError, match="bpm applies to ACE-Step 1.5 models only"):
        encode(v1, bpm=120)
    assert not isinstance(encode(v1), v15.Cond15)  # v1 unchanged


# ------------------------------------------------------------------------------------------------ sampler
def test_sampler_text2music_is_the_pipeline(turbo):
    cond = encode(turbo, bpm=100)
    (latent,) = run("AceStep15EmptyLatent", seconds=2.0, batch_size=2)
    assert latent["samples"].shape == (2, 64, 50) and latent["type"] == "audio"
    (out,) = run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **TURBO)
    bundle = v15.bundle_for(turbo)
    want = P.run(bundle, "text2music", cond.caption, cond.lyrics, bpm=100, frames=50, seed=4, batch_size=2,
                 options=SamplerOptions(variant="turbo"), decode=False)
    assert torch.equal(out["samples"], cut(want, 50))
    assert out["samples"].shape == (2, bundle.model.config.audio_acoustic_hidden_dim, 50)
    (audio,) = run("AceStepDecode", model=turbo, latent=out, sample_rate="48000")
    assert torch.equal(audio["waveform"], P.decode_latents(bundle, out["samples"].transpose(1, 2)))
    (audio44,) = run("AceStepDecode", model=turbo, latent=out, sample_rate="44100")
    assert audio44["sample_rate"] == 44100 and audio44["waveform"].shape[-1] == 88200


def test_base_sampler_uses_steps_and_guidance(base):
    cond = encode(base)
    (latent,) = run("AceStep15EmptyLatent", seconds=1.0, batch_size=1)
    settings = dict(TURBO, steps=3, scheduler="heun", guidance_scale=3.0)
    (out,) = run("AceStepSampler", model=base, conditioning=cond, latent=latent, **settings)
    want = P.run(v15.bundle_for(base), "text2music", cond.caption, cond.lyrics, frames=25, seed=4,
                 options=SamplerOptions(variant="base", steps=3, sampler="heun", guidance_scale=3.0),
                 decode=False)
    assert torch.equal(out["samples"], cut(want, 25))


def test_repaint_region_and_sampler_repaint_from_an_encoded_latent(turbo):
    cond = encode(turbo)
    (source,) = run("AceStepEncode", model=turbo, audio=tone())
    bundle = v15.bundle_for(turbo)
    frames = source["samples"].shape[-1]
    assert frames == 50 and source["samples"].shape[1] == bundle.model.config.audio_acoustic_hidden_dim
    (marked,) = run("AceStepRepaintRegion", latent=source, start_seconds=0.5, end_seconds=1.5, variance=0.2)
    assert marked[v15.MARK] == {"task": "repaint", "start_frame": 12, "end_frame": 37}
    assert marked["noise_mask"][0, 0].nonzero().flatten().tolist() == list(range(12, 37))
    (out,) = run("AceStepSampler", model=turbo, conditioning=cond, latent=marked, **TURBO)
    assert v15.MARK not in out and "noise_mask" not in out
    want = P.run(bundle, "repaint", cond.caption, cond.lyrics, source_latents=source["samples"].transpose(1, 2),
                 span=(0.5, 1.5), seed=4, decode=False)
    assert torch.equal(out["samples"], cut(want, frames))
    with pytest.raises(ValueError, match="end_seconds"):
        run("AceStepRepaintRegion", latent=source, start_seconds=0.5, end_seconds=9.0, variance=0.2)
    two = dict(marked, samples=torch.cat([marked["samples"], marked["samples"] + 1]))
    with pytest.raises(ValueError, match="latent holds 2 different songs"):
        run("AceStepSampler", model=turbo, conditioning=cond, latent=two, **TURBO)


def test_encode_is_the_pipeline_source_encoding(turbo):
    (source,) = run("AceStepEncode", model=turbo, audio=tone(channels=1))
    bundle = v15.bundle_for(turbo)
    audio = P.prepare_audio(tone(channels=1)["waveform"][0], SR)
    want = P.encode_audio(bundle, audio, torch.Generator().manual_seed(0))
    assert torch.equal(source["samples"], want.transpose(1, 2))


# ------------------------------------------------------------------------------------------------ task nodes
def test_cover_node_is_the_pipeline(turbo):
    cond = encode(turbo, keyscale="C major")
    (out,) = run("AceStep15Cover", model=turbo, conditioning=cond, source=tone(), audio_cover_strength=0.5,
                 reference=tone(1.0), **TASK)
    src = tone()["waveform"][0]
    want = P.cover(v15.bundle_for(turbo), cond.caption, cond.lyrics, keyscale="C major", source_audio=src,
                   source_sample_rate=SR, audio_cover_strength=0.5, reference_audio=(tone(1.0)["waveform"][0], SR),
                   seed=5, options=SamplerOptions(variant="turbo"), decode=False)
    assert torch.equal(out["samples"], cut(want, 50))


@pytest.mark.parametrize("task", ["lego", "extract", "complete"])
def test_track_nodes_are_the_pipeline(base, task):
    cond = encode(base)
    bundle = v15.bundle_for(base)
    src = tone()["waveform"][0]
    opts = SamplerOptions(variant="base", steps=3)
    if task == "lego":
        (out,) = run("AceStep15Lego", model=base, conditioning=cond, source=tone(), track_name="bass",
                     start_seconds=0.4, end_seconds=-1.0, **BASE_TASK)
        handler = dict(repaint_injection_ratio=0.5, repaint_crossfade_frames=12)  # the handler's lego defaults
        want = P.run(bundle, "lego", cond.caption, cond.lyrics, source_audio=src, source_sample_rate=SR,
                     track_name="bass", span=(0.4, None), seed=5, options=SamplerOptions(variant="base", steps=3,
                                                                                          **handler), decode=False)
    elif task == "extract":
        (out,) = run("AceStep15Extract", model=base, conditioning=cond, source=tone(), track_name="drums",
                     **BASE_TASK)
        want = P.extract(bundle, cond.caption, cond.lyrics, source_audio=src, source_sample_rate=SR,
                         track_name="drums", seed=5, options=opts, decode=False)
    else:
        (out,) = run("AceStep15Complete", model=base, conditioning=cond, source=tone(),
                     track_classes="drums, Bass ,keyboard", **BASE_TASK)
        want = P.complete(bundle, cond.caption, cond.lyrics, source_audio=src, source_sample_rate=SR,
                          track_classes=["drums", "bass", "keyboard"], seed=5, options=opts, decode=False)
    assert torch.equal(out["samples"], cut(want, 50))


def test_stemgen_and_singing2accompaniment_run_lego_and_complete_on_a_1_5_model(base):
    settings = dict(seed=2, steps=3, scheduler="euler", cfg_type="apg", guidance_scale=7.0, omega_scale=10.0,
                    control_scale=1.0, lora_strength=1.0, sample_rate="48000")
    stem, mix = run("AceStepStemGen", model=base, reference=tone(), instrument="bass", **settings)
    (lego,) = run("AceStep15Lego", model=base, conditioning=v15.Cond15("bass", ""), source=tone(),
                  track_name="bass", start_seconds=0.0, end_seconds=-1.0, seed=2, steps=3, guidance_scale=7.0,
                  shift=0.0, batch_size=1)
    (decoded,) = run("AceStepDecode", model=base, latent=lego, sample_rate="48000")
    assert torch.equal(stem["waveform"], decoded["waveform"])
    torch.testing.assert_close(mix["waveform"] - stem["waveform"], tone()["waveform"], atol=1e-6, rtol=0)
    song, full = run("AceStepSinging2Accompaniment", model=base, vocal=tone(), tags="synth pop", **settings)
    assert song["waveform"].shape == (1, 2, 96000) and torch.isfinite(song["waveform"]).all()
    with pytest.raises(ValueError, match="instrument"):
        run("AceStepStemGen", model=base, reference=tone(), instrument="kazoo", **settings)
    with pytest.raises(ValueError, match="stemgen"):
        run("AceStepStemGen", model=base, reference=tone(), instrument="bass", stemgen=object(), **settings)


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_loader_applies_a_1_5_lora_and_the_base_handle_gets_the_base_weights(turbo, models_dir):
    from test_v15_lora import peft_lora, write_peft_folder

    lora15 = sys.modules[f"{pack.__name__}.acestep_core.v15.lora"]
    bundle = v15.bundle_for(turbo)
    folder = models_dir / "loras" / "tiny15-lora"
    if not folder.exists():
        write_peft_folder(folder, peft_lora(bundle.model), rank=4, alpha=8)
    name = "loras/tiny15-lora/adapter_model.safetensors"
    assert name in files.loras()
    (with_lora,) = run("AceStepLoraLoader", model=turbo, lora_name=name, strength=0.7, honour_alpha=False)
    assert with_lora.key == turbo.key and len(with_lora.loras) == 1 and turbo.loras == ()
    cond = encode(turbo)
    (latent,) = run("AceStep15EmptyLatent", seconds=1.0, batch_size=1)
    (base_out,) = run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **TURBO)
    (lora_out,) = run("AceStepSampler", model=with_lora, conditioning=cond, latent=latent, **TURBO)
    try:
        lora15.ensure_adapters(bundle.model, [(lora15.load_adapter_file(folder), 0.7)])
        want = P.run(bundle, "text2music", cond.caption, cond.lyrics, frames=25, seed=4, decode=False)
    finally:
        lora15.ensure_adapters(bundle.model, [])
    assert torch.equal(lora_out["samples"], cut(want, 25)) and not torch.equal(lora_out["samples"],
                                                                                base_out["samples"])
    (again,) = run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **TURBO)
    assert torch.equal(again["samples"], base_out["samples"])  # the base handle runs the exact base weights
    assert run("AceStepLoraLoader", model=turbo, lora_name=name, strength=0.0, honour_alpha=False)[0] is turbo
    with pytest.raises(ValueError, match="LoRA does not match this ACE-Step 1.5 model"):
        bad = run("AceStepLoraLoader", model=turbo, lora_name="acestep-v1-tiny-lora", strength=1.0,
                  honour_alpha=False)[0]
        run("AceStepSampler", model=bad, conditioning=cond, latent=latent, **TURBO)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_name_the_input(turbo, base, v1):
    cond = encode(turbo)
    (latent,) = run("AceStep15EmptyLatent", seconds=1.0, batch_size=1)
    with pytest.raises(ValueError, match="track_name must be one of"):
        run("AceStep15Extract", model=turbo, conditioning=cond, source=tone(), track_name="kazoo", **TASK)
    with pytest.raises(ValueError, match="track_classes"):
        run("AceStep15Complete", model=turbo, conditioning=cond, source=tone(), track_classes="drums, kazoo", **TASK)
    with pytest.raises(ValueError, match="track_classes"):
        run("AceStep15Complete", model=turbo, conditioning=cond, source=tone(), track_classes=" , ", **TASK)
    with pytest.raises(ValueError, match="model is an ACE-Step v1 model"):
        run("AceStep15Cover", model=v1, conditioning=cond, source=tone(), audio_cover_strength=1.0, **TASK)
    with pytest.raises(ValueError, match="model is an ACE-Step 1.5 model; this node runs ACE-Step v1"):
        model_mod.transformer_for(turbo)  # what Flow Edit, Long Form and the other v1-only nodes call first
    v1_cond = encode(v1)
    with pytest.raises(ValueError, match="conditioning was not encoded for an ACE-Step 1.5 model"):
        run("AceStepSampler", model=turbo, conditioning=v1_cond, latent=latent, **TURBO)
    with pytest.raises(ValueError, match="model is an ACE-Step v1 model"):
        run("AceStepSampler", model=v1, conditioning=cond, latent=latent, **TURBO)
    with pytest.raises(ValueError, match="steps"):
        run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **dict(TURBO, steps=60))
    with pytest.raises(ValueError, match="scheduler"):
        run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **dict(TURBO, scheduler="pingpong"))
    with pytest.raises(ValueError, match="cfg_type"):
        run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **dict(TURBO, cfg_type="cfg_star"))
    with pytest.raises(ValueError, match="retake_variance"):
        run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, retake_variance=0.3, **TURBO)
    with pytest.raises(ValueError, match="seed must be"):
        run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **dict(TURBO, seed=-1))
    with pytest.raises(ValueError, match="latent is not an ACE-Step 1.5 latent"):
        run("AceStepSampler", model=turbo, conditioning=cond,
            latent={"samples": torch.zeros(1, 8, 16, 10), "type": "audio"}, **TURBO)
    with pytest.raises(ValueError, match="channels"):
        run("AceStepDecode", model=turbo, latent={"samples": torch.zeros(1, 3, 10)}, sample_rate="48000")
    with pytest.raises(ValueError, match="source: give one clip"):
        batch = {"waveform": torch.zeros(2, 2, SR), "sample_rate": SR}
        run("AceStep15Extract", model=turbo, conditioning=cond, source=batch, track_name="vocals", **TASK)
    with pytest.raises(ValueError, match="seconds"):
        run("AceStep15EmptyLatent", seconds=0.0, batch_size=1)
    # a failed call leaves the cached model as it was
    (out,) = run("AceStepSampler", model=turbo, conditioning=cond, latent=latent, **TURBO)
    assert torch.isfinite(out["samples"]).all()


def test_nodes_are_registered_with_track_name_choices():
    for name in ("AceStep15EmptyLatent", "AceStep15Cover", "AceStep15Lego", "AceStep15Extract", "AceStep15Complete"):
        assert name in NODES and name in pack.NODE_DISPLAY_NAME_MAPPINGS
    for name in ("AceStep15Lego", "AceStep15Extract"):
        assert NODES[name].INPUT_TYPES()["required"]["track_name"][0] == list(TRACKS)


def test_the_loader_lists_its_1_5_entries_for_the_editor(models_dir):
    """web/js/v15_fields.js shows the Text Encode node's 1.5 fields for the entries the Loader lists under
    acestep_v15: told by the weights (a renamed 1.5 folder is 1.5), never a v1 checkpoint."""
    loaders = sys.modules[f"{pack.__name__}.nodes.loaders"]
    renamed = models_dir / "my-music-model"
    if not renamed.exists():
        shutil.copytree(models_dir / MAIN, renamed)
    inputs = NODES["AceStepLoader"].INPUT_TYPES()
    names, options = inputs["required"]["checkpoint"]
    listed = options[loaders.V15_OPTION]
    assert {MAIN, BASE, "my-music-model"} <= set(listed) and set(listed) <= set(names)
    assert "acestep-v1-tiny" in names and "acestep-v1-tiny" not in listed
    assert all(v15.is_path(files.checkpoints()[name]) for name in listed)
    repos = inputs["optional"]["repo_id"][1][loaders.V15_OPTION]
    assert "ACE-Step/Ace-Step1.5" in repos and all(v15.is_repo(r) for r in repos)
    assert not any(v15.is_repo(r) for r in ("ACE-Step/ACE-Step-v1-3.5B", ""))
