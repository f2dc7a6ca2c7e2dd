"""StemGen / singing-to-accompaniment: the control mechanism (exact no-op when untrained), the file format, the
multi-track pairs, training (command line, torchrun), the nodes and workflows on the tiny checkpoint, and an
honest learning check on synthetic songs (figures printed; run with -s to see them).

The learning check does not use the tiny checkpoint's transformer: its width (64) is smaller than the 128 values
of one latent frame (8 channels x 16 bands), so no adapter on it can carry a frame's noise through and denoise
(a generated latent keeps about half its noise whatever is trained). It trains the branch on a random ACE-Step
transformer of the same architecture with width 128 (8 heads x 16) and 2 blocks (CPU time), with the tiny
checkpoint's DCAE and UMT5 for the data.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_FOLDER, VOCAB
from pack_loader import load_pack

from acestep_core.audio import SCALE, SHIFT, denormalise_mel
from acestep_core.conditioning import Conditioning, encode_conditioning
from acestep_core.loading import load_acestep
from acestep_core.lora import apply_loras
from acestep_core.models.transformer import AceStepTransformer
from acestep_core.noise import SeededNoise
from acestep_core.sampling.denoiser import GuidanceConfig
from acestep_core.stemgen import dataset as sgdata
from acestep_core.stemgen import synth
from acestep_core.stemgen.control import ControlConfig, StemGenControl, controlled_decode, timbre_vector
from acestep_core.stemgen.generate import generate_latent, mix_with_reference, stemgen_lora
from acestep_core.stemgen.train import StemGenTrainConfig, fit
from acestep_core.stemgen.train import main as train_main
from acestep_core.stemgen.weights import is_stemgen_file, load_stemgen, read_header, save_stemgen
from acestep_core.tasks import SamplerOptions, SpeedOptions

RATE = 44100
STEMGEN_FILE = "acestep-stemgen.safetensors"
S2A_FILE = "acestep-singing2accompaniment.safetensors"


@pytest.fixture(scope="module")
def tiny():
    """Every component of the tiny checkpoint, float32 on the CPU."""
    return load_acestep(TINY_FOLDER)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Synthetic song folders: stemgen songs (bass/drums/lead) and vocal songs (the lead labelled as a vocal)."""
    root = tmp_path_factory.mktemp("stemgen")
    spec = synth.SynthSpec(seconds=1.5)
    synth.write_dataset(root / "songs", 3, spec, seed=3)
    generator = torch.Generator().manual_seed(4)
    for i in range(2):
        stems = synth.synth_song(spec, generator)
        stems["vocals"] = stems.pop("lead")
        synth.write_song(root / "vocal_songs" / f"take_{i}", stems, RATE, tags="synth pop, 120 bpm",
                         labels={"vocals": "female vocal", "bass": "bass", "drums": "drums"})
    (root / "models" / "loras").mkdir(parents=True)
    (root / "models" / "ace_step").mkdir()
    (root / "models" / "ace_step" / "acestep-v1-tiny").symlink_to(TINY_FOLDER, target_is_directory=True)
    return root


def random_inputs(transformer: AceStepTransformer, batch: int = 2, frames: int = 7, seed: int = 0):
    """A noisy latent, a reference latent, encoder states/mask and timesteps for direct decode calls."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, 16, frames, generator=g)
    reference = torch.randn(batch, 8, 16, frames, generator=g)
    states = torch.randn(batch, 5, transformer.config.inner_dim, generator=g)
    mask = torch.ones(batch, 5)
    mask[1, 3:] = 0
    timestep = torch.rand(batch, generator=g) * 1000
    return x, reference, states, mask, timestep


def perturbed(control: StemGenControl, seed: int = 1) -> StemGenControl:
    """The branch with random (non-zero) projections, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (control.control_in, control.timbre_proj, *control.control_out):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
    return control


# ---------------------------------------------------------------------------------------------------------------
# mechanism


