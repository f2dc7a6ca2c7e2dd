"""LoRA application (design §9): parity with the official LoRA forward, scale modes, stacking, exact removal, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_FOLDER, TINY_LORA, Case, case_params
from safetensors.torch import load_file, save_file

from acestep_core.lora import (
    LoraWeights,
    apply_loras,
    ensure_loras,
    load_lora_file,
    lora_signature,
    lora_state,
)
from acestep_core.models.transformer import AceStepTransformer, TransformerConfig

TINY_LORA_META = TINY_LORA.parent / "acestep-v1-tiny-lora-with-metadata"
TRANSFORMER_DIR = TINY_FOLDER / "ace_step_transformer"
FORWARD_ARGS = (
    "hidden_states", "attention_mask", "encoder_text_hidden_states", "text_attention_mask",
    "speaker_embeds", "lyric_token_idx", "lyric_mask", "timestep",
)


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return load_file(str(TRANSFORMER_DIR / "diffusion_pytorch_model.safetensors"))


@pytest.fixture()
def transformer(base_state) -> AceStepTransformer:
    """A fresh tiny transformer per test (its own weight tensors), built on meta and loaded strictly."""
    config = json.loads((TRANSFORMER_DIR / "config.json").read_text())
    cfg = TransformerConfig.from_checkpoint(config, {k: v.shape for k, v in base_state.items()})
    with torch.device("meta"):
        model = AceStepTransformer(cfg)
    model.load_state_dict({k: v.clone() for k, v in base_state.items()}, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_lora() -> LoraWeights:
    return load_lora_file(TINY_LORA)


@pytest.fixture(scope="module")
def tiny_lora_meta() -> LoraWeights:
    return load_lora_file(TINY_LORA_META)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == reference.keys()
    changed = [k for k in reference if not torch.equal(current[k], reference[k])]
    assert not changed, f"parameters differ from the reference: {changed[:5]}"


def deltas(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W - W0 (float64) for every weight the patch changed."""
    current = model.state_dict()
    return {
        k: current[k].double() - reference[k].double()
        for k in reference
        if not torch.equal(current[k], reference[k])
    }


