"""The node layer: nodes called directly without ComfyUI, and the bridge against a fake `comfy` / `folder_paths`."""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, TINY_FOLDER, VOCAB
from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
nodes = sys.modules[f"{pack.__name__}.nodes"]
bridge = nodes.bridge
cache = nodes.cache
files = nodes.files
model_mod = nodes.model
wire = nodes.wire
core = sys.modules[f"{pack.__name__}.acestep_core"]
tasks = sys.modules[f"{pack.__name__}.acestep_core.tasks"]
noise_mod = sys.modules[f"{pack.__name__}.acestep_core.noise"]

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
FAST = dict(steps=2, scheduler="euler", cfg_type="apg", guidance_scale=15.0, omega_scale=10.0)


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))


def run(name: str, **inputs):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def handle():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(TINY))
        return run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")[0]


@pytest.fixture(scope="module")
def cond(handle):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
        return run("AceStepTextEncode", model=handle, tags="rock, guitar", lyrics="[verse]\nhello there")[0]


def empty(seconds=1.0, batch=1):
    return run("AceStepEmptyLatent", seconds=seconds, batch_size=batch)[0]


def sample(handle, cond, latent, seed=1, **extra):
    return run("AceStepSampler", model=handle, conditioning=cond, latent=latent, seed=seed, **{**FAST, **extra})[0]


def tone(seconds=1.0, rate=48000, channels=2):
    t = torch.arange(int(seconds * rate)) / rate
    wave = torch.stack([0.3 * torch.sin(2 * torch.pi * (220 + 110 * c) * t) for c in range(channels)])
    return {"waveform": wave[None], "sample_rate": rate}


# ---------------------------------------------------------------------------------------------------------------
# registration and node contracts


def test_pack_registers_every_node_with_a_display_name():
    assert set(NODES) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert all(name.startswith("AceStep") for name in NODES)
    assert all(label.startswith("ACE-Step ") for label in pack.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert (REPO / pack.WEB_DIRECTORY).resolve() == REPO / "web"
    assert (REPO / "web" / "js" / "waveform_region.js").is_file()


def test_importing_the_pack_touched_no_comfyui_module():
    loaded = [m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "server", "comfy_api")]
    assert loaded == []


@pytest.mark.parametrize("name", sorted(NODES))
def test_node_declares_category_description_and_tooltips(name):
    cls = NODES[name]
    assert cls.CATEGORY == "audio/ACE-Step"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert callable(getattr(cls, cls.FUNCTION))
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert all(tip.strip() for tip in cls.OUTPUT_TOOLTIPS)
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for input_name, (kind, options) in spec.get(section, {}).items():
            assert options.get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"
            if kind in ("INT", "FLOAT"):
                assert {"default", "min", "max"} <= options.keys(), f"{name}.{input_name} lacks default/min/max"
                assert options["min"] <= options["default"] <= options["max"]
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind


def test_region_nodes_keep_the_widget_names_the_web_picker_uses():
    repaint = NODES["AceStepRepaintRegion"].INPUT_TYPES()
    extend = NODES["AceStepExtend"].INPUT_TYPES()
    assert {"start_seconds", "end_seconds"} <= set(repaint["required"])
    assert {"left_seconds", "right_seconds"} <= set(extend["required"])
    assert repaint["optional"]["audio"][0] == "AUDIO" and extend["optional"]["audio"][0] == "AUDIO"
    js = (REPO / "web" / "js" / "waveform_region.js").read_text()
    for widget in ("start_seconds", "end_seconds", "left_seconds", "right_seconds"):
        assert f'"{widget}"' in js


