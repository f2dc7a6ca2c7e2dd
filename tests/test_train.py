"""Training (design §11): objective pieces, data, cache, LoRA layers and the trainer end to end on the tiny checkpoint."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, TINY_FOLDER, VOCAB, Case, case_params
from safetensors import safe_open

from acestep_core.loading import load_acestep
from acestep_core.lora import OFFICIAL_FILENAME, ensure_loras, load_lora_file, lora_state
from acestep_core.sampling.schedules import flow_shift
from acestep_core.train import cache as cache_module
from acestep_core.train.__main__ import build_parser
from acestep_core.train.__main__ import main as train_main
from acestep_core.train.checkpoint import checkpoint_params
from acestep_core.train.convert import main as convert_main
from acestep_core.train.dataset import (
    Record,
    choose_prompt,
    load_training_audio,
    prompt_variants,
    read_records,
    records_from_jsonl,
    training_lyric_ids,
)
from acestep_core.train.lora_layers import LinearLora, LoraSpec, inject_lora, load_lora_parameters
from acestep_core.train.objective import (
    Conditions,
    add_noise,
    denoising_loss,
    drop_conditions,
    repa_loss,
    sample_sigmas,
    training_forward,
    training_sigmas,
)
from acestep_core.train.repa import ChunkedSSLExtractor, MultiSSLExtractor
from acestep_core.train.trainer import TrainConfig, lr_factor, train

LORA_CONFIG = {"r": 4, "lora_alpha": 8, "use_rslora": True,
               "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "linear_q", "speaker_embedder", "final_layer.linear"]}
TONES = ((220.0, 2.5, "[verse]\nhello world\nsing along"), (330.0, 3.0, ""), (440.0, 2.0, "[chorus]\nla la la"))


def _write_tone(path: Path, freq: float, seconds: float, rate: int = 44100, channels: int = 2) -> None:
    t = np.arange(int(rate * seconds)) / rate
    wave = np.stack([np.sin(2 * np.pi * freq * (1 + 0.5 * c) * t) for c in range(channels)], axis=1) * 0.3
    soundfile.write(str(path), wave.astype(np.float32), rate)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Three short stereo tones with official sidecars, a one-record JSONL repeated 4 times, a LoRA config."""
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    data.mkdir()
    for i, (freq, seconds, lyrics) in enumerate(TONES):
        _write_tone(data / f"tone{i}.wav", freq, seconds)
        (data / f"tone{i}_prompt.txt").write_text("pop, piano, upbeat, female vocals", encoding="utf-8")
        (data / f"tone{i}_lyrics.txt").write_text(lyrics, encoding="utf-8")
    record = read_records(data)[0]
    (root / "single.jsonl").write_text("\n".join(json.dumps(record.to_json()) for _ in range(8)) + "\n")
    (root / "lora.json").write_text(json.dumps(LORA_CONFIG))
    return root


def _config(workspace: Path, dataset: str, name: str, **overrides) -> TrainConfig:
    values = dict(dataset_path=str(workspace / dataset), checkpoint_dir=str(TINY_FOLDER), lyric_vocab=str(VOCAB),
                  lora_config_path=str(workspace / "lora.json"), cache_dir=str(workspace / "cache"),
                  logger_dir=str(workspace / "logs" / name), exp_name=name, num_workers=0, every_plot_step=0,
                  every_n_train_steps=0, gradient_checkpointing=False, log_every_n_steps=1000)
    values.update(overrides)
    return TrainConfig(**values)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model is overhead-bound and the CI machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def transformer():
    return load_acestep(TINY_FOLDER, components=("transformer",)).transformer


