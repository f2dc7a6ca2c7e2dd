"""Reliability, second pass (docs/bad-inputs.md): what a red team broke, each with the test that would have caught it.

Long text is read in time linear in its length and refused past its limit; every count is bounded where it enters;
checkpoint and LoRA tensors with NaN, huge or integer values are refused naming the file and tensor; broken files
and texts give one clear line; a failing load evicts no cached model; Cancel is checked before every codec layer;
the command line answers each bad input at once, with exit code 2, one line and no output file.
"""
from __future__ import annotations

import importlib
import os
import random
import re
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_FOLDER, TINY_LORA, VOCAB
from comfy_fakes import Interrupted, install_interrupting_comfy
from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
nodes = sys.modules[f"{pack.__name__}.nodes"]
model_mod, cache, files_mod = nodes.model, nodes.cache, nodes.files


def core(name: str) -> types.ModuleType:
    """A module of the pack's own acestep_core (the one the nodes use)."""
    return importlib.import_module(f"{pack.__name__}.acestep_core.{name}")


audio_mod, lora_mod, loading, validation = core("audio"), core("lora"), core("loading"), core("validation")
errors, cleaners, tokenizer_mod = core("errors"), core("lyrics.cleaners"), core("lyrics.tokenizer")

TRANSFORMER_FILE = TINY_FOLDER / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"
LORA_FILE = TINY_LORA / "pytorch_lora_weights.safetensors"
FAST = dict(steps=2, scheduler="euler", cfg_type="apg", guidance_scale=15.0, omega_scale=10.0)


def run(name: str, **inputs):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


def empty(seconds: float = 1.0, batch: int = 1) -> dict:
    return run("AceStepEmptyLatent", seconds=seconds, batch_size=batch)[0]


# ---------------------------------------------------------------------------------------------------------------
# broken files: checkpoints whose transformer weights are changed, LoRAs with bad tensors


def checkpoint_copy(root: Path, name: str, change) -> Path:
    """A checkpoint folder whose transformer tensors are `change(tensors)` (the other parts link to the tiny ones)."""
    folder = root / name
    (folder / "ace_step_transformer").mkdir(parents=True)
    for part in ("music_dcae_f8c8", "music_vocoder", "umt5-base"):
        (folder / part).symlink_to(TINY_FOLDER / part)
    source = TINY_FOLDER / "ace_step_transformer"
    (folder / "ace_step_transformer" / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = change(load_file(str(TRANSFORMER_FILE)))
    if tensors is not None:
        save_file(tensors, str(folder / "ace_step_transformer" / TRANSFORMER_FILE.name))
    else:
        (folder / "ace_step_transformer" / TRANSFORMER_FILE.name).symlink_to(TRANSFORMER_FILE)
    return folder


def first_weight(tensors: dict) -> str:
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 2)[0]


def with_value(value: float):
    def change(tensors):
        key = first_weight(tensors)
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        return tensors
    return change


def as_int8(tensors):
    return {k: (v * 127).round().clamp(-127, 127).to(torch.int8) if v.is_floating_point() else v
            for k, v in tensors.items()}


def lora_copy(folder: Path, name: str, change) -> Path:
    tensors = change(load_file(str(LORA_FILE)))
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def lora_with_value(value: float):
    def change(tensors):
        key = sorted(k for k in tensors if "lora_A" in k or "lora_down" in k)[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        return tensors
    return change


def lora_rank_zero(tensors):
    out = {}
    for k, v in tensors.items():
        if "lora_A" in k or "lora_down" in k:
            out[k] = v[:0].clone()
        elif "lora_B" in k or "lora_up" in k:
            out[k] = v[:, :0].clone()
        else:
            out[k] = v
    return out


def lora_alpha(value: float):
    def change(tensors):
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
        return {**tensors, **{f"{m}.alpha": torch.tensor(value) for m in modules}}
    return change


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "ace_step").mkdir()
    (root / "ace_step" / "acestep-v1-tiny").symlink_to(TINY_FOLDER)
    bad = root / "ace_step" / "bad"
    checkpoint_copy(bad, "nan", with_value(float("nan")))
    checkpoint_copy(bad, "inf", with_value(float("inf")))
    checkpoint_copy(bad, "huge", with_value(1e30))
    checkpoint_copy(bad, "int8", as_int8)
    (checkpoint_copy(bad, "config-not-json", lambda t: None) / "ace_step_transformer" / "config.json").write_text("{nope")
    (checkpoint_copy(bad, "config-a-list", lambda t: None) / "ace_step_transformer" / "config.json").write_text("[1, 2]")
    loras = root / "loras"
    loras.mkdir()
    (loras / "acestep-v1-tiny-lora").symlink_to(TINY_LORA)
    lora_copy(loras, "nan", lora_with_value(float("nan")))
    lora_copy(loras, "huge", lora_with_value(1e30))
    lora_copy(loras, "rank-0", lora_rank_zero)
    lora_copy(loras, "nan-alpha", lora_alpha(float("nan")))
    lora_copy(loras, "overflowing-alpha", lambda t: lora_alpha(3e38)({k: v * 1000 for k, v in t.items()}))
    data = LORA_FILE.read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    (loras / "loop").symlink_to(loras)  # a symlink loop inside a model folder
    return root


