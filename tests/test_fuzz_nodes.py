"""A fuzz pass over every node input, through the node functions as ComfyUI calls them (docs/bad-inputs.md).

Each example takes a working set of inputs for one node and replaces one input with a hostile value: text with any
code point (lone surrogates included) and up to a megabyte, numbers at and past every limit, NaN and infinities,
empty, wrong-shaped, non-finite and over-sized tensors, combo values that are not offered. The node must answer
with a ValueError (or ModelDownloadError, the named error for downloads) whose message names the input, or with a
finite result; never another exception, never a hang; and the cached model stays bit-identical.

The shared nodes that also run ACE-Step 1.5 are fuzzed a second time on a 1.5 model, latent or conditioning (cases
"<node>@1.5", on the tiny 1.5 checkpoint tests/tiny15.py writes), and the 1.5 bundle stays bit-identical too.
The StemGen generation nodes are left out on v1: they need a trained control file (tests/test_stemgen.py trains
one); on 1.5 they run the lego and complete tasks and are fuzzed there.
"""
from __future__ import annotations

import importlib
import math
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_FOLDER, TINY_LORA, VOCAB
from pack_loader import load_pack
from tiny15 import BASE, write_tiny15

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
nodes = sys.modules[f"{pack.__name__}.nodes"]
model_mod = nodes.model
v15 = nodes.v15
lora15 = importlib.import_module(f"{pack.__name__}.acestep_core.v15.lora")
errors = importlib.import_module(f"{pack.__name__}.acestep_core.errors")

SKIPPED_NODES = ("AceStepStemGen", "AceStepSinging2Accompaniment")
OUR_SOCKETS = ("ACESTEP_MODEL", "ACESTEP_COND", "ACESTEP_OPTIONS", "ACESTEP_STEMGEN")  # only our nodes make these
NAMED_ERRORS = (ValueError, errors.ModelDownloadError)
CALL_SECONDS = 60  # a call that takes longer is a hang
# Limits whose maximum is legitimate but costs minutes on the tiny model (1000 sampling steps, an hour of long-form);
# the bench covers their cost, and the value one past the limit is still fuzzed here.
COSTLY_MAXIMA = {"steps", ("AceStepLongForm", "seconds"), ("AceStepFlowEdit", "n_avg")}
ANY_CHARACTER = st.characters(blacklist_categories=())  # every code point, surrogates included
MAX_EXAMPLES = {"AceStepLongForm": 12}  # each working long-form example samples and decodes several windows
NO_WORKING_SET = {"AceStepStemGenLoader": "control_name"}  # no StemGen file in the models folder: only refusals
V15 = "@1.5"  # a case "<node>@1.5" fuzzes the node's ACE-Step 1.5 branch
SHARED_15 = ("AceStepLoader", "AceStepLoraLoader", "AceStepTextEncode", "AceStepSampler", "AceStepRepaintRegion",
             "AceStepEncode", "AceStepDecode", "AceStepDownload", "AceStepStemGen", "AceStepSinging2Accompaniment")


def run(name: str, **inputs):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "ace_step").mkdir()
    (root / "ace_step" / "acestep-v1-tiny").symlink_to(TINY_FOLDER)
    (root / "loras").mkdir()
    (root / "loras" / "acestep-v1-tiny-lora").symlink_to(TINY_LORA)
    write_tiny15(root / "ace_step")  # the 1.5 main folder and a base DiT folder beside it
    return root


@pytest.fixture(autouse=True)
def environment(monkeypatch, models_dir, tmp_path_factory):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline (the fuzz pass never downloads)")

    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path_factory.getbasetemp())  # files the nodes write (lyric timing) land in a temp folder