def _inputs(transformer, batch: int = 2, frames: int = 12, seed: int = 0) -> tuple[torch.Tensor, Conditions, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(batch, 8, 16, frames, generator=g)
    lyric_mask = torch.ones(batch, 7, dtype=torch.long)
    lyric_mask[-1, 5:] = 0                                                     # a padded lyric sequence
    cond = Conditions(torch.randn(batch, 5, cfg.text_embedding_dim, generator=g), torch.ones(batch, 5, dtype=torch.long),
                      torch.randn(batch, cfg.speaker_embedding_dim, generator=g),
                      torch.randint(0, 6000, (batch, 7), generator=g), lyric_mask)
    return x, cond, torch.tensor([900.0, 120.0][:batch])


def _velocity(model, x, cond, timestep) -> torch.Tensor:
    return model(x, torch.ones(x.shape[0], x.shape[-1]), cond.text_states, cond.text_mask, cond.speaker,
                 cond.lyric_ids, cond.lyric_mask, timestep)


# ---------------------------------------------------------------------------------------------------------------
# objective


@pytest.mark.parametrize("case_dir", case_params("scheduler_timesteps"))
def test_training_sigma_table_ends_match_official_scheduler(case_dir: Path) -> None:
    case = Case(case_dir)
    for schedule in case.args["schedules"]:
        if schedule["sigma_max"] != 1.0:
            continue
        table = training_sigmas(schedule["shift"])
        assert table[0].item() == pytest.approx(schedule["scheduler_sigma_max_attr"], abs=1e-7)
        assert table[-1].item() == pytest.approx(schedule["scheduler_sigma_min_attr"], abs=1e-7)


def test_sigma_sampling_is_logit_normal_through_the_table() -> None:
    table = training_sigmas(3.0)
    assert table.shape == (1000,) and bool((table[1:] < table[:-1]).all())
    torch.testing.assert_close(table[500], flow_shift(torch.tensor(0.5), 3.0), rtol=0, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    u = torch.normal(0.0, 1.0, size=(4096,), generator=torch.Generator().manual_seed(0))
    expected = table[(torch.sigmoid(u) * 1000).long().clamp(0, 999)]
    torch.testing.assert_close(sample_sigmas(4096, table, g), expected, rtol=0, atol=0)


def test_loss_is_sigma_squared_weighted_velocity_mse_and_masked() -> None:
    g = torch.Generator().manual_seed(1)
    x0, noise, v = (torch.randn(2, 8, 16, 10, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 0.8])
    x_sigma = add_noise(x0, noise, sigma)
    torch.testing.assert_close(x_sigma[1], 0.8 * noise[1] + 0.2 * x0[1])
    loss = denoising_loss(v, x_sigma, x0, sigma, torch.ones(2, 10))
    weighted = sigma**2 * ((v - (noise - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, weighted, rtol=1e-5, atol=1e-6)
    mask = torch.ones(2, 10)
    mask[:, 6:] = 0
    garbage = v.clone()
    garbage[..., 6:] = 1e3
    torch.testing.assert_close(denoising_loss(garbage, x_sigma, x0, sigma, mask), denoising_loss(v, x_sigma, x0, sigma, mask))


def test_condition_dropout_zeroes_each_condition_independently(transformer) -> None:
    _, cond, _ = _inputs(transformer, batch=2)
    g = torch.Generator().manual_seed(0)
    dropped = drop_conditions(cond, g, text=1.0, speaker=0.0, lyrics=1.0)
    assert not dropped.text_states.any() and torch.equal(dropped.text_mask, cond.text_mask)
    assert torch.equal(dropped.speaker, cond.speaker)
    assert not dropped.lyric_ids.any() and not dropped.lyric_mask.any()
    kept = drop_conditions(cond, g, text=0.0, speaker=1.0, lyrics=0.0)
    assert torch.equal(kept.text_states, cond.text_states) and not kept.speaker.any()


def test_training_forward_equals_transformer_forward(transformer) -> None:
    x, cond, timestep = _inputs(transformer, frames=8)
    with torch.no_grad():
        reference = transformer(x, None, cond.text_states, cond.text_mask, cond.speaker, cond.lyric_ids, cond.lyric_mask,
                                timestep)
    plain, hidden = training_forward(transformer, x, torch.ones(2, 8), cond, timestep, checkpointing=True,
                                     capture_block=8)
    torch.testing.assert_close(plain, reference, rtol=0, atol=1e-6)
    assert hidden.shape == (2, 8, transformer.config.inner_dim) and plain.requires_grad is False


def test_repa_loss_is_zero_for_aligned_features_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    estimate = torch.randn(1, 10, 6, generator=g)
    aligned = repa_loss([estimate], [[estimate[0] * 3.0]], torch.ones(1, 10))[0]
    assert aligned.item() == pytest.approx(0.0, abs=1e-6)
    other = repa_loss([estimate], [[torch.randn(25, 6, generator=g)]], torch.ones(1, 10))[0]
    assert 0.0 < other.item() < 2.0


def test_official_lr_schedule() -> None:
    assert lr_factor(0, 10, 100) == 0.0 and lr_factor(5, 10, 100) == 0.5
    assert lr_factor(10, 10, 100) == 1.0 and lr_factor(55, 10, 100) == 0.5 and lr_factor(100, 10, 100) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# LoRA layers


def test_lora_targets_follow_peft_suffix_matching(transformer) -> None:
    model = load_acestep(TINY_FOLDER, components=("transformer",)).transformer
    layers = inject_lora(model, LoraSpec.from_mapping(LORA_CONFIG))
    blocks, conformer = transformer.config.num_layers, len(transformer.lyric_encoder.encoders)
    assert len(layers) == blocks * 8 + conformer + 2                    # + speaker_embedder, final_layer.linear
    assert "transformer_blocks.3.cross_attn.to_out.0" in layers and "speaker_embedder" in layers
    assert not any(n.endswith(("linear_pos", "linear_out", "add_q_proj")) for n in layers)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    regex = inject_lora(load_acestep(TINY_FOLDER, components=("transformer",)).transformer,
                        LoraSpec.from_mapping({"r": 2, "target_modules": r"transformer_blocks\.0\.attn\.to_q"}))
    assert list(regex) == ["transformer_blocks.0.attn.to_q"]
    with pytest.raises(ValueError, match="match no module"):
        inject_lora(model, LoraSpec.from_mapping({"r": 2, "target_modules": ["no_such_layer"]}))
    with pytest.raises(ValueError, match="use_dora"):
        LoraSpec.from_mapping({**LORA_CONFIG, "use_dora": True})


def test_lora_layer_starts_as_identity_and_scales_like_peft() -> None:
    base = torch.nn.Linear(6, 5)
    layer = LinearLora(base, rank=4, scale=LoraSpec(r=4, lora_alpha=8, use_rslora=True).scale)
    assert layer.scale == 4.0 and isinstance(layer, torch.nn.Linear)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))
    torch.nn.init.normal_(layer.lora_B.weight)
    delta = layer.lora_B.weight @ layer.lora_A.weight * 4.0
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T)


# ---------------------------------------------------------------------------------------------------------------
# data


def test_folder_records_and_converter(workspace: Path, tmp_path: Path) -> None:
    records = read_records(workspace / "data")
    assert [r.keys for r in records] == ["tone0", "tone1", "tone2"]
    assert records[0].tags == ("pop", "piano", "upbeat", "female vocals") and records[1].norm_lyrics == ""
    assert convert_main([str(workspace / "data"), str(tmp_path / "out.jsonl"), "--repeat_count", "2"]) == 0
    converted = records_from_jsonl(tmp_path / "out.jsonl")
    assert converted == records * 2
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text("{}")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="optional 'datasets' package"):
            read_records(tmp_path / "hf")