@pytest.fixture(autouse=True)
def environment(monkeypatch, models_dir):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))


@pytest.fixture(scope="module")
def handle(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_MODELS_DIR", str(models_dir))
        (loaded,) = run("AceStepLoader", checkpoint="ace_step/acestep-v1-tiny", dtype="fp32", device="cpu")
        yield loaded


@pytest.fixture(scope="module")
def cond(handle):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
        return run("AceStepTextEncode", model=handle, tags="rock, guitar", lyrics="[verse]\nhello there")[0]


def snapshot(model) -> dict[str, torch.Tensor]:
    parts = {"transformer": model.transformer, "dcae": model.dcae, "vocoder": model.vocoder, "text": model.text_encoder}
    return {f"{p}.{k}": v.detach().clone() for p, m in parts.items() for k, v in m.state_dict().items()}


@pytest.fixture
def untouched(handle):
    """After the test: the same cached model, no LoRA applied, every weight bit-identical."""
    model_mod.transformer_for(handle)
    model = model_mod.model_for(handle)
    before = snapshot(model)
    yield
    assert model_mod.model_for(handle) is model, "the cached model was replaced or reloaded"
    model_mod.transformer_for(handle)  # base weights again (a LoRA stays applied until a run without it)
    now = snapshot(model)
    changed = [k for k in now if not torch.equal(now[k], before[k])]
    assert not changed, f"weights changed: {changed[:5]}"


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("name,match", [
    ("nan", r"bad/nan/ace_step_transformer/diffusion_pytorch_model\.safetensors: tensor '[^']+' contains NaN values"),
    ("inf", r"bad/inf/ace_step_transformer/diffusion_pytorch_model\.safetensors: tensor '[^']+' contains infinite"),
    ("huge", r"bad/huge/.*: tensor '[^']+' contains huge values \(from .* to 1e\+30"),
    ("int8", r"bad/int8/.*: tensor '[^']+' is stored as int8, not floating point; quantized"),
    ("config-not-json", r"config-not-json/ace_step_transformer/config\.json is not valid JSON"),
    ("config-a-list", r"config-a-list/ace_step_transformer/config\.json must hold a JSON object of settings, got list"),
])
def test_broken_checkpoints_are_refused_naming_file_and_tensor(handle, untouched, name, match):
    with pytest.raises(errors.CheckpointError, match=match):
        run("AceStepLoader", checkpoint=f"ace_step/bad/{name}", dtype="fp32", device="cpu")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_weights_past_a_half_precision_range_are_refused_when_loaded_in_it(handle, untouched, dtype):
    """1e30 fits fp32 but not fp16 (inf) nor... bf16 holds it: either way the check runs on the loaded values."""
    with pytest.raises(errors.CheckpointError, match=r"bad/huge/.*contains (huge|infinite) values"):
        run("AceStepLoader", checkpoint="ace_step/bad/huge", dtype=dtype, device="cpu")


def test_a_failing_load_evicts_no_cached_model(handle, models_dir, untouched):
    models = cache.ModelCache(capacity=1)
    model = model_mod.model_for(handle)
    models.get(handle.key, lambda: model)
    bad = cache.ModelKey(str(models_dir / "ace_step" / "bad" / "nan"), "float32", "cpu")
    with pytest.raises(errors.CheckpointError, match="contains NaN"):
        models.get(bad, lambda: model_mod._load(bad))
    assert models.keys() == [handle.key]
    assert models.get(handle.key, lambda: pytest.fail("the working model was evicted by a failing load")) is model
    other = cache.ModelKey("/elsewhere", "float32", "cpu")
    replacement = object()
    assert models.get(other, lambda: replacement) is replacement and models.keys() == [other]  # evicted after


@pytest.mark.parametrize("repo_id,match", [
    ("a" * 150 + "/" + "b" * 150, "is neither a local path nor a valid Hugging Face repo id"),
    ("x" * 300, "cannot be a path: File name too long"),
    ("ACE-Step/a..b", "is neither a local path nor a valid Hugging Face repo id"),
    ("ACE-Step./v1", "is neither a local path nor a valid Hugging Face repo id"),
    ("ACE-Step/..", "not found: expected a folder with"),
    ("../ACE-Step-v1-3.5B", "not found: expected a folder with"),
    ("ACE-Step/a--b", "is neither a local path nor a valid Hugging Face repo id"),
    ("a\x00b/c", "cannot contain a NUL character"),
])
def test_repo_ids_that_cannot_exist_are_refused_without_a_download(monkeypatch, repo_id, match):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the network"))
    with pytest.raises(errors.CheckpointError, match=re.escape(match)):
        loading.load_acestep(repo_id, models_dir="/nonexistent-models")


@pytest.mark.parametrize("repo_id", ["ACE-Step/a..b", "ACE-Step/-x", "a" * 200 + "/b", "ACE-Step/x--y"])
def test_the_loader_and_download_nodes_refuse_impossible_repo_ids_without_a_download(monkeypatch, repo_id):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the network"))
    with pytest.raises(ValueError, match="is not a Hugging Face repo id"):
        run("AceStepLoader", checkpoint="ace_step/acestep-v1-tiny", dtype="fp32", device="cpu", repo_id=repo_id)
    target = NODES["AceStepDownload"].INPUT_TYPES()["required"]["target"][0][0]
    with pytest.raises(ValueError, match="is not a Hugging Face repo id"):
        run("AceStepDownload", repo_id=repo_id, target=target)


# ---------------------------------------------------------------------------------------------------------------
# LoRAs


@pytest.mark.parametrize("name,honour_alpha,match", [
    ("nan", False, r"nan\.safetensors cannot be read: \S+ A contains NaN values"),
    ("huge", False, r"huge\.safetensors cannot be read: .* contains huge values"),
    ("rank-0", False, r"rank-0\.safetensors cannot be read: .*: rank 0 \(A \(0, "),
    ("nan-alpha", True, r"nan-alpha\.safetensors cannot be read: .*: alpha must be a finite number, got nan"),
    ("truncated", False, r"truncated\.safetensors cannot be read as safetensors \(.*\); it is truncated or corrupt"),
])
def test_broken_loras_are_refused_naming_the_file(handle, cond, untouched, name, honour_alpha, match):
    def use():
        (lora,) = run("AceStepLoraLoader", model=handle, lora_name=f"{name}.safetensors", strength=1.0,
                      honour_alpha=honour_alpha)
        run("AceStepSampler", model=lora, conditioning=cond, latent=empty(), seed=1, **FAST)

    with pytest.raises(ValueError, match=match):
        use()


def test_a_lora_whose_scale_overflows_the_weights_is_refused_and_nothing_is_applied(handle, cond, untouched):
    (lora,) = run("AceStepLoraLoader", model=handle, lora_name="overflowing-alpha.safetensors", strength=1.0,
                  honour_alpha=True)  # finite values and alpha, but alpha/r * B·A is past float32
    with pytest.raises(ValueError, match=r"LoRA makes weight \S+ non-finite .*; nothing was applied"):
        run("AceStepSampler", model=lora, conditioning=cond, latent=empty(), seed=1, **FAST)
    assert lora_mod.lora_state(model_mod.model_for(handle).transformer).signature == ()


# ---------------------------------------------------------------------------------------------------------------
# counts bounded where they enter


def test_counts_past_their_limits_are_refused_naming_the_input(handle, cond, untouched):
    latent = empty(1.0)
    sampler = dict(model=handle, conditioning=cond, seed=1, **FAST)
    cases = [
        (lambda: run("AceStepSampler", **{**sampler, "latent": latent, "steps": 10**9}),
         r"steps must be an integer >= 1 and <= 1000, got 1000000000"),
        (lambda: run("AceStepSampler", **{**sampler, "latent": {"samples": torch.zeros(128, 8, 16, 5)}}),
         r"latent has a batch of 128; ACE-Step takes 1 to 64"),
        (lambda: run("AceStepSampler", **{**sampler, "latent": {"samples": torch.zeros(4096, 8, 16, 1)}}),
         r"latent has a batch of 4096"),
        (lambda: run("AceStepFlowEdit", model=handle, source_conditioning=cond, target_conditioning=cond,
                     latent=latent, seed=1, steps=2, guidance_scale=15.0, scheduler="euler", n_min=0.0, n_max=1.0,
                     n_avg=17), r"n_avg must be an integer >= 1 and <= 16, got 17"),
        (lambda: run("AceStepEmptyLatent", seconds=1.0, batch_size=65), "batch"),
    ]
    defaults = {n: spec[1]["default"] for n, spec in NODES["AceStepSamplerOptions"].INPUT_TYPES()["required"].items()}
    cases.append((lambda: run("AceStepSamplerOptions", **{**defaults, "oss_steps": "1, 1000000000"}),
                  r"oss_steps must be step numbers from 1 to 1000"))
    cases.append((lambda: run("AceStepSamplerOptions", **{**defaults, "oss_steps": "9" * 5000}),
                  r"oss_steps must be comma-separated integers"))
    for call, match in cases:
        started = time.monotonic()
        with pytest.raises(ValueError, match=match):
            call()
        assert time.monotonic() - started < 5, f"refusing {match!r} took too long"


def test_pipeline_requests_are_bounded_before_any_work(handle, untouched):
    pipeline = core("pipeline")
    model = model_mod.model_for(handle)
    for request, match in [
        (pipeline.Request(prompt="rock", audio_duration=1.0, infer_step=10**9), "steps must be an integer"),
        (pipeline.Request(prompt="rock", audio_duration=1.0, infer_step=2, batch_size=65), "batch_size must be"),
        (pipeline.Request(prompt="rock", task="edit", infer_step=2, edit_n_avg=10**6), "edit_n_avg must be"),
        (pipeline.Request(prompt="rock", task="repaint", infer_step=2, repaint_end=float("inf")), "repaint_end"),
        (pipeline.Request(prompt="rock", task="extend", infer_step=2, repaint_start=-1e300), "repaint_start"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipeline.generate(model, request, decode=False)


# ---------------------------------------------------------------------------------------------------------------
# text: linear time, bounded length, valid Unicode


@pytest.fixture(scope="module")
def lyric_tokenizer():
    """The lyric tokenizer with every lazily loaded helper (langid model, pypinyin, num2words, ...) already loaded."""
    tokenizer = tokenizer_mod.LyricTokenizer(VOCAB)
    tokenizer.encode("hello 12th world 3.5\n我爱你 2\n사랑해\nпривет\nbonjour à tous\nhola amigos\nنحن")
    return tokenizer


SECONDS_PER_CHARACTER = 400e-6  # far above the real cost (about 10-150 us), far below a quadratic one at 20k
LONG_TEXT = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])
ANY_CHARACTER = st.characters(blacklist_categories=())  # surrogates included


@LONG_TEXT
@given(unit=st.text(ANY_CHARACTER, min_size=1, max_size=12),
       size=st.sampled_from([10, 300, 3_000, 19_000, 25_000, 1_000_000]),
       newlines=st.booleans())
def test_any_lyrics_up_to_a_megabyte_are_encoded_or_refused_in_linear_time(lyric_tokenizer, unit, size, newlines):
    """Built from a repeated unit: the shape (one very long line, or many) that made language detection quadratic."""
    text = (unit * (size // len(unit) + 1))[:size]
    if newlines:
        text = "\n".join(text[i:i + 500] for i in range(0, len(text), 500))
    lyric_tokenizer._encode_line.cache_clear()
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = lyric_tokenizer.encode(text)
    except ValueError as err:
        assert "lyrics" in str(err)
        assert len(text) > validation.MAX_LYRICS_CHARS or any("\ud800" <= c <= "\udfff" for c in text)
    else:
        assert len(text) <= validation.MAX_LYRICS_CHARS and all(0 <= i < tokenizer_mod.VOCAB_SIZE for i in ids)
    elapsed = time.perf_counter() - started
    assert elapsed <= 1.0 + SECONDS_PER_CHARACTER * len(text), f"{len(text)} characters took {elapsed:.1f} s"


def test_the_slowest_known_lines_stay_linear(lyric_tokenizer):
    """Mixed scripts, digit runs and script switches: the inputs whose cost grew with the square of a line."""
    marks = random.Random(5)
    for unit in ("안a", "我a", "1a", "1", "12.5", "Жa", "ไa", "'a", "こa", "a"):
        # 8 lines of 1200 characters: the unit, with 3 random letters every 40 so that no two pieces are alike
        # (the tokenizer caches pieces it has seen)
        lines = ["".join((unit * 40)[:37] + "".join(marks.choices("xyzq", k=3)) for _ in range(30)) for _ in range(8)]
        text = "\n".join(lines)
        lyric_tokenizer._encode_line.cache_clear()
        started = time.perf_counter()
        with pytest.warns(UserWarning, match=r"lyrics line 1 \(.*\) is 1200 characters long: it is read as \d+ lines"):
            lyric_tokenizer.encode(text)
        elapsed = time.perf_counter() - started
        assert elapsed <= 1.0 + SECONDS_PER_CHARACTER * len(text), f"{unit!r} lines took {elapsed:.1f} s"


@settings(max_examples=60, deadline=None)
@given(line=st.text(st.sampled_from("ab  c\t1"), max_size=600), limit=st.integers(1, 200))
def test_long_lines_are_split_at_spaces_into_bounded_pieces(line, limit):
    line = line.strip()
    pieces = tokenizer_mod.split_long_line(line, limit) if line else []
    assert all(0 < len(p) <= limit and p == p.strip() for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(line.split())  # only whitespace is lost, at the cuts
    if line and len(line) <= limit:
        assert pieces == [line]


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("0123456789.,stndrhéèºª-йe ab"), max_size=60))
def test_number_patterns_anchored_at_digit_runs_match_the_official_ones(text):
    """The (?<![0-9]) prefix (linear time) gives exactly the official substitutions."""
    official_decimal = re.compile(r"([0-9]+[.,][0-9]+)")
    assert cleaners._DECIMAL_RE.sub("<D>", text) == official_decimal.sub("<D>", text)
    for lang, pattern in cleaners._ORDINAL_RES.items():
        official = re.compile(pattern.pattern.removeprefix(cleaners._RUN_START))
        assert pattern.sub(r"<\1|\2>" if pattern.groups > 1 else r"<\1>", text) == \
            official.sub(r"<\1|\2>" if official.groups > 1 else r"<\1>", text), lang


def test_normal_lines_are_not_split(lyric_tokenizer):
    line = "we sing along " * 9  # 126 characters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = lyric_tokenizer.encode(line)
    assert ids == [tokenizer_mod.START_ID, *lyric_tokenizer._encode_line(line.strip()), tokenizer_mod.SEPARATOR_ID]


@pytest.mark.parametrize("field", ["tags", "lyrics"])
def test_lone_surrogates_and_huge_texts_are_refused_naming_the_field(handle, untouched, field):
    text = {"tags": "rock", "lyrics": "[verse]\nhello"}
    with pytest.raises(ValueError, match=rf"{field} contain the lone surrogate code point U\+D800 at character 3"):
        run("AceStepTextEncode", model=handle, **{**text, field: "ab\ud800cd"})
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"{field} are 1000000 characters long; at most \d+ are accepted"):
        run("AceStepTextEncode", model=handle, **{**text, field: "la " * 333_333 + "a"})
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------------------------------------------------------
# cancel inside the codec's model calls


@pytest.fixture
def comfy(monkeypatch):
    """Fake `comfy.utils` / `comfy.model_management`: the interrupt check raises once `interrupt_at` checks ran."""
    return install_interrupting_comfy(monkeypatch)


def test_cancel_is_checked_before_every_layer_of_the_decoder_and_vocoder(handle, comfy, monkeypatch, untouched):
    """A decode on a long song is seconds of work in one DCAE call: Cancel is checked before every layer of it."""
    model = model_mod.model_for(handle)
    latent = {"samples": torch.randn(1, 8, 16, 20) * 0.5, "type": "audio"}
    events: list[str] = []  # module names as their forward starts, and CHECK for every cancel check
    mm = sys.modules["comfy.model_management"]
    check = mm.throw_exception_if_processing_interrupted
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", lambda: events.append("CHECK") or check())
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=f"{label}.{n}": events.append(name))
             for label, part in (("dcae", model.dcae), ("vocoder", model.vocoder)) for n, m in part.named_modules()]
    try:
        (reference,) = run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")
        calls = [e for e in events if e != "CHECK"]
        assert events.count("CHECK") >= len(calls) > 20, "fewer cancel checks than layer calls"
        total = events.count("CHECK")
        for stop_at, part in ((3, "dcae."), (total - 2, "vocoder.")):  # inside the DCAE decoder, inside the vocoder
            events.clear()
            comfy.interrupt_at = comfy.checks + stop_at
            with pytest.raises(Interrupted):
                run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")
            assert events[-1] == "CHECK" and events.count("CHECK") == stop_at, "a layer ran after the cancel"
            assert [e for e in events if e != "CHECK"][-1].startswith(part), events[-5:]
    finally:
        for hook in hooks:
            hook.remove()
    (again,) = run("AceStepDecode", model=handle, latent=latent, sample_rate="44100")
    assert torch.equal(again["waveform"], reference["waveform"]), "a cancelled decode changed the next one"


