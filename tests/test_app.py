"""The official app's side: its UI defaults, parameter files both ways (CLI and nodes), presets, seed lists,
random duration and the edit types (acestep_core.params, acestep_core.presets, acestep_core.cli_app, nodes/params).

The official parameter files in tests/data/app carry the keys the official ``ACEStepPipeline.__call__`` writes.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import soundfile
import torch

from acestep_core import cli, params
from acestep_core.pipeline import request_from_official_args
from acestep_core.presets import GENRE_PRESETS, PRESET_NAMES, preset_tags
from conftest import DATA, TINY, TINY_FOLDER, VOCAB
from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
APP_FILES = DATA / "app"
OFFICIAL = APP_FILES / "output_20260101120000_0_input_params.json"
OLD_OFFICIAL = APP_FILES / "output_20250101000000_0_input_params.json"
TINY_ARGS = ["--checkpoint", str(TINY_FOLDER), "--lyric-vocab", str(VOCAB), "--device", "cpu"]


def _parse(*argv: str):
    return cli.build_parser().parse_args(["generate", "--tags", "pop", *argv])


def _node_default(node: str, name: str):
    spec = NODES[node].INPUT_TYPES()
    return {**spec["required"], **spec.get("optional", {})}[name][1]["default"]


# ---------------------------------------------------------------------------------------------------------------
# the app's defaults: one test per value where the app's UI and the pipeline differ


def test_every_app_default_differs_from_the_pipeline_and_names_its_line():
    for name, d in params.APP_DEFAULTS.items():
        assert d.app != d.pipeline, name
        assert d.source.startswith("acestep/"), name


def test_use_erg_lyric_is_off_as_the_app_ui():
    """acestep/ui/components.py: use_erg_lyric = gr.Checkbox(label="use ERG for lyric", value=False)."""
    assert "use_erg_lyric" in params.APP_DEFAULTS["use_erg_lyric"].source
    assert _parse().erg_lyric is False
    assert _node_default("AceStepSamplerOptions", "use_erg_lyric") is False
    sampling = __import__(f"{pack.__name__}.nodes.sampling", fromlist=["DEFAULTS"])
    assert sampling.DEFAULTS.guidance.use_erg_lyric is False  # the sampler without an options node
    # parity keeps the pipeline's default
    assert request_from_official_args({}).guidance.use_erg_lyric is True


def test_duration_is_random_by_default_as_the_app_ui():
    """acestep/ui/components.py: audio_duration = gr.Slider(-1, 240.0, value=-1), -1 = random 30-240 s."""
    assert _parse().duration == -1
    rng = random.Random(5)
    drawn = [params.resolve_duration(-1, rng) for _ in range(50)]
    assert all(30.0 <= d <= 240.0 for d in drawn) and len(set(drawn)) == 50
    assert request_from_official_args({}).audio_duration == 60.0
    with pytest.raises(ValueError, match="-1 for a random"):
        params.resolve_duration(-2)


def test_output_rate_is_48k_as_the_app_saves():
    """acestep/pipeline_ace_step.py: latents2audio(..., sample_rate=48000)."""
    assert _parse().sample_rate == 48000
    assert _node_default("AceStepDecode", "sample_rate") == "48000"


@pytest.mark.parametrize("task, expected, line", [
    ("retake", 0.2, "retake tab"), ("repaint", 0.2, "repainting tab"), ("extend", 1.0, "retake_variance=1.0"),
])
def test_variance_per_task_as_the_app_ui(task, expected, line):
    """components.py: retake and repainting tabs gr.Slider(value=0.2, label="variance"); extend_process_func
    passes retake_variance=1.0."""
    key = {"retake": "retake_variance", "repaint": "repaint_variance", "extend": "extend_variance"}[task]
    assert line in params.APP_DEFAULTS[key].source
    args = _parse("--task", task)
    assert args.variance is None
    assert cli.cli_app.prepare(args).variance == expected
    assert request_from_official_args({}).retake_variance == 0.5
    if task == "extend":
        assert _node_default("AceStepExtend", "variance") == expected
    if task == "repaint":
        assert _node_default("AceStepRepaintRegion", "variance") == expected


def test_edit_n_min_as_the_app_ui():
    """components.py, edit tab: edit_n_min = gr.Slider(value=0.6) (only_lyrics)."""
    assert _parse().edit_n_min == 0.6
    assert _node_default("AceStepFlowEdit", "n_min") == 0.6
    assert request_from_official_args({}).edit_n_min == 0.0


def test_edit_falls_back_to_the_source_texts_as_the_app():
    """components.py edit_process_func: an empty edit prompt / lyrics takes the source's."""
    setup = cli.cli_app.prepare(_parse("--lyrics", "[verse]\nla la", "--task", "edit", "--edit-lyrics", "[verse]\nlo"))
    assert (setup.edit_tags, setup.edit_lyrics) == ("pop", "[verse]\nlo")
    setup = cli.cli_app.prepare(_parse("--lyrics", "[verse]\nla", "--task", "edit", "--edit-tags", "rock"))
    assert (setup.edit_tags, setup.edit_lyrics) == ("rock", "[verse]\nla")


