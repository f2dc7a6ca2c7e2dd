"""ACE-Step 1.5 LoRA / LoKr (acestep_core/v15/lora.py) on the fixtures' tiny official DiT.

Oracles (peft and lycoris are not installed here; their forward rules are written out in the test instead):
- PEFT LoRA, unmerged: y = W·x + (lora_alpha / r)·B(A(x)) per targeted Linear (peft `LoraLayer.forward`);
- LyCORIS LoKr: ΔW[i·p + k, j·q + l] = w1[i, j]·w2[k, l] (the Kronecker product written by index, not
  torch.kron), scaled by alpha / r when a factor is low-rank;
applied as forward hooks on the UNPATCHED model and compared with the merged model's decoder output.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from acestep_core.v15.lora import (Adapters15, apply_adapters, comfy_key, ensure_adapters, load_adapter_file,
                                   signature)
from test_v15_generate import case_dir, load_case_model, rel

TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def model():
    return load_case_model("turbo_lego")


def decoder_inputs(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    inputs = load_file(str(case_dir("turbo_lego") / "inputs.safetensors"))
    x = torch.randn(2, 26, c.audio_acoustic_hidden_dim, generator=g)
    ctx = torch.cat([inputs["src_latents"], inputs["chunk_masks"]], dim=-1)
    enc = torch.randn(2, 11, c.hidden_size, generator=g)
    t = torch.tensor([0.7, 0.7])
    return dict(hidden_states=x, timestep=t, timestep_r=t, attention_mask=None, encoder_hidden_states=enc,
                encoder_attention_mask=None, context_latents=ctx)


def run_decoder(m, seed=0):
    with torch.no_grad():
        return m.decoder(**decoder_inputs(m, seed))


def peft_lora(m, rank=4, seed=1, layers=(0, 1)):
    """{decoder path: (A, B)} for the official target modules."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(m.decoder.named_modules())
    out = {}
    for i in layers:
        for t in TARGETS:
            path = f"layers.{i}.{t}"
            w = mods[path].weight
            out[path] = (torch.randn(rank, w.shape[1], generator=g) * 0.3,
                         torch.randn(w.shape[0], rank, generator=g) * 0.3)
    return out


def write_peft_folder(folder, pairs, rank, alpha):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in pairs.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj"]}))
    return folder


def hooked(m, deltas):
    """Forward hooks adding x·ΔWᵀ to each targeted Linear's output (the unmerged oracle); returns the handles."""
    mods = dict(m.decoder.named_modules())
    handles = []
    for path, fn in deltas.items():
        handles.append(mods[path].register_forward_hook(lambda mod, inp, out, fn=fn: out + fn(inp[0])))
    return handles


def kron_by_index(w1, w2):
    a, b = w1.shape
    p, q = w2.shape
    return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(a * p, b * q)


def test_peft_folder_matches_the_unmerged_peft_forward(tmp_path):
    m = model()
    base = run_decoder(m)
    pairs = peft_lora(m, rank=4)
    lora = load_adapter_file(write_peft_folder(tmp_path / "adapter", pairs, rank=4, alpha=8))
    handles = hooked(m, {p: (lambda x, a=a, b=b: 2.0 * 0.7 * (x @ a.T) @ b.T) for p, (a, b) in pairs.items()})
    oracle = run_decoder(m)
    for h in handles:
        h.remove()
    assert torch.equal(run_decoder(m), base)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    patch = apply_adapters(m, [(lora, 0.7)])
    merged = run_decoder(m)
    assert rel(merged, oracle) <= 1e-5
    assert rel(merged, base) > 1e-3
    assert len(patch.module_names) == 8
    patch.remove()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # exact base weights back
    assert torch.equal(run_decoder(m), base)


def test_comfyui_names_and_alpha_tensor_give_the_same_patch(tmp_path):
    m = model()
    pairs = peft_lora(m, rank=4, seed=2)
    peft = load_adapter_file(write_peft_folder(tmp_path / "a", pairs, rank=4, alpha=8))
    patch = apply_adapters(m, [(peft, 1.0)])
    want = run_decoder(m)
    patch.remove()
    for style in ("diffusion_model", "lora_unet", "peft"):
        tensors = {}
        for path, (a, b) in pairs.items():
            stem = comfy_key("decoder." + path, style)
            tensors[f"{stem}.lora_down.weight"] = a
            tensors[f"{stem}.lora_up.weight"] = b
            tensors[f"{stem}.alpha"] = torch.tensor(8.0)
        file = tmp_path / f"{style}.safetensors"
        save_file(tensors, str(file))
        lora = load_adapter_file(file)
        patch = apply_adapters(m, [(lora, 1.0)])
        assert rel(run_decoder(m), want) <= 1e-6, style
        patch.remove()
    # without alpha (a bare ComfyUI file) the scale is 1, as ComfyUI applies it
    bare_tensors = {f"diffusion_model.decoder.{p}.lora_A.weight": a for p, (a, _) in pairs.items()}
    bare_tensors.update({f"diffusion_model.decoder.{p}.lora_B.weight": b for p, (_, b) in pairs.items()})
    bare = Adapters15.from_state_dict(bare_tensors)
    assert all(bare.scale(n) == 1.0 for n in bare.modules)
    assert all(peft.scale(n) == 2.0 for n in peft.modules)