def test_cancel_is_checked_before_every_layer_of_a_sampling_step(handle, cond, comfy, monkeypatch, untouched):
    """One step of the 3.5B model on a long song is seconds of CPU work: Cancel is checked inside the step too."""
    model = model_mod.model_for(handle)
    events: list[str] = []
    mm = sys.modules["comfy.model_management"]
    check = mm.throw_exception_if_processing_interrupted
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", lambda: events.append("CHECK") or check())
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: events.append(name))
             for n, m in model.transformer.named_modules()]
    inputs = dict(model=handle, conditioning=cond, latent=empty(1.0), seed=1, **FAST)
    try:
        (reference,) = run("AceStepSampler", **inputs)
        calls = [e for e in events if e != "CHECK"]
        assert events.count("CHECK") >= len(calls) > 50, "fewer cancel checks than layer calls"
        stop_at = events.count("CHECK") // 4  # inside the first step
        events.clear()
        comfy.interrupt_at = comfy.checks + stop_at
        with pytest.raises(Interrupted):
            run("AceStepSampler", **inputs)
        assert events[-1] == "CHECK" and events.count("CHECK") == stop_at, "a layer ran after the cancel"
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(run("AceStepSampler", **inputs)[0]["samples"], reference["samples"])


# ---------------------------------------------------------------------------------------------------------------
# cosmetic