def test_untrained_branch_and_zero_scale_give_the_base_velocity_exactly(tiny):
    transformer = tiny.transformer
    control = StemGenControl.from_base(transformer, ControlConfig.for_transformer(transformer.config))
    x, reference, states, mask, timestep = random_inputs(transformer)
    frames = torch.ones(2, 7)
    frames[0, 5:] = 0
    timbre = torch.randn(2, 128)
    per_item = torch.tensor([1.0, 0.01])
    with torch.no_grad():
        for masks in ((frames, mask), (None, None)):
            for erg in (None, 0.01, per_item):
                for linear_ff in (False, True):
                    options = dict(erg_tau=erg, linear_ff=linear_ff)
                    base = transformer.decode(x, masks[0], states, masks[1], timestep, **options)
                    same = controlled_decode(transformer, control, x, masks[0], states, masks[1], timestep,
                                             reference=reference, timbre=timbre, **options)
                    assert torch.equal(same, base), (masks[0] is None, erg, linear_ff)
        trained = perturbed(control)
        off = controlled_decode(transformer, trained, x, frames, states, mask, timestep, reference=reference,
                                timbre=timbre, control_scale=0.0)
        on = controlled_decode(transformer, trained, x, frames, states, mask, timestep, reference=reference,
                               timbre=timbre)
        other_reference = controlled_decode(transformer, trained, x, frames, states, mask, timestep,
                                            reference=reference.flip(-1), timbre=timbre)
    assert torch.equal(off, transformer.decode(x, frames, states, mask, timestep))
    assert (on - off).abs().max() > 1e-3 and (other_reference - on).abs().max() > 1e-4


def test_generation_batched_branches_match_separate_calls(tiny):
    transformer = tiny.transformer
    control = perturbed(StemGenControl.from_base(transformer, ControlConfig.for_transformer(transformer.config)))
    cond = encode_conditioning(tiny, "bass", "")
    generator = torch.Generator().manual_seed(2)
    reference, timbre = torch.randn(2, 8, 16, 6, generator=generator), torch.randn(1, 128, generator=generator)
    runs = []
    for fast in (False, True):
        options = SamplerOptions(steps=4, guidance=GuidanceConfig(guidance_interval=1.0), speed=SpeedOptions(
                                     batch_branches=fast, linear_ff=fast, skip_full_masks=fast))
        with torch.no_grad():
            runs.append(generate_latent(transformer, control, cond, reference, timbre=timbre,
                                        options=options, noise=SeededNoise.from_seeds([1, 2], 2)))
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=1e-4)
    assert runs[0].shape == reference.shape and not torch.equal(runs[0][0], runs[0][1])


def test_branch_copies_the_first_blocks_and_leaves_out_unused_layers(tiny):
    transformer = tiny.transformer
    control = StemGenControl.from_base(transformer, ControlConfig.for_transformer(transformer.config,
                                                                                  control_blocks=3))
    assert len(control.transformer_blocks) == 3 and len(control.control_out) == 3
    base = transformer.state_dict()
    for key, value in control.state_dict().items():
        if key.startswith(("transformer_blocks.", "proj_in.")):
            assert torch.equal(value, base[key]), key
        else:
            assert not value.any(), f"{key} must start at zero"
    assert not any("add_q_proj" in k or "to_add_out" in k for k in control.state_dict())
    assert all(p.dtype == torch.float32 for p in control.parameters())


def test_config_refusals_name_the_problem(tiny):
    config = tiny.transformer.config
    with pytest.raises(ValueError, match="control_blocks=21"):
        ControlConfig.for_transformer(config, control_blocks=21)
    with pytest.raises(ValueError, match="task"):
        ControlConfig.for_transformer(config, task="remix")
    wide = dataclasses.replace(ControlConfig.for_transformer(config), inner_dim=128, num_attention_heads=8)
    with pytest.raises(ValueError, match="inner_dim 128 vs model 64"):
        wide.check_base(config)
    control = StemGenControl.from_base(tiny.transformer, ControlConfig.for_transformer(config))
    x, reference, states, mask, timestep = random_inputs(tiny.transformer)
    with pytest.raises(ValueError, match="reference latent must have"):
        controlled_decode(tiny.transformer, control, x, None, states, mask, timestep, reference=reference[..., :3])
    with pytest.raises(ValueError, match="timbre must be"):
        controlled_decode(tiny.transformer, control, x, None, states, mask, timestep, reference=reference,
                          timbre=torch.zeros(2, 7))


