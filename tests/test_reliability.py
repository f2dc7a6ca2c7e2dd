"""Reliability (docs/bad-inputs.md): every bad input gets a clear error naming the input and the fix and leaves the
cached model exactly as it was; interrupts and running out of memory are survived; nothing unsafe is loaded; twenty
generations in a row leak nothing and repeat exactly.

Inputs go through the node layer (called as ComfyUI calls them, without ComfyUI) wherever a node takes them, else
through acestep_core. After the failing calls of each row the cached model is checked: the same object, every
weight bit-identical, no LoRA left applied, and a normal generation equal to the one made before.
"""
from __future__ import annotations

import ast
import gc
import importlib
import math
import os
import re
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_FOLDER, TINY_LORA, VOCAB
from comfy_fakes import Interrupted, install_interrupting_comfy
from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
nodes = sys.modules[f"{pack.__name__}.nodes"]
model_mod, cache = nodes.model, nodes.cache


def core(name: str) -> types.ModuleType:
    """A module of the pack's own acestep_core (the one the nodes use)."""
    return importlib.import_module(f"{pack.__name__}.acestep_core.{name}")


audio_mod, lora_mod, pipeline, validation = core("audio"), core("lora"), core("pipeline"), core("validation")
cleaners, errors, loading = core("lyrics.cleaners"), core("errors"), core("loading")

FAST = dict(steps=2, scheduler="euler", cfg_type="apg", guidance_scale=15.0, omega_scale=10.0)
SEED = 11
LORA = "acestep-v1-tiny-lora"


def run(name: str, **inputs):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


def empty(seconds: float = 1.0, batch: int = 1) -> dict:
    return run("AceStepEmptyLatent", seconds=seconds, batch_size=batch)[0]


def sample(handle, cond, latent: dict, **extra) -> dict:
    return run("AceStepSampler", model=handle, conditioning=cond, latent=latent, seed=SEED, **{**FAST, **extra})[0]


def tone(seconds: float = 1.0, rate: int = 44100, channels: int = 2) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * (220 + 55 * c) * t) for c in range(channels)])
    return {"waveform": wave[None], "sample_rate": rate}


def with_lora(handle, name: str = LORA, strength: float = 1.0):
    return run("AceStepLoraLoader", model=handle, lora_name=name, strength=strength, honour_alpha=False)[0]


# ---------------------------------------------------------------------------------------------------------------
# the model folder with broken files beside the tiny checkpoint, and the model under test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to split, and on a busy machine threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _component_copy(root: Path, name: str, transformer: dict[str, torch.Tensor] | bytes | None, file: str) -> Path:
    """A checkpoint folder whose transformer weights are replaced; the other components link to the tiny ones."""
    folder = root / name
    (folder / "ace_step_transformer").mkdir(parents=True)
    for part in ("music_dcae_f8c8", "music_vocoder", "umt5-base"):
        (folder / part).symlink_to(TINY_FOLDER / part)
    source = TINY_FOLDER / "ace_step_transformer"
    (folder / "ace_step_transformer" / "config.json").write_bytes((source / "config.json").read_bytes())
    target = folder / "ace_step_transformer" / file
    if isinstance(transformer, bytes):
        target.write_bytes(transformer)
    else:
        save_file(transformer, str(target))
    return target


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """models/ with the tiny checkpoint and LoRA (links) and every kind of broken or foreign file."""
    root = tmp_path_factory.mktemp("models")
    (root / "ace_step").mkdir()
    (root / "ace_step" / "acestep-v1-tiny").symlink_to(TINY_FOLDER)
    loras = root / "loras"
    loras.mkdir()
    (loras / LORA).symlink_to(TINY_LORA)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
              str(loras / "sd15-style.safetensors"))
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(8, 2560),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(2560, 8)},
              str(loras / "acestep-3.5b-lora.safetensors"))
    weights_file = TINY_FOLDER / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"
    data = weights_file.read_bytes()
    broken = root / "ace_step" / "broken"
    _component_copy(broken, "truncated", data[: len(data) * 2 // 3], weights_file.name)
    tensors = load_file(str(weights_file))
    dropped = sorted(k for k in tensors if k.startswith("transformer_blocks.1.") and k.endswith(".bias"))[0]
    _component_copy(broken, "missing-keys", {k: v for k, v in tensors.items() if k != dropped}, weights_file.name)
    _component_copy(broken, "pickled", b"\x80\x04\x95not a real pickle", "diffusion_pytorch_model.bin")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "acestep.ckpt").write_bytes(b"\x80\x04\x95not a real pickle")
    return root


@pytest.fixture(autouse=True)
def environment(monkeypatch, models_dir):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))