def test_a_symlink_loop_in_a_model_folder_lists_each_file_once(models_dir):
    listing = files_mod.loras()
    assert not any("loop" in name for name in listing), f"entries repeated through the loop: {sorted(listing)}"
    assert "acestep-v1-tiny-lora" in listing and "nan.safetensors" in listing


def test_audio_just_past_ten_minutes_is_named_in_seconds():
    with pytest.raises(ValueError, match=r"audio is 601\.0 seconds long; ACE-Step encodes at most 10 minutes"):
        audio_mod.check_source_duration(601 * 1000, 1000)
    with pytest.raises(ValueError, match=r"audio is 60\.0 minutes long"):
        audio_mod.check_source_duration(3600 * 1000, 1000)


# ---------------------------------------------------------------------------------------------------------------
# the command line: each bad input answered at once, exit code 2, one line naming it, no traceback, no file


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    big = root / "one-line.txt"
    big.write_text("la " * 333_333 + "a", encoding="utf-8")  # 1,000,000 characters, one line
    loras = root / "loras"
    loras.mkdir()
    data = LORA_FILE.read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    not_audio = root / "notes.wav"
    not_audio.write_text("these are not samples")
    return {
        "big": big,
        "nan": checkpoint_copy(root / "ckpt", "nan", with_value(float("nan"))),
        "int8": checkpoint_copy(root / "ckpt", "int8", as_int8),
        "nan_lora": lora_copy(loras, "nan", lora_with_value(float("nan"))),
        "rank0_lora": lora_copy(loras, "rank-0", lora_rank_zero),
        "truncated_lora": loras / "truncated.safetensors",
        "not_audio": not_audio,
    }


