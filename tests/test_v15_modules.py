"""ACE-Step 1.5 modules against the official fixtures (tests/data/fixtures-15) and against diffusers 0.42.1.

Fixture cases: every module case (dit_forward, condition_encoder, tokenizer_detokenizer), each expected tensor at
the README's tolerance max|a - e| / max|e| <= 1e-5 (fp32, one thread). Second oracle: diffusers 0.42.1's
AceStepTransformer1DModel / AceStepConditionEncoder / AceStepAudioTokenizer / AceStepAudioTokenDetokenizer, which
match the official code bit for bit with SDPA (docs: acestep-15-oracle), on tiny random configurations and lengths
the fixtures do not cover; seeds from ACESTEP15_PARITY_SEEDS, durations (seconds, 25 latent frames/s) from
ACESTEP15_PARITY_SECONDS.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import FIXTURES_15
from safetensors.torch import load_file

from acestep_core.v15.config import AceStepConfig
from acestep_core.v15.model import AceStep15Model, build_model, model_from_state_dict

RTOL = 1e-5
MODULE_CASES = ("dit_forward", "condition_encoder", "tokenizer_detokenizer")


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> float:
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} vs {expected.dtype}"
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{name}: integer/bool tensors differ"
        return 0.0
    r = rel(actual, expected)
    assert r <= rtol, f"{name}: max rel diff {r:.3e} > {rtol:.0e}"
    return r


# ---------------------------------------------------------------------------------------------- official fixtures
def _fixture_config(case_dir) -> AceStepConfig:
    meta = json.loads((case_dir / "case.json").read_text())
    data = json.loads((case_dir / meta.get("config", "../config.json")).resolve().read_text())
    data.update(meta.get("config_overrides", {}))
    return AceStepConfig.from_dict(data)


def _load_case(name: str):
    case_dir = FIXTURES_15 / name
    if not (case_dir / "case.json").is_file():
        raise RuntimeError(f"fixture case {name} missing under {FIXTURES_15}; set ACESTEP15_FIXTURES_DIR")
    cfg = _fixture_config(case_dir)
    model = model_from_state_dict(load_file(str(case_dir / "weights.safetensors")), cfg)
    return model, load_file(str(case_dir / "inputs.safetensors")), load_file(str(case_dir / "expected.safetensors"))


def _run_case(name: str) -> dict[str, torch.Tensor]:
    model, i, _ = _load_case(name)
    with torch.no_grad():
        if name == "dit_forward":
            return {"velocity": model.decoder(**i)}
        if name == "condition_encoder":
            enc = model.encoder
            states, mask = enc(**i)
            unpack, unpack_mask = enc.timbre_encoder(i["refer_audio_acoustic_hidden_states_packed"],
                                                     i["refer_audio_order_mask"])
            return {
                "encoder_hidden_states": states,
                "encoder_attention_mask": mask,
                "text_projector.output": enc.text_projector(i["text_hidden_states"]),
                "lyric_encoder.last_hidden_state": enc.lyric_encoder(i["lyric_hidden_states"],
                                                                     i["lyric_attention_mask"]),
                "timbre_encoder.timbre_embs_unpack": unpack,
                "timbre_encoder.timbre_embs_mask": unpack_mask,
            }
        quantized, indices, mask = model.tokenize(i["x"], i["silence_latent"], i["attention_mask"])
        from_codes = model.tokenizer.quantizer.get_output_from_indices(indices)
        return {
            "tokenize.quantized": quantized,
            "tokenize.indices": indices,
            "tokenize.attention_mask": mask,
            "detokenize.output": model.detokenize(quantized),
            "get_output_from_indices.output": from_codes,
            "detokenize_from_indices.output": model.detokenize(from_codes),
        }


@pytest.mark.parametrize("name", MODULE_CASES)
def test_module_fixture(name):
    _, _, expected = _load_case(name)
    actual = _run_case(name)
    assert set(actual) == set(expected), f"{name}: keys {sorted(actual)} vs {sorted(expected)}"
    figures = {k: assert_close(f"{name}.{k}", actual[k], expected[k]) for k in sorted(expected)}
    print(name, {k: f"{v:.2e}" for k, v in figures.items()})


def test_fixture_cases_all_present():
    """Every module case the fixture README lists exists (a missing one is an error, not a skip)."""
    found = {p.name for p in FIXTURES_15.iterdir() if p.is_dir()}
    assert set(MODULE_CASES) <= found, f"missing module cases under {FIXTURES_15}: {set(MODULE_CASES) - found}"


def test_prepare_condition_matches_loop_fixtures():
    """prepare_condition's outputs recorded in the loop cases (text2music, cover, cover-strength switch)."""
    checked = 0
    for case_dir in sorted(p for p in FIXTURES_15.iterdir() if (p / "weights.safetensors").is_file()):
        expected = load_file(str(case_dir / "expected.safetensors"))
        if "prepare_condition.context_latents" not in expected:
            continue
        meta = json.loads((case_dir / "case.json").read_text())
        model = model_from_state_dict(load_file(str(case_dir / "weights.safetensors")), _fixture_config(case_dir))
        i = load_file(str(case_dir / "inputs.safetensors"))
        src = i["src_latents"]
        mask = i.get("attention_mask", torch.ones(src.shape[:2], dtype=src.dtype))
        common = dict(lyric_hidden_states=i["lyric_hidden_states"], lyric_attention_mask=i["lyric_attention_mask"],
                      refer_audio_acoustic_hidden_states_packed=i["refer_audio_acoustic_hidden_states_packed"],
                      refer_audio_order_mask=i["refer_audio_order_mask"], attention_mask=mask,
                      silence_latent=i["silence_latent"], chunk_masks=i["chunk_masks"])
        out = model.prepare_condition(text_hidden_states=i["text_hidden_states"],
                                      text_attention_mask=i["text_attention_mask"], hidden_states=src,
                                      src_latents=src, is_covers=i["is_covers"], **common)
        for k, v in zip(("encoder_hidden_states", "encoder_attention_mask", "context_latents"), out):
            assert_close(f"{case_dir.name}.prepare_condition.{k}", v, expected[f"prepare_condition.{k}"])
        if "prepare_condition_non_cover.context_latents" in expected:
            silence = i["silence_latent"][:, : src.shape[1], :].expand(src.shape[0], -1, -1)
            out = model.prepare_condition(text_hidden_states=i["non_cover_text_hidden_states"],
                                          text_attention_mask=i["non_cover_text_attention_mask"],
                                          hidden_states=silence, src_latents=silence,
                                          is_covers=torch.zeros_like(i["is_covers"]), **common)
            for k, v in zip(("encoder_hidden_states", "encoder_attention_mask", "context_latents"), out):
                assert_close(f"{case_dir.name}.prepare_condition_non_cover.{k}", v,
                             expected[f"prepare_condition_non_cover.{k}"])
        checked += 1
        assert meta["name"] == case_dir.name
    assert checked >= 10, f"only {checked} loop cases carry prepare_condition outputs under {FIXTURES_15}"


