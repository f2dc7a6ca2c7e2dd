"""ACE-Step transformer + Conformer lyric encoder: parity with the official fixtures, key layout, ERG, input checks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acestep_core.models.lyric_encoder import LyricEncoderConfig
from acestep_core.models.transformer import AceStepTransformer, TransformerConfig
from conftest import REAL_KEYS, TINY_FOLDER, Case, case_params

TINY_TRANSFORMER = TINY_FOLDER / "ace_step_transformer"

# fixture intermediate name -> our submodule whose output it is
SUBMODULE_INTERMEDIATES = {
    "speaker_embedder": "speaker_embedder_out",
    "genre_embedder": "genre_embedder_out",
    "lyric_embs": "lyric_embs_out",
    "lyric_encoder": "lyric_encoder_out",
    "lyric_proj": "lyric_proj_out",
    "timestep_embedder": "embedded_timestep",
    "t_block": "temb",
    "proj_in": "proj_in_out",
}


def load_tiny() -> AceStepTransformer:
    """Tiny checkpoint: config.json + shapes -> config, build on meta, strict assign-load."""
    state = load_file(str(TINY_TRANSFORMER / "diffusion_pytorch_model.safetensors"))
    config = json.loads((TINY_TRANSFORMER / "config.json").read_text())
    cfg = TransformerConfig.from_checkpoint(config, {k: v.shape for k, v in state.items()})
    with torch.device("meta"):
        model = AceStepTransformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> AceStepTransformer:
    return load_tiny()


def conditions(case: Case) -> tuple[torch.Tensor, ...]:
    i = case.inputs
    return (i["encoder_text_hidden_states"], i["text_attention_mask"], i["speaker_embeds"],
            i["lyric_token_idx"], i["lyric_mask"])


def assert_near(ours: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case_dir", case_params("transformer_forward_"))
def test_forward_matches_official(tiny: AceStepTransformer, case_dir) -> None:
    case = Case(case_dir)
    atol = case.atol("sample", 1e-4)
    captured: dict[str, torch.Tensor] = {}
    hooks = [getattr(tiny, name).register_forward_hook(lambda m, a, out, key=key: captured.__setitem__(key, out))
             for name, key in SUBMODULE_INTERMEDIATES.items()]
    hooks += [block.register_forward_hook(lambda m, a, out, key=f"block_{i:02d}_out": captured.__setitem__(key, out))
              for i, block in enumerate(tiny.transformer_blocks)]
    try:
        with torch.no_grad():
            out = tiny(**case.inputs)
            states, mask = tiny.encode(*conditions(case))
    finally:
        for hook in hooks:
            hook.remove()

    assert_near(states, case.intermediates["encoder_hidden_states"], atol, "encode states")
    assert torch.equal(mask, case.intermediates["encoder_hidden_mask"]), "encode mask"
    for key in list(SUBMODULE_INTERMEDIATES.values()) + [f"block_{i:02d}_out" for i in range(len(tiny.transformer_blocks))]:
        assert_near(captured[key], case.intermediates[key], atol, key)
    assert_near(out, case.outputs["sample"], atol, "output.sample")


def test_padded_frames_give_finite_output(tiny: AceStepTransformer) -> None:
    """Padded latent frames have fully masked cross-attention rows: 0, not NaN (fixtures README pitfall)."""
    case = Case(case_params("transformer_forward_padded")[0].values[0])
    assert (case.inputs["attention_mask"] == 0).any(), "the padded fixture must pad latent frames"
    with torch.no_grad():
        out = tiny(**case.inputs)
    assert torch.isfinite(out).all()


def test_cross_kv_reuse_equals_plain_decode(tiny: AceStepTransformer) -> None:
    case = Case(case_params("transformer_forward_padded")[0].values[0])
    i = case.inputs
    with torch.no_grad():
        states, mask = tiny.encode(*conditions(case))
        plain = tiny.decode(i["hidden_states"], i["attention_mask"], states, mask, i["timestep"])
        cached = tiny.decode(i["hidden_states"], i["attention_mask"], states, mask, i["timestep"],
                             cross_kv=tiny.cross_kv(states))
    assert torch.equal(plain, cached)


def test_empty_lyrics_give_finite_states(tiny: AceStepTransformer) -> None:
    """Official empty lyrics are ids [[0]] with mask [[0]]: the Conformer row is fully masked -> zeros, no NaN."""
    case = Case(case_params("transformer_forward_nomask")[0].values[0])
    text, text_mask, speaker, _, _ = conditions(case)
    ids = torch.zeros(text.shape[0], 1, dtype=torch.long)
    with torch.no_grad():
        states, mask = tiny.encode(text, text_mask, speaker, ids, torch.zeros_like(ids))
    assert torch.isfinite(states).all()
    assert mask[:, -1].eq(0).all()


def test_erg_diffusion_tempers_cross_attention_only(tiny: AceStepTransformer) -> None:
    """ERG scales to_q of attn and cross_attn in blocks 15..19: cross-attn outputs change, earlier blocks do not,
    the linear self-attention barely moves (the factor cancels), tau 1.0 is a no-op (design §7.6)."""
    case = Case(case_params("transformer_forward_nomask")[0].values[0])
    i = case.inputs
    first = 15
    runs: dict[object, dict[str, torch.Tensor]] = {}
    for tau in (None, 0.01, 1.0):
        captured: dict[str, torch.Tensor] = {}
        block = tiny.transformer_blocks[first]
        hooks = [
            block.attn.register_forward_hook(lambda m, a, out: captured.__setitem__("attn", out)),
            block.cross_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("cross", out)),
            tiny.transformer_blocks[first - 1].register_forward_hook(
                lambda m, a, out: captured.__setitem__("before", out)),
        ]
        try:
            with torch.no_grad():
                states, mask = tiny.encode(*conditions(case))
                captured["out"] = tiny.decode(i["hidden_states"], i["attention_mask"], states, mask, i["timestep"],
                                              erg_tau=tau)
        finally:
            for hook in hooks:
                hook.remove()
        runs[tau] = captured

    none, erg, one = runs[None], runs[0.01], runs[1.0]
    assert all(torch.equal(none[k], one[k]) for k in none), "erg_tau=1.0 must equal no ERG"
    assert torch.equal(none["before"], erg["before"]), "blocks before 15 must not change"
    torch.testing.assert_close(erg["attn"], none["attn"], atol=1e-5, rtol=1e-5)
    assert (erg["cross"] - none["cross"]).abs().max() > 1e-3, "ERG must flatten the cross-attention"
    assert not torch.allclose(erg["out"], none["out"])


def test_erg_lyric_changes_only_lyric_tokens(tiny: AceStepTransformer) -> None:
    case = Case(case_params("transformer_forward_nomask")[0].values[0])
    lyric_len = case.inputs["lyric_token_idx"].shape[1]
    with torch.no_grad():
        plain, _ = tiny.encode(*conditions(case))
        tempered, _ = tiny.encode(*conditions(case), lyric_erg_tau=0.01)
        unit, _ = tiny.encode(*conditions(case), lyric_erg_tau=1.0)
    assert torch.equal(plain, unit)
    assert torch.equal(plain[:, :-lyric_len], tempered[:, :-lyric_len])
    assert (plain[:, -lyric_len:] - tempered[:, -lyric_len:]).abs().max() > 1e-4


def test_real_config_state_dict_matches_checkpoint_keys() -> None:
    real = json.loads((REAL_KEYS / "ace_step_transformer.json").read_text())["keys"]
    with torch.device("meta"):
        model = AceStepTransformer(TransformerConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(real) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(real)) == [], "unexpected keys"
    assert {k: v for k, v in ours.items() if real[k] != v} == {}, "shape mismatches"


def test_from_checkpoint_derives_real_config_from_shapes() -> None:
    shapes = json.loads((REAL_KEYS / "ace_step_transformer.json").read_text())["keys"]
    assert TransformerConfig.from_checkpoint(None, shapes) == TransformerConfig()
    official = {"num_attention_heads": 20, "attention_head_dim": 128, "inner_dim": 2560, "num_layers": 24,
                "mlp_ratio": 2.5, "patch_size": [16, 1], "ssl_latent_dims": [1024, 768], "rope_theta": 1e6}
    assert TransformerConfig.from_checkpoint(official, shapes) == TransformerConfig()
    assert TransformerConfig().lyric_encoder == LyricEncoderConfig(1024, 16, 4096, 6)


def test_from_checkpoint_reads_tiny_lyric_encoder_sizes_from_weights() -> None:
    state = load_file(str(TINY_TRANSFORMER / "diffusion_pytorch_model.safetensors"))
    expected = json.loads((TINY_TRANSFORMER / "tiny_lyric_encoder.json").read_text())
    cfg = TransformerConfig.from_checkpoint({"num_attention_heads": 4}, {k: v.shape for k, v in state.items()})
    assert cfg.lyric_encoder == LyricEncoderConfig(
        expected["output_size"], expected["attention_heads"], expected["linear_units"], expected["num_blocks"])


def test_from_checkpoint_rejects_conflicting_config() -> None:
    shapes = json.loads((REAL_KEYS / "ace_step_transformer.json").read_text())["keys"]
    with pytest.raises(ValueError, match="num_layers"):
        TransformerConfig.from_checkpoint({"num_layers": 28}, shapes)
    with pytest.raises(ValueError, match="remove the prefix 'model.diffusion_model.'"):
        TransformerConfig.from_checkpoint(None, {"model.diffusion_model." + k: v for k, v in shapes.items()})


def test_image_latent_is_rejected_by_name(tiny: AceStepTransformer) -> None:
    case = Case(case_params("transformer_forward_nomask")[0].values[0])
    inputs = dict(case.inputs, hidden_states=torch.zeros(2, 4, 64, 64))
    with pytest.raises(ValueError, match="hidden_states"):
        tiny(**inputs)
    states, mask = tiny.encode(*conditions(case))
    with pytest.raises(ValueError, match=r"\bx must be an ACE-Step music latent"):
        tiny.decode(torch.zeros(2, 4, 64, 64), None, states, mask, case.inputs["timestep"])


def test_bad_condition_inputs_are_named(tiny: AceStepTransformer) -> None:
    case = Case(case_params("transformer_forward_nomask")[0].values[0])
    text, text_mask, speaker, ids, lyric_mask = conditions(case)
    with pytest.raises(ValueError, match="text_states"):
        tiny.encode(torch.zeros(2, 12, 768), text_mask, speaker, ids, lyric_mask)
    with pytest.raises(ValueError, match="lyric_ids"):
        tiny.encode(text, text_mask, speaker, ids.float(), lyric_mask)
    with pytest.raises(ValueError, match="lyric_ids"):
        tiny.encode(text, text_mask, speaker, ids + 10_000, lyric_mask)