def test_timbre_vector_is_the_mean_over_real_frames():
    latent = torch.randn(2, 8, 16, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    vector = timbre_vector(latent, mask)
    torch.testing.assert_close(vector[0], latent[0, ..., :3].mean(-1).flatten())
    torch.testing.assert_close(vector[1], timbre_vector(latent)[1])


def test_file_round_trip_and_lora(tiny, tmp_path):
    transformer = tiny.transformer
    control = perturbed(StemGenControl.from_base(transformer, ControlConfig.for_transformer(transformer.config)))
    g = torch.Generator().manual_seed(5)
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 64, generator=g),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 2, generator=g)}
    path = save_stemgen(tmp_path / "x.safetensors", control, lora, lora_info={"rank": 2}, training={"step": 7})
    assert is_stemgen_file(path) and read_header(path)["training"] == {"step": 7}
    weights = load_stemgen(path)
    assert weights.task == "stemgen" and weights.config == control.config
    rebuilt = weights.build_control(transformer)
    for key, value in control.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x, reference, states, mask, timestep = random_inputs(transformer)
    with torch.no_grad():
        before = transformer.decode(x, None, states, mask, timestep)
        with stemgen_lora(transformer, weights):
            patched = transformer.decode(x, None, states, mask, timestep)
        after = transformer.decode(x, None, states, mask, timestep)
        with apply_loras(transformer, [(weights.lora, 1.0)]):
            assert torch.equal(transformer.decode(x, None, states, mask, timestep), patched)
    assert torch.equal(before, after) and (patched - before).abs().max() > 1e-4
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file(lora, str(plain))
    assert not is_stemgen_file(plain)
    with pytest.raises(ValueError, match="not a StemGen control file"):
        load_stemgen(plain)
    wide = dataclasses.replace(transformer.config, num_attention_heads=8)
    with pytest.raises(ValueError, match="another ACE-Step transformer"):
        weights.build_control(AceStepTransformer(wide))