def test_edit_types_set_n_min_n_max_as_the_app():
    """components.py edit_type_change_func: only_lyrics 0.6/1.0, remix 0.2/0.4."""
    assert params.edit_range("only_lyrics", 0.1, 0.2) == (0.6, 1.0)
    assert params.edit_range("remix", 0.1, 0.2) == (0.2, 0.4)
    assert params.edit_range("custom", 0.1, 0.2) == (0.1, 0.2)
    assert cli.cli_app.prepare(_parse("--edit-type", "remix")).edit_n_min == 0.2
    with pytest.raises(ValueError, match="edit_type"):
        params.edit_range("karaoke", 0, 1)
    choices = NODES["AceStepFlowEdit"].INPUT_TYPES()["optional"]["edit_type"][0]
    assert choices == ["custom", "only_lyrics", "remix"]


# ---------------------------------------------------------------------------------------------------------------
# presets and seeds


def test_genre_presets_are_the_apps():
    assert PRESET_NAMES[0] == "Custom" and len(GENRE_PRESETS) == 10
    assert preset_tags("Custom", "my own") == "my own"
    assert preset_tags("EDM", "ignored").startswith("edm, synth")
    (tags,) = NODES["AceStepGenrePreset"]().pick("Jazz", "")
    assert tags == GENRE_PRESETS["Jazz"]
    with pytest.raises(ValueError, match="preset"):
        preset_tags("Polka", "")


def test_seed_lists_as_the_app_manual_seeds():
    assert params.parse_seed_list("1,2,3,4") == [1, 2, 3, 4]
    assert params.parse_seed_list(" 5, 6 ") == [5, 6]
    assert params.parse_seed_list("") is None
    assert params.seeds_for_batch([7, 8], 4) == [7, 8, 8, 8]  # official set_seeds pads with the last seed
    for bad in ("1,x", "-1", str(2**32)):
        with pytest.raises(ValueError, match="seed"):
            params.parse_seed_list(bad)
    with pytest.raises(ValueError, match="at most one per item"):
        params.seeds_for_batch([1, 2, 3], 2)
    setup = cli.cli_app.prepare(_parse("--seed", "1,2,3,4", "--batch-size", "4"))
    assert setup.seeds == [1, 2, 3, 4]
    assert cli.cli_app.prepare(_parse("--seed", "9", "--batch-size", "2")).seeds == [9, 10]
    args = _parse("--seed", "5,6,7")  # a list alone sets the batch size
    assert cli.cli_app.prepare(args).seeds == [5, 6, 7] and args.batch_size == 3