def random_lora(template: LoraWeights, seed: int) -> LoraWeights:
    """A second LoRA with the same targets as `template` and fresh random A/B."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, pair in template.modules.items():
        tensors[f"{name}.lora_A.weight"] = 0.1 * torch.randn(pair.down.shape, generator=gen)
        tensors[f"{name}.lora_B.weight"] = 0.1 * torch.randn(pair.up.shape, generator=gen)
    return LoraWeights.from_state_dict(tensors, source=f"random-{seed}")


@pytest.mark.parametrize("case_dir", case_params("lora_transformer_forward_"))
def test_lora_forward_parity(case_dir, transformer, tiny_lora):
    case = Case(case_dir)
    args = [case.inputs[name] for name in FORWARD_ARGS]
    with apply_loras(transformer, [(tiny_lora, 1.0)]), torch.no_grad():
        out = transformer(*args)
    atol = case.atol("sample", 1e-4)
    torch.testing.assert_close(out, case.outputs["sample"], atol=atol, rtol=1e-4)


def test_patch_formula_and_targets(transformer, tiny_lora):
    base = snapshot(transformer)
    patch = apply_loras(transformer, [(tiny_lora, 0.7)])
    changed = deltas(transformer, base)
    assert set(changed) == {f"{name}.weight" for name in tiny_lora.modules}
    assert set(patch.module_names) == set(tiny_lora.modules)
    for name, pair in tiny_lora.modules.items():
        expected = (base[f"{name}.weight"] + 0.7 * (pair.up @ pair.down)).double() - base[f"{name}.weight"].double()
        torch.testing.assert_close(changed[f"{name}.weight"], expected, atol=1e-6, rtol=0)
    patch.remove()
    assert_bit_equal(transformer, base)
    assert not patch.active
    patch.remove()
    assert_bit_equal(transformer, base)


def test_metadata_ignored_by_default_and_honoured_on_request(transformer, tiny_lora, tiny_lora_meta):
    config = tiny_lora_meta.adapter_config
    assert tiny_lora.adapter_config is None
    assert config["use_rslora"] is True
    rank = next(iter(tiny_lora_meta.modules.values())).rank
    factor = config["lora_alpha"] / math.sqrt(rank)
    assert factor == 4.0  # r=4, alpha=8, rsLoRA (README of the with-metadata LoRA)
    base = snapshot(transformer)

    with apply_loras(transformer, [(tiny_lora, 1.0)]):
        plain = snapshot(transformer)
    with apply_loras(transformer, [(tiny_lora_meta, 1.0)]):
        assert_bit_equal(transformer, plain)
    with apply_loras(transformer, [(tiny_lora, 1.0)], honour_alpha=True):
        assert_bit_equal(transformer, plain)  # no metadata: alpha = r, scale 1
    with apply_loras(transformer, [(tiny_lora_meta, 1.0)], honour_alpha=True):
        honoured = deltas(transformer, base)
    assert_bit_equal(transformer, base)

    plain_delta = {k: plain[k].double() - base[k].double() for k in honoured}
    for key, delta in honoured.items():
        torch.testing.assert_close(delta, factor * plain_delta[key], atol=1e-5, rtol=1e-4)


def test_strength_zero_is_exact_pass_through(transformer, tiny_lora):
    base = snapshot(transformer)
    with apply_loras(transformer, [(tiny_lora, 0.0)]) as patch:
        assert patch.module_names == ()
        assert_bit_equal(transformer, base)
    assert lora_signature([(tiny_lora, 0.0)]) == ()


def test_negative_strength_mirrors_positive(transformer, tiny_lora):
    base = snapshot(transformer)
    with apply_loras(transformer, [(tiny_lora, 1.0)]):
        positive = deltas(transformer, base)
    with apply_loras(transformer, [(tiny_lora, -0.5)]):
        negative = deltas(transformer, base)
    assert positive.keys() == negative.keys()
    for key in positive:
        torch.testing.assert_close(negative[key], -0.5 * positive[key], atol=1e-6, rtol=0)
    assert_bit_equal(transformer, base)


def test_stacking_is_sum_of_deltas(transformer, tiny_lora):
    other = random_lora(tiny_lora, seed=7)
    base = snapshot(transformer)
    with apply_loras(transformer, [(tiny_lora, 0.8)]):
        first = deltas(transformer, base)
    with apply_loras(transformer, [(other, -1.3)]):
        second = deltas(transformer, base)
    with apply_loras(transformer, [(tiny_lora, 0.8), (other, -1.3)]):
        both = deltas(transformer, base)
    assert both.keys() == first.keys() == second.keys()
    for key in both:
        torch.testing.assert_close(both[key], first[key] + second[key], atol=2e-6, rtol=0)
    assert_bit_equal(transformer, base)


def test_bf16_weights_delta_in_float32_cast_once():
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 16, generator=gen), torch.randn(8, 2, generator=gen)
    lora = LoraWeights.from_state_dict({"lin.lora_A.weight": down, "lin.lora_B.weight": up})
    model = torch.nn.Sequential()
    model.add_module("lin", layer)
    base = snapshot(model)
    with apply_loras(model, [(lora, 0.3)]):
        expected = (base["lin.weight"].float() + 0.3 * (up @ down)).to(torch.bfloat16)
        assert torch.equal(layer.weight, expected)
    assert_bit_equal(model, base)


def test_conv_layers_supported():
    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv1d(6, 5, 1))
    gen = torch.Generator().manual_seed(1)
    down, up = torch.randn(3, 6, 1, generator=gen), torch.randn(5, 3, 1, generator=gen)
    lora = LoraWeights.from_state_dict({"conv.lora_A.weight": down, "conv.lora_B.weight": up})
    base = snapshot(model)
    with apply_loras(model, [(lora, 1.0)]):
        torch.testing.assert_close(model.conv.weight, base["conv.weight"] + (up[..., 0] @ down[..., 0])[..., None])
    assert_bit_equal(model, base)


def _renamed(lora: LoraWeights, prefix: str, down: str = "lora_A", up: str = "lora_B", flat: bool = False,
             alpha: float | None = None) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, pair in lora.modules.items():
        key = prefix + (name.replace(".", "_") if flat else name)
        tensors[f"{key}.{down}.weight"] = pair.down
        tensors[f"{key}.{up}.weight"] = pair.up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.mark.parametrize(
    "prefix, down, up, flat",
    [
        ("diffusion_model.", "lora_A", "lora_B", False),
        ("model.diffusion_model.", "lora_A", "lora_B", False),
        ("transformer.", "lora_A", "lora_B", False),
        ("base_model.model.", "lora_down", "lora_up", False),
        ("lora_unet_", "lora_down", "lora_up", True),
    ],
)
def test_comfyui_and_kohya_names_equal_official(tmp_path, transformer, tiny_lora, prefix, down, up, flat):
    rank = next(iter(tiny_lora.modules.values())).rank
    file = tmp_path / "renamed.safetensors"
    save_file(_renamed(tiny_lora, prefix, down, up, flat, alpha=float(rank)), str(file))
    renamed = load_lora_file(file)
    with apply_loras(transformer, [(tiny_lora, 1.0)]):
        official = snapshot(transformer)
    with apply_loras(transformer, [(renamed, 1.0)], honour_alpha=True):
        assert_bit_equal(transformer, official)


def test_alpha_tensors_scale_only_when_honoured(tmp_path, transformer, tiny_lora):
    rank = next(iter(tiny_lora.modules.values())).rank
    file = tmp_path / "alpha.safetensors"
    save_file(_renamed(tiny_lora, "diffusion_model.", alpha=2.0 * rank), str(file))
    with_alpha = load_lora_file(file)
    base = snapshot(transformer)
    with apply_loras(transformer, [(tiny_lora, 1.0)]):
        plain = deltas(transformer, base)
    with apply_loras(transformer, [(with_alpha, 1.0)]):
        assert deltas(transformer, base).keys() == plain.keys()
        for key, delta in deltas(transformer, base).items():
            assert torch.equal(delta, plain[key])
    with apply_loras(transformer, [(with_alpha, 1.0)], honour_alpha=True):
        for key, delta in deltas(transformer, base).items():
            torch.testing.assert_close(delta, 2.0 * plain[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["unknown_module", "wrong_shape", "unsupported_layer"])
def test_mismatched_lora_raises_and_leaves_model_untouched(transformer, tiny_lora, kind):
    tensors = _renamed(tiny_lora, "")
    if kind == "unknown_module":
        tensors["double_blocks.0.img_attn.qkv.lora_A.weight"] = torch.zeros(4, 64)
        tensors["double_blocks.0.img_attn.qkv.lora_B.weight"] = torch.zeros(192, 4)
        needle = "double_blocks.0.img_attn.qkv"
    elif kind == "wrong_shape":
        tensors["transformer_blocks.3.attn.to_q.lora_A.weight"] = torch.zeros(4, 65)
        needle = "transformer_blocks.3.attn.to_q"
    else:
        tensors["transformer_blocks.0.attn.lora_A.weight"] = torch.zeros(4, 64)
        tensors["transformer_blocks.0.attn.lora_B.weight"] = torch.zeros(64, 4)
        needle = "transformer_blocks.0.attn"
    bad = LoraWeights.from_state_dict(tensors, source="bad")
    base = snapshot(transformer)
    with pytest.raises(ValueError, match="nothing was applied") as err:
        apply_loras(transformer, [(tiny_lora, 1.0), (bad, 1.0)])
    assert needle in str(err.value)
    assert_bit_equal(transformer, base)


def test_unsupported_tensors_and_incomplete_pairs_rejected(tiny_lora):
    pair = next(iter(tiny_lora.modules.items()))
    name, module = pair
    with pytest.raises(ValueError, match="unsupported tensors"):
        LoraWeights.from_state_dict({
            f"{name}.lora_A.weight": module.down, f"{name}.lora_B.weight": module.up,
            f"{name}.lora_magnitude_vector": torch.ones(module.up.shape[0]),
        })
    with pytest.raises(ValueError, match="needs both"):
        LoraWeights.from_state_dict({f"{name}.lora_A.weight": module.down})
    with pytest.raises(ValueError, match="low-rank pair"):
        LoraWeights.from_state_dict({f"{name}.lora_A.weight": module.down, f"{name}.lora_B.weight": module.up.T})


def test_pickles_and_non_safetensors_refused(tmp_path, tiny_lora):
    tensors = _renamed(tiny_lora, "")
    torch.save(tensors, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="pickle"):
        load_lora_file(tmp_path / "lora.pt")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes((tmp_path / "lora.pt").read_bytes())
    with pytest.raises(ValueError, match="pickle"):
        load_lora_file(disguised)
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save(tensors, folder / "pytorch_lora_weights.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_lora_file(folder)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_lora_file(garbage)
    with pytest.raises(ValueError, match="does not exist"):
        load_lora_file(tmp_path / "missing.safetensors")


def test_bad_strengths_rejected(transformer, tiny_lora):
    for strength in (float("nan"), float("inf"), "1.0", None, True):
        with pytest.raises(ValueError, match="strength"):
            apply_loras(transformer, [(tiny_lora, strength)])
    with pytest.raises(ValueError, match="LoraWeights"):
        apply_loras(transformer, [("not a lora", 1.0)])


def test_signature(tiny_lora, tiny_lora_meta):
    again = load_lora_file(TINY_LORA / "pytorch_lora_weights.safetensors")
    sig = lora_signature([(tiny_lora, 1.0)])
    assert hash(sig) == hash(lora_signature([(again, 1.0)])) and sig == lora_signature([(again, 1.0)])
    assert sig != lora_signature([(tiny_lora, 0.5)])
    assert sig != lora_signature([(tiny_lora, 1.0)], honour_alpha=True)
    assert sig != lora_signature([(tiny_lora_meta, 1.0)])
    assert lora_signature([(tiny_lora, 1.0), (tiny_lora_meta, 0.0)]) == sig
    assert lora_signature([]) == ()
    assert str(TINY_LORA.resolve()) in str(sig)
    other = random_lora(tiny_lora, seed=3)
    assert lora_signature([(other, 1.0)]) == lora_signature([(random_lora(tiny_lora, seed=3), 1.0)])
    assert lora_signature([(other, 1.0)]) != lora_signature([(random_lora(tiny_lora, seed=4), 1.0)])


def test_ensure_loras_switches_sets(transformer, tiny_lora):
    other = random_lora(tiny_lora, seed=11)
    base = snapshot(transformer)
    with apply_loras(transformer, [(other, 0.5)]):
        other_weights = snapshot(transformer)
    with apply_loras(transformer, [(tiny_lora, 1.0)]):
        tiny_weights = snapshot(transformer)

    state = ensure_loras(transformer, [(tiny_lora, 1.0)])
    assert state is lora_state(transformer)
    assert state.signature == lora_signature([(tiny_lora, 1.0)])
    assert_bit_equal(transformer, tiny_weights)
    assert state.ensure([(tiny_lora, 1.0)]) is False
    assert_bit_equal(transformer, tiny_weights)

    ensure_loras(transformer, [(other, 0.5)])
    assert_bit_equal(transformer, other_weights)

    bad = LoraWeights.from_state_dict(
        {"nope.lora_A.weight": torch.zeros(1, 2), "nope.lora_B.weight": torch.zeros(2, 1)}
    )
    with pytest.raises(ValueError, match="nope"):
        ensure_loras(transformer, [(bad, 1.0)])
    assert_bit_equal(transformer, other_weights)
    assert state.signature == lora_signature([(other, 0.5)])

    ensure_loras(transformer, [(other, 0.0)])
    assert state.signature == ()
    assert_bit_equal(transformer, base)
    ensure_loras(transformer, [(tiny_lora, 1.0)])
    state.clear()
    assert_bit_equal(transformer, base)


def test_header_metadata_alpha_pattern_and_invalid_json(tmp_path, tiny_lora):
    tensors = _renamed(tiny_lora, "")
    config = {"r": 4, "lora_alpha": 8, "use_rslora": False, "alpha_pattern": {"attn.to_q": 16}}
    file = tmp_path / "meta.safetensors"
    save_file(tensors, str(file), metadata={"lora_adapter_metadata": json.dumps(config)})
    lora = load_lora_file(file)
    assert lora.adapter_config == config
    for name, pair in lora.modules.items():
        alpha = 16 if name.endswith(".attn.to_q") else 8
        assert lora.scale(name, honour_alpha=True) == alpha / pair.rank
        assert lora.scale(name, honour_alpha=False) == 1.0
    save_file(tensors, str(file), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        load_lora_file(file)
    save_file(tensors, str(file), metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 0})})
    with pytest.raises(ValueError, match="lora_alpha"):
        load_lora_file(file)