# ---------------------------------------------------------------------------------------------- diffusers oracle
def _ints(name: str, default: str) -> list[int]:
    raw = os.environ.get(name, default)
    try:
        return [int(v) for v in raw.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{name} must be comma-separated ints, got {raw!r}") from exc


def _frames(default: str) -> list[int]:
    raw = os.environ.get("ACESTEP15_PARITY_SECONDS", default)
    try:
        secs = [float(v) for v in raw.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"ACESTEP15_PARITY_SECONDS must be comma-separated durations, got {raw!r}") from exc
    if not secs or any(not 0 < s <= 120 for s in secs):
        raise ValueError(f"ACESTEP15_PARITY_SECONDS durations must lie in (0, 120] s, got {raw!r}")
    return [max(1, round(s * 25)) for s in secs]


SEEDS = _ints("ACESTEP15_PARITY_SEEDS", "0,1")
FRAMES = _frames("0.44,1.2,2.04")  # 11, 30, 51 latent frames: odd (patch pad), window-aligned, both pads

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=3, patch_size=2, audio_acoustic_hidden_dim=8,
            in_channels=24, text_hidden_dim=24, timbre_hidden_dim=8, fsq_dim=64, pool_window_size=5,
            num_lyric_encoder_hidden_layers=3, num_timbre_encoder_hidden_layers=2,
            num_attention_pooler_hidden_layers=2)