def test_mix_with_reference_resamples_and_matches_length():
    stem = torch.randn(1, 2, 48000)
    mono = torch.randn(1, 1, 44100)
    mix = mix_with_reference(mono, 44100, stem, 48000)
    assert mix.shape == stem.shape
    from acestep_core.audio import resample

    torch.testing.assert_close(mix - stem, resample(mono.expand(1, 2, -1), 44100, 48000)[..., :48000],
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# data


def test_song_folders_give_the_documented_pairs(workspace):
    songs = sgdata.read_songs(workspace / "songs")
    assert [s.name for s in songs] == ["song_0000", "song_0001", "song_0002"]
    song = songs[0]
    pairs = sgdata.song_pairs(song, "stemgen")
    assert [(p.target, p.tags) for p in pairs] == [(("bass",), "bass"), (("drums",), "drums"),
                                                   (("lead",), "lead synth")]
    stems = {n: sgdata.load_audio(p) for n, p in song.stems.items()}
    mix = sgdata.load_audio(song.mix)
    reference, target = sgdata.pair_audio(song, pairs[0], stems, mix)
    torch.testing.assert_close(reference + target, mix, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference, stems["drums"] + stems["lead"], atol=1e-5, rtol=0)
    assert sgdata.song_pairs(song, "singing2accompaniment") == []
    vocal = sgdata.read_songs(workspace / "vocal_songs")[0]
    (pair,) = sgdata.song_pairs(vocal, "singing2accompaniment")
    assert pair.target == ("bass", "drums") and pair.tags == "synth pop, 120 bpm"


def test_song_folder_refusals(tmp_path):
    with pytest.raises(ValueError, match="no song folders"):
        sgdata.read_songs(tmp_path)
    folder = tmp_path / "a"
    synth.write_song(folder, {"bass": torch.zeros(2, 100)}, RATE)
    (folder / "labels.json").write_text('{"guitar": "guitar"}')
    with pytest.raises(ValueError, match="not in"):
        sgdata.read_songs(tmp_path)
    (folder / "labels.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        sgdata.read_songs(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# command line, torchrun, nodes, workflows on the tiny checkpoint


def cli_args(workspace: Path, task: str, output: str, *extra: str) -> list[str]:
    data = "songs" if task == "stemgen" else "vocal_songs"
    return ["--dataset_path", str(workspace / data), "--checkpoint_dir", str(TINY_FOLDER), "--task", task,
            "--output", str(workspace / "models" / "loras" / output), "--cache_dir", str(workspace / "cache"),
            "--max_steps", "2", "--batch_size", "2", "--lora_rank", "2", "--control_blocks", "2",
            "--num_workers", "0", "--accelerator", "cpu", *extra]


@pytest.fixture(scope="module")
def trained_files(workspace):
    """Two-step runs of the command line for both tasks (they write the files the nodes load)."""
    assert train_main(cli_args(workspace, "stemgen", STEMGEN_FILE)) == 0
    assert train_main(cli_args(workspace, "singing2accompaniment", S2A_FILE, "--learning_rate", "1e-3")) == 0
    return workspace / "models" / "loras"


def test_command_line_writes_a_loadable_file_per_task(trained_files, tiny):
    for name, task, pairs in ((STEMGEN_FILE, "stemgen", 9), (S2A_FILE, "singing2accompaniment", 2)):
        weights = load_stemgen(trained_files / name)
        assert weights.task == task and weights.info["training"]["step"] == 2
        assert weights.config.control_blocks == 2 and weights.info["lora"]["rank"] == 2
        assert any(v.abs().max() > 0 for k, v in weights.control.items() if k.startswith("control_out"))
        assert "transformer_blocks.19.cross_attn.to_v" in weights.lora.modules
        weights.build_control(tiny.transformer)
    cached = sorted((trained_files.parent.parent / "cache" / "stemgen").glob("*.safetensors"))
    assert len(cached) == 3 and sum(len(sgdata._read_pairs(p)) for p in cached) == 9


def test_command_line_refusals(workspace, capsys):
    assert train_main(cli_args(workspace, "stemgen", "x.safetensors", "--control_blocks", "0")) == 2
    assert "--control_blocks must be an integer >= 1" in capsys.readouterr().err
    assert train_main(cli_args(workspace, "remix", "x.safetensors")) == 2
    assert "--task must be one of" in capsys.readouterr().err


def test_torchrun_two_processes_write_one_file(workspace, trained_files):
    output = "ddp.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "acestep_core.stemgen.train", *cli_args(workspace, "stemgen", output)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_stemgen(trained_files / output)
    assert weights.info["training"]["step"] == 2
    (trained_files / output).unlink()


@pytest.fixture()
def node_env(workspace, trained_files, monkeypatch):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(workspace / "models"))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    pack = load_pack()
    return pack, importlib.import_module(f"{pack.__name__}.nodes.stemgen")


def tone(seconds: float = 1.5, rate: int = 48000, channels: int = 2) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * (220 + 110 * c) * t) for c in range(channels)])
    return {"waveform": wave[None].float(), "sample_rate": rate}


