"""ACE-Step 1.5 Oobleck VAE: real names/shapes, ComfyUI key map both ways, diffusers 0.42.1 as oracle, tiling.

diffusers' AutoencoderOobleck is what the official 1.5 code loads the VAE with, so it is the oracle for encode
(posterior mean and std) and decode, on tiny random configurations (the real one is 169M parameters). Seeds from
ACESTEP15_PARITY_SEEDS, durations from ACESTEP15_PARITY_SECONDS.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import REAL_KEYS_15

from acestep_core.v15.vae import (AudioVAE, OobleckConfig, comfyui_key_map, from_comfyui_state_dict,
                                  to_comfyui_state_dict, vae_from_state_dict)

SEEDS = [int(s) for s in os.environ.get("ACESTEP15_PARITY_SEEDS", "0,1").split(",") if s.strip()]
SECONDS = [float(s) for s in os.environ.get("ACESTEP15_PARITY_SECONDS", "0.44,1.2,2.04").split(",") if s.strip()]

TINY_CONFIGS = {
    # The real strides (hop 1920, 48 kHz -> 25 latents/s) at a tiny width.
    "real_strides": dict(encoder_hidden_size=8, downsampling_ratios=[2, 4, 4, 6, 10],
                         channel_multiples=[1, 2, 2, 2, 2], decoder_channels=4, decoder_input_channels=4),
    # Short hop, so the tiling tests cover many windows cheaply.
    "short_hop": dict(encoder_hidden_size=16, downsampling_ratios=[2, 4], channel_multiples=[1, 2],
                      decoder_channels=8, decoder_input_channels=8),
}


def rel(a: torch.Tensor, e: torch.Tensor) -> float:
    return float((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30))


def _random_vae(name: str, seed: int) -> tuple[OobleckConfig, dict[str, torch.Tensor], AudioVAE]:
    cfg = OobleckConfig(**TINY_CONFIGS[name])
    with torch.device("meta"):
        names = AudioVAE(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, t in names.items():
        noise = torch.randn(t.shape, generator=g)
        sd[k] = 0.1 * noise if k.endswith((".alpha", ".beta")) else (
            1 + 0.1 * noise if k.endswith("weight_g") else 0.3 * noise)
    return cfg, sd, vae_from_state_dict(sd, cfg)


def _diffusers_vae(cfg: OobleckConfig, sd):
    diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-dev.txt (diffusers==0.42.1)")
    assert diffusers.__version__ == "0.42.1", f"the oracle is diffusers 0.42.1, found {diffusers.__version__}"
    from diffusers import AutoencoderOobleck

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's legacy weight_norm, as diffusers uses it
        ref = AutoencoderOobleck(**cfg.to_dict())
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


# ---------------------------------------------------------------------------------------------- names
def test_real_names_and_shapes():
    real = json.loads((REAL_KEYS_15 / "vae.json").read_text())
    cfg = OobleckConfig.from_dict(real["config"])
    assert cfg == OobleckConfig(), "the real VAE config is the default OobleckConfig"
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in AudioVAE(cfg).state_dict().items()}
    assert list(ours) == list(real["tensors"]), "names or their order differ from diffusers AutoencoderOobleck"
    assert ours == real["tensors"]
    assert sum(torch.Size(s).numel() for s in ours.values()) == real["parameters"]
    assert cfg.hop_length == 1920 and cfg.sampling_rate // cfg.hop_length == 25


def test_comfyui_key_map_matches_reference():
    ref = json.loads((REAL_KEYS_15 / "vae-comfyui-keymap.json").read_text())["tensors"]
    ours = comfyui_key_map()
    assert ours == {k: v[0] for k, v in ref.items()}


def test_comfyui_repack_both_ways():
    ref = json.loads((REAL_KEYS_15 / "vae-comfyui-keymap.json").read_text())["tensors"]
    with torch.device("meta"):
        sd = AudioVAE().state_dict()
    comfy = to_comfyui_state_dict(sd)
    assert {k: list(v.shape) for k, v in comfy.items()} == {v[0]: v[1] for v in ref.values()}
    back = from_comfyui_state_dict(comfy)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    # the parametrizations spelling of weight norm loads too
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1"): v for k, v in comfy.items()}
    assert set(from_comfyui_state_dict(renamed)) == set(sd)


def test_comfyui_file_loads_to_the_same_vae():
    cfg, sd, vae = _random_vae("short_hop", 3)
    again = vae_from_state_dict(to_comfyui_state_dict(sd, cfg), cfg)
    z = torch.randn(1, cfg.decoder_input_channels, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(z), again.decode(z))


def test_folded_weight_norm_loads():
    cfg, sd, vae = _random_vae("short_hop", 4)
    folded = {}
    for k, v in sd.items():
        if k.endswith(".weight_g"):
            continue
        if k.endswith(".weight_v"):
            base = k[: -len(".weight_v")]
            folded[base + ".weight"] = torch._weight_norm(v, sd[base + ".weight_g"], 0)
        else:
            folded[k] = v
    again = vae_from_state_dict(folded, cfg)
    z = torch.randn(1, cfg.decoder_input_channels, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(again.decode(z), vae.decode(z)) < 1e-5


# ---------------------------------------------------------------------------------------------- diffusers oracle
@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_against_diffusers(name, seed, seconds):
    cfg, sd, vae = _random_vae(name, seed)
    ref = _diffusers_vae(cfg, sd)
    g = torch.Generator().manual_seed(100 + seed)
    samples = max(cfg.hop_length, round(seconds * cfg.sampling_rate))
    if name == "short_hop":
        samples = max(cfg.hop_length, samples // 200)
    audio = torch.randn(2, 2, samples, generator=g) * 0.5
    with torch.no_grad():
        post = ref.encode(audio).latent_dist
        mean, std = vae.encode_moments(audio)
        assert rel(mean, post.mean) <= 1e-5 and rel(std, post.std) <= 1e-5
        z = torch.randn(2, cfg.decoder_input_channels, samples // cfg.hop_length, generator=g)
        out, expected = vae.decode(z), ref.decode(z).sample
        assert out.shape == expected.shape
        assert rel(out, expected) <= 1e-5


# ---------------------------------------------------------------------------------------------- tiling
def test_tiled_decode_equals_whole_when_overlap_covers_receptive_field():
    cfg, _, vae = _random_vae("short_hop", 5)
    z = torch.randn(2, cfg.decoder_input_channels, 90, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = vae.decode(z)
        seen = []
        tiled = vae.decode(z, chunk=50, overlap=20, progress=lambda i, n: seen.append((i, n)))
    assert tiled.shape == whole.shape == (2, 2, 90 * cfg.hop_length)
    assert rel(tiled, whole) <= 1e-5
    assert seen == [(1, 9), (2, 9), (3, 9), (4, 9), (5, 9), (6, 9), (7, 9), (8, 9), (9, 9)]


def test_tiled_encode_equals_whole_when_overlap_covers_receptive_field():
    cfg, _, vae = _random_vae("short_hop", 6)
    audio = torch.randn(1, 2, 90 * cfg.hop_length, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = vae.encode(audio, sample=False)
        tiled = vae.encode(audio, sample=False, chunk=400, overlap=160)
    assert tiled.shape == whole.shape == (1, cfg.decoder_input_channels, 90)
    assert rel(tiled, whole) <= 1e-5


@pytest.mark.parametrize("frames", [1, 13, 64, 65, 200])
def test_tiled_decode_lengths(frames):
    cfg, _, vae = _random_vae("short_hop", 7)
    z = torch.randn(1, cfg.decoder_input_channels, frames)
    with torch.no_grad():
        assert vae.decode(z, chunk=16, overlap=4).shape[-1] == frames * cfg.hop_length


def test_sampled_encode_is_mean_plus_std_noise():
    cfg, _, vae = _random_vae("short_hop", 8)
    audio = torch.randn(1, 2, 40 * cfg.hop_length, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mean, std = vae.encode_moments(audio)
        a = vae.encode(audio, generator=torch.Generator().manual_seed(9))
        b = vae.encode(audio, generator=torch.Generator().manual_seed(9), chunk=120, overlap=40)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(a, mean + std * eps)
    assert a.shape == b.shape


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(1, 1, 100), "convert mono"),
    (torch.zeros(1, 2, 0), r"\[B, 2, samples\]"),
    (torch.full((1, 2, 100), float("nan")), "NaN"),
    (torch.zeros(1, 2, 100, dtype=torch.long), "float tensor"),
])
def test_encode_rejects_bad_audio(bad, match):
    _, _, vae = _random_vae("short_hop", 0)
    with pytest.raises(ValueError, match=match):
        vae.encode(bad)


def test_decode_rejects_bad_latents():
    cfg, _, vae = _random_vae("short_hop", 0)
    with pytest.raises(ValueError, match="channel-first"):
        vae.decode(torch.zeros(1, 10, cfg.decoder_input_channels))
    with pytest.raises(ValueError, match="exceed twice the overlap"):
        vae.decode(torch.zeros(1, cfg.decoder_input_channels, 40), chunk=8, overlap=4)
    with pytest.raises(ValueError, match="Oobleck"):
        vae_from_state_dict({"encoder.layers.99.weight": torch.zeros(1)}, cfg)
