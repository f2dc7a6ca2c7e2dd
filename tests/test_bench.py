"""The speed benchmark runs end to end on the tiny checkpoint (CPU) and writes the documented JSON fields; its
random-weight builder makes every component on the device with finite outputs."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REAL_KEYS, TINY_FOLDER

from acestep_core import tasks
from acestep_core.loading import component_classes, folder_sources
from bench import rtf

PHASES = {"text_encoding", "diffusion", "dcae_decode", "vocoder", "decode_other", "offload"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return rtf.main(["--checkpoint", str(TINY_FOLDER), "--seconds", "2", "--steps", "2", "--compare",
                     "--warmup", "0", "--repeats", "1", "--out", str(out)])


def test_report_is_written_as_json_named_after_the_device(report):
    path = report["meta"]["path"]
    assert path.endswith(".json") and "/cpu-" in path
    written = json.loads(open(path).read())
    assert written["results"] == report["results"] and written["comparisons"] == report["comparisons"]
    meta = written["meta"]
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["device_name"]
    assert meta["guidance"]["cfg_type"] == "apg" and meta["guidance"]["use_erg_diffusion"]


def test_each_variant_reports_phases_rtf_and_model_calls(report):
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"eager", "fast"}
    for r in results.values():
        assert set(r["phases_s"]) == PHASES
        assert all(v >= 0 for v in r["phases_s"].values())
        assert r["phases_s"]["diffusion"] > 0 and r["phases_s"]["dcae_decode"] > 0 and r["phases_s"]["vocoder"] > 0
        assert r["total_s"] >= sum(v for k, v in r["phases_s"].items() if k != "decode_other") * 0.99
        assert r["rtf"] == pytest.approx(r["batch"] * r["seconds"] / r["total_s"])
        assert r["peak_gpu_memory_gib"] is None and r["latent_frames"] == tasks.frames_for_seconds(2)
        assert len(r["calls_per_step"]) == 2 and sum(r["calls_per_step"]) == r["model_calls"]
    guidance = tasks.SamplerOptions().guidance
    branches = [len(guidance.branches(step, 2)) for step in range(2)]
    assert branches != [1, 1], "a 2-step schedule has one guided step"
    assert results["eager"]["calls_per_step"] == branches and results["fast"]["calls_per_step"] == [1, 1]
    assert not any(results["eager"]["options"].values()) and all(results["fast"]["options"][k]
                                                                 for k in rtf.FAST_FLAGS)


def test_comparison_reports_speed_ratio_and_max_differences(report):
    (c,) = report["comparisons"]
    assert c["speedup"] == pytest.approx(c["eager_total_s"] / c["fast_total_s"])
    assert c["diffusion_speedup"] > 0 and c["process_cpu_speedup"] > 0
    assert 0 <= c["max_abs_diff_latents"] <= 1e-4 and c["max_abs_latents"] > 0.1
    assert 0 <= c["max_abs_diff_audio"] <= 1e-4 and c["max_abs_audio"] > 0


def test_command_line_refusals():
    with pytest.raises(SystemExit):
        rtf.parse_args(["--checkpoint", "x", "--seconds", "300"])
    with pytest.raises(SystemExit):
        rtf.parse_args(["--checkpoint", "x", "--random-weights"])
    with pytest.raises(SystemExit):
        rtf.parse_args(["--checkpoint", "x", "--compare", "--eager"])
    args = rtf.parse_args(["--random-weights", "--no-batch-branches", "--compile"])
    assert not args.batch_branches and args.reuse_cross_kv and args.compile and args.seconds == [60.0, 240.0]


def test_random_weights_build_every_component_on_the_device_and_run():
    sources = folder_sources(TINY_FOLDER, ("transformer", "dcae", "vocoder", "text"))
    configs = {name: component_classes(name)[0](s.config, s.shapes) for name, s in sources.items()}
    models = rtf.random_models(torch.device("cpu"), torch.float32, transformer=configs["transformer"],
                               dcae=configs["dcae"], vocoder=configs["vocoder"], text=configs["text"])
    assert models.source == "random weights, reduced configuration"
    for module in (models.transformer, models.dcae, models.vocoder, models.text_model):
        tensors = list(module.parameters())
        assert tensors and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        assert not any(t.requires_grad for t in tensors)
    shapes = {k: tuple(v.shape) for k, v in models.transformer.state_dict().items()}
    assert shapes == {k: tuple(v) for k, v in sources["transformer"].shapes.items()}
    text = models.text_model
    assert text.shared.weight is text.encoder.embed_tokens.weight
    inputs = rtf.make_inputs(models, 8, 20, seed=0)
    run = rtf.run_once(models, inputs, rtf.Setting(1.0, 2, 1), tasks.SamplerOptions(steps=2), fast_decode=True,
                       offloader=None, seed=0)
    assert torch.isfinite(run["latents"]).all() and torch.isfinite(run["audio"]).all()
    assert run["audio"].abs().max() > 0


def test_umt5_base_sizes_match_the_real_key_list():
    real = json.loads((REAL_KEYS / "umt5_base_encoder.json").read_text())["keys"]
    ours = rtf.umt5_config_from_checkpoint(None, rtf.UMT5_BASE_SHAPES).to_dict()
    assert ours == rtf.umt5_config_from_checkpoint(None, real).to_dict()