def test_training_audio_is_stereo_48k_padded_and_silence_dropped(tmp_path: Path) -> None:
    _write_tone(tmp_path / "mono.wav", 300.0, 1.0, rate=22050, channels=1)
    audio = load_training_audio(tmp_path / "mono.wav")
    assert audio.shape == (2, 48000 * 3) and torch.equal(audio[0], audio[1])
    assert audio[:, 48000 + 100:].abs().max() == 0 and audio[:, :48000].abs().max() > 0.2
    soundfile.write(str(tmp_path / "silent.wav"), np.zeros((44100 * 4, 2), np.float32), 44100)
    assert load_training_audio(tmp_path / "silent.wav") is None


def test_prompt_variants_and_official_choice_odds() -> None:
    record = Record("k", "f.wav", ("a", "b", "c"), recaption={"simplified": "short", "expanded": "", "analysis": "x" * 300})
    recaptions, tags = prompt_variants(record, shuffles=4, seed=0)
    assert recaptions == ["short", "x" * 256] and tags[0] == "a, b, c" and len(set(tags)) == 4
    assert all(sorted(t.split(", ")) == ["a", "b", "c"] for t in tags)
    rng = random.Random(0)
    picks = [choose_prompt(2, 4, rng) for _ in range(3000)]
    assert abs(sum(p >= 2 for p in picks) / 3000 - 1 / 3) < 0.04