def test_lokr_matches_the_kronecker_rule(tmp_path):
    m = model()
    base = run_decoder(m)
    g = torch.Generator().manual_seed(4)
    tensors, deltas = {}, {}
    # q_proj [32, 32] = kron([4, 4], [8, 8]) with w2 low-rank (r = 2, alpha 4 -> scale 2);
    # k_proj [16, 32] = kron([2, 4], [8, 8]) with both factors full (scale 1 whatever alpha says)
    w1 = torch.randn(4, 4, generator=g) * 0.3
    w2a, w2b = torch.randn(8, 2, generator=g) * 0.3, torch.randn(2, 8, generator=g) * 0.3
    stem = comfy_key("decoder.layers.0.self_attn.q_proj", "lycoris")
    assert stem == "lycoris_layers_0_self_attn_q_proj"
    tensors.update({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b,
                    f"{stem}.alpha": torch.tensor(4.0)})
    deltas["layers.0.self_attn.q_proj"] = 2.0 * kron_by_index(w1, w2a @ w2b)
    k1, k2 = torch.randn(2, 4, generator=g) * 0.3, torch.randn(8, 8, generator=g) * 0.3
    stem = comfy_key("decoder.layers.1.self_attn.k_proj", "lycoris")
    tensors.update({f"{stem}.lokr_w1": k1, f"{stem}.lokr_w2": k2, f"{stem}.alpha": torch.tensor(7.0)})
    deltas["layers.1.self_attn.k_proj"] = kron_by_index(k1, k2)
    file = tmp_path / "lokr.safetensors"
    save_file(tensors, str(file))
    lokr = load_adapter_file(file)
    strength = 0.8
    handles = hooked(m, {p: (lambda x, d=d: strength * x @ d.T) for p, d in deltas.items()})
    oracle = run_decoder(m)
    for h in handles:
        h.remove()
    with apply_adapters(m, [(lokr, strength)]):
        assert rel(run_decoder(m), oracle) <= 1e-5
    assert torch.equal(run_decoder(m), base)


def test_stacking_sums_and_removal_in_reverse_order(tmp_path):
    m = model()
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    one = load_adapter_file(write_peft_folder(tmp_path / "one", peft_lora(m, seed=5), 4, 4))
    two = load_adapter_file(write_peft_folder(tmp_path / "two", peft_lora(m, seed=6, layers=(1,)), 4, 4))
    both = apply_adapters(m, [(one, 0.5), (two, -1.0)])
    together = run_decoder(m)
    both.remove()
    p1 = apply_adapters(m, [(one, 0.5)])
    p2 = apply_adapters(m, [(two, -1.0)])
    assert rel(run_decoder(m), together) <= 1e-5
    p2.remove()
    p1.remove()
    assert all(torch.equal(base_sd[k], v) for k, v in m.state_dict().items())
    assert signature([(one, 0.0)]) == ()
    with apply_adapters(m, [(one, 0.0)]) as p:
        assert p.module_names == ()


def test_bf16_model_is_restored_bit_for_bit(tmp_path):
    m = model()
    lora = load_adapter_file(write_peft_folder(tmp_path / "a", peft_lora(m, seed=7), 4, 8))
    m = m.to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    patch = apply_adapters(m, [(lora, 1.0)])
    q = "decoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(m.decoder.layers[0].self_attn.q_proj.weight, before[q])
    assert m.decoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    patch.remove()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _bad(tensors):
    return lambda: Adapters15.from_state_dict(tensors)