CLI_CASES = {
    "1 MB single-line lyric": (["--lyrics", "@{big}"], r"lyrics file '.*one-line\.txt' is 1000000 bytes long"),
    "steps 10**9": (["--steps", str(10**9)], r"--steps must be an integer >= 1 and <= 1000, got 1000000000"),
    "NaN checkpoint": (["--checkpoint", "{nan}"], r"nan/ace_step_transformer/.*: tensor '.*' contains NaN values"),
    "int8 checkpoint": (["--checkpoint", "{int8}"], r"int8/ace_step_transformer/.*: tensor '.*' is stored as int8"),
    "NaN LoRA": (["--lora", "{nan_lora}"], r"LoRA .*nan\.safetensors cannot be read: .* contains NaN values"),
    "rank-0 LoRA": (["--lora", "{rank0_lora}"], r"LoRA .*rank-0\.safetensors cannot be read: .*rank 0"),
    "truncated LoRA": (["--lora", "{truncated_lora}"], r"LoRA file .*truncated\.safetensors cannot be read as safetensors"),
    "surrogate in the tags": (["--tags", b"rock \xff guitar"], r"tags contain the lone surrogate code point U\+DCFF"),
    "--out x.txt": (["--out", "{out_dir}/x.txt"], r"--out '.*x\.txt': the file name must end in \.wav, \.flac"),
    "unreadable source audio": (["--task", "repaint", "--repaint-end", "0.5", "--src-audio", "{not_audio}"],
                                r"audio file '.*notes\.wav' cannot be read as audio"),
}