def test_training_lyric_ids_conventions() -> None:
    from acestep_core.lyrics import LyricTokenizer

    tokenizer = LyricTokenizer(VOCAB)
    assert training_lyric_ids(tokenizer, "") == ([0], [1])
    assert training_lyric_ids(tokenizer, "write a happy song that genre is pop") == ([0], [1])
    ids, mask = training_lyric_ids(tokenizer, "[verse]\nhello")
    assert ids == tokenizer.encode("[verse]\nhello") and mask == [1] * len(ids)


# ---------------------------------------------------------------------------------------------------------------
# trainer


@pytest.fixture(scope="module")
def counted_run(workspace: Path):
    """Two epochs over three items (batch 3) with every DCAE / UMT5 encode counted, then a cache-only second run."""
    calls = {"audio": 0, "text": 0}
    original_audio = cache_module.encode_audio
    from acestep_core.text import TextEncoder

    original_text = TextEncoder.encode

    def audio(*args, **kwargs):
        calls["audio"] += 1
        return original_audio(*args, **kwargs)

    def text(self, *args, **kwargs):
        calls["text"] += 1
        return original_text(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(cache_module, "encode_audio", audio)
    mp.setattr(TextEncoder, "encode", text)
    try:
        first = train(_config(workspace, "data", "count", max_steps=2, batch_size=3), log=_quiet)
        after_first = dict(calls)
        train(_config(workspace, "data", "count2", prepare_only=True), log=_quiet)
    finally:
        mp.undo()
    return first, after_first, calls


def test_cache_encodes_each_item_once(counted_run) -> None:
    first, after_first, calls = counted_run
    assert first.step == 2 and sorted(first.losses) == [1, 2]
    assert after_first == {"audio": 3, "text": 3}
    assert calls == after_first
    metrics = [json.loads(line) for line in (first.log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]


@pytest.fixture(scope="module")
def lora_runs(workspace: Path, counted_run):
    """16 steps on one item repeated in a batch of 8 (checkpoint at 8), then a resume from step 8 to 16."""
    options = dict(max_steps=16, every_n_train_steps=8, batch_size=8, learning_rate=2e-2, warmup_steps=2)
    first = train(_config(workspace, "single.jsonl", "fall", **options), log=_quiet)
    middle = next(p for p in first.checkpoints if p.name.endswith("step=8_lora"))
    resumed = train(_config(workspace, "single.jsonl", "resume", ckpt_path=str(middle), **options), log=_quiet)
    return first, resumed


def test_lora_loss_falls(lora_runs) -> None:
    first, _ = lora_runs
    losses = [first.losses[s] for s in range(1, 17)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_resume_continues_step_counter_and_loss_trajectory(lora_runs) -> None:
    first, resumed = lora_runs
    assert sorted(resumed.losses) == list(range(9, 17)) and resumed.step == 16
    for step in range(9, 17):
        assert resumed.losses[step] == pytest.approx(first.losses[step], rel=1e-5, abs=1e-7)


def test_saved_lora_loads_and_reproduces_the_trained_model(lora_runs, workspace: Path, transformer) -> None:
    first, _ = lora_runs
    final = first.checkpoints[-1]
    lora = load_lora_file(final)
    assert (final / OFFICIAL_FILENAME).is_file()
    with safe_open(str(final / OFFICIAL_FILENAME), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert "transformer_blocks.0.cross_attn.to_k.lora_A.weight" in keys and meta["lora_alpha"] == meta["r"] == 4
    trained = load_acestep(TINY_FOLDER, components=("transformer",)).transformer
    inject_lora(trained, LoraSpec.from_mapping(LORA_CONFIG))
    load_lora_parameters(trained, checkpoint_params(final))
    x, cond, timestep = _inputs(transformer, seed=3)
    with torch.no_grad():
        expected = _velocity(trained, x, cond, timestep)
        base = _velocity(transformer, x, cond, timestep)
        for honour in (False, True):
            ensure_loras(transformer, [(lora, 1.0)], honour_alpha=honour)
            patched = _velocity(transformer, x, cond, timestep)
            torch.testing.assert_close(patched, expected, rtol=0, atol=1e-5)
        lora_state(transformer).clear()
    assert (expected - base).abs().max() > 1e-3


def test_torchrun_two_processes_rank0_writes_the_lora(workspace: Path, counted_run) -> None:
    logs = workspace / "logs" / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "acestep_core.train", "--dataset_path", str(workspace / "data"), "--checkpoint_dir", str(TINY_FOLDER),
               "--lyric_vocab", str(VOCAB), "--lora_config_path", str(workspace / "lora.json"),
               "--cache_dir", str(workspace / "cache"), "--logger_dir", str(logs), "--exp_name", "ddp",
               "--max_steps", "2", "--num_workers", "0", "--every_plot_step", "0", "--gradient_checkpointing"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (logs / "lightning_logs").iterdir()
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert checkpoint.name.endswith("step=2_lora") and sorted(p.name for p in checkpoint.glob("rng_rank*")) == [
        "rng_rank0.safetensors", "rng_rank1.safetensors"]
    modules = load_lora_file(checkpoint).modules
    assert "speaker_embedder" in modules and "lyric_encoder.encoders.0.self_attn.linear_q" in modules
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_full_finetune_saves_a_loadable_transformer_and_eval_audio(workspace: Path, counted_run, transformer) -> None:
    result = train(_config(workspace, "data", "full", lora_config_path=None, max_steps=2, every_plot_step=2,
                           plot_seconds=1.0, plot_steps=2, val_check_interval=2, learning_rate=1e-3), log=_quiet)
    (checkpoint,) = result.checkpoints
    assert checkpoint.name == "epoch=0-step=2"
    tuned = load_acestep(checkpoint, components=("transformer",)).transformer
    changed = (tuned.transformer_blocks[0].attn.to_q.weight - transformer.transformer_blocks[0].attn.to_q.weight).abs()
    assert changed.max() > 0
    torch.testing.assert_close(tuned.transformer_blocks[0].cross_attn.add_q_proj.weight,
                               transformer.transformer_blocks[0].cross_attn.add_q_proj.weight)
    (clip,) = result.eval_audio
    wav, rate = soundfile.read(str(clip))
    assert rate == 48000 and wav.shape[1] == 2 and np.isfinite(wav).all()
    assert math.isfinite(result.validation[2])


def test_repa_adds_a_finite_alignment_loss(workspace: Path, counted_run) -> None:
    torch.manual_seed(0)
    dims = load_acestep(TINY_FOLDER, components=("transformer",)).transformer.config.ssl_latent_dims
    extractors = [ChunkedSSLExtractor(_LastHidden(torch.nn.Conv1d(1, d, 320, stride=320)), rate, seconds,
                                      cache_id=f"tiny{d}") for d, (rate, seconds) in zip(dims, ((24000, 5), (16000, 30)))]
    result = train(_config(workspace, "data", "repa", max_steps=2, batch_size=2, ssl_coeff=0.5),
                   ssl_extractor=MultiSSLExtractor(extractors), log=_quiet)
    metrics = [json.loads(line) for line in (result.log_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert math.isfinite(m["repa_loss"]) and m["repa_loss"] > 0
        assert m["loss"] == pytest.approx(m["denoising_loss"] + 0.5 * m["repa_loss"], rel=1e-6)


class _LastHidden(torch.nn.Module):
    """A tiny stand-in SSL model: conv frames of the waveform as `last_hidden_state` [N, frames, d]."""

    def __init__(self, conv: torch.nn.Conv1d):
        super().__init__()
        self.conv = conv

    def forward(self, chunks: torch.Tensor):
        return type("Out", (), {"last_hidden_state": self.conv(chunks[:, None]).transpose(1, 2)})()


def test_cli_flags_and_refusals(workspace: Path, capsys) -> None:
    parser = build_parser()
    args = parser.parse_args(["--dataset_path", "x", "--no-gradient_checkpointing", "--precision", "bf16-mixed"])
    assert args.gradient_checkpointing is False and args.learning_rate == 1e-4 and args.shift == 3.0
    assert args.gradient_clip_val == 0.5 and args.max_steps == 2_000_000
    for flag in ("--every_n_train_steps", "--every_plot_step", "--val_check_interval", "--ckpt_path", "--devices",
                 "--num_nodes", "--cache_dir", "--fsdp", "--accumulate_grad_batches", "--gradient_clip_algorithm"):
        assert flag in parser.format_help()
    assert train_main(["--dataset_path", "x", "--precision", "16"]) == 2
    assert "--precision" in capsys.readouterr().err
    assert train_main(["--dataset_path", str(workspace / "data"), "--fsdp", "--lora_config_path", "l.json"]) == 2
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train(_config(workspace, "data", "bad", ckpt_path=str(workspace), max_steps=1), log=_quiet)