def test_sampler_options_defaults_are_the_official_pipeline_defaults():
    (options,) = run("AceStepSamplerOptions", **{
        name: spec[1]["default"] for name, spec in NODES["AceStepSamplerOptions"].INPUT_TYPES()["required"].items()
    })
    # the official app's UI turns ERG on the lyrics off (acestep_core.params.APP_DEFAULTS, tests/test_app.py)
    assert options == tasks.with_options(tasks.SamplerOptions(), use_erg_lyric=False)
    sampler = NODES["AceStepSampler"].INPUT_TYPES()["required"]
    guidance = tasks.SamplerOptions().guidance
    assert sampler["steps"][1]["default"] == 60 and sampler["scheduler"][1]["default"] == "euler"
    assert sampler["guidance_scale"][1]["default"] == guidance.guidance_scale
    assert sampler["omega_scale"][1]["default"] == guidance.omega_scale
    assert sampler["seed"][1]["control_after_generate"]


# ---------------------------------------------------------------------------------------------------------------
# latents


@pytest.mark.parametrize("seconds,batch", [(3.0, 2), (2.0, 1), (60.0, 1)])
def test_empty_latent_matches_comfyui_empty_ace_step_latent(seconds, batch):
    latent = empty(seconds, batch)
    assert set(latent) == {"samples", "type"} and latent["type"] == "audio"
    assert latent["samples"].shape == (batch, 8, 16, int(seconds * 44100 / 512 / 8))
    assert latent["samples"].dtype == torch.float32 and not latent["samples"].any()


def test_repaint_region_marks_the_latent_and_keeps_the_input():
    source = {"samples": torch.randn(2, 8, 16, 40), "type": "audio", "batch_index": [3, 4]}
    before = copy.deepcopy(source)
    (out,) = run("AceStepRepaintRegion", latent=source, start_seconds=1.0, end_seconds=2.5, variance=0.3)
    assert torch.equal(source["samples"], before["samples"]) and source.keys() == before.keys()
    start, end = int(1.0 * 44100 / 4096), int(2.5 * 44100 / 4096)
    assert out["acestep"] == {"task": "repaint", "start_frame": start, "end_frame": end, "variance": 0.3}
    assert out["batch_index"] == [3, 4] and out["samples"] is source["samples"]
    mask = torch.zeros(2, 1, 40)
    mask[..., start:end] = 1
    assert torch.equal(out["noise_mask"], mask)


@pytest.mark.parametrize("start,end,message", [
    (2.0, 1.0, "end_seconds"),
    (1.0, 1.0, "end_seconds"),
    (1.0, 9.0, "past the end"),
    (1.0, 1.02, "shorter than one latent frame"),
])
def test_repaint_region_refuses_bad_regions(start, end, message):
    with pytest.raises(ValueError, match=message):
        run("AceStepRepaintRegion", latent=empty(3.0), start_seconds=start, end_seconds=end, variance=0.2)


@pytest.mark.parametrize("node,widgets", [
    ("AceStepRepaintRegion", dict(start_seconds=0.0, end_seconds=1.0, variance=0.2)),
    ("AceStepExtend", dict(left_seconds=0.0, right_seconds=1.0, variance=1.0)),
    ("AceStepAudio2Audio", dict(ref_strength=0.5)),
    ("AceStepSampler", None),
    ("AceStepDecode", None),
])
def test_nodes_refuse_an_image_latent_naming_the_input(node, widgets, handle, cond):
    image = {"samples": torch.zeros(1, 4, 64, 64)}
    if node == "AceStepSampler":
        call = lambda: sample(handle, cond, image)  # noqa: E731
    elif node == "AceStepDecode":
        call = lambda: run(node, model=handle, latent=image, sample_rate="44100")  # noqa: E731
    else:
        call = lambda: run(node, latent=image, **widgets)  # noqa: E731
    with pytest.raises(ValueError, match=r"latent must be an ACE-Step audio latent \[batch, 8, 16, frames\]"):
        call()


def test_extend_and_audio2audio_marks_and_refusals():
    source = empty(2.0)
    (out,) = run("AceStepExtend", latent=source, left_seconds=0.5, right_seconds=1.0, variance=1.0)
    assert out["acestep"] == {"task": "extend", "left_frames": 5, "right_frames": 10, "variance": 1.0}
    assert "acestep" not in source
    with pytest.raises(ValueError, match="left_seconds and right_seconds are both 0"):
        run("AceStepExtend", latent=source, left_seconds=0.0, right_seconds=0.05, variance=1.0)
    (a2a,) = run("AceStepAudio2Audio", latent=source, ref_strength=0.7)
    assert a2a["acestep"] == {"task": "audio2audio", "ref_strength": 0.7}
    with pytest.raises(ValueError, match="ref_strength"):
        run("AceStepAudio2Audio", latent=source, ref_strength=1.0)