def test_empty_latent_minus_one_is_a_random_length():
    node = NODES["AceStepEmptyLatent"]()
    frames = {node.make(-1.0, 1)[0]["samples"].shape[-1] for _ in range(5)}
    assert all(int(30 * 44100 / 4096) <= f <= int(240 * 44100 / 4096) for f in frames) and len(frames) > 1
    assert NODES["AceStepEmptyLatent"].IS_CHANGED(-1.0, 1) != NODES["AceStepEmptyLatent"].IS_CHANGED(-1.0, 1)


# ---------------------------------------------------------------------------------------------------------------
# parameter files


def test_official_file_reads_into_official_args():
    data = params.read_params(OFFICIAL)
    args = params.official_args(data)
    assert args["manual_seeds"] == [1234567] and args["retake_seeds"] == [7654321]
    assert args["use_erg_lyric"] is False and args["oss_steps"] == "" and args["batch_size"] == 1
    request = request_from_official_args(args)
    assert (request.prompt, request.audio_duration, request.infer_step) == (data["prompt"], 1.5, 2)
    old = params.official_args(params.read_params(OLD_OFFICIAL))
    assert old["task"] == "text2music" and old["manual_seeds"] == [1234567]


def test_bad_parameter_files_say_which_key(tmp_path):
    for content, match in (({"prompt": "x", "infer_step": "many"}, "infer_step"),
                           ({"prompt": "x", "task": "karaoke"}, "task"),
                           ({"lyrics": "x"}, "prompt"), ([1, 2], "JSON object"),
                           ({"prompt": "x", "actual_seeds": [-5]}, "actual_seeds")):
        path = tmp_path / "p_input_params.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=match):
            params.read_params(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        params.read_params(path)


def test_edit_record_keeps_official_keys_and_the_source_texts():
    request = request_from_official_args({"task": "edit", "prompt": "src tags", "lyrics": "src", "audio_duration": 2.0,
                                          "edit_target_prompt": "new tags", "edit_target_lyrics": "new"})
    record = params.params_record(request, actual_seeds=[1], retake_seeds=[2], audio_path="x.wav")
    assert set(params.OFFICIAL_KEYS) <= set(record)
    assert (record["prompt"], record["lyrics"]) == ("new tags", "new")  # as the official __call__ writes it
    back = params.official_args(params.check_params(json.loads(json.dumps(record))))
    assert (back["prompt"], back["lyrics"], back["edit_target_prompt"]) == ("src tags", "src", "new tags")


def test_cli_runs_an_official_file_and_its_own_file_round_trips(tmp_path, capsys):
    """--params on the app's file, then --params on the file we wrote: the same song, the same settings."""
    first = tmp_path / "first.wav"
    assert cli.main(["generate", "--params", str(OFFICIAL), "--out", str(first), *TINY_ARGS]) == 0
    written = params.params_path_for(first)
    record = json.loads(written.read_text(encoding="utf-8"))
    official = json.loads(OFFICIAL.read_text(encoding="utf-8"))
    assert list(record)[: len(params.OFFICIAL_KEYS)] == list(params.OFFICIAL_KEYS)
    for key in official:
        if key not in ("timecosts", "audio_path"):
            assert record[key] == official[key], key
    assert record["audio_path"] == str(first)
    audio, rate = soundfile.read(str(first), dtype="float32")
    frames = int(1.5 * 44100 / 4096)
    assert rate == 48000 and audio.shape == (math.ceil(frames * 4096 * 48000 / 44100), 2)
    assert soundfile.info(str(first)).subtype == "FLOAT"
    second = tmp_path / "again.flac"
    assert cli.main(["generate", "--params", str(written), "--out", str(second), *TINY_ARGS]) == 0
    again = json.loads(params.params_path_for(second).read_text(encoding="utf-8"))
    assert {k: v for k, v in again.items() if k not in ("timecosts", "audio_path", "format")} == \
        {k: v for k, v in record.items() if k not in ("timecosts", "audio_path", "format")}
    audio2, _ = soundfile.read(str(second), dtype="float32")
    assert audio2.shape == audio.shape
    assert abs(audio2 - audio).max() < 1e-3  # FLAC's 24-bit step; the same seeds give the same song
    # a flag given on the command line wins over the file
    args = cli.cli_app.parse(cli.build_parser(), ["generate", "--params", str(OFFICIAL), "--steps", "3"])
    assert args.steps == 3 and args.seed == "1234567" and args.erg_lyric is False


def test_cli_rejects_a_missing_params_file_and_an_unknown_format(tmp_path, capsys):
    assert cli.main(["generate", "--params", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["generate", "--tags", "pop", "--out", str(tmp_path / "x.aiff"), *TINY_ARGS]) == 2
    assert ".mp3" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", params.AUDIO_FORMATS)
def test_audio_formats_write(tmp_path, fmt):
    from acestep_core.audiofile import write_audio

    wave = 0.1 * torch.sin(torch.linspace(0, 600, 4800)).repeat(2, 1)
    path = write_audio(tmp_path / f"a.{fmt}", wave, 48000)
    info = soundfile.info(str(path))
    assert info.samplerate == 48000 and info.channels == 2 and info.format == fmt.upper()


# ---------------------------------------------------------------------------------------------------------------
# the Load Params / Save Audio nodes in a workflow


@pytest.fixture()
def comfy_dirs(tmp_path, monkeypatch):
    """A working folder with input/ holding the official file (nodes use ./input and ./output outside ComfyUI)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    (tmp_path / "input").mkdir()
    shutil.copy(OFFICIAL, tmp_path / "input" / OFFICIAL.name)
    return tmp_path


def test_load_params_node_outputs_the_file(comfy_dirs):
    node = NODES["AceStepLoadParams"]
    assert OFFICIAL.name in node.INPUT_TYPES()["required"]["params_file"][0]
    assert node.VALIDATE_INPUTS(OFFICIAL.name) is True
    assert "upload" in node.VALIDATE_INPUTS("missing.json")
    assert "outside" in node.VALIDATE_INPUTS("../x.json")
    out = dict(zip(node.RETURN_NAMES, node().load(OFFICIAL.name)))
    official = json.loads(OFFICIAL.read_text(encoding="utf-8"))
    assert out["tags"] == official["prompt"] and out["lyrics"] == official["lyrics"]
    assert (out["seconds"], out["seed"], out["seeds"], out["steps"]) == (1.5, 1234567, "1234567", 2)
    assert out["options"].guidance.use_erg_lyric is False and out["task"] == "text2music"
    sampler = NODES["AceStepSampler"].INPUT_TYPES()["required"]
    assert node.RETURN_TYPES[6] == sampler["scheduler"][0] and node.RETURN_TYPES[7] == sampler["cfg_type"][0]


def test_app_params_workflow_remakes_the_song_and_saves_json_that_round_trips(comfy_dirs, monkeypatch):
    import test_workflows
    from test_workflows import API_DIR, Run

    monkeypatch.setattr(test_workflows, "TINY_PROFILE", {})  # every setting from the file (already tiny-sized)
    prompt = json.loads((API_DIR / "acestep_app_params.json").read_text())
    prompt["2"]["inputs"].update(checkpoint="acestep-v1-tiny", device="cpu")
    run = Run(prompt).run()
    (paths,) = run.outputs["7"]
    saved = Path(paths.splitlines()[0])
    assert saved.suffix == ".wav" and saved.is_file()
    record = params.read_params(params.params_path_for(saved))
    official = json.loads(OFFICIAL.read_text(encoding="utf-8"))
    for key in ("prompt", "lyrics", "infer_step", "actual_seeds", "use_erg_lyric", "guidance_scale", "cfg_type",
                "scheduler_type", "omega_scale", "guidance_interval"):
        assert record[key] == official[key], key
    assert abs(record["audio_duration"] - official["audio_duration"]) < 0.1  # whole latent frames
    # the song is the CLI's song for the same file (same seeds and settings)
    cli_out = comfy_dirs / "cli.wav"
    assert cli.main(["generate", "--params", str(OFFICIAL), "--out", str(cli_out), *TINY_ARGS]) == 0
    graph_audio, _ = soundfile.read(str(saved), dtype="float32")
    cli_audio, _ = soundfile.read(str(cli_out), dtype="float32")
    n = min(len(graph_audio), len(cli_audio))
    assert abs(graph_audio[:n] - cli_audio[:n]).max() < 1e-4
    # and the saved file loads again through the node
    shutil.copy(params.params_path_for(saved), comfy_dirs / "input" / "again_input_params.json")
    loader = NODES["AceStepLoadParams"]
    again = dict(zip(loader.RETURN_NAMES, loader().load("again_input_params.json")))
    assert again["seed"] == 1234567 and again["tags"] == official["prompt"]


# ---------------------------------------------------------------------------------------------------------------
# the trainer takes every flag of the official trainer.py

OFFICIAL_TRAINER_FLAGS = {  # flag -> a value of the official type (trainer.py, its argparse section)
    "num_nodes": "1", "shift": "3.0", "learning_rate": "1e-4", "num_workers": "8", "epochs": "-1",
    "max_steps": "2000000", "every_n_train_steps": "2000", "dataset_path": "./zh_lora_dataset",
    "exp_name": "chinese_rap_lora", "precision": "32", "accumulate_grad_batches": "1", "devices": "1",
    "logger_dir": "./exps/logs/", "ckpt_path": "run/ckpt", "checkpoint_dir": "ckpt", "gradient_clip_val": "0.5",
    "gradient_clip_algorithm": "norm", "reload_dataloaders_every_n_epochs": "1", "every_plot_step": "2000",
    "val_check_interval": "100", "lora_config_path": "config/lora.json",
}
# the official defaults that are not about hardware or files of the official repository
OFFICIAL_TRAINER_DEFAULTS = {
    "shift": 3.0, "learning_rate": 1e-4, "num_workers": 8, "epochs": -1, "max_steps": 2000000,
    "every_n_train_steps": 2000, "exp_name": "chinese_rap_lora", "precision": "32", "accumulate_grad_batches": 1,
    "logger_dir": "./exps/logs/", "ckpt_path": None, "gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm",
    "reload_dataloaders_every_n_epochs": 1, "every_plot_step": 2000, "val_check_interval": None,
}


def test_trainer_accepts_every_official_flag_with_official_defaults():
    from acestep_core.train.__main__ import build_parser as train_parser
    from acestep_core.train.__main__ import notes_for
    from acestep_core.train.trainer import TrainConfig

    argv = [part for flag, value in OFFICIAL_TRAINER_FLAGS.items() for part in (f"--{flag}", value)]
    args = train_parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    assert config.reload_dataloaders_every_n_epochs == 1 and config.val_check_interval == 100
    defaults = train_parser().parse_args(["--dataset_path", "x"])
    for flag, value in OFFICIAL_TRAINER_DEFAULTS.items():
        assert getattr(defaults, flag) == value, flag
    notes = notes_for(argv)
    assert len(notes) == 1 and "--reload_dataloaders_every_n_epochs" in notes[0]
    assert notes_for(["--dataset_path", "x"]) == []
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        TrainConfig(dataset_path="x", reload_dataloaders_every_n_epochs=-1)


# ---------------------------------------------------------------------------------------------------------------
# command line: lyric timing, long songs, StemGen


def test_cli_lrc_writes_the_lyric_timing(tmp_path):
    lrc = tmp_path / "song.lrc"
    argv = ["generate", "--tags", "pop", "--lyrics", "[verse]\nhello bright world\n[chorus]\nsing it now",
            "--duration", "1.5", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "song.ogg"),
            "--lrc", str(lrc), *TINY_ARGS]
    assert cli.main(argv) == 0
    text = lrc.read_text(encoding="utf-8")
    assert text.startswith("[re:ACE-Step lyric timing") and "[#:verse]" in text and "[#:chorus]" in text
    assert "hello bright world" in text and "sing it now" in text
    assert soundfile.info(str(tmp_path / "song.ogg")).format == "OGG"


def test_cli_long_form_past_the_window(tmp_path, monkeypatch, capsys):
    """Past the model's length the CLI chains windows (the tiny test shrinks 240 s to 1 s to stay fast)."""
    from acestep_core import cli_tasks

    monkeypatch.setattr(cli_tasks, "MAX_MODEL_SECONDS", 1.0)
    out = tmp_path / "long.wav"
    argv = ["generate", "--tags", "pop", "--lyrics", "[verse]\nline one\n[chorus]\nline two", "--duration", "2.5",
            "--window-seconds", "1.2", "--overlap-seconds", "0.4", "--steps", "2", "--seed", "4", "--out", str(out),
            "--lrc", str(tmp_path / "long.lrc"), *TINY_ARGS]
    assert cli.main(argv) == 0
    audio, rate = soundfile.read(str(out), dtype="float32")
    assert rate == 48000 and abs(len(audio) / rate - 2.5) < 0.01
    assert (tmp_path / "long.lrc").read_text(encoding="utf-8").startswith("[re:")
    assert params.read_params(params.params_path_for(out))["audio_duration"] == 2.5
    assert cli.main(["generate", "--tags", "x", "--task", "repaint", "--duration", "300", *TINY_ARGS]) == 2
    assert "text2music only" in capsys.readouterr().err


def test_cli_stemgen_matches_the_core_generation(tmp_path, monkeypatch, capsys):
    from acestep_core import audio as codec
    from acestep_core import tasks
    from acestep_core.conditioning import encode_conditioning
    from acestep_core.loading import load_acestep
    from acestep_core.noise import SeededNoise
    from acestep_core.sampling.denoiser import GuidanceConfig
    from acestep_core.stemgen.control import ControlConfig, StemGenControl
    from acestep_core.stemgen.generate import encode_reference, generate_latent
    from acestep_core.stemgen.weights import load_stemgen, save_stemgen

    model = load_acestep(TINY_FOLDER, lyric_vocab=VOCAB)
    transformer = model.transformer
    control = StemGenControl.from_base(transformer, ControlConfig.for_transformer(transformer.config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (control.control_in, control.timbre_proj, *control.control_out):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
    file = save_stemgen(tmp_path / "stem.safetensors", control, None)
    t = torch.arange(int(1.5 * 48000)) / 48000
    tone = torch.stack([0.3 * torch.sin(2 * math.pi * 220 * t), 0.3 * torch.sin(2 * math.pi * 330 * t)])
    soundfile.write(str(tmp_path / "ref.wav"), tone.T.numpy(), 48000, subtype="FLOAT")
    out = tmp_path / "bass.wav"
    argv = ["generate", "--task", "stemgen", "--stemgen", str(file), "--src-audio", str(tmp_path / "ref.wav"),
            "--tags", "bass", "--steps", "2", "--seed", "11", "--out", str(out), *TINY_ARGS]
    assert cli.main(argv) == 0
    stem, rate = soundfile.read(str(out), dtype="float32")
    mix, _ = soundfile.read(str(tmp_path / "bass_mix.wav"), dtype="float32")
    assert rate == 48000 and stem.shape == mix.shape
    # the same generation through the core calls the StemGen node makes, with the CLI's settings
    from acestep_core.pipeline import Request

    options = tasks.with_options(tasks.SamplerOptions(steps=2, guidance=GuidanceConfig(use_erg_lyric=False)),
                                 batch_branches=Request().batch_branches)  # the CLI's default speed switch
    with torch.no_grad():
        weights = load_stemgen(file)
        cond = encode_conditioning(model, "bass", "", erg_tag=True)
        reference = encode_reference(model, tone[None], 48000)
        latent = generate_latent(transformer, weights.build_control(transformer), cond, reference,
                                 options=options, noise=SeededNoise([11], [0]))
        expected = codec.decode_latents(model.dcae, model.vocoder, latent, sample_rate=48000)[0]
    assert abs(torch.from_numpy(stem.T) - expected).max() < 1e-5
    assert cli.main(["generate", "--task", "stemgen", "--tags", "bass", *TINY_ARGS]) == 2
    assert "--stemgen" in capsys.readouterr().err
    s2a = ["generate", "--task", "singing2accompaniment", "--stemgen", str(file), "--src-audio",
           str(tmp_path / "ref.wav"), "--tags", "pop", "--steps", "2", "--out", str(tmp_path / "acc.wav"), *TINY_ARGS]
    assert cli.main(s2a) == 2
    assert "trained for stemgen" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI polish


def test_web_extensions_are_registered_once():
    """ComfyUI registers web/ once per way it is named (nodes.py, load_custom_node: pyproject's [tool.comfy] web,
    then WEB_DIRECTORY); two ways load every extension twice."""
    import tomllib

    from conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "web" not in project["tool"]["comfy"]
    assert (REPO / pack.WEB_DIRECTORY).resolve() == REPO / "web"


def test_checkpoint_validation_reports_once(tmp_path, monkeypatch):
    """ComfyUI repeats a custom validation message once per argument of VALIDATE_INPUTS (execution.py)."""
    import inspect

    validate = NODES["AceStepLoader"].VALIDATE_INPUTS
    assert list(inspect.signature(validate).parameters) == ["checkpoint"]
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY))
    message = validate("not-a-checkpoint")
    assert isinstance(message, str) and message.count("not-a-checkpoint") == 1 and "repo_id" in message
    assert validate("acestep-v1-tiny") is True
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(tmp_path))  # nothing installed: repo_id decides at run time
    monkeypatch.chdir(tmp_path)
    assert validate("ace_step_v1_3.5b.safetensors") is True


def test_stemgen_loader_says_when_no_file_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    loader = NODES["AceStepStemGenLoader"]
    names = loader.INPUT_TYPES()["required"]["control_name"][0]
    assert len(names) == 1 and "docs/stemgen.md" in names[0]
    message = loader.VALIDATE_INPUTS(names[0])
    assert isinstance(message, str) and "no StemGen file" in message and "stemgen.train" in message
    assert "stemgen.train" in loader.VALIDATE_INPUTS("acestep-stemgen.safetensors")


@pytest.mark.parametrize("name", ["acestep_stemgen", "acestep_singing2accompaniment"])
def test_stemgen_examples_explain_the_file_they_need(name):
    from test_workflows import UI_DIR, load

    notes = [n["widgets_values"][0] for n in load(UI_DIR, name)["nodes"]
             if n["type"] in ("MarkdownNote", "Note")]
    text = "\n".join(notes)
    assert "python -m acestep_core.stemgen.train" in text and "models/loras" in text
    assert "labels.json" in text and "stems/" in text


# ---------------------------------------------------------------------------------------------------------------
# LoRA recipes (docs/lora-recipes.md)

REAL_TRANSFORMER_KEYS = DATA / "real-keys"


@pytest.mark.parametrize("recipe", ["lyric2vocal", "text2samples"])
def test_lora_recipe_config_targets_real_modules(recipe):
    from conftest import REPO

    from acestep_core.loading import load_acestep
    from acestep_core.train.lora_layers import LoraSpec, inject_lora

    spec = LoraSpec.from_json(REPO / "config" / f"{recipe}_lora_config.json")
    model = load_acestep(TINY_FOLDER, lyric_vocab=VOCAB)
    injected = inject_lora(model.transformer, spec)
    for target in spec.target_modules:
        assert any(name == target or name.endswith("." + target) for name in injected), f"{target} matches nothing"
    # the same names exist in the real 3.5B checkpoint's key list
    keys = "\n".join(p.read_text() for p in REAL_TRANSFORMER_KEYS.rglob("*") if p.is_file() and p.suffix in
                     (".txt", ".json"))
    for target in spec.target_modules:
        assert f".{target}.weight" in keys, f"{target} is not a module of the real transformer"
    doc = (REPO / "docs" / "lora-recipes.md").read_text()
    from test_workflows import UI_FILES

    assert f"config/{recipe}_lora_config.json" in doc
    assert f"example_workflows/{UI_FILES['acestep_' + recipe].name}" in doc


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a baseline/progressive JPEG's SOF marker."""
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9", "not a complete JPEG"
    i = 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    raise AssertionError("no SOF marker")


def test_every_example_has_a_thumbnail_of_its_name():
    """ComfyUI's template browser shows example_workflows/<name>.json titled <name> with <name>.jpg as thumbnail
    (the frontend asks custom-node templates for jpg); tests/js/thumbnails.mjs draws them."""
    from test_workflows import UI_DIR

    examples = sorted(UI_DIR.glob("*.json"))
    assert examples
    for example in examples:
        thumbnail = example.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{example.name} has no {thumbnail.name}"
        assert _jpeg_size(thumbnail.read_bytes()) == (640, 400)
    assert sorted(p.stem for p in UI_DIR.glob("*.jpg")) == [p.stem for p in examples]


def test_cli_lora_repo_id_is_downloaded_once(tmp_path, monkeypatch):
    """The app's LoRA names are Hugging Face repo ids; a parameter file carrying one must still run."""
    import huggingface_hub

    from acestep_core import cli_app

    calls = []

    def fake_download(repo_id, local_dir, allow_patterns):
        calls.append((repo_id, allow_patterns))
        shutil.copytree(TINY / "acestep-v1-tiny-lora", local_dir, dirs_exist_ok=True)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    repo = "ACE-Step/ACE-Step-v1-chinese-rap-LoRA"
    first = cli_app.lora_path(repo, str(tmp_path))
    again = cli_app.lora_path(repo, str(tmp_path))
    assert first == again == str(tmp_path / "loras" / "ACE-Step-v1-chinese-rap-LoRA") and len(calls) == 1
    assert "pytorch_lora_weights.safetensors" in calls[0][1]
    local = str(TINY / "acestep-v1-tiny-lora")
    assert cli_app.lora_path(local, str(tmp_path)) == local
    args = cli.cli_app.parse(cli.build_parser(), ["generate", "--params", str(OFFICIAL)])
    assert args.out == "song.wav" and args.lora == []


def test_params_source_audio_is_found_as_written_or_beside_the_file(tmp_path):
    from acestep_core import cli_app

    data = json.loads(OFFICIAL.read_text(encoding="utf-8"))
    data.update(task="repaint", src_audio_path="./outputs/source.wav", repaint_start=0.5, repaint_end=1.0)
    path = tmp_path / "r_input_params.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="neither there nor beside the file"):
        cli_app.defaults_from_params(str(path))
    soundfile.write(str(tmp_path / "source.wav"), torch.zeros(4800, 2).numpy(), 48000)
    defaults, _ = cli_app.defaults_from_params(str(path))
    assert defaults["src_audio"] == str(tmp_path / "source.wav") and defaults["task"] == "repaint"
    assert (defaults["repaint_start"], defaults["repaint_end"]) == (0.5, 1.0)


def test_official_edit_file_notes_that_the_source_texts_are_gone(tmp_path, capsys):
    data = json.loads(OFFICIAL.read_text(encoding="utf-8"))
    data.update(task="edit", edit_target_prompt=data["prompt"], edit_target_lyrics="[verse]\nnew words")
    data["lyrics"] = data["edit_target_lyrics"]  # the official file writes the target's texts here
    path = tmp_path / "e_input_params.json"
    path.write_text(json.dumps(data))
    args = cli.cli_app.parse(cli.build_parser(), ["generate", "--params", str(path), "--lyrics", "[verse]\nold"])
    assert "keeps only the target" in capsys.readouterr().err
    setup = cli.cli_app.prepare(args)
    assert (setup.lyrics, setup.edit_lyrics) == ("[verse]\nold", "[verse]\nnew words")
