"""End-to-end parity with the official pipeline: strings and source audio in, latents and 48 kHz audio out.

Every `e2e_*` fixture case is replayed: tags through UMT5, lyrics through our tokenizer, source audio through
our DCAE, the recorded noise in draw order, our task layer and samplers, our decoder. Nothing comes from the
fixture's intermediates except for the diagnostics printed on failure.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_FOLDER, TINY_LORA, VOCAB, Case, case_params

from acestep_core.loading import load_acestep
from acestep_core.lora import ensure_loras, load_lora_file
from acestep_core.noise import ReplayNoise
from acestep_core.pipeline import generate, request_from_official_args

DEFECT_CASES = {
    "e2e_edit_pingpong": "official defect: the official flow-edit never applies the PingPong update in its edit "
    "phase, so the latent does not move there; we move it (tested in test_edit_pingpong_moves_in_edit_phase)",
}


@pytest.fixture(scope="module")
def model():
    return load_acestep(TINY_FOLDER, lyric_vocab=VOCAB)


def _request(case: Case):
    audio = {}
    if "src_audio" in case.inputs:
        audio.update(src_audio=case.inputs["src_audio"], src_sample_rate=case.meta["sample_rate_src"])
    if "ref_audio" in case.inputs:
        audio.update(ref_audio=case.inputs["ref_audio"], ref_sample_rate=case.meta["sample_rate_ref"])
    return request_from_official_args(case.args, **audio)


def _noise(case: Case) -> ReplayNoise:
    return ReplayNoise([case.inputs[k] for k in sorted(k for k in case.inputs if k.startswith("noise_"))])


def _run(model, case: Case):
    lora = [(load_lora_file(TINY_LORA), float(case.args["lora_weight"]))] if case.args.get("lora_name_or_path") else []
    ensure_loras(model.transformer, lora)
    try:
        noise = _noise(case)
        result = generate(model, _request(case), noise=noise)
    finally:
        ensure_loras(model.transformer, [])
    return result, noise


@pytest.mark.parametrize("path", case_params("e2e_"))
def test_e2e_parity(model, path):
    case = Case(path)
    if case.name in DEFECT_CASES:
        pytest.skip(DEFECT_CASES[case.name])
    result, noise = _run(model, case)
    assert noise.position == len(noise.tensors), "every recorded random draw must be consumed, in order"
    inter = case.intermediates
    if "lyric_token_ids" in inter and case.args.get("lyrics"):
        assert result.conditioning.lyric_ids[0].tolist() == inter["lyric_token_ids"].tolist()
    if "text_hidden_states" in inter:
        torch.testing.assert_close(result.conditioning.text_states, inter["text_hidden_states"], atol=1e-4, rtol=1e-4)
    latents = case.outputs["latents"]
    torch.testing.assert_close(result.latents, latents, atol=case.atol("latents", 1e-3), rtol=0)
    wave = case.outputs.get("waveform", case.outputs.get("waveform_head"))
    got = result.waveform[..., : wave.shape[-1]]
    assert result.sample_rate == case.meta["waveform_stats"]["waveform_sample_rate"]
    assert tuple(result.waveform.shape) == tuple(case.meta["waveform_stats"]["waveform_shape"])
    torch.testing.assert_close(got, wave, atol=case.atol("waveform", 1e-3), rtol=0)


def test_edit_pingpong_moves_in_edit_phase(model):
    """Our flow-edit with PingPong moves the latent in the edit phase, unlike the recorded official defect."""
    case = Case(next(p for p in (pp.values[0] for pp in case_params("e2e_edit_pingpong"))))
    request = _request(case)
    request.edit_n_max = 1.0  # official: returns the source unchanged
    torch.manual_seed(0)
    noise = ReplayNoise([torch.randn(1, 8, 16, case.inputs["noise_000"].shape[-1]) for _ in range(64)])
    result = generate(model, request, noise=noise, decode=False)
    src = case.intermediates["src_latents"]
    assert (result.latents - src).abs().max() > 1e-2
    assert torch.isfinite(result.latents).all()