def test_region_nodes_return_a_temp_copy_of_the_source_audio_for_the_picker(tmp_path, monkeypatch):
    monkeypatch.setattr(bridge, "temp_folder", lambda: (tmp_path, "temp"))
    audio = tone(1.0)
    result = run("AceStepRepaintRegion", latent=empty(3.0), start_seconds=0.0, end_seconds=1.0, variance=0.2,
                 audio=audio)
    (entry,) = result["ui"]["audio"]
    assert entry["type"] == "temp" and entry["subfolder"] == ""
    import soundfile

    data, rate = soundfile.read(str(tmp_path / entry["filename"]))
    assert rate == 48000 and data.shape == (48000, 2)
    assert abs(data - audio["waveform"][0].T.numpy()).max() < 1e-4
    assert result["result"][0]["acestep"]["task"] == "repaint"
    extended = run("AceStepExtend", latent=empty(3.0), left_seconds=0.0, right_seconds=1.0, variance=1.0, audio=audio)
    assert extended["ui"]["audio"] == [entry]
    assert isinstance(run("AceStepExtend", latent=empty(3.0), left_seconds=0.0, right_seconds=1.0, variance=1.0), tuple)


# ---------------------------------------------------------------------------------------------------------------
# loader, cache, LoRA


def test_checkpoint_and_lora_combos_list_the_model_folders():
    checkpoints = NODES["AceStepLoader"].INPUT_TYPES()["required"]["checkpoint"][0]
    assert checkpoints == ["acestep-v1-tiny", "acestep-v1-tiny-comfy.safetensors"]
    loras = NODES["AceStepLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    assert loras == ["acestep-v1-tiny-lora", "acestep-v1-tiny-lora-with-metadata"]


@pytest.mark.parametrize("name", ["../acestep-v1-tiny", str(TINY_FOLDER), "acestep-v1-tiny/../acestep-v1-tiny", "nope"])
def test_loader_resolves_only_listed_names(name):
    assert isinstance(NODES["AceStepLoader"].VALIDATE_INPUTS(checkpoint=name), str)
    with pytest.raises(ValueError, match="checkpoint .* is not in the model folders"):
        run("AceStepLoader", checkpoint=name, dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="lora_name"):
        files.resolve("lora_name", name, files.loras())


def test_loader_refuses_bad_repo_ids_and_missing_cuda(monkeypatch):
    with pytest.raises(ValueError, match="repo_id"):
        run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu", repo_id="../../etc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device is 'cuda'"):
        run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cuda")


def test_model_cache_is_an_lru_keyed_by_path_dtype_device():
    models = cache.ModelCache(capacity=2)
    a, b, c = (cache.ModelKey("/m", d, "cpu") for d in ("float32", "bfloat16", "float16"))
    loads = []

    def loader(key):
        return lambda: loads.append(key) or object()

    first = models.get(a, loader(a))
    assert models.get(a, loader(a)) is first and loads == [a]
    models.get(b, loader(b))
    models.get(a, loader(a))
    models.get(c, loader(c))
    assert models.keys() == [a, c] and loads == [a, b, c]
    models.clear()
    assert len(models) == 0


def test_loaders_share_one_model_and_lora_changes_never_reload(handle, monkeypatch):
    model = model_mod.model_for(handle)
    monkeypatch.setattr(model_mod, "_load", lambda key: pytest.fail(f"reloaded {key}"))
    (again,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="fp32", device="cpu")
    assert again == handle and model_mod.model_for(again) is model
    (with_lora,) = run("AceStepLoraLoader", model=handle, lora_name="acestep-v1-tiny-lora", strength=0.5,
                       honour_alpha=False)
    (stacked,) = run("AceStepLoraLoader", model=with_lora, lora_name="acestep-v1-tiny-lora-with-metadata",
                     strength=1.0, honour_alpha=False)
    assert handle.loras == () and len(with_lora.loras) == 1 and len(stacked.loras) == 2
    assert stacked.key == handle.key and model_mod.model_for(stacked) is model
    assert run("AceStepLoraLoader", model=with_lora, lora_name="acestep-v1-tiny-lora", strength=0.0,
               honour_alpha=False)[0] is with_lora


def test_changing_dtype_or_device_loads_a_new_model(handle, monkeypatch):
    models = cache.ModelCache()
    real = models.get(handle.key, lambda: model_mod.model_for(handle))
    monkeypatch.setattr(model_mod, "MODELS", models)
    loaded = []
    monkeypatch.setattr(model_mod, "_load", lambda key: loaded.append(key) or object())
    (bf16,) = run("AceStepLoader", checkpoint="acestep-v1-tiny", dtype="bf16", device="cpu")
    assert bf16.key == cache.ModelKey(handle.key.path, "bfloat16", "cpu") and loaded == [bf16.key]
    assert models.get(handle.key, lambda: pytest.fail("fp32 model was evicted")) is real


def test_lora_changes_the_sampled_song_and_removing_it_restores_the_base(handle, cond):
    latent = empty(1.0)
    base = sample(handle, cond, latent)["samples"]
    (with_lora,) = run("AceStepLoraLoader", model=handle, lora_name="acestep-v1-tiny-lora", strength=1.0,
                       honour_alpha=False)
    lora = sample(with_lora, cond, latent)["samples"]
    assert (lora - base).abs().max() > 1e-3
    assert torch.equal(sample(handle, cond, latent)["samples"], base)
    (alpha,) = run("AceStepLoraLoader", model=with_lora, lora_name="acestep-v1-tiny-lora-with-metadata",
                   strength=1.0, honour_alpha=True)
    with pytest.raises(ValueError, match="honour_alpha"):
        sample(alpha, cond, latent)


# ---------------------------------------------------------------------------------------------------------------
# sampling, text, codec


def test_text_encode_gives_cpu_conditioning(cond, handle):
    assert cond.text_states.device.type == "cpu" and not cond.instrumental
    (instrumental,) = run("AceStepTextEncode", model=handle, tags="ambient", lyrics="")
    assert instrumental.instrumental


def test_sampler_runs_text2music_with_the_official_seeded_noise(handle, cond):
    latent = {**empty(1.0, batch=2), "extra": "kept"}
    before = copy.deepcopy(latent)
    out = sample(handle, cond, latent, seed=7)
    assert latent.keys() == before.keys() and torch.equal(latent["samples"], before["samples"])
    assert out["extra"] == "kept" and out["type"] == "audio" and "acestep" not in out
    transformer = model_mod.transformer_for(handle)
    options = tasks.with_options(tasks.SamplerOptions(), use_erg_lyric=False, **FAST)  # the app's UI default
    noise = noise_mod.SeededNoise([7, 8], [0, 1])
    expected = tasks.text2music(transformer, cond, 10, batch_size=2, options=options, noise=noise)
    assert torch.equal(out["samples"], expected)


def test_retake_variance_changes_the_song_and_is_refused_for_edits(handle, cond):
    latent = empty(1.0)
    base = sample(handle, cond, latent)["samples"]
    retake = sample(handle, cond, latent, retake_variance=0.3, retake_seed=5)["samples"]
    assert (retake - base).abs().max() > 1e-3
    marked = run("AceStepAudio2Audio", latent={**latent, "samples": base}, ref_strength=0.5)[0]
    with pytest.raises(ValueError, match="retake_variance only applies"):
        sample(handle, cond, marked, retake_variance=0.3)


def test_sampler_dispatches_extend_and_audio2audio(handle, cond):
    source = sample(handle, cond, empty(1.0))
    (extend,) = run("AceStepExtend", latent=source, left_seconds=0.3, right_seconds=0.5, variance=1.0)
    longer = sample(handle, cond, extend, steps=3)["samples"]
    left, right = int(0.3 * 44100 / 4096), int(0.5 * 44100 / 4096)
    assert longer.shape[-1] == 10 + left + right
    assert torch.equal(longer[..., left:left + 10], source["samples"])
    (a2a,) = run("AceStepAudio2Audio", latent=source, ref_strength=0.5)
    out = sample(handle, cond, a2a, steps=4)["samples"]
    assert out.shape == source["samples"].shape and not torch.equal(out, source["samples"])


def test_flow_edit_moves_the_source(handle, cond):
    source = sample(handle, cond, empty(1.0))
    (target,) = run("AceStepTextEncode", model=handle, tags="jazz, saxophone", lyrics="[verse]\nanother line")
    before = source["samples"].clone()
    (out,) = run("AceStepFlowEdit", model=handle, source_conditioning=cond, target_conditioning=target, latent=source,
                 seed=3, steps=4, guidance_scale=15.0, scheduler="euler", n_min=0.25, n_max=1.0, n_avg=1)
    assert torch.equal(source["samples"], before)
    assert out["samples"].shape == before.shape and (out["samples"] - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="n_min"):
        run("AceStepFlowEdit", model=handle, source_conditioning=cond, target_conditioning=target, latent=source,
            seed=3, steps=4, guidance_scale=15.0, scheduler="euler", n_min=0.8, n_max=0.5, n_avg=1)


def test_encode_decode_round_trip_lengths_and_checks(handle, monkeypatch):
    (latent,) = run("AceStepEncode", model=handle, audio=tone(0.5, rate=44100, channels=1))
    frames = -(-22050 // 4096)
    assert latent["samples"].shape == (1, 8, 16, frames) and latent["type"] == "audio"
    for rate in ("44100", "48000"):
        (audio,) = run("AceStepDecode", model=handle, latent=latent, sample_rate=rate)
        assert audio["sample_rate"] == int(rate)
        assert audio["waveform"].shape == (1, 2, -(-frames * 4096 * int(rate) // 44100))
        assert torch.isfinite(audio["waveform"]).all() and audio["waveform"].abs().max() > 0
    bad = tone(0.5)
    bad["waveform"][0, 0, 10] = float("nan")
    with pytest.raises(ValueError, match="audio contains NaN"):
        run("AceStepEncode", model=handle, audio=bad)
    monkeypatch.setattr(nodes.codec.codec, "decode_latents",
                        lambda *a, **k: torch.full((1, 2, 100), float("nan")))
    with pytest.raises(ValueError, match="decoded audio contains NaN"):
        run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")


# ---------------------------------------------------------------------------------------------------------------
# the bridge inside a (fake) ComfyUI


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """`comfy.utils`, `comfy.model_management` and `folder_paths` fakes that record what the pack does."""
    state = types.SimpleNamespace(bars=[], interrupt_after=None, checks=0, freed=[], emptied=0)

    class ProgressBar:
        def __init__(self, total):
            self.total, self.updates = total, []
            state.bars.append(self)

        def update_absolute(self, value, total=None):
            self.updates.append((value, total))

    def throw_if_interrupted():
        state.checks += 1
        if state.interrupt_after is not None and state.checks > state.interrupt_after:
            state.interrupt_after = None
            raise Interrupted("interrupted")

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_if_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.should_use_bf16 = lambda device=None: True
    mm.free_memory = lambda size, device: state.freed.append((size, device))
    mm.soft_empty_cache = lambda force=False: setattr(state, "emptied", state.emptied + 1)
    comfy.utils, comfy.model_management = utils, mm
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.supported_pt_extensions = {".safetensors", ".ckpt"}
    user_folder = str(tmp_path / "elsewhere")
    fp.folder_names_and_paths = {
        "ace_step": ([user_folder], set()),
        "checkpoints": ([str(TINY)], {".safetensors"}),
        "loras": ([str(TINY)], {".safetensors"}),
    }
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_temp_directory = lambda: str(tmp_path / "temp")
    for name, module in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm), ("folder_paths", fp)):
        monkeypatch.setitem(sys.modules, name, module)
    state.folder_paths, state.user_folder = fp, user_folder
    return state


def test_bridge_uses_comfyui_devices_folders_and_temp_dir(fake_comfy, tmp_path):
    assert bridge.default_device() == torch.device("cpu")
    assert bridge.default_dtype(torch.device("cpu")) == torch.float32
    assert bridge.default_dtype(torch.device("cuda")) == torch.bfloat16
    assert bridge.model_folders("ace_step") == [Path(fake_comfy.user_folder), tmp_path / "models" / "ace_step"]
    folders, extensions = fake_comfy.folder_paths.folder_names_and_paths["ace_step"]
    assert fake_comfy.user_folder in folders and extensions == {".safetensors", ".ckpt"}
    bridge.model_folders("ace_step")
    assert len(folders) == 2
    del fake_comfy.folder_paths.folder_names_and_paths["ace_step"]
    assert bridge.model_folders("ace_step") == [tmp_path / "models" / "ace_step"]
    assert bridge.temp_folder() == (tmp_path / "temp", "temp")
    assert bridge.download_folder() == tmp_path / "models" / "ace_step"
    assert files.checkpoints() == {"acestep-v1-tiny": TINY_FOLDER,
                                   "acestep-v1-tiny-comfy.safetensors": TINY / "acestep-v1-tiny-comfy.safetensors"}


def test_progress_bar_counts_every_sampling_step(fake_comfy, handle, cond):
    sample(handle, cond, empty(1.0), steps=3)
    (bar,) = fake_comfy.bars
    assert bar.total == 3 and bar.updates == [(1, 3), (2, 3), (3, 3)]
    assert fake_comfy.checks > 3  # after every step, and before every transformer layer (acestep_core.cancel)


def test_interrupt_stops_sampling_within_one_step_and_the_next_run_works(fake_comfy, handle, cond, monkeypatch):
    latent = empty(1.0)
    reference = sample(handle, cond, latent, steps=4)["samples"]
    model = model_mod.model_for(handle)
    transformer = model.transformer
    calls = []
    original = type(transformer).decode
    monkeypatch.setattr(type(transformer), "decode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    at_check = []
    original_check = sys.modules["comfy.model_management"].throw_exception_if_processing_interrupted

    def check():
        at_check.append(len(calls))
        original_check()

    monkeypatch.setattr(sys.modules["comfy.model_management"], "throw_exception_if_processing_interrupted", check)
    fake_comfy.bars.clear()
    fake_comfy.checks = 0
    fake_comfy.interrupt_after = 1
    with pytest.raises(Interrupted):
        sample(handle, cond, latent, steps=4)
    assert len(at_check) == 2 and len(calls) == at_check[-1], "the model ran after the interrupt"
    assert fake_comfy.bars[-1].updates == [], "the second check is inside the first step: no step finished"
    assert model_mod.model_for(handle) is model
    assert torch.equal(sample(handle, cond, latent, steps=4)["samples"], reference)


def test_interrupt_stops_decoding(fake_comfy, handle):
    latent = {"samples": torch.zeros(1, 8, 16, 5), "type": "audio"}
    fake_comfy.interrupt_after = 0
    with pytest.raises(Interrupted):
        run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")
    (audio,) = run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")
    assert fake_comfy.bars[-1].updates == [(1, 2), (2, 2)], "one DCAE call, one vocoder call for both channels"
    assert audio["waveform"].shape[-1] == 5 * 4096


def test_loading_frees_comfyui_memory_first(fake_comfy, monkeypatch):
    monkeypatch.setattr(model_mod, "load_acestep", lambda path, **kw: ("model", path, kw["dtype"], kw["device"]))
    key = cache.ModelKey(str(TINY_FOLDER), "bfloat16", "cuda:0")
    assert model_mod._load(key)[0] == "model"
    ((size, device),) = fake_comfy.freed
    assert device == torch.device("cuda:0")
    assert size == sum(p.stat().st_size for p in TINY_FOLDER.rglob("*.safetensors"))