TINY_XL = dict(TINY, hidden_size=80, intermediate_size=112, num_attention_heads=5, num_key_value_heads=1,
               encoder_hidden_size=64, encoder_intermediate_size=96, encoder_num_attention_heads=4,
               encoder_num_key_value_heads=2)
CONFIGS = {"tiny": TINY, "tiny_xl_split": TINY_XL}

_RENAMES = [(r"\.q_proj\.", ".to_q."), (r"\.k_proj\.", ".to_k."), (r"\.v_proj\.", ".to_v."),
            (r"\.o_proj\.", ".to_out.0."), (r"\.q_norm\.", ".norm_q."), (r"\.k_norm\.", ".norm_k."),
            (r"^proj_in\.1\.", "proj_in_conv."), (r"^proj_out\.1\.", "proj_out_conv.")]


def to_diffusers_name(name: str) -> tuple[str, str]:
    """Official state-dict name -> (diffusers component, name), the mapping of the oracle note."""
    if name == "null_condition_emb":
        return "condition_encoder", name
    prefix, rest = name.split(".", 1)
    component = {"decoder": "transformer", "encoder": "condition_encoder", "tokenizer": "audio_tokenizer",
                 "detokenizer": "audio_token_detokenizer"}[prefix]
    for pattern, repl in _RENAMES:
        rest = re.sub(pattern, repl, rest)
    return component, rest


def _random_model(cfg: AceStepConfig, seed: int) -> AceStep15Model:
    gen = torch.Generator().manual_seed(seed)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if re.search(r"norm[^.]*\.weight$", name) else 0.15 * noise)
    return model.eval()


def _diffusers_modules(cfg: AceStepConfig, model: AceStep15Model):
    diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-dev.txt (diffusers==0.42.1)")
    assert diffusers.__version__ == "0.42.1", f"the oracle is diffusers 0.42.1, found {diffusers.__version__}"
    from diffusers import (AceStepAudioTokenDetokenizer, AceStepAudioTokenizer, AceStepConditionEncoder,
                           AceStepTransformer1DModel)

    enc = dict(hidden_size=cfg.encoder_size, intermediate_size=cfg.encoder_ffn, num_attention_heads=cfg.encoder_heads,
               num_key_value_heads=cfg.encoder_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
               rms_norm_eps=cfg.rms_norm_eps, sliding_window=cfg.sliding_window, layer_types=cfg.layer_types)
    mods = {
        "transformer": AceStepTransformer1DModel(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, in_channels=cfg.in_channels,
            audio_acoustic_hidden_dim=cfg.audio_acoustic_hidden_dim, patch_size=cfg.patch_size,
            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, sliding_window=cfg.sliding_window,
            layer_types=cfg.layer_types, encoder_hidden_size=cfg.encoder_size),
        "condition_encoder": AceStepConditionEncoder(
            text_hidden_dim=cfg.text_hidden_dim, timbre_hidden_dim=cfg.timbre_hidden_dim,
            num_lyric_encoder_hidden_layers=cfg.num_lyric_encoder_hidden_layers,
            num_timbre_encoder_hidden_layers=cfg.num_timbre_encoder_hidden_layers, **enc),
        "audio_tokenizer": AceStepAudioTokenizer(
            audio_acoustic_hidden_dim=cfg.audio_acoustic_hidden_dim, pool_window_size=cfg.pool_window_size,
            fsq_dim=cfg.fsq_dim, fsq_input_levels=cfg.fsq_input_levels,
            fsq_input_num_quantizers=cfg.fsq_input_num_quantizers,
            num_attention_pooler_hidden_layers=cfg.num_attention_pooler_hidden_layers, **enc),
        "audio_token_detokenizer": AceStepAudioTokenDetokenizer(
            audio_acoustic_hidden_dim=cfg.audio_acoustic_hidden_dim, pool_window_size=cfg.pool_window_size,
            num_attention_pooler_hidden_layers=cfg.num_attention_pooler_hidden_layers, **enc),
    }
    states = {k: {} for k in mods}
    for name, tensor in model.state_dict().items():
        component, dname = to_diffusers_name(name)
        states[component][dname] = tensor
    for component, module in mods.items():
        own = module.state_dict()
        if component == "condition_encoder":
            states[component]["silence_latent"] = own["silence_latent"]
        missing = set(own) - set(states[component])
        unexpected = set(states[component]) - set(own)
        assert not missing and not unexpected, f"{component}: missing {sorted(missing)[:5]}, extra {sorted(unexpected)[:5]}"
        module.load_state_dict(states[component], strict=True)
        module.eval()
    return mods


