"""The static memory accounting of bench/memory.py: its live-bytes counter counts what lives (views once, freed
tensors no more), the real configurations' weights match the real checkpoints' key lists, and the per-phase
accounting runs the pack's own code on meta tensors (here on the tiny configurations, in seconds)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REAL_KEYS, TINY_FOLDER

from acestep_core import tasks
from acestep_core.loading import component_classes, folder_sources
from bench import memory

FILES = {"transformer": "ace_step_transformer.json", "dcae": "music_dcae_f8c8.json", "vocoder": "music_vocoder.json",
         "text": "umt5_base_encoder.json"}


def test_live_bytes_counts_storages_while_they_live():
    with memory.LiveBytes() as live:
        a = torch.zeros(1024, device="meta")  # 4 KiB
        b = a * 2  # 8 KiB alive
        view = b.view(2, 512)  # a view: no new bytes
        del a
        c = b + 1  # 8 KiB alive again (a freed first)
        assert live.current == 8192
        del b, c
        d = view.sum()  # `view` keeps b's storage alive: 4 KiB + 4 bytes
        assert live.current == 4096 + 4
    assert live.peak == 8192 and d.numel() == 1


def test_real_configurations_weigh_what_the_real_checkpoints_hold():
    models = memory.meta_models(torch.bfloat16)
    for name, module in (("transformer", models.transformer), ("dcae", models.dcae), ("vocoder", models.vocoder),
                         ("text", models.text)):
        keys = json.loads((REAL_KEYS / FILES[name]).read_text())["keys"]
        shapes = {k: v for k, v in keys.items() if name != "text" or not k.startswith("decoder.")}
        tied = {"encoder.embed_tokens.weight"} if name == "text" else set()
        expected = 2 * sum(math.prod(s) for k, s in shapes.items() if k not in tied)
        ours = memory.weight_bytes(module)
        assert abs(ours - expected) <= 0.001 * expected, name  # buffers (mel filterbank, window) are extra


@pytest.fixture(scope="module")
def tiny_meta():
    sources = folder_sources(TINY_FOLDER, ("transformer", "dcae", "vocoder", "text"))
    configs = {name: component_classes(name)[0](s.config, s.shapes) for name, s in sources.items()}
    return memory.meta_models(torch.bfloat16, transformer=configs["transformer"], dcae=configs["dcae"],
                              vocoder=configs["vocoder"], text=configs["text"])


def test_phases_account_weights_and_activations(tiny_meta):
    frames = tasks.frames_for_seconds(60.0)
    single = memory.account(tiny_meta, 60.0)
    windows = memory.account(tiny_meta, 60.0, overlapped_decode=True)
    assert [p.name for p in single] == ["text_encoding", "diffusion", "decode"]
    text, diffusion, decode = single
    assert text.weights == memory.weight_bytes(tiny_meta.text) and text.kept == 0
    assert diffusion.weights == memory.weight_bytes(tiny_meta.transformer)
    assert decode.weights == memory.weight_bytes(tiny_meta.dcae, tiny_meta.vocoder)
    assert decode.kept == 2 * 8 * 16 * frames, "the latents (bf16) wait on the device for decoding"
    mel_bytes = 2 * 2 * 128 * 8 * frames
    assert decode.activations_peak > mel_bytes, "at least the whole song's mel lives during the single pass"
    assert frames > 512 and windows[2].activations_peak < decode.activations_peak, "windows bound the decode"
    assert diffusion.activations_peak > 2 * 8 * 16 * frames * 2, "at least the latents and the velocity"
    report = memory.summary(single, memory.weight_bytes(tiny_meta.transformer, tiny_meta.dcae, tiny_meta.vocoder,
                                                          tiny_meta.text))
    assert report["low_vram_peak_bytes"] == max(p.peak for p in single) < report["plain_peak_bytes"]


def test_command_line_writes_the_report(tmp_path, monkeypatch, tiny_meta):
    monkeypatch.setattr(memory, "meta_models", lambda dtype: tiny_meta)
    out = tmp_path / "memory.json"
    report = memory.main(["--seconds", "10", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {"single_pass_decode", "overlapped_decode"} <= set(report)
    with pytest.raises(SystemExit):
        memory.main(["--seconds", "300"])