def test_nodes_generate_a_stem_and_a_mix(node_env):
    pack, nodes = node_env
    assert sorted(nodes.stemgen_files()) == sorted([f"loras/{STEMGEN_FILE}", STEMGEN_FILE, f"loras/{S2A_FILE}",
                                                    S2A_FILE])
    loaders = importlib.import_module(f"{pack.__name__}.nodes.loaders")
    (model,) = loaders.AceStepLoader().load("acestep-v1-tiny", "fp32", "cpu")
    (stemgen,) = nodes.AceStepStemGenLoader().load(STEMGEN_FILE)
    (s2a,) = nodes.AceStepStemGenLoader().load(S2A_FILE)
    settings = dict(seed=3, steps=2, scheduler="euler", cfg_type="apg", guidance_scale=15.0, omega_scale=10.0,
                    control_scale=1.0, lora_strength=1.0, sample_rate="48000")
    reference = tone(channels=1)
    stem, mix = nodes.AceStepStemGen().generate(model, stemgen=stemgen, reference=reference, instrument="bass",
                                                instrument_audio=tone(0.5), **settings)
    frames = math.ceil(1.5 * 44100 / 4096)
    assert stem["sample_rate"] == mix["sample_rate"] == 48000
    assert stem["waveform"].shape == mix["waveform"].shape == (1, 2, math.ceil(frames * 4096 * 48000 / 44100))
    added = mix["waveform"] - stem["waveform"]
    torch.testing.assert_close(added[0, 0, :72000], reference["waveform"][0, 0], atol=1e-5, rtol=0)
    again, _ = nodes.AceStepStemGen().generate(model, stemgen=stemgen, reference=reference, instrument="bass",
                                               instrument_audio=tone(0.5), **settings)
    assert torch.equal(again["waveform"], stem["waveform"])
    accompaniment, full = nodes.AceStepSinging2Accompaniment().generate(model, stemgen=s2a, vocal=reference,
                                                                        tags="synth pop", **settings)
    assert accompaniment["waveform"].shape == full["waveform"].shape and torch.isfinite(full["waveform"]).all()
    with pytest.raises(ValueError, match="trained for singing2accompaniment"):
        nodes.AceStepStemGen().generate(model, stemgen=s2a, reference=reference, instrument="bass", **settings)


def test_workflows_match_their_api_copies_and_run(node_env):
    pack, nodes = node_env
    import test_workflows as flows

    registered = dict(flows.NODES)
    for name in ("AceStepStemGenLoader", "AceStepStemGen", "AceStepSinging2Accompaniment"):
        registered.setdefault(name, getattr(nodes, name))
    patch = pytest.MonkeyPatch()
    patch.setattr(flows, "NODES", registered)
    patch.setattr(flows, "TINY_PROFILE", {**flows.TINY_PROFILE, ("AceStepStemGen", "steps"): 2,
                                          ("AceStepSinging2Accompaniment", "steps"): 2})
    try:
        for name in ("acestep_stemgen", "acestep_singing2accompaniment"):
            ui, api = flows.load(flows.UI_DIR, name), flows.load(flows.API_DIR, name)
            expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
            assert flows.ui_to_api(ui) == expected
            run = flows.Run(api).run()
            assert len(run.saved) == 2
            for audio in run.saved.values():
                assert audio["waveform"].shape[:2] == (1, 2) and torch.isfinite(audio["waveform"]).all()
    finally:
        patch.undo()


# ---------------------------------------------------------------------------------------------------------------
# learning