@pytest.fixture(scope="module")
def cli_answers(cli_files, tmp_path_factory) -> dict[str, tuple[int, str, float, Path]]:
    """Every case run at once as `python -m acestep_core generate` (rc, stderr, seconds, output folder)."""
    running = {}
    for case, (extra, _) in CLI_CASES.items():
        out_dir = tmp_path_factory.mktemp("out")
        values = {**{k: str(v) for k, v in cli_files.items()}, "out_dir": str(out_dir)}
        args = [a.format(**values) if isinstance(a, str) else a for a in extra]
        base = ["--tags", "rock", "--duration", "1", "--steps", "2", "--checkpoint", str(TINY_FOLDER),
                "--lyric-vocab", str(VOCAB), "--device", "cpu", "--out", str(out_dir / "song.wav"), "--seed", "1"]
        command = [sys.executable, "-m", "acestep_core", "generate", *base, *args]  # later flags win
        env = {**os.environ, "ACESTEP_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
        env.pop("ACESTEP_TRACEBACK", None)
        running[case] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
                         time.monotonic(), out_dir)
    answers = {}
    for case, (process, started, out_dir) in running.items():
        try:
            _, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        answers[case] = (process.returncode, stderr.decode("utf-8", "replace"), time.monotonic() - started, out_dir)
    return answers


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_command_line_answers_a_bad_input_at_once_in_one_line(cli_answers, case):
    rc, stderr, seconds, out_dir = cli_answers[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, f"exit code {rc}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors_shown = [line for line in lines if line.startswith("error:")]
    assert len(errors_shown) == 1 and re.search(CLI_CASES[case][1], errors_shown[0]), stderr[-3000:]
    assert seconds < 120, f"took {seconds:.0f} s (all {len(CLI_CASES)} cases run at once on a shared machine)"
    assert not any(out_dir.iterdir()), f"an output file was written: {list(out_dir.iterdir())}"