A = torch.ones(4, 32)
B = torch.ones(32, 4)
P = "base_model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tensors, match", [
    ({f"{P}.lora_A.weight": A}, "needs both"),
    ({f"{P}.lora_A.weight": A, f"{P}.lora_B.weight": torch.ones(32, 3)}, "low-rank pair"),
    ({f"{P}.lora_A.weight": A * float("nan"), f"{P}.lora_B.weight": B}, "NaN"),
    ({f"{P}.lora_A.weight": A, f"{P}.lora_B.weight": B, f"{P}.alpha": torch.tensor(-1.0)}, "alpha"),
    ({f"{P}.lora_A.weight": A, f"{P}.lora_B.weight": B, f"{P}.dora_scale": B}, "unsupported"),
    ({"lycoris_layers_0_self_attn_q_proj.lokr_w1": torch.ones(4, 4),
      "lycoris_layers_0_self_attn_q_proj.lokr_t2": torch.ones(2, 2, 1, 1)}, "unsupported"),
    ({"lycoris_layers_0_self_attn_q_proj.lokr_w1": torch.ones(4, 4)}, "lokr_w2"),
    ({"lycoris_x.lokr_w1": torch.ones(4, 4), "lycoris_x.lokr_w2": torch.ones(8, 8), "lycoris_x.lokr_w2_a":
      torch.ones(8, 2)}, "both lokr_w2"),
    ({"something.weight": A}, "unsupported"),
    ({}, "no LoRA"),
])
def test_bad_files_raise(tensors, match):
    with pytest.raises(ValueError, match=match):
        Adapters15.from_state_dict(tensors)


def test_misfits_raise_and_leave_the_model_untouched():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    wrong_size = Adapters15.from_state_dict({f"{P}.lora_A.weight": torch.ones(4, 48), f"{P}.lora_B.weight":
                                             torch.ones(48, 4)})
    unknown = Adapters15.from_state_dict({"base_model.model.layers.9.self_attn.q_proj.lora_A.weight": A,
                                          "base_model.model.layers.9.self_attn.q_proj.lora_B.weight": B})
    not_linear = Adapters15.from_state_dict({"diffusion_model.decoder.layers.0.self_attn_norm.lora_A.weight": A,
                                             "diffusion_model.decoder.layers.0.self_attn_norm.lora_B.weight": B})
    good = Adapters15.from_state_dict({f"{P}.lora_A.weight": A, f"{P}.lora_B.weight": B})
    for bad, match in ((wrong_size, "do not fit"), (unknown, "not in this"), (not_linear, "not a Linear")):
        with pytest.raises(ValueError, match=match):
            apply_adapters(m, [(good, 1.0), (bad, 1.0)])
    for s in (float("inf"), float("nan"), 1e9, True):
        with pytest.raises(ValueError, match="strength"):
            apply_adapters(m, [(good, s)])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m = m.to(torch.float16)
    half = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        apply_adapters(m, [(Adapters15.from_state_dict(
            {f"{P}.lora_A.weight": A * 300, f"{P}.lora_B.weight": B * 300}), 50.0)])
    assert all(torch.equal(half[k], v) for k, v in m.state_dict().items())


def test_file_checks(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter_file(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter_file(tmp_path / "none.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="exactly one"):
        load_adapter_file(tmp_path / "d")
    folder = write_peft_folder(tmp_path / "cfg", {"layers.0.self_attn.q_proj": (A, B)}, 4, 8)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": -2}))
    with pytest.raises(ValueError, match="lora_alpha"):
        load_adapter_file(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter_file(folder)


def test_rslora_and_alpha_pattern(tmp_path):
    m = model()
    pairs = {"layers.0.self_attn.q_proj": (A * 0.01, B * 0.01),
             "layers.0.self_attn.k_proj": (A * 0.01, B[:16] * 0.01)}
    folder = write_peft_folder(tmp_path / "p", pairs, 4, 8)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"k_proj": 2}}))
    lora = load_adapter_file(folder)
    assert lora.scale("decoder.layers.0.self_attn.q_proj") == pytest.approx(8 / 2)
    assert lora.scale("decoder.layers.0.self_attn.k_proj") == pytest.approx(2 / 2)
    with apply_adapters(m, [(lora, 1.0)]):
        pass
    assert isinstance(m.decoder.layers[0].self_attn.q_proj, nn.Linear)


def test_ensure_switches_sets_and_restores_the_base(tmp_path):
    m = model()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    one = load_adapter_file(write_peft_folder(tmp_path / "one", peft_lora(m, seed=8), 4, 4))
    two = load_adapter_file(write_peft_folder(tmp_path / "two", peft_lora(m, seed=9), 4, 4))
    assert ensure_adapters(m, [(one, 1.0)])
    first = run_decoder(m)
    assert not ensure_adapters(m, [(one, 1.0)])  # same set: no work
    assert ensure_adapters(m, [(two, 0.5)])
    with pytest.raises(ValueError, match="strength"):
        ensure_adapters(m, [(one, float("nan"))])
    assert ensure_adapters(m, [(one, 1.0)])
    assert torch.equal(run_decoder(m), first)  # switching back gives the same weights
    assert ensure_adapters(m, [])
    assert all(torch.equal(base[k], v) for k, v in m.state_dict().items())
