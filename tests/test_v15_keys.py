"""ACE-Step 1.5 names and shapes: the model built on meta at every real configuration equals the real key lists
(tests/data/real-keys-15), the config is inferred back from them, the ComfyUI repack maps hold both ways, and the
loader reads the official folder layout and ComfyUI's files (tiny weights written here) and tells v1 from 1.5.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES_15, REAL_KEYS, REAL_KEYS_15, TINY_COMFY, TINY_FOLDER
from safetensors.torch import save_file

from acestep_core.errors import CheckpointError
from acestep_core.v15.config import AceStepConfig, default_layer_types
from acestep_core.v15.loading import (checkpoint_family, family_of_keys, load_acestep15, load_dit,
                                      load_silence_latent, load_text_encoder, load_vae, variant_from_name)
from acestep_core.v15.model import AceStep15Model, build_model, model_from_state_dict
from acestep_core.v15.text_encoder import (QWEN3_EMBEDDING_06B, add_comfy_prefix, build_text_model,
                                           config_from_weights, strip_comfy_prefix)
from acestep_core.v15.vae import AudioVAE, OobleckConfig, to_comfyui_state_dict

DIT_FILES = ["turbo", "base", "sft", "xl-turbo", "xl-base", "xl-sft"]


def _real(name: str) -> dict:
    return json.loads((REAL_KEYS_15 / f"{name}.json").read_text())


def _real_config(name: str) -> AceStepConfig:
    data = dict(_real(name)["config"])
    assert isinstance(data.pop("layer_types"), str)  # a description there: "alternating ..., N entries"
    return AceStepConfig.from_dict(data)


@pytest.mark.parametrize("name", DIT_FILES)
def test_dit_names_and_shapes_equal_real_checkpoint(name):
    real = _real(name)
    cfg = _real_config(name)
    model = build_model(cfg)  # meta: no memory
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    assert list(ours) == list(real["tensors"]), "names or order differ from the official state_dict"
    assert ours == real["tensors"]
    assert sum(torch.Size(s).numel() for s in ours.values()) == real["parameters"]
    assert len(ours) == real["count"]


@pytest.mark.parametrize("name", DIT_FILES)
def test_config_inferred_from_real_shapes(name):
    real = _real(name)
    expected = _real_config(name)
    inferred = AceStepConfig.from_weights(real["tensors"], model_version=variant_from_name(name))
    assert inferred.to_dict() == expected.to_dict()
    assert inferred.is_xl == name.startswith("xl")
    assert inferred.layer_types == default_layer_types(inferred.num_hidden_layers)


def test_xl_split_sizes():
    cfg = _real_config("xl-turbo")
    assert (cfg.hidden_size, cfg.encoder_size) == (2560, 2048)
    assert _real("xl-turbo")["tensors"]["decoder.condition_embedder.weight"] == [2560, 2048]


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        AceStepConfig(num_attention_heads=16, num_key_value_heads=5)
    with pytest.raises(ValueError, match="layer_types"):
        AceStepConfig(num_hidden_layers=4, layer_types=["sliding_attention"] * 3)
    with pytest.raises(ValueError, match="in_channels"):
        AceStepConfig(in_channels=100)
    with pytest.raises(ValueError, match="model_version"):
        AceStepConfig(model_version="large")
    with pytest.raises(ValueError, match="fsq_input_levels"):
        AceStepConfig(fsq_input_levels=5)
    with pytest.raises(ValueError, match="rope_scaling"):
        AceStepConfig(rope_scaling="linear")
    with pytest.raises(ValueError, match="sliding_window"):
        AceStepConfig(sliding_window=None)
    with pytest.raises(ValueError, match="lyric/timbre/pooler"):
        AceStepConfig(num_hidden_layers=4)
    with pytest.raises(ValueError, match="hidden_size"):
        AceStepConfig.from_dict({"hidden_size": "2048"})
    real = _real("turbo")["tensors"]
    with pytest.raises(ValueError, match="hidden_size=1024.*2048"):
        AceStepConfig.from_weights(real, {"hidden_size": 1024})
    with pytest.raises(ValueError, match="not found"):
        AceStepConfig.from_weights({k: v for k, v in real.items() if not k.startswith("encoder.")})


def test_config_json_round_trip_and_bookkeeping_keys():
    data = dict(_real_config("xl-base").to_dict(), architectures=["AceStepConditionGenerationModel"],
                torch_dtype="bfloat16", transformers_version="4.57.6", is_turbo=False)
    cfg = AceStepConfig.from_dict(data)
    assert cfg.model_version == "base" and cfg.extra["torch_dtype"] == "bfloat16"
    assert AceStepConfig.from_dict(cfg.to_dict()) == cfg


def test_load_state_dict_strict_rejects_wrong_weights():
    cfg = AceStepConfig(**json.loads((FIXTURES_15 / "config.json").read_text()))
    model = build_model(cfg, device="cpu")
    sd = model.state_dict()
    again = model_from_state_dict(sd, cfg)
    assert isinstance(again, AceStep15Model) and not any(p.is_meta for p in again.parameters())
    with pytest.raises(ValueError, match="missing"):
        model_from_state_dict({k: v for k, v in sd.items() if k != "null_condition_emb"}, cfg)
    bad = dict(sd, null_condition_emb=torch.zeros(1, 1, 7))
    with pytest.raises(ValueError, match="shape"):
        model_from_state_dict(bad, cfg)


# ---------------------------------------------------------------------------------------------- text encoder
def test_text_encoder_names_and_shapes():
    real = _real("text-encoder")
    model = build_text_model(real["config"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(real["tensors"]) and ours == real["tensors"]
    assert sum(torch.Size(s).numel() for s in ours.values()) == real["parameters"]
    assert config_from_weights({k: tuple(v) for k, v in real["tensors"].items()}) == QWEN3_EMBEDDING_06B


def test_text_encoder_comfy_prefix_both_ways():
    real = _real("text-encoder")["tensors"]
    comfy = add_comfy_prefix(real)
    assert "model.layers.0.post_attention_layernorm.weight" in comfy  # ComfyUI's detection key
    assert comfy["model.layers.0.self_attn.q_norm.weight"] == [128]
    assert strip_comfy_prefix(comfy) == real
    assert strip_comfy_prefix(real) == real


# ---------------------------------------------------------------------------------------------- DiT repack
def test_dit_comfy_prefix_both_ways():
    real = _real("turbo")["tensors"]
    from acestep_core.v15.loading import _strip_dit_prefix

    for prefix in ("", "model.diffusion_model."):
        packed = {prefix + k: v for k, v in real.items()}
        packed.update({"vae.encoder.layers.0.bias": [128], "text_encoders.qwen3_06b.transformer.model.norm.weight": [1]})
        mapping = _strip_dit_prefix(packed)
        assert set(mapping) == set(real)
        assert all(mapping[k] == prefix + k for k in real)
    assert family_of_keys(real) == "1.5"


def test_family_of_v1_and_15():
    v1 = json.loads((REAL_KEYS / "ace_step_transformer.json").read_text())
    v1_keys = v1["keys"]
    assert family_of_keys(v1_keys) == "v1"
    assert family_of_keys("model.diffusion_model." + k for k in v1_keys) == "v1"
    assert family_of_keys(_real("xl-sft")["tensors"]) == "1.5"
    assert family_of_keys(_real("vae")["tensors"]) is None
    assert checkpoint_family(TINY_FOLDER) == "v1"
    assert checkpoint_family(TINY_COMFY) == "v1"


# ---------------------------------------------------------------------------------------------- on-disk layouts
TINY_TEXT = dict(QWEN3_EMBEDDING_06B, vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TINY_VAE = dict(encoder_hidden_size=8, downsampling_ratios=[2, 4, 4, 6, 10], channel_multiples=[1, 2, 2, 2, 2],
                decoder_channels=4, decoder_input_channels=4)


def _tiny_parts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = AceStepConfig(**json.loads((FIXTURES_15 / "config.json").read_text()))
    cfg = AceStepConfig.from_dict(dict(cfg.to_dict(), audio_acoustic_hidden_dim=4, in_channels=12,
                                       timbre_hidden_dim=4))
    dit = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in build_model(cfg).state_dict().items()}
    with torch.device("meta"):
        vae_names = AudioVAE(OobleckConfig(**TINY_VAE)).state_dict()
    vae = {k: torch.randn(v.shape, generator=g) * 0.1 + (1 if k.endswith("weight_g") else 0)
           for k, v in vae_names.items()}
    text = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in build_text_model(TINY_TEXT).state_dict().items()}
    return cfg, dit, vae, text


def _write_official(root, cfg, dit, vae, text, dit_folder="acestep-v15-turbo"):
    d = root / dit_folder
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), architectures=["AceStepConditionGenerationModel"])))
    save_file({k: v.contiguous() for k, v in dit.items()}, str(d / "model.safetensors"))
    torch.save(torch.randn(1, 4, 50), str(d / "silence_latent.pt"))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps(dict(TINY_VAE, audio_channels=2, sampling_rate=48000)))
    save_file(vae, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "Qwen3-Embedding-0.6B").mkdir()
    (root / "Qwen3-Embedding-0.6B" / "config.json").write_text(json.dumps(TINY_TEXT))
    save_file(text, str(root / "Qwen3-Embedding-0.6B" / "model.safetensors"))


def test_load_official_main_repo_layout(tmp_path):
    cfg, dit, vae, text = _tiny_parts()
    _write_official(tmp_path, cfg, dit, vae, text)
    assert checkpoint_family(tmp_path) == "1.5"
    ck = load_acestep15(tmp_path)
    assert ck.config == cfg and ck.config.model_version == "turbo"
    assert all(torch.equal(ck.model.state_dict()[k], v) for k, v in dit.items())
    assert ck.silence_latent.shape == (1, 50, 4)  # official [1, 64, T] file transposed
    assert ck.vae.config == OobleckConfig(**TINY_VAE)
    assert torch.equal(ck.text_encoder.embed_lyrics(torch.tensor([[3, 5]]))[0, 1], text["embed_tokens.weight"][5])
    assert ck.text_encoder.tokenizer is None  # no tokenizer files were written


def test_load_dit_repo_sharded_and_bf16(tmp_path):
    cfg, dit, _, _ = _tiny_parts(1)
    cfg = AceStepConfig.from_dict(dict(cfg.to_dict(), model_version="sft"))
    keys = sorted(dit)
    half = len(keys) // 2
    save_file({k: dit[k] for k in keys[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: dit[k] for k in keys[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    model, source = load_dit(tmp_path, dtype=torch.bfloat16)
    assert source.endswith("model.safetensors.index.json")
    assert model.config.model_version == "sft"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert load_silence_latent(tmp_path) is None


def test_load_comfyui_split_and_all_in_one(tmp_path):
    cfg, dit, vae, text = _tiny_parts(2)
    dm = tmp_path / "diffusion_models"
    dm.mkdir()
    save_file({"model.diffusion_model." + k: v for k, v in dit.items()}, str(dm / "acestep_v1.5_sft.safetensors"))
    save_file(to_comfyui_state_dict(vae, OobleckConfig(**TINY_VAE)), str(tmp_path / "ace_1.5_vae.safetensors"))
    save_file(add_comfy_prefix(text), str(tmp_path / "qwen_0.6b_ace15.safetensors"))
    assert checkpoint_family(dm / "acestep_v1.5_sft.safetensors") == "1.5"
    model, _ = load_dit(dm / "acestep_v1.5_sft.safetensors")
    assert model.config.model_version == "sft"  # from the file name: weights cannot tell
    v, _ = load_vae(tmp_path / "ace_1.5_vae.safetensors")
    assert all(torch.equal(v.state_dict()[k], t) for k, t in vae.items())
    te, _ = load_text_encoder(tmp_path / "qwen_0.6b_ace15.safetensors")
    assert torch.equal(te.model.norm.weight, text["norm.weight"])

    aio = {"model.diffusion_model." + k: v for k, v in dit.items()}
    aio.update({"vae." + k: t for k, t in to_comfyui_state_dict(vae, OobleckConfig(**TINY_VAE)).items()})
    aio.update({"text_encoders.qwen3_06b.transformer.model." + k: t for k, t in text.items()})
    save_file(aio, str(tmp_path / "ace_step_1.5_turbo_aio.safetensors"))
    ck = load_acestep15(tmp_path / "ace_step_1.5_turbo_aio.safetensors")
    assert ck.config.model_version == "turbo"
    assert ck.silence_latent.shape == (1, 15000, 4)  # no silence file: the VAE's encoding of silence
    assert torch.equal(ck.text_encoder.model.norm.weight, text["norm.weight"])


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_acestep15(tmp_path / "missing")
    (tmp_path / "x.ckpt").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="pickle"):
        load_dit(tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="no ACE-Step 1.5 DiT"):
        load_dit(tmp_path)
    with pytest.raises(CheckpointError, match="not a 1.5 diffusion model"):
        load_dit(TINY_COMFY)
    with pytest.raises(ValueError, match="unknown 1.5 components"):
        load_acestep15(TINY_COMFY, components=("dit", "lm"))