def _inputs(cfg: AceStepConfig, frames: int, seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(1000 + seed)
    c = cfg.audio_acoustic_hidden_dim
    text_len, lyric_len = 6, 9
    text_mask = torch.ones(batch, text_len, dtype=torch.long)
    text_mask[-1, text_len - 2:] = 0
    lyric_mask = torch.ones(batch, lyric_len, dtype=torch.long)
    lyric_mask[-1, lyric_len - 3:] = 0
    return {
        "x_t": torch.randn(batch, frames, c, generator=g),
        "context": torch.randn(batch, frames, 2 * c, generator=g),
        "t": torch.rand(batch, generator=g),
        "r": torch.rand(batch, generator=g) * 0.5,
        "enc_states": torch.randn(batch, 10, cfg.encoder_size, generator=g),
        "text": torch.randn(batch, text_len, cfg.text_hidden_dim, generator=g),
        "text_mask": text_mask,
        "lyric": torch.randn(batch, lyric_len, cfg.text_hidden_dim, generator=g),
        "lyric_mask": lyric_mask,
        "refs": torch.randn(3, max(frames, 2), cfg.timbre_hidden_dim, generator=g),
        "order": torch.tensor([1, 0, 1]),
        "silence": torch.randn(1, frames + cfg.pool_window_size, c, generator=g),
    }


@pytest.mark.parametrize("frames", FRAMES, ids=[f"{f}frames" for f in FRAMES])
@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_against_diffusers(config_name, seed, frames):
    cfg = AceStepConfig(**CONFIGS[config_name])
    model = _random_model(cfg, seed)
    ref = _diffusers_modules(cfg, model)
    i = _inputs(cfg, frames, seed)
    figures = {}
    with torch.no_grad():
        ours = model.decoder(i["x_t"], i["t"], i["r"], None, i["enc_states"], None, i["context"])
        theirs = ref["transformer"](i["x_t"], i["t"], i["r"], i["enc_states"], i["context"], return_dict=False)[0]
        figures["dit"] = assert_close("dit velocity", ours, theirs)

        ours = model.encoder(i["text"], i["text_mask"], i["lyric"], i["lyric_mask"], i["refs"], i["order"])
        theirs = ref["condition_encoder"](i["text"], i["text_mask"], i["lyric"], i["lyric_mask"], i["refs"],
                                          i["order"])
        figures["encoder"] = assert_close("encoder states", ours[0], theirs[0])
        assert torch.equal(ours[1], theirs[1]), "encoder masks differ"

        mask = torch.ones(2, frames)
        q, idx, _ = model.tokenize(i["x_t"], i["silence"], mask)
        q_ref, idx_ref = ref["audio_tokenizer"].tokenize(i["x_t"], i["silence"])
        figures["tokenize"] = assert_close("quantized", q, q_ref)
        assert torch.equal(idx.long(), idx_ref), "FSQ indices differ"
        figures["detokenize"] = assert_close("detokenize", model.detokenize(q), ref["audio_token_detokenizer"](q))
        from_codes = model.tokenizer.quantizer.get_output_from_indices(idx)
        ref_codes = ref["audio_tokenizer"].quantizer.get_output_from_indices(idx_ref)
        figures["codes"] = assert_close("codes -> quantized", from_codes, ref_codes)
    print(config_name, seed, frames, {k: f"{v:.2e}" for k, v in figures.items()})


def test_diffusers_name_map_covers_real_checkpoint():
    """Every real 1.5 DiT name maps to a diffusers component (the oracle's key map is complete)."""
    from conftest import REAL_KEYS_15

    names = json.loads((REAL_KEYS_15 / "turbo.json").read_text())["tensors"]
    components = {to_diffusers_name(n)[0] for n in names}
    assert components == {"transformer", "condition_encoder", "audio_tokenizer", "audio_token_detokenizer"}


# ---------------------------------------------------------------------------------------------- inputs and dtypes
def _fixture_model(name: str = "dit_forward"):
    model, inputs, _ = _load_case(name)
    return model, inputs


@pytest.mark.parametrize("change, match", [
    (dict(hidden_states=torch.zeros(2, 26, 5)), "hidden_states must be"),
    (dict(context_latents=torch.zeros(2, 25, 16)), "context_latents must be"),
    (dict(encoder_hidden_states=torch.zeros(2, 0, 32)), "encoder_hidden_states must be"),
    (dict(encoder_hidden_states=torch.zeros(3, 11, 32)), "encoder_hidden_states must be"),
    (dict(timestep=torch.zeros(3)), "timestep must be"),
    (dict(timestep_r=torch.zeros(2, 1)), "timestep_r must be"),
])
def test_decoder_rejects_bad_inputs(change, match):
    model, i = _fixture_model()
    with pytest.raises(ValueError, match=match):
        model.decoder(**dict(i, **change))


def test_decoder_scalar_timesteps_equal_vectors():
    model, i = _fixture_model()
    with torch.no_grad():
        a = model.decoder(**dict(i, timestep=torch.tensor(0.7), timestep_r=0.7))
        b = model.decoder(**dict(i, timestep=torch.full((2,), 0.7), timestep_r=torch.full((2,), 0.7)))
    assert torch.equal(a, b)


@pytest.mark.parametrize("change, match", [
    (dict(text_hidden_states=torch.zeros(2, 7, 5)), "text_hidden_states must be"),
    (dict(lyric_attention_mask=torch.ones(2, 8, dtype=torch.long)), "lyric_attention_mask must be"),
    (dict(lyric_hidden_states=torch.zeros(3, 9, 32), lyric_attention_mask=torch.ones(3, 9, dtype=torch.long)),
     "batch sizes differ"),
    (dict(refer_audio_order_mask=torch.tensor([0, 1, 2])), r"values must lie in \[0, 2\)"),
    (dict(refer_audio_order_mask=torch.tensor([0.0, 1.0, 0.0])), "int tensor"),
    (dict(refer_audio_acoustic_hidden_states_packed=torch.zeros(3, 30, 7)), "silence_latent"),
])
def test_encoder_rejects_bad_inputs(change, match):
    model, i = _fixture_model("condition_encoder")
    with pytest.raises(ValueError, match=match):
        model.encoder(**dict(i, **change))


def test_encoder_item_without_reference_matches_diffusers():
    """An item with no packed reference gets an empty (masked) timbre slot; diffusers agrees when it is not last."""
    cfg = AceStepConfig(**TINY)
    model = _random_model(cfg, 5)
    ref = _diffusers_modules(cfg, model)
    i = _inputs(cfg, 11, 5, batch=3)
    order = torch.tensor([0, 2, 2])
    with torch.no_grad():
        ours = model.encoder(i["text"], torch.ones(3, 6, dtype=torch.long), i["lyric"],
                             torch.ones(3, 9, dtype=torch.long), i["refs"], order)
        theirs = ref["condition_encoder"](i["text"], torch.ones(3, 6, dtype=torch.long), i["lyric"],
                                          torch.ones(3, 9, dtype=torch.long), i["refs"], order)
        assert_close("encoder states, item 1 without reference", ours[0], theirs[0])
        assert torch.equal(ours[1], theirs[1]) and int(ours[1][1].sum()) == 9 + 6
        last_missing = model.encoder(i["text"], torch.ones(3, 6, dtype=torch.long), i["lyric"],
                                     torch.ones(3, 9, dtype=torch.long), i["refs"], torch.tensor([0, 1, 1]))
    assert last_missing[0].shape[0] == 3 and int(last_missing[1][2].sum()) == 9 + 6


def test_bfloat16_model_casts_inputs():
    """bf16 weights: float inputs of any dtype are cast to bf16 (t included, as the official loop passes t in the
    model dtype), so fp32 and bf16 inputs give the same result; FSQ indices stay int32."""
    model, i = _fixture_model()
    half = model_from_state_dict(model.state_dict(), model.config, dtype=torch.bfloat16)
    with torch.no_grad():
        out = half.decoder(**i)
        again = half.decoder(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in i.items()})
    assert out.dtype == torch.bfloat16 and out.shape == i["hidden_states"].shape
    assert torch.isfinite(out).all() and torch.equal(out, again)
    tok_model, t = _fixture_model("tokenizer_detokenizer")
    tok_half = model_from_state_dict(tok_model.state_dict(), tok_model.config, dtype=torch.bfloat16)
    with torch.no_grad():
        q, idx, _ = tok_half.tokenize(t["x"].bfloat16(), t["silence_latent"], t["attention_mask"])
    assert q.dtype == torch.bfloat16 and idx.dtype == torch.int32 and torch.isfinite(q).all()