@pytest.fixture(scope="module")
def handle(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        # the Loader's fuzzed dtypes load other models: room for them, so that no eviction hides a replaced model
        mp.setattr(nodes.cache.MODELS, "capacity", max(nodes.cache.MODELS.capacity, len(nodes.cache.MODELS) + 10))
        yield run("AceStepLoader", checkpoint="ace_step/acestep-v1-tiny", dtype="fp32", device="cpu")[0]


def checkpoint_name(ending: str) -> str:
    return next(name for name in nodes.files.checkpoints() if name.endswith(ending))


@pytest.fixture(scope="module")
def handle15(handle, models_dir):
    """The tiny 1.5 base model (any step count: the fuzz pass runs one or two steps)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        yield run("AceStepLoader", checkpoint=checkpoint_name(BASE), dtype="fp32", device="cpu")[0]


@pytest.fixture(scope="module")
def lora15_name(handle15, models_dir) -> str:
    """A PEFT LoRA for the tiny 1.5 DiT in the loras folder."""
    from test_v15_lora import peft_lora, write_peft_folder

    write_peft_folder(models_dir / "loras" / "tiny15-lora", peft_lora(v15.bundle_for(handle15).model), rank=4,
                      alpha=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        return next(name for name in nodes.files.loras() if "tiny15-lora" in name)


def tone(seconds: float = 0.5, rate: int = 44100) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * f * t) for f in (220.0, 330.0)])
    return {"waveform": wave[None], "sample_rate": rate}


@pytest.fixture(scope="module")
def valid(handle, handle15, lora15_name, tmp_path_factory) -> dict[str, dict]:
    """A working set of inputs for every fuzzed case (few steps, short songs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
        cond = run("AceStepTextEncode", model=handle, tags="rock", lyrics="[verse]\nhello")[0]
        cond15 = run("AceStepTextEncode", model=handle15, tags="rock", lyrics="[verse]\nhello", bpm=100)[0]
    latent = {"samples": torch.zeros(1, 8, 16, 5), "type": "audio"}  # 0.46 s: shorter than the Empty Latent makes
    sampler = dict(model=handle, conditioning=cond, latent=latent, seed=1, steps=2, scheduler="euler",
                   cfg_type="apg", guidance_scale=15.0, omega_scale=10.0)
    timed = run("AceStepSampler", **sampler, collect_lyric_timing=True)[0]
    defaults = {name: {k: spec[1]["default"] for k, spec in NODES[name].INPUT_TYPES()["required"].items()
                       if len(spec) > 1 and "default" in spec[1]} for name in NODES}
    channels = v15.bundle_for(handle15).model.config.audio_acoustic_hidden_dim  # the tiny VAE's latent channels
    latent15 = {"samples": torch.zeros(1, channels, 12), "type": "audio"}  # 0.48 s
    task15 = dict(model=handle15, conditioning=cond15, source=tone(0.4), seed=1, steps=1, guidance_scale=1.0,
                  shift=0.0, batch_size=1)
    v1_settings = dict(scheduler="euler", cfg_type="apg", omega_scale=10.0, control_scale=1.0, lora_strength=1.0)
    stemgen15 = dict(model=handle15, seed=1, steps=1, guidance_scale=1.0, sample_rate="48000", **v1_settings)
    cases15 = {
        "AceStepLoader": dict(checkpoint=checkpoint_name(BASE), dtype="fp32", device="cpu", repo_id=""),
        "AceStepLoraLoader": dict(model=handle15, lora_name=lora15_name, strength=0.5, honour_alpha=False),
        "AceStepTextEncode": dict(model=handle15, tags="rock", lyrics="[verse]\nhello", bpm=100,
                                  keyscale="C major", timesignature="4", language="en"),
        "AceStepSampler": dict(model=handle15, conditioning=cond15, latent=latent15, seed=1, steps=2,
                               scheduler="euler", cfg_type="apg", guidance_scale=1.0, omega_scale=10.0),
        "AceStepRepaintRegion": dict(latent=latent15, start_seconds=0.1, end_seconds=0.3, variance=0.5),
        "AceStepEncode": dict(model=handle15, audio=tone(0.4)),
        "AceStepDecode": dict(model=handle15, latent=latent15, sample_rate="48000"),
        "AceStepDownload": dict(repo_id="ACE-Step/acestep-v15-base", target=NODES["AceStepDownload"].INPUT_TYPES()
                                ["required"]["target"][0][0]),
        "AceStepStemGen": dict(reference=tone(0.4), instrument="bass", **stemgen15),
        "AceStepSinging2Accompaniment": dict(vocal=tone(0.4), tags="synth pop", **stemgen15),
    }
    return {
        **{name + V15: inputs for name, inputs in cases15.items()},
        "AceStep15EmptyLatent": dict(seconds=1.0, batch_size=1),
        "AceStep15Cover": dict(task15, audio_cover_strength=0.5, audio_codes=""),
        "AceStep15Lego": dict(task15, track_name="bass", start_seconds=0.1, end_seconds=-1.0),
        "AceStep15Extract": dict(task15, track_name="vocals"),
        "AceStep15Complete": dict(task15, track_classes="drums, bass"),
        "AceStepLoader": dict(checkpoint="ace_step/acestep-v1-tiny", dtype="fp32", device="cpu", repo_id=""),
        "AceStepLoraLoader": dict(model=handle, lora_name="acestep-v1-tiny-lora", strength=0.5, honour_alpha=False),
        "AceStepTextEncode": dict(model=handle, tags="rock", lyrics="[verse]\nhello"),
        "AceStepEmptyLatent": dict(seconds=1.0, batch_size=1),
        "AceStepSampler": sampler,
        "AceStepSamplerOptions": defaults["AceStepSamplerOptions"],
        "AceStepRepaintRegion": dict(latent=latent, start_seconds=0.1, end_seconds=0.3, variance=0.5),
        "AceStepExtend": dict(latent=latent, left_seconds=0.0, right_seconds=0.3, variance=1.0),
        "AceStepAudio2Audio": dict(latent=latent, ref_strength=0.5),
        "AceStepFlowEdit": dict(model=handle, source_conditioning=cond, target_conditioning=cond, latent=latent,
                                seed=1, steps=2, guidance_scale=15.0, scheduler="euler", n_min=0.0, n_max=1.0,
                                n_avg=1),
        "AceStepEncode": dict(model=handle, audio=tone()),
        "AceStepDecode": dict(model=handle, latent=latent, sample_rate="44100"),
        "AceStepPreviewImage": dict(width=256, height=64, start_seconds=0.0, end_seconds=0.0, audio=tone()),
        "AceStepDownload": dict(repo_id="ACE-Step/ACE-Step-v1-3.5B", target=NODES["AceStepDownload"].INPUT_TYPES()
                                ["required"]["target"][0][0]),
        "AceStepLyricTiming": dict(model=handle, latent=timed, threshold=0.5, filename_prefix="fuzz/timing",
                                   batch_index=0, keep_unsung=False),
        "AceStepLongForm": {**defaults["AceStepLongForm"], "model": handle, "conditioning": cond, "seconds": 12.0,
                            "window_seconds": 10.0, "overlap_seconds": 2.0, "steps": 1, "seed": 1},
        "AceStepStemGenLoader": dict(control_name="none"),
        "AceStepLoadParams": dict(params_file=official_params_file(tmp_path_factory.getbasetemp())),
        "AceStepSaveAudio": dict(audio=tone(), filename_prefix="fuzz/save", format="wav", write_params=True),
        "AceStepGenrePreset": dict(preset="Custom", tags="rock"),
    }


def official_params_file(workdir: Path) -> str:
    """An official parameter file in <workdir>/input (the nodes' input folder outside ComfyUI is ./input, and the
    fuzzed calls run in `workdir`)."""
    source = sorted((Path(__file__).parent / "data" / "app").glob("*_input_params.json"))[0]
    folder = workdir / "input"
    folder.mkdir(exist_ok=True)
    (folder / source.name).write_bytes(source.read_bytes())
    return source.name


def snapshot(model, bundle) -> dict[str, torch.Tensor]:
    """Every weight of the cached v1 model and 1.5 bundle."""
    parts = {"transformer": model.transformer, "dcae": model.dcae, "vocoder": model.vocoder, "text": model.text_encoder,
             "v15.dit": bundle.model, "v15.vae": bundle.vae, "v15.text": bundle.text_encoder.model}
    return {f"{p}.{k}": v.detach().clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def base_weights(handle, handle15) -> tuple:
    """The cached v1 model and 1.5 bundle with their base weights (a fuzzed LoRA stays applied until a run without
    it)."""
    model_mod.transformer_for(handle)
    bundle = v15.bundle_for(handle15)
    lora15.ensure_adapters(bundle.model, [])
    return model_mod.model_for(handle), bundle


# ---------------------------------------------------------------------------------------------------------------
# hostile values per input kind


def huge_text() -> st.SearchStrategy[str]:
    return st.builds(lambda unit, n: unit * n, st.text(ANY_CHARACTER, min_size=1, max_size=4),
                     st.sampled_from([2_000, 40_000, 300_000]))


def text_values() -> st.SearchStrategy:
    return st.one_of(st.text(ANY_CHARACTER, max_size=40), huge_text(),
                     st.sampled_from(["", " ", "\x00", "\ud800", "../../etc/passwd", "/etc/passwd", "C:\\x", "1e999"]))


def number_values(node: str, name: str, spec: dict, integer: bool) -> st.SearchStrategy:
    low, high = spec.get("min"), spec.get("max")
    costly = name in COSTLY_MAXIMA or (node, name) in COSTLY_MAXIMA
    edges = [low] if costly else [low, high]
    past = [v for v in (low - 1 if low is not None else None, high + 1 if high is not None else None) if v is not None]
    if not integer:
        past += [low - 1e-6 if low is not None else -1e308, high + 1e-6 if high is not None else 1e308]
    wild = [0, -1, 2**31, 2**63, -(2**63), 10**100, float("nan"), float("inf"), float("-inf"), 1e308, -0.0]
    fixed = st.sampled_from([v for v in edges + past + wild if v is not None])
    drawn = st.integers(-10**6, 10**6) if integer else st.floats(allow_nan=True, allow_infinity=True)
    if costly:  # small legal values and illegal ones only
        drawn = drawn.filter(lambda v: not (4 < v <= high))
    return st.one_of(fixed, drawn)


def latent_values() -> st.SearchStrategy:
    shapes = [(0, 8, 16, 5), (1, 8, 16, 0), (1, 4, 64, 64), (65, 8, 16, 2), (4096, 8, 16, 1), (1, 8, 16), (2, 8, 16, 3),
              (1, 8, 0), (4096, 8, 2), (1, 8, 15_001), (2, 8, 3)]  # the last four: 1.5 layout [B, C, T] (tiny C = 8)
    fills = [0.0, float("nan"), float("inf"), 1e30, -1e30]
    tensors = st.builds(lambda shape, fill: {"samples": torch.full(shape, fill)}, st.sampled_from(shapes),
                        st.sampled_from(fills))
    frames = [(0, 2), ("a", 3), (3, 1), (-1, 2), (0, 2**63), (float("nan"), 2), (True, 2), (None, 2)]
    marks = ["repaint", {}, {"task": "cover", "start_frame": 0, "end_frame": 2}] + [
        {"task": "repaint", "start_frame": a, "end_frame": b} for a, b in frames]
    marked = st.builds(lambda mark: {"samples": torch.zeros(1, 8, 12), "type": "audio", "acestep15": mark},
                       st.sampled_from(marks))  # 1.5 latents with a hostile Repaint Region mark
    return st.one_of(tensors, marked, st.sampled_from([None, "latent", {}, {"samples": "x"}, torch.zeros(1, 8, 16, 3)]))


def audio_values() -> st.SearchStrategy:
    def audio(shape, fill, rate):
        return {"waveform": torch.full(shape, fill), "sample_rate": rate}

    shapes = [(1, 2, 0), (1, 2, 5), (1, 0, 100), (2, 100), (1, 8, 2000), (1, 1, 3_600_000)]
    rates = [44100, 0, -1, 1, 10**9, float("nan"), 8000.5, True]
    tensors = st.builds(audio, st.sampled_from(shapes), st.sampled_from([0.1, float("nan"), float("inf"), 1e30]),
                        st.sampled_from(rates))
    return st.one_of(tensors, st.sampled_from([None, "audio", {}, {"waveform": torch.zeros(1, 2, 100)}]))


def input_values(node: str, name: str, spec: tuple) -> st.SearchStrategy | None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return st.one_of(st.sampled_from(kind), text_values()) if kind else text_values()
    if kind == "STRING":
        return text_values()
    if kind == "INT":
        return number_values(node, name, options, integer=True)
    if kind == "FLOAT":
        return number_values(node, name, options, integer=False)
    if kind == "BOOLEAN":
        return st.booleans()
    if kind == "LATENT":
        return latent_values()
    if kind == "AUDIO":
        return audio_values()
    return None  # our own sockets: only our nodes connect to them


def fuzzed_inputs(node: str) -> dict[str, st.SearchStrategy]:
    types_ = NODES[node].INPUT_TYPES()
    specs = {**types_.get("required", {}), **types_.get("optional", {})}
    return {name: s for name, spec in specs.items() if (s := input_values(node, name, spec)) is not None}


# ---------------------------------------------------------------------------------------------------------------
# the checks


class Hang(Exception):
    """A node call ran past CALL_SECONDS."""


@contextmanager
def time_limit(seconds: int):
    def expired(signum, frame):
        raise Hang(f"the call ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def finite(value) -> bool:
    """Every tensor and float reachable in a node's result is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return all(finite(v) for v in value)
    return True


def names_the_input(message: str, name: str) -> bool:
    return name in message


def check_one(node: str, base: dict, name: str, value) -> None:
    inputs = {**base, name: value}
    try:
        with time_limit(CALL_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run(node, **inputs)
    except NAMED_ERRORS as err:
        message = str(err)
        offline = isinstance(err, errors.ModelDownloadError)  # a valid download request, answered offline
        assert offline or names_the_input(message, name), \
            f"{node}.{name}={value!r:.80}: the message does not name it: {message}"
        assert "Traceback" not in message and len(message) < 4000
    except Hang:
        pytest.fail(f"{node}.{name}={value!r:.80} ran past {CALL_SECONDS} s")
    else:
        assert finite(result), f"{node}.{name}={value!r:.80}: a non-finite result"


FUZZED = [n for n in NODES if n not in SKIPPED_NODES] + [n + V15 for n in SHARED_15]


@pytest.mark.parametrize("field, value", [("bpm", 120), ("keyscale", "C major"), ("timesignature", "3"),
                                          ("language", "de")])
def test_1_5_text_fields_on_a_v1_model_are_refused_naming_the_field(handle, field, value):
    with pytest.raises(ValueError, match=f"^{field} applies to ACE-Step 1.5 models only"):
        run("AceStepTextEncode", model=handle, tags="rock", lyrics="", **{field: value})


@pytest.mark.parametrize("case", FUZZED)
def test_every_input_of_every_node_refuses_or_works(case, handle, handle15, valid):
    node = case.removesuffix(V15)
    model, bundle = base_weights(handle, handle15)
    before = snapshot(model, bundle)
    strategies = fuzzed_inputs(node)
    assert strategies, f"{node} has no input to fuzz"
    try:  # the working set works (else every example would be refused and the pass would test nothing)
        assert finite(run(node, **valid[case])), f"{case}: the working inputs give a non-finite result"
    except errors.ModelDownloadError:
        assert node == "AceStepDownload"  # a valid download request, answered offline
    except ValueError as err:
        assert node in NO_WORKING_SET and NO_WORKING_SET[node] in str(err), f"{case}: the working inputs fail: {err}"
    examples = min(MAX_EXAMPLES.get(node, 40), 4 * len(strategies) + 6)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,  # the same examples in CI
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(data=st.data())
    def fuzz(data):
        name = data.draw(st.sampled_from(sorted(strategies)), label="input")
        value = data.draw(strategies[name], label=name)
        check_one(node, valid[case], name, value)

    fuzz()
    assert model_mod.model_for(handle) is model, "the cached model was replaced or reloaded"
    assert v15.bundle_for(handle15) is bundle, "the cached 1.5 bundle was replaced or reloaded"
    now = snapshot(*base_weights(handle, handle15))
    changed = [k for k in now if not torch.equal(now[k], before[k])]
    assert not changed, f"weights changed: {changed[:5]}"


@pytest.fixture(scope="module")
def other_family(handle, handle15, valid) -> dict:
    """For each model and conditioning in the working sets, the same socket's value of the other family."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
        cond = run("AceStepTextEncode", model=handle, tags="rock", lyrics="")[0]
        cond15 = run("AceStepTextEncode", model=handle15, tags="rock", lyrics="")[0]
    return {"model": lambda v: handle if v15.is_handle(v) else handle15,
            "conditioning": lambda v: cond if v15.is_cond(v) else cond15}


def takes_our_model_or_conditioning(case: str) -> bool:
    types_ = NODES[case.removesuffix(V15)].INPUT_TYPES()
    specs = {**types_.get("required", {}), **types_.get("optional", {})}
    return any(spec[0] in OUR_SOCKETS[:2] for spec in specs.values())


@pytest.mark.parametrize("case", [c for c in FUZZED if takes_our_model_or_conditioning(c)])
def test_the_other_familys_model_or_conditioning_is_refused_naming_it(case, handle, handle15, valid, other_family):
    """Our own sockets are not fuzzed with hostile values (only our nodes make them), but a v1 value where the
    node holds 1.5 ones (or the reverse) is a wiring a user can make: refused naming the socket, or working."""
    node = case.removesuffix(V15)
    model, bundle = base_weights(handle, handle15)
    before = snapshot(model, bundle)
    swaps = [(name, other_family[kind](valid[case][name])) for name in valid[case]
             for kind in other_family if name == kind or name.endswith("_" + kind)]
    assert swaps, f"{case}: no model or conditioning in the working inputs"
    for name, value in swaps:
        check_one(node, valid[case], name, value)
    assert model_mod.model_for(handle) is model and v15.bundle_for(handle15) is bundle
    now = snapshot(*base_weights(handle, handle15))
    assert not [k for k in now if not torch.equal(now[k], before[k])], "weights changed"