@pytest.fixture(scope="module")
def handle(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        # Room beside the model under test, so no other load in this module evicts it (a failing load never does).
        mp.setattr(cache.MODELS, "capacity", max(cache.MODELS.capacity, len(cache.MODELS) + 2))
        (loaded,) = run("AceStepLoader", checkpoint="ace_step/acestep-v1-tiny", dtype="fp32", device="cpu")
        yield loaded


@pytest.fixture(scope="module")
def cond(handle):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
        return run("AceStepTextEncode", model=handle, tags="rock, guitar", lyrics="[verse]\nhello there")[0]


def weights(model) -> dict[str, torch.Tensor]:
    """Copies of every weight and buffer of every component."""
    parts = {"transformer": model.transformer, "dcae": model.dcae, "vocoder": model.vocoder,
             "text": model.text_encoder}
    return {f"{p}.{k}": v.detach().clone() for p, module in parts.items() for k, v in module.state_dict().items()}


@dataclass
class Baseline:
    """The cached model, its weights and a normal generation, taken before any bad input."""

    model: object
    weights: dict[str, torch.Tensor]
    latent: torch.Tensor


@pytest.fixture(scope="module")
def baseline(handle, cond) -> Baseline:
    model_mod.transformer_for(handle)  # base weights, whatever LoRA an earlier test module left applied
    model = model_mod.model_for(handle)
    return Baseline(model, weights(model), sample(handle, cond, empty())["samples"])


def assert_weights_unchanged(baseline: Baseline, handle) -> None:
    model = model_mod.model_for(handle)
    assert model is baseline.model, "the cached model was replaced or reloaded"
    assert lora_mod.lora_state(model.transformer).signature == (), "a LoRA was left applied"
    now = weights(model)
    assert now.keys() == baseline.weights.keys()
    changed = [k for k in now if not torch.equal(now[k], baseline.weights[k])]
    assert not changed, f"weights changed: {changed[:5]}"


def assert_untouched(baseline: Baseline, handle, cond) -> None:
    """Same cached model, bit-identical weights, and a normal generation gives the same song as before."""
    assert_weights_unchanged(baseline, handle)
    assert torch.equal(sample(handle, cond, empty())["samples"], baseline.latent)


def refused(baseline: Baseline, handle, call, error=ValueError, match: str | None = None):
    """`call()` raises `error` matching `match` and leaves every weight as it was; returns the message."""
    with pytest.raises(error, match=match) as info:
        call()
    assert_weights_unchanged(baseline, handle)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# tags and lyrics


def test_empty_tags_warn_and_still_generate(handle, baseline):
    with pytest.warns(UserWarning, match="tags are empty.*describe genre, instruments"):
        (empty_tags,) = run("AceStepTextEncode", model=handle, tags="  ", lyrics="[verse]\nhello there")
    out = sample(handle, empty_tags, empty())["samples"]
    assert out.shape == baseline.latent.shape and torch.isfinite(out).all()
    assert not torch.equal(out, baseline.latent)


def test_empty_lyrics_are_an_instrumental(handle, baseline):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (instrumental,) = run("AceStepTextEncode", model=handle, tags="ambient, pads", lyrics="")
    assert instrumental.instrumental and instrumental.lyric_mask.tolist() == [[0]]
    out = sample(handle, instrumental, empty())["samples"]
    assert out.shape == baseline.latent.shape and torch.isfinite(out).all()


def test_long_tags_are_cut_at_256_tokens_with_a_warning(handle):
    with pytest.warns(UserWarning, match=r"tags text 0 has \d+ tokens; the text encoder keeps 256"):
        (cond,) = run("AceStepTextEncode", model=handle, tags=", ".join(["rock"] * 300), lyrics="")
    assert cond.text_states.shape[1] == 256


def test_lyrics_past_4096_tokens_are_cut_with_a_warning_naming_the_line(handle, baseline, cond):
    conditioning = core("conditioning")
    verse = "[verse]\n" + "\n".join(f"line {i} of the song goes on and on" for i in range(40))
    lyrics = "\n\n".join([verse] * 12)
    tokenizer = model_mod.model_for(handle).lyric_tokenizer
    full = tokenizer.encode(lyrics)
    assert len(full) > conditioning.MAX_LYRIC_TOKENS == 4096
    with pytest.warns(UserWarning) as record:
        (long,) = run("AceStepTextEncode", model=handle, tags="rock", lyrics=lyrics)
    (message,) = [str(w.message) for w in record if "lyrics are" in str(w.message)]
    lines = lyrics.split("\n")
    cut = next(n for n in range(1, len(lines) + 1) if len(tokenizer.encode("\n".join(lines[:n]))) > 4096)
    assert f"lyrics are {len(full)} tokens, past the 4096" in message
    assert f"cut in line {cut} of {len(lines)} ({lines[cut - 1].strip()[:40]!r})" in message
    assert long.lyric_ids[0].tolist() == full[:4096] and long.lyric_mask.sum() == 4096
    assert_untouched(baseline, handle, cond)


def test_unknown_structure_tags_warn(handle):
    with pytest.warns(UserWarning, match=r"unknown structure tags \[verse 1\], \[drop\].*use one of \[verse\]"):
        run("AceStepTextEncode", model=handle, tags="edm", lyrics="[verse 1]\nhello\n[drop]\n[chorus]\nhey")


def test_a_language_without_its_helper_names_the_line_and_the_pip_command(handle, baseline, cond, monkeypatch):
    monkeypatch.setitem(sys.modules, "cutlet", None)  # as if cutlet were not installed
    cleaners._cutlet.cache_clear()
    try:
        message = refused(baseline, handle, lambda: run(
            "AceStepTextEncode", model=handle, tags="j-pop", lyrics="[verse]\nhello\nこんにちは、元気ですか"),
            ImportError, r"lyrics line 3 \('こんにちは、元気ですか'\)")
    finally:
        cleaners._cutlet.cache_clear()
    assert "Japanese" in message and "pip install cutlet fugashi unidic-lite" in message
    assert_untouched(baseline, handle, cond)


# ---------------------------------------------------------------------------------------------------------------
# durations, steps, guidance


@pytest.mark.parametrize("seconds", [0.0, 0.05, -2.0, float("nan"), float("inf")])  # -1 = random (test_app)
def test_bad_durations_are_refused_naming_seconds(seconds):
    with pytest.raises(ValueError, match="seconds"):
        empty(seconds)


def test_duration_past_240_s_is_refused_before_sampling(handle, baseline, cond):
    with pytest.raises(ValueError, match=r"seconds must be a finite number from -1.0 to 240.0, got 300.0"):
        empty(300.0)
    long = {"samples": torch.zeros(1, 8, 16, 3229), "type": "audio"}  # 300 s, e.g. from ComfyUI's own empty latent
    refused(baseline, handle, lambda: sample(handle, cond, long), match=r"past the model's 240 s")
    assert_untouched(baseline, handle, cond)


@pytest.mark.parametrize("duration", [0.0, -5.0, float("nan"), float("inf"), 300.0])
def test_pipeline_refuses_bad_durations(handle, baseline, duration):
    request = pipeline.Request(prompt="rock", audio_duration=duration, infer_step=2)
    refused(baseline, handle, lambda: pipeline.generate(model_mod.model_for(handle), request, decode=False),
            match=r"duration|audio_duration")


@pytest.mark.parametrize("setting,value,match", [
    ("steps", 0, "steps must be an integer >= 1"),
    ("steps", -3, "steps must be an integer >= 1"),
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number"),
    ("guidance_scale", float("inf"), "guidance_scale must be a finite number"),
    ("omega_scale", float("nan"), "omega_scale must be a finite number"),
    ("scheduler", "ddim", "scheduler must be one of"),
    ("cfg_type", "pag", "cfg_type must be one of"),
])
def test_bad_sampler_settings_are_refused_naming_the_setting(handle, baseline, cond, setting, value, match):
    refused(baseline, handle, lambda: sample(handle, cond, empty(), **{setting: value}), match=match)


def test_bad_sampler_options_and_flow_edit_settings(handle, baseline, cond):
    defaults = {name: spec[1]["default"] for name, spec in NODES["AceStepSamplerOptions"].INPUT_TYPES()["required"].items()}
    for setting, value, match in [
        ("shift", float("nan"), "shift must be a finite number from 0.01 to 100.0, got nan"),
        ("min_guidance_scale", float("nan"), "min_guidance_scale must be a finite number"),
        ("guidance_interval", 1.5, r"guidance_interval must be a finite number from 0.0 to 1.0, got 1.5"),
        ("oss_steps", "16, x", "oss_steps must be comma-separated integers"),
    ]:
        refused(baseline, handle, lambda: run("AceStepSamplerOptions", **{**defaults, setting: value}), match=match)
    edit = dict(model=handle, source_conditioning=cond, target_conditioning=cond, latent=empty(), seed=1,
                guidance_scale=15.0, scheduler="euler", n_min=0.0, n_max=1.0, n_avg=1)
    refused(baseline, handle, lambda: run("AceStepFlowEdit", **{**edit, "steps": 0}), match="steps must be")
    refused(baseline, handle, lambda: run("AceStepFlowEdit", **{**edit, "steps": 2, "guidance_scale": float("nan")}),
            match="guidance_scale must be a finite number")
    assert_untouched(baseline, handle, cond)


# ---------------------------------------------------------------------------------------------------------------
# regions


@pytest.mark.parametrize("start,end,match", [
    (1.0, 5.0, r"end_seconds \(5.0\) is past the end of the source latent \(2.97 s\)"),
    (2.0, 1.0, r"end_seconds \(1.0\) must be after start_seconds \(2.0\)"),
    (-1.0, 1.0, "start_seconds must be a finite number from 0.0 to 240.0, got -1.0"),
    (0.0, float("nan"), "end_seconds must be a finite number from 0.0 to 240.0, got nan"),
])
def test_repaint_regions_outside_the_source_are_refused(start, end, match):
    with pytest.raises(ValueError, match=match):
        run("AceStepRepaintRegion", latent=empty(3.0), start_seconds=start, end_seconds=end, variance=0.5)


def test_extensions_that_cannot_be_made_are_refused(handle, baseline, cond):
    source = empty(2.0)
    for left, right, match in [
        (-1.0, 1.0, "left_seconds must be a finite number from 0.0 to 240.0, got -1.0"),
        (0.0, float("inf"), "right_seconds must be a finite number from 0.0 to 240.0, got inf"),
        (0.0, 0.0, "left_seconds and right_seconds are both 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            run("AceStepExtend", latent=source, left_seconds=left, right_seconds=right, variance=1.0)
    with pytest.raises(ValueError, match="right_seconds must be a finite number from 0.0 to 240.0, got 300.0"):
        run("AceStepExtend", latent=source, left_seconds=0.0, right_seconds=300.0, variance=1.0)
    (far,) = run("AceStepExtend", latent=source, left_seconds=0.0, right_seconds=240.0, variance=1.0)
    refused(baseline, handle, lambda: sample(handle, cond, far), match="limited to just under 240 s; extend in several")
    assert_untouched(baseline, handle, cond)


# ---------------------------------------------------------------------------------------------------------------
# audio


def encode(handle, audio: dict) -> torch.Tensor:
    return run("AceStepEncode", model=handle, audio=audio)[0]["samples"]


def test_unusable_audio_is_refused_naming_the_problem(handle, baseline, cond):
    nan, inf = tone(0.5), tone(0.5)
    nan["waveform"][0, 1, 100] = float("nan")
    inf["waveform"][0, 0, 7] = float("-inf")
    for audio, match in [
        ({"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100}, r"non-empty tensor \[batch, channels, samples\]"),
        ({"waveform": torch.zeros(2, 100), "sample_rate": 44100}, r"\[batch, channels, samples\]"),
        (nan, "audio contains NaN or infinite samples; clean or re-export the file"),
        (inf, "audio contains NaN or infinite samples"),
        ({"waveform": torch.zeros(1, 2, 100), "sample_rate": 0}, "sample_rate must be a positive integer"),
        ({"samples": torch.zeros(1, 2, 100)}, "AUDIO dict with 'waveform' and 'sample_rate'"),
    ]:
        refused(baseline, handle, lambda: encode(handle, audio), match=match)
    assert_untouched(baseline, handle, cond)


def test_any_rate_and_channel_count_is_encoded(handle):
    stereo = tone(1.0, 44100, 2)
    reference = encode(handle, stereo)
    low = tone(1.0, 8000, 2)
    assert encode(handle, low).shape[-1] == -(-math.ceil(8000 * 44100 / 8000) // 4096)
    mono = tone(1.0, 44100, 1)
    duplicated = {"waveform": mono["waveform"].expand(1, 2, -1).clone(), "sample_rate": 44100}
    assert torch.equal(encode(handle, mono), encode(handle, duplicated))
    surround = {"waveform": torch.cat([stereo["waveform"], torch.zeros(1, 4, 44100)], dim=1), "sample_rate": 44100}
    assert torch.equal(encode(handle, surround), reference), "silent extra channels must not change the encode"
    six = tone(1.0, 44100, 6)
    folded = six["waveform"][:, :2] + six["waveform"][:, 2:].mean(dim=1, keepdim=True) / math.sqrt(2)
    assert torch.allclose(encode(handle, six), encode(handle, {"waveform": folded, "sample_rate": 44100}), atol=1e-4)


def test_hours_of_audio_are_refused_before_any_work(handle, baseline, cond, monkeypatch):
    monkeypatch.setattr(audio_mod, "resample", lambda *a, **k: pytest.fail("resampled an over-long file"))
    hour = {"waveform": torch.zeros(1, 1, 3600 * 1000), "sample_rate": 1000}
    message = refused(baseline, handle, lambda: encode(handle, hour), match="audio is 60.0 minutes long")
    assert "at most 10 minutes" in message and "trim it" in message
    assert audio_mod.MAX_SOURCE_SECONDS == 600.0


# ---------------------------------------------------------------------------------------------------------------
# latents


def test_latents_that_are_not_ace_step_audio_latents_are_refused(handle, baseline, cond):
    image = {"samples": torch.zeros(1, 4, 64, 64)}
    broken = {"samples": torch.full((1, 8, 16, 10), float("nan"))}
    calls = {
        "AceStepSampler": lambda latent: sample(handle, cond, latent),
        "AceStepDecode": lambda latent: run("AceStepDecode", model=handle, latent=latent, sample_rate="44100"),
        "AceStepFlowEdit": lambda latent: run(
            "AceStepFlowEdit", model=handle, source_conditioning=cond, target_conditioning=cond, latent=latent,
            seed=1, steps=2, guidance_scale=15.0, scheduler="euler", n_min=0.0, n_max=1.0, n_avg=1),
        "AceStepRepaintRegion": lambda latent: run("AceStepRepaintRegion", latent=latent, start_seconds=0.0,
                                                   end_seconds=0.5, variance=0.5),
    }
    for call in calls.values():
        refused(baseline, handle, lambda: call(image),
                match=r"latent must be an ACE-Step audio latent \[batch, 8, 16, frames\], got \(1, 4, 64, 64\)")
        refused(baseline, handle, lambda: call(broken), match="latent contains NaN or infinite values")
        refused(baseline, handle, lambda: call(torch.zeros(1, 8, 16, 10)), match="LATENT dict with 'samples'")
    assert_untouched(baseline, handle, cond)


# ---------------------------------------------------------------------------------------------------------------
# LoRAs and checkpoints


@pytest.mark.parametrize("name", ["sd15-style.safetensors", "acestep-3.5b-lora.safetensors"])
def test_a_lora_for_another_model_is_refused_and_nothing_is_applied(handle, baseline, cond, name):
    (foreign,) = run("AceStepLoraLoader", model=handle, lora_name=name, strength=1.0, honour_alpha=False)
    refused(baseline, handle, lambda: sample(foreign, cond, empty()),
            match=r"LoRA does not match this ACE-Step transformer \(a LoRA for another model\?\); nothing was applied")
    assert_untouched(baseline, handle, cond)


def test_a_failing_lora_stack_leaves_the_previous_loras_applied(handle, baseline, cond):
    good = with_lora(handle)
    latent = sample(good, cond, empty())["samples"]
    transformer = model_mod.model_for(handle).transformer
    applied = {k: v.clone() for k, v in transformer.state_dict().items()}
    signature = lora_mod.lora_state(transformer).signature
    stacked = run("AceStepLoraLoader", model=good, lora_name="sd15-style.safetensors", strength=0.5,
                  honour_alpha=False)[0]
    with pytest.raises(ValueError, match="nothing was applied"):
        sample(stacked, cond, empty())
    assert lora_mod.lora_state(transformer).signature == signature
    assert all(torch.equal(v, applied[k]) for k, v in transformer.state_dict().items())
    assert torch.equal(sample(good, cond, empty())["samples"], latent)
    model_mod.transformer_for(handle)  # back to the base weights: the LoRA stays applied until a run without it
    assert_untouched(baseline, handle, cond)


@pytest.fixture
def no_unpickling(monkeypatch):
    import pickle

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail(f"{owner.__name__}.{name} was called"))


@pytest.mark.parametrize("name,error,match", [
    ("broken/truncated", errors.CheckpointError,
     r"broken/truncated/ace_step_transformer/diffusion_pytorch_model\.safetensors: cannot be read as safetensors"
     r".*truncated or corrupt - download it again"),
    ("broken/missing-keys", errors.CheckpointError,
     r"missing-keys/ace_step_transformer/diffusion_pytorch_model\.safetensors: keys do not match the model: "
     r"1 missing key\(s\) \(transformer_blocks\.1\..*download the ACE-Step v1 checkpoint again"),
    ("broken/pickled", errors.CheckpointError,
     r"diffusion_pytorch_model\.bin: \.bin files are Python pickles, which can run code when loaded and are refused"),
])
def test_broken_checkpoints_are_refused_naming_the_file(handle, baseline, cond, no_unpickling, name, error, match):
    assert f"ace_step/{name}" in NODES["AceStepLoader"].INPUT_TYPES()["required"]["checkpoint"][0]
    refused(baseline, handle, lambda: run("AceStepLoader", checkpoint=f"ace_step/{name}", dtype="fp32", device="cpu"),
            error, match)
    assert_untouched(baseline, handle, cond)


@pytest.mark.parametrize("name", [
    "checkpoints/acestep.ckpt", "ace_step/acestep-v2", "../../etc/passwd", "/etc/passwd",
    "ace_step/../ace_step/acestep-v1-tiny", str(TINY_FOLDER),
])
def test_checkpoint_names_outside_the_listing_are_refused(handle, baseline, no_unpickling, name):
    assert isinstance(NODES["AceStepLoader"].VALIDATE_INPUTS(checkpoint=name), str)
    refused(baseline, handle, lambda: run("AceStepLoader", checkpoint=name, dtype="fp32", device="cpu"),
            match=re.escape(f"checkpoint {name!r} is not in the model folders (found: ") + ".*acestep-v1-tiny")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "loras/../loras/acestep-v1-tiny-lora"])
def test_lora_names_outside_the_listing_are_refused(handle, baseline, name):
    refused(baseline, handle, lambda: with_lora(handle, name),
            match=re.escape(f"lora_name {name!r} is not in the model folders"))


def test_a_model_folder_that_does_not_exist(handle, baseline, monkeypatch, tmp_path):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    refused(baseline, handle, lambda: run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu"),
            match=r"checkpoint 'acestep-v1-tiny' is not in the model folders \(found: nothing\)")
    with pytest.raises(errors.CheckpointError, match=r"checkpoint '.*nowhere' not found: expected a folder with"):
        loading.load_acestep(tmp_path / "nowhere")


def test_no_network_when_a_download_is_needed(handle, baseline, cond, models_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def offline(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        raise LocalEntryNotFoundError("Cannot reach the Hub: offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    message = refused(baseline, handle, lambda: run(
        "AceStepLoader", checkpoint="ace_step/acestep-v1-tiny", dtype="fp32", device="cpu",
        repo_id="ACE-Step/ACE-Step-v1-3.5B"), errors.ModelDownloadError, "no network or Hugging Face offline mode")
    target = models_dir / "ACE-Step-v1-3.5B"
    assert f"put the folder at {target}" in message and "ace_step_transformer/" in message
    ((repo, kwargs),) = asked
    assert repo == "ACE-Step/ACE-Step-v1-3.5B" and kwargs["local_dir"] == str(target), "downloads go where pointed"
    assert not target.exists()
    assert_untouched(baseline, handle, cond)


# ---------------------------------------------------------------------------------------------------------------
# only safetensors are loaded


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) of every call that can unpickle: torch.load without weights_only=True, pickle and friends."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or \
                node.func.attr not in ("load", "loads", "Unpickler", "open"):
            continue
        owner = ast.unparse(node.func.value)
        name = f"{owner}.{node.func.attr}"
        keywords = {k.arg: k.value for k in node.keywords}

        def flag(key: str, value: object) -> bool:
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value == value

        if name in ("torch.load", "torch.jit.load") and not flag("weights_only", True):
            found.append((node.lineno, name))
        elif owner in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve") and \
                node.func.attr in ("load", "loads", "Unpickler", "open"):
            found.append((node.lineno, name))
        elif name in ("numpy.load", "np.load") and flag("allow_pickle", True):
            found.append((node.lineno, name))
        elif name == "yaml.load" and "Loader" not in keywords:
            found.append((node.lineno, name))
    return found


def test_no_python_file_can_unpickle():
    skip = {".git", "node_modules", "__pycache__", ".venv", "venv"}
    files = [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]
    assert any(p.name == "loading.py" for p in files) and len(files) > 20
    unsafe = [f"{p.relative_to(REPO)}:{line} {call}" for p in files
              for line, call in _unsafe_calls(ast.parse(p.read_text(encoding="utf-8")))]
    assert not unsafe, f"calls that can run pickled code: {unsafe}"
    unsafe_source = "torch." + "load(f)\npickle.loads(b)\nnp.load(f, allow_pickle=True)"  # split: repo greps stay clean
    assert _unsafe_calls(ast.parse(unsafe_source)) == [
        (1, "torch.load"), (2, "pickle.loads"), (3, "np.load")]
    assert _unsafe_calls(ast.parse("torch.load(f, weights_only=True)\nnp.load(f)")) == []


# ---------------------------------------------------------------------------------------------------------------
# interrupts


@pytest.fixture
def comfy(monkeypatch):
    """Fake `comfy.utils` / `comfy.model_management`: the interrupt check raises once `interrupt_at` checks ran."""
    return install_interrupting_comfy(monkeypatch)


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def counting(monkeypatch, module: torch.nn.Module, name: str) -> list[int]:
    """Count the calls of one method of `module`'s class."""
    calls: list[int] = []
    original = getattr(type(module), name)
    monkeypatch.setattr(type(module), name, lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def interrupted(call) -> None:
    """call() raises Interrupted; no reference to the exception (and the frames it holds) is kept."""
    try:
        call()
    except Interrupted:
        return
    pytest.fail("the interrupt did not stop the node")


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_interrupt_while_sampling_stops_within_a_step_and_the_next_run_matches(
        handle, baseline, cond, comfy, monkeypatch, lora):
    model = model_mod.model_for(handle)
    current = with_lora(handle) if lora else handle
    latent = empty()
    reference = sample(current, cond, latent, steps=4)["samples"]
    patched = weights(model)
    signature = lora_mod.lora_state(model.transformer).signature
    before = live_tensors()
    calls = counting(monkeypatch, model.transformer, "decode")
    at_check = []
    check = sys.modules["comfy.model_management"].throw_exception_if_processing_interrupted
    monkeypatch.setattr(sys.modules["comfy.model_management"], "throw_exception_if_processing_interrupted",
                        lambda: at_check.append(len(calls)) or check())
    comfy.interrupt_at = comfy.checks + 2
    interrupted(lambda: sample(current, cond, latent, steps=4))
    assert len(at_check) == 2 and len(calls) == at_check[-1], "the model ran after the interrupt"
    assert live_tensors() <= before, "the interrupted run left tensors alive"
    assert lora_mod.lora_state(model.transformer).signature == signature, "LoRA bookkeeping lost by the interrupt"
    assert all(torch.equal(v, patched[k]) for k, v in weights(model).items())
    assert model_mod.model_for(handle) is model
    assert torch.equal(sample(current, cond, latent, steps=4)["samples"], reference)
    model_mod.transformer_for(handle)  # back to the base weights
    assert_untouched(baseline, handle, cond)


def test_interrupt_while_encoding_or_decoding_stops_within_a_chunk(handle, baseline, cond, comfy, monkeypatch):
    model = model_mod.model_for(handle)
    audio = {"waveform": torch.cat([tone(0.5)["waveform"]] * 2), "sample_rate": 44100}  # two items = two chunks
    encoded = encode(handle, audio)
    latent = {"samples": encoded[:1], "type": "audio"}
    (decoded,) = run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")
    before = live_tensors()
    encoder_calls = counting(monkeypatch, model.dcae, "encode")
    comfy.interrupt_at = comfy.checks + 1
    interrupted(lambda: encode(handle, audio))
    assert len(encoder_calls) <= 1, "the second item was encoded after the interrupt"  # checks run inside calls too
    vocoder_calls = counting(monkeypatch, model.vocoder, "decode")
    comfy.interrupt_at = comfy.checks + 1
    interrupted(lambda: run("AceStepDecode", model=handle, latent=latent, sample_rate="44100"))
    assert vocoder_calls == [], "the vocoder ran after the interrupt"
    assert live_tensors() <= before
    assert torch.equal(encode(handle, audio), encoded)
    assert torch.equal(run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")[0]["waveform"],
                       decoded["waveform"])
    assert_untouched(baseline, handle, cond)


# ---------------------------------------------------------------------------------------------------------------
# out of memory


def test_out_of_memory_while_sampling_names_the_settings_that_fit(handle, baseline, cond, monkeypatch):
    model = model_mod.model_for(handle)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore allocator details")

    monkeypatch.setattr(type(model.transformer), "decode", out_of_memory)
    request = pipeline.Request(prompt="rock", audio_duration=30.0, infer_step=2, batch_size=2, batch_branches=True)
    before = live_tensors()
    message = refused(baseline, handle, lambda: pipeline.generate(model, request, decode=False), torch.OutOfMemoryError,
                      r"ACE-Step ran out of memory \(RAM\) while generating 30.0 s of audio \(batch_size 2, fp32 on cpu\)")
    for advice in ("a shorter song (15 s instead of 30 s", "batch_size 1 instead of 2", "batch_branches off",
                   "[CUDA out of memory. Tried to allocate 20.00 GiB]"):
        assert advice in message
    assert live_tensors() <= before
    monkeypatch.undo()
    assert_untouched(baseline, handle, cond)


def test_out_of_memory_advice_for_a_gpu():
    settings = validation.MemorySettings("sampling", 240.0, batch_size=1, dtype=torch.float32, device="cuda:0",
                                         offload_option="low_vram")
    advice = validation.memory_advice(settings)
    assert advice[0].startswith("a shorter song (120 s instead of 240 s")
    assert any("dtype bf16" in a for a in advice) and any("low_vram on" in a for a in advice)
    assert any("device cpu" in a for a in advice)
    assert not any("bf16" in a for a in validation.memory_advice(
        validation.MemorySettings("sampling", 5.0, dtype=torch.bfloat16, device="cuda")))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        validation.MemorySettings("sampling", 5.0, batch_size=0)


def test_only_out_of_memory_errors_are_rewritten():
    settings = validation.MemorySettings("sampling", 60.0)
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 1 TB")
    assert validation.is_out_of_memory(cpu) and validation.is_out_of_memory(torch.OutOfMemoryError("x"))
    with pytest.raises(torch.OutOfMemoryError, match="ran out of memory.*DefaultCPUAllocator"):
        validation.call_explaining_oom(lambda: (_ for _ in ()).throw(cpu), settings)
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as info:
        validation.call_explaining_oom(lambda: (_ for _ in ()).throw(other), settings)
    assert info.value is other
    assert validation.call_explaining_oom(lambda: 42, settings) == 42


# ---------------------------------------------------------------------------------------------------------------
# many generations in one process


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_twenty_generations_in_a_row_leak_nothing_and_repeat_exactly(handle, baseline, cond):
    """Text2music, repaint, extend and retake, each with and without a LoRA, 20 runs through the nodes.

    Memory is measured after the first round of 8 (every path has filled its caches) and after runs 16 and 20; all
    three are runs without the LoRA, because an applied LoRA rightly keeps CPU copies of the weights it changed.
    """
    source = {"samples": encode(handle, tone(1.0)), "type": "audio"}
    repaint = run("AceStepRepaintRegion", latent=source, start_seconds=0.3, end_seconds=0.7, variance=0.6)[0]
    extend = run("AceStepExtend", latent=source, left_seconds=0.0, right_seconds=0.5, variance=1.0)[0]
    lora = with_lora(handle, strength=0.8)
    retake = {"retake_variance": 0.4}
    configs = [  # (latent, extra sampler inputs, LoRA on)
        (empty(), {}, True), (repaint, {}, True), (empty(), retake, True), (extend, {}, False),
        (empty(), {}, False), (repaint, {}, False), (extend, {}, True), (empty(), retake, False),
    ]
    rounds, measured = len(configs), (8, 16, 20)
    assert not any(configs[(n - 1) % rounds][2] for n in measured)
    outputs, usage = [], []
    for i in range(20):
        latent, extra, on = configs[i % rounds]
        outputs.append(sample(lora if on else handle, cond, latent, retake_seed=5, **extra)["samples"])
        if i + 1 in measured:
            usage.append((live_tensors() - len(outputs), resident_bytes()))  # the kept outputs aside
    for i in range(rounds, 20):
        assert torch.equal(outputs[i], outputs[i - rounds]), f"generation {i} differs from generation {i - rounds}"
    assert torch.equal(outputs[4], baseline.latent), "the same seed gave another song"
    assert not torch.equal(outputs[0], outputs[4]), "the LoRA had no effect"
    assert outputs[3].shape[-1] == outputs[6].shape[-1] == source["samples"].shape[-1] + 5
    (tensors, resident), later = usage[0], usage[1:]
    for count, now in later:
        assert count <= tensors, f"{count - tensors} more live tensors than after the first round"
        assert now - resident < 32 * 2**20, f"resident memory grew by {(now - resident) / 2**20:.1f} MiB"
    assert_untouched(baseline, handle, cond)