def test_trained_branch_generates_closer_stems_than_untrained_and_reference(tiny, tmp_path):
    """Train control + LoRA on synthetic songs; on held-out songs compare generated stems with the true ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and much faster on a busy machine
    try:
        figures, report, losses = learning_run(tiny, tmp_path)
    finally:
        torch.set_num_threads(threads)
    print("\nStemGen learning check (held-out synthetic songs):\n" + report)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), report
    for metric in ("latent_mse", "log_mel_l1", "log_mel_l2"):
        for sampler in ("pingpong", "euler"):
            assert figures[f"trained ({sampler})"][metric] < figures[f"untrained ({sampler})"][metric], report
        assert figures["trained (pingpong)"][metric] < figures["reference mix"][metric], report


def learning_run(tiny, tmp_path: Path) -> tuple[dict, str, list[float]]:
    """Synthetic songs → cache → fit on a random width-128 base → generate held-out stems; (figures, report, losses)."""
    spec = synth.SynthSpec(seconds=2.0)
    synth.write_dataset(tmp_path / "train", 16, spec, seed=1)
    synth.write_dataset(tmp_path / "eval", 4, spec, seed=999)
    encoders = lambda: sgdata.Encoders(tiny.dcae, tiny.vocoder.mel_transform, tiny.text_encoder)  # noqa: E731
    identity = sgdata.checkpoint_identity(TINY_FOLDER)
    train_paths = sgdata.build_cache(sgdata.read_songs(tmp_path / "train"), "stemgen", tmp_path / "cache", identity,
                                     encoders)
    eval_paths = sgdata.build_cache(sgdata.read_songs(tmp_path / "eval"), "stemgen", tmp_path / "cache", identity,
                                    encoders)
    train_set = sgdata.PairDataset(train_paths, max_frames=10**6)
    eval_set = sgdata.PairDataset(eval_paths, max_frames=10**6, timbre_dropout=1.0)

    torch.manual_seed(0)
    config = dataclasses.replace(tiny.transformer.config, num_attention_heads=8, num_layers=2)
    base = AceStepTransformer(config)
    base.lyric_encoder.load_state_dict(tiny.transformer.lyric_encoder.state_dict())
    base.lyric_embs.load_state_dict(tiny.transformer.lyric_embs.state_dict())
    student = AceStepTransformer(config)
    student.load_state_dict(base.state_dict())
    settings = StemGenTrainConfig(
        dataset_path=str(tmp_path / "train"), output=str(tmp_path / "learned.safetensors"), control_blocks=2,
        freeze_control_embedding=True, lora_rank=64, lora_alpha=512.0,
        lora_targets="to_q,to_k,to_v,to_out.0,final_layer.linear,linear_1,linear_2,t_block.1",
        learning_rate=3e-3, warmup_steps=10, max_steps=200, batch_size=8, gradient_clip_val=1.0,
        every_n_train_steps=0, log_every_n_steps=50, num_workers=0)
    result = fit(settings, student, train_set)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert all(math.isfinite(v) for v in losses)

    weights = load_stemgen(settings.output)
    trained, untrained = weights.build_control(base), StemGenControl.from_base(base, weights.config)
    items = [eval_set[i] for i in range(len(eval_set))]
    batch = sgdata.collate(items)
    n = len(items)
    cond = Conditioning(tags="", lyrics="", text_states=batch.text, text_mask=batch.text_mask,
                        lyric_ids=torch.zeros(n, 1, dtype=torch.long), lyric_mask=torch.zeros(n, 1, dtype=torch.long))

    def generate(control, scheduler, lora):
        options = SamplerOptions(steps=10, scheduler=scheduler, guidance=GuidanceConfig(guidance_scale=1.0))
        noise = SeededNoise.from_seeds(list(range(n)), n)
        with torch.no_grad(), stemgen_lora(base, weights, 1.0 if lora else 0.0):
            return generate_latent(base, control, cond, batch.reference, options=options, noise=noise)

    def log_mel(latent):
        with torch.no_grad():
            return denormalise_mel(tiny.dcae.decode(latent / SCALE + SHIFT))

    groups = {}
    for index, (_, _, group) in enumerate(train_set.items):
        groups.setdefault(group, []).append(train_set._tensor(index, "target"))
    label_mean = torch.stack([torch.stack(groups[group]).mean(0) for _, _, group in eval_set.items])
    truth, truth_mel = batch.target, log_mel(batch.target)
    candidates = {
        "trained (pingpong)": generate(trained, "pingpong", True),
        "untrained (pingpong)": generate(untrained, "pingpong", False),
        "trained (euler)": generate(trained, "euler", True),
        "untrained (euler)": generate(untrained, "euler", False),
        "reference mix": batch.reference,
        "label mean (oracle)": label_mean,
    }
    figures = {}
    for name, latent in candidates.items():
        mel = log_mel(latent)
        figures[name] = {"latent_mse": float((latent - truth).pow(2).mean()),
                         "log_mel_l1": float((mel - truth_mel).abs().mean()),
                         "log_mel_l2": float((mel - truth_mel).pow(2).mean())}
    report = json.dumps({"steps": result.step, "first_loss": sum(losses[:10]) / 10,
                         "last_loss": sum(losses[-10:]) / 10, "held_out_pairs": n,
                         "seconds_per_step": round(result.seconds_per_step, 3), "figures": figures}, indent=1)
    return figures, report, losses