def test_get_output_from_indices_checks_codes():
    model, _ = _fixture_model("tokenizer_detokenizer")
    fsq = model.tokenizer.quantizer
    assert fsq.codebook_size == 64000
    flat = fsq.get_output_from_indices(torch.tensor([[0, 63999]]))
    assert torch.equal(flat, fsq.get_output_from_indices(torch.tensor([[[0], [63999]]])))
    with pytest.raises(ValueError, match=r"\[0, 64000\)"):
        fsq.get_output_from_indices(torch.tensor([[64000]]))
    with pytest.raises(ValueError, match="integers"):
        fsq.get_output_from_indices(torch.tensor([[1.0]]))


# ---------------------------------------------------------------------------------------------- text encoder
def test_text_encoder_right_padding_keeps_real_token_states():
    """The official handler encodes right-padded prompts without a mask; the causal model keeps every real token's
    state equal to the unpadded encoding (transformers Qwen3Model, the class the official code loads)."""
    from acestep_core.v15.text_encoder import QWEN3_EMBEDDING_06B, build_text_model, text_encoder_from_state_dict

    tiny = dict(QWEN3_EMBEDDING_06B, vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in build_text_model(tiny).state_dict().items()}
    enc = text_encoder_from_state_dict(sd, tiny)
    a = torch.randint(0, 59, (1, 9), generator=g)
    b = torch.randint(0, 59, (1, 5), generator=g)
    padded = torch.cat([a, torch.cat([b, torch.full((1, 4), 59)], dim=1)])
    both = enc.encode_text(padded)
    assert rel(both[0], enc.encode_text(a)[0]) <= 1e-5
    assert rel(both[1, :5], enc.encode_text(b)[0]) <= 1e-5
    assert torch.equal(enc.embed_lyrics(b)[0], sd["embed_tokens.weight"][b[0]])
    with pytest.raises(ValueError, match=r"\[0, 60\)"):
        enc.encode_text(torch.tensor([[60]]))
