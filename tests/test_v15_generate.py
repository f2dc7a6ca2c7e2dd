"""ACE-Step 1.5 sampling: guidance, randomness, repaint helpers, options, and the generation loop.

Oracles: the 1.5 parity fixtures (official `generate_audio` at 53067ab, tests/data/fixtures-15) for the loops and
the per-item noise; diffusers 0.42.1 for APG (`normalized_guidance`) and, where it matches the official code, the
pipeline loop. Where diffusers deviates (docs/acestep-15.md) the tests follow the official lines they name.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acestep_core.v15 import guidance as G
from acestep_core.v15.generate import (
    SamplerOptions,
    repaint_boundary_blend,
    repaint_soft_mask,
    repaint_step_injection,
    seed_noise,
)
from conftest import FIXTURES_15

RTOL = 1e-5
LOOP_CASES = [
    "turbo_text2music_shift3",
    "turbo_text2music_shift1",
    "turbo_text2music_auto_mask",
    "turbo_repaint_official_defaults",
    "turbo_repaint_auto_mask",
    "turbo_lego",
    "turbo_extract",
    "turbo_complete",
    "turbo_cover_strength1",
    "turbo_cover_strength05",
    "base_text2music_apg",
    "base_cfg_interval",
    "base_repaint_official_defaults",
]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a − e| / max|e| (the fixture README's metric)."""
    expected = expected.float()
    return float((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def case_dir(name: str) -> Path:
    folder = FIXTURES_15 / name
    assert folder.is_dir(), f"fixture case {name} missing under {FIXTURES_15} (set ACESTEP15_FIXTURES_DIR)"
    return folder


def case_meta(name: str) -> dict:
    return json.loads((case_dir(name) / "case.json").read_text())


# ------------------------------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("case", LOOP_CASES)
def test_seed_noise_is_the_official_per_item_draw(case):
    # README "Randomness": torch.randn((1, T, 8), generator=Generator("cpu").manual_seed(seed[b])) per item.
    meta = case_meta(case)
    stored = load_file(str(case_dir(case) / "inputs.safetensors"))["noise"]
    seeds = meta["call"]["args"]["seed"]
    got = seed_noise(seeds, stored.shape[0], stored.shape[1], stored.shape[2])
    assert torch.equal(got, stored)


def test_seed_noise_items_are_independent_of_the_batch():
    both = seed_noise([5, 9], 2, 13, 8)
    assert torch.equal(both[1:], seed_noise([9], 1, 13, 8))
    # A single int seed is the official single-seed draw: one [B, T, C] tensor from one generator.
    g = torch.Generator("cpu").manual_seed(5)
    assert torch.equal(seed_noise(5, 2, 13, 8), torch.randn((2, 13, 8), generator=g))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, [1, "2"]])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        seed_noise(seed, 1 if not isinstance(seed, list) else 2, 4, 8)


def test_seed_count_must_match_batch():
    with pytest.raises(ValueError, match="one seed per batch item"):
        seed_noise([1, 2, 3], 2, 4, 8)


# --------------------------------------------------------------------------------------------------- guidance


def test_apg_matches_diffusers_normalized_guidance_over_steps():
    # diffusers 0.42.1 AceStepPipeline: normalized_guidance(g − 1, eta 0, threshold 2.5, original formulation,
    # norm_dim=(1,)) with MomentumBuffer(−0.75); the oracle note measured it bit-equal to the official apg_forward.
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer as DMomentum
    from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

    gen = torch.Generator().manual_seed(3)
    ours, theirs = G.MomentumBuffer(), DMomentum(momentum=-0.75)
    for step in range(5):
        cond = torch.randn(2, 27, 8, generator=gen) * (1 + step)
        uncond = cond + torch.randn(2, 27, 8, generator=gen)
        a = G.apg(cond, uncond, 7.0, ours)
        b = normalized_guidance(
            pred_cond=cond, pred_uncond=uncond, guidance_scale=6.0, momentum_buffer=theirs, eta=0.0,
            norm_threshold=2.5, use_original_formulation=True, norm_dim=(1,),
        )
        assert torch.equal(a, b), step


def test_cfg_interval_is_tested_on_t():
    # Official base generate_audio: `apply_cfg_guidance = t_curr >= cfg_interval_start and t_curr <= cfg_interval_end`
    # (t = 1 is noise). diffusers tests 1 − t (pipeline_ace_step.py: timestep_ratio = 1.0 - current_timestep).
    assert G.in_cfg_interval(torch.tensor(0.5), 0.0, 0.6)
    assert not G.in_cfg_interval(torch.tensor(0.9), 0.0, 0.6)
    assert G.in_cfg_interval(torch.tensor(0.9), 0.4, 1.0)
    assert G.in_cfg_interval(1.0, 0.0, 1.0) and G.in_cfg_interval(0.0, 0.0, 1.0)


@pytest.mark.parametrize("start, end", [(0.7, 0.2), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0)])
def test_bad_cfg_interval_raises(start, end):
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplerOptions(variant="base", cfg_interval=(start, end)).validate()


@pytest.mark.parametrize("scale", [1.5, 7.0])
def test_adg_two_channel_geometry(scale):
    # Official adg_forward worked by hand for unit x̂_u = (1, 0), x̂_c = (cos a, sin a), x = 0, σ = 1:
    # w = g − 1 + 1e-3, θ' = min(w·a, 3.14/6), (x̂_c − x̂_u)⊥x̂_u = (0, sin a), so
    # x̂ = cos θ'·x̂_c + sin θ'·(0, 1) and v = (x − x̂)/σ = −x̂.
    a = 0.3
    hat_c = torch.tensor([math.cos(a), math.sin(a)])
    hat_u = torch.tensor([1.0, 0.0])
    x = torch.zeros(1, 1, 2)
    v = G.adg(x, -hat_c.view(1, 1, 2), -hat_u.view(1, 1, 2), torch.tensor(1.0), scale)
    theta_new = min((scale - 1 + 1e-3) * a, 3.14 / 6)
    want = -(math.cos(theta_new) * hat_c + math.sin(theta_new) * torch.tensor([0.0, 1.0]))
    assert torch.allclose(v.view(2), want, atol=2e-6), (v, want)


def test_adg_norm_variant_keeps_the_frame_axis_norm():
    gen = torch.Generator().manual_seed(1)
    x, c, u = (torch.randn(2, 9, 8, generator=gen) for _ in range(3))
    sigma = torch.tensor(0.6)
    v = G.adg(x, c, u, sigma, 5.0, apply_norm=True)
    hat_new, hat_c = x - sigma * v, x - sigma * c
    assert torch.allclose(torch.linalg.norm(hat_new, dim=1), torch.linalg.norm(hat_c, dim=1), rtol=1e-5)


def test_adg_rejects_zero_sigma_and_shape_mismatch():
    x = torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="sigma > 0"):
        G.adg(x, x + 1, x + 2, 0.0, 3.0)
    with pytest.raises(ValueError, match="one shape"):
        G.adg(x, torch.zeros(1, 4, 2), x, 0.5, 3.0)


# ---------------------------------------------------------------------------------------------- repaint helpers


def test_repaint_soft_mask_ramps():
    # Official _repaint_boundary_blend: linspace(0, 1, n + 2)[1:-1] before the span, linspace(1, 0, n + 2)[1:-1]
    # after it, clipped at the edges; all-True and all-False rows untouched.
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 5:8] = True
    mask[1, 0:3] = True
    mask[2, :] = True
    soft = repaint_soft_mask(mask, 3)
    assert torch.allclose(soft[0], torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 0.75, 0.5, 0.25, 0]))
    assert torch.allclose(soft[1], torch.tensor([1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(soft[2], torch.ones(12))
    assert torch.equal(repaint_soft_mask(mask, 0), mask.float())


def test_repaint_blend_and_injection():
    gen = torch.Generator().manual_seed(0)
    x, clean, noise = (torch.randn(1, 12, 4, generator=gen) for _ in range(3))
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 4:6] = True
    blended = repaint_boundary_blend(x, clean, mask, 2)
    assert torch.equal(blended[:, 4:6], x[:, 4:6]) and torch.equal(blended[:, :2], clean[:, :2])
    m = 1 / 3
    assert torch.allclose(blended[:, 3], m * 2 * x[:, 3] + (1 - m * 2) * clean[:, 3])
    injected = repaint_step_injection(x, clean, mask, 0.25, noise)
    assert torch.equal(injected[:, 4:6], x[:, 4:6])
    assert torch.allclose(injected[:, 7], 0.25 * noise[:, 7] + 0.75 * clean[:, 7])


# --------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="pro"), "variant"),
        (dict(sampler="dpm"), "sampler"),
        (dict(sampler="heun", infer_method="sde"), "heun"),
        (dict(steps=4), "fixed 8-step"),
        (dict(variant="base", timesteps=(0.5,)), "turbo option"),
        (dict(variant="base", steps=0), "steps"),
        (dict(audio_cover_strength=1.5), "audio_cover_strength"),
        (dict(repaint_injection_ratio=-0.1), "repaint_injection_ratio"),
        (dict(repaint_crossfade_frames=2.5), "repaint_crossfade_frames"),
        (dict(velocity_ema_factor=1.0), "velocity_ema_factor"),
        (dict(shift=0.0), "shift"),
        (dict(guidance="cfgpp"), "guidance"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerOptions(**kwargs).validate()


def test_option_defaults_follow_the_official_signatures():
    turbo = SamplerOptions().validate()
    base = SamplerOptions(variant="base").validate()
    assert (turbo.shift, turbo.steps) == (3.0, None)  # turbo generate_audio: shift=3.0, fix_nfe=8
    assert (base.shift, base.steps, base.guidance_scale) == (1.0, 30, 7.0)  # base: shift=1.0, infer_steps=30
    assert turbo.repaint_injection_ratio == 0.5 and turbo.repaint_crossfade_frames == 10


# ------------------------------------------------------------------------------------------- the loop, official


def load_case_model(name: str):
    """The model container (acestep_core/v15/model.py) with the case's tiny official-named weights."""
    from acestep_core.v15.config import AceStepConfig
    from acestep_core.v15.model import model_from_state_dict

    meta = case_meta(name)
    config = json.loads((FIXTURES_15 / "config.json").read_text())
    config.update(meta.get("config_overrides", {}))
    weights = load_file(str(case_dir(name) / "weights.safetensors"))
    return model_from_state_dict(weights, config=AceStepConfig.from_dict(config))


def options_from_case(meta: dict) -> SamplerOptions:
    """SamplerOptions from `call.all_non_tensor_args` (every non-tensor argument of the official call)."""
    a = meta["call"]["all_non_tensor_args"]
    kwargs = dict(
        variant=meta["variant"],
        shift=a["shift"],
        audio_cover_strength=a["audio_cover_strength"],
        cover_noise_strength=a["cover_noise_strength"],
        repaint_injection_ratio=a["repaint_injection_ratio"],
        repaint_crossfade_frames=a["repaint_crossfade_frames"],
        infer_method=a["infer_method"],
        sampler=a["sampler_mode"],
        velocity_norm_threshold=a["velocity_norm_threshold"],
        velocity_ema_factor=a["velocity_ema_factor"],
    )
    if meta["variant"] == "base":
        kwargs.update(
            steps=a["infer_steps"],
            guidance_scale=a["diffusion_guidance_scale"],
            cfg_interval=(a["cfg_interval_start"], a["cfg_interval_end"]),
            guidance="adg" if a["use_adg"] else "apg",
        )
    else:
        assert a["fix_nfe"] == 8
        kwargs.update(timesteps=a["timesteps"])
    return SamplerOptions(**kwargs)


def run_case(name: str, **overrides):
    meta = case_meta(name)
    inputs = load_file(str(case_dir(name) / "inputs.safetensors"))
    inputs.pop("noise")  # the loop draws it from the case's seeds (checked above against the stored noise)
    model = load_case_model(name)
    record: dict[str, torch.Tensor] = {}
    kwargs = dict(options=options_from_case(meta), seed=meta["call"]["args"]["seed"], record=record)
    kwargs.update(overrides)
    out = generate_audio(model, **inputs, **kwargs)
    record["target_latents"] = out
    return meta, record, load_file(str(case_dir(name) / "expected.safetensors"))


from acestep_core.v15.generate import generate_audio  # noqa: E402


@pytest.mark.parametrize("case", LOOP_CASES)
def test_loop_matches_official_fixture(case):
    meta, record, expected = run_case(case)
    steps = meta["num_steps"]
    for n in range(steps):  # every recorded step is present
        assert f"x_t.step_{n}" in expected and f"decoder_output.step_{n}" in expected
    worst = {}
    for key, want in expected.items():
        assert key in record, f"{case}: the loop did not produce {key}"
        got = record[key]
        assert tuple(got.shape) == tuple(want.shape), (case, key, tuple(got.shape), tuple(want.shape))
        if want.dtype == torch.bool or not want.is_floating_point():
            assert torch.equal(got.to(want.dtype), want), (case, key)
            continue
        worst[key] = rel(got, want)
    bad = {k: v for k, v in worst.items() if v > RTOL}
    assert not bad, f"{case}: over {RTOL}: {bad}"
    # Every case.json expected key family is covered (no key silently skipped).
    assert set(expected) <= set(record)


# -------------------------------------------------------------------------------------------------- task inputs


@pytest.mark.parametrize("case", LOOP_CASES)
def test_task_inputs_rebuild_the_fixture_inputs(case):
    # The fixtures' task tensors were built as the official handler builds them (conditioning_masks.py,
    # service_generate_execute.py); our builder must give the same tensors from the task, source and spans.
    from acestep_core.v15.tasks import build_task_inputs

    meta = case_meta(case)
    inputs = load_file(str(case_dir(case) / "inputs.safetensors"))
    batch, length, _ = inputs["src_latents"].shape
    task = meta["task"]
    spans = meta["repaint_ranges_latent_frames"]
    if task == "text2music":
        source = None
    elif "clean_src_latents" in inputs:
        source = inputs["clean_src_latents"]
    else:
        source = inputs["src_latents"]  # extract / complete / cover: the source is passed as it is
    built = build_task_inputs(
        task, batch=batch, length=length, silence_latent=inputs["silence_latent"], source_latents=source,
        spans=None if spans is None else [tuple(s) for s in spans],
        chunk_mask_mode="auto" if "auto_mask" in case else "explicit",
    )
    assert torch.equal(built.src_latents, inputs["src_latents"])
    assert torch.equal(built.chunk_masks, inputs["chunk_masks"])
    assert torch.equal(built.is_covers, inputs["is_covers"])
    if "repaint_mask" in inputs:
        assert torch.equal(built.repaint_mask, inputs["repaint_mask"])
        assert torch.equal(built.clean_src_latents, inputs["clean_src_latents"])
    else:
        assert built.repaint_mask is None and built.clean_src_latents is None


def test_seconds_to_frames_follows_the_handler():
    from acestep_core.v15.tasks import seconds_to_frames

    assert seconds_to_frames(1.0, 2.0, 250) == (25, 50)
    assert seconds_to_frames(0.039, 0.081, 250) == (0, 2)  # floor of s·48000 // 1920
    assert seconds_to_frames(None, 3.0, 250) == (0, 75)
    assert seconds_to_frames(-2.0, 1.0, 250) == (0, 75)  # a negative start shifts both ends (left padding)
    assert seconds_to_frames(20.0, 30.0, 250) == (249, 250)  # clamped into the latent
    assert seconds_to_frames(4.0, -1, 250) == seconds_to_frames(4.0, None, 250) == (100, 250)  # to the end
    with pytest.raises(ValueError, match="end > start"):
        seconds_to_frames(3.0, 3.0, 250)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="remix"), "task"),
        (dict(task="repaint"), "needs source audio"),
        (dict(task="text2music", source_latents=torch.zeros(1, 10, 8)), "no source audio"),
        (dict(task="repaint", source_latents=torch.zeros(1, 10, 8)), "span"),
        (dict(task="extract", source_latents=torch.zeros(1, 10, 8), spans=[(1, 3)]), "repaint and lego only"),
        (dict(task="repaint", source_latents=torch.zeros(1, 10, 8), spans=[(5, 12)]), "0 <= start < end"),
        (dict(task="cover", source_latents=torch.zeros(1, 9, 8)), "source_latents must be"),
        (dict(task="text2music", chunk_mask_mode="smart"), "chunk_mask_mode"),
    ],
)
def test_bad_task_inputs_raise(kwargs, match):
    from acestep_core.v15.tasks import build_task_inputs

    with pytest.raises(ValueError, match=match):
        build_task_inputs(batch=1, length=10, silence_latent=torch.zeros(1, 4, 8), **kwargs)


def test_task_inputs_tile_a_short_silence_latent():
    from acestep_core.v15.tasks import build_task_inputs

    silence = torch.arange(3 * 2, dtype=torch.float32).view(1, 3, 2)
    built = build_task_inputs("text2music", batch=1, length=7, silence_latent=silence)
    assert torch.equal(built.src_latents[0], silence[0].repeat(3, 1)[:7])


# ------------------------------------------------------------------------------------ the loop, diffusers oracle
# diffusers 0.42.1 AceStepPipeline on tiny random weights (the model container's, mapped to diffusers names), for
# shapes and seeds the fixtures do not cover. Seeds: ACESTEP15_PARITY_SEEDS; durations: ACESTEP15_PARITY_SECONDS.
# Only paths where diffusers matches the official code are compared directly; the four deviations
# (docs/acestep-15.md) are compared in their mirrored / disabled form, and the official form is pinned by the
# fixtures above.

from test_v15_modules import CONFIGS, FRAMES, SEEDS, _diffusers_modules, _random_model  # noqa: E402


class _Latents:
    def __init__(self, x):
        self.x = x

    def sample(self):
        return self.x


class _FakeVAE:
    """Stands in for AutoencoderOobleck in `prepare_src_latents`: "encodes" to the given source latents."""

    dtype = torch.float32

    def __init__(self, latents):
        self.latents = latents

    def encode(self, audio):
        return type("Out", (), {"latent_dist": _Latents(self.latents.transpose(1, 2))})()


def _diffusers_pipe(model, cfg, silence, states):
    from diffusers import AceStepPipeline, FlowMatchEulerDiscreteScheduler

    mods = _diffusers_modules(cfg, model)
    mods["condition_encoder"].silence_latent.copy_(silence)
    pipe = AceStepPipeline(
        vae=None, text_encoder=None, tokenizer=None, transformer=mods["transformer"],
        condition_encoder=mods["condition_encoder"],
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
        audio_tokenizer=mods["audio_tokenizer"], audio_token_detokenizer=mods["audio_token_detokenizer"],
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.encode_prompt = lambda **_: states  # the text encoder is not under test: same states on both sides
    return pipe


def _oracle_setup(seed: int, frames: int, batch: int = 2):
    from acestep_core.v15.config import AceStepConfig

    cfg = AceStepConfig.from_dict(CONFIGS["tiny"])
    model = _random_model(cfg, seed)
    g = torch.Generator().manual_seed(2000 + seed)
    c = cfg.audio_acoustic_hidden_dim
    silence = torch.randn(1, 15000, c, generator=g)  # the length of diffusers' silence_latent buffer
    text = torch.randn(batch, 6, cfg.text_hidden_dim, generator=g)
    lyric = torch.randn(batch, 9, cfg.text_hidden_dim, generator=g)
    text_mask = torch.ones(batch, 6, dtype=torch.bool)
    text_mask[-1, 4:] = False
    lyric_mask = torch.ones(batch, 9, dtype=torch.bool)
    lyric_mask[-1, 6:] = False
    source = torch.randn(1, frames, c, generator=g)
    ours = dict(
        text_hidden_states=text, text_attention_mask=text_mask, lyric_hidden_states=lyric,
        lyric_attention_mask=lyric_mask,
        refer_audio_acoustic_hidden_states_packed=silence[:, :750].expand(batch, -1, -1).contiguous(),
        refer_audio_order_mask=torch.arange(batch), silence_latent=silence,
    )
    pipe = _diffusers_pipe(model, cfg, silence, (text, text_mask, lyric, lyric_mask))
    return model, pipe, ours, source


ORACLE_CASES = {
    # name: (task, our options, diffusers call arguments)
    "turbo_text2music_shift3": ("text2music", dict(variant="turbo", shift=3.0), dict(shift=3.0)),
    "turbo_text2music_shift2": ("text2music", dict(variant="turbo", shift=2.0), dict(shift=2.0)),
    "base_apg": ("text2music", dict(variant="base", steps=6, shift=2.0, guidance_scale=5.0),
                 dict(num_inference_steps=6, shift=2.0, guidance_scale=5.0)),
    # D4: the official interval [0, 0.6] on t is diffusers' [0.4, 1.0] on 1 − t.
    "base_cfg_interval_mirrored": ("text2music",
                                   dict(variant="base", steps=6, shift=3.0, guidance_scale=4.0,
                                        cfg_interval=(0.0, 0.6)),
                                   dict(num_inference_steps=6, shift=3.0, guidance_scale=4.0,
                                        cfg_interval_start=0.4, cfg_interval_end=1.0)),
    "turbo_extract": ("extract", dict(variant="turbo"), dict(track_name="vocals")),
    "turbo_complete": ("complete", dict(variant="turbo"), dict(complete_track_classes=["drums"])),
    "turbo_cover_strength1": ("cover", dict(variant="turbo"), dict()),
    # D2: without step injection and crossfade (both official options) the official repaint is diffusers'.
    "turbo_repaint_no_injection": ("repaint", dict(variant="turbo", repaint_injection_ratio=0.0,
                                                   repaint_crossfade_frames=0), dict()),
    "turbo_lego_no_injection": ("lego", dict(variant="turbo", repaint_injection_ratio=0.0,
                                             repaint_crossfade_frames=0), dict(track_name="guitar")),
}


@pytest.mark.parametrize("frames", FRAMES, ids=[f"{f}frames" for f in FRAMES])
@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_loop_matches_diffusers(name, seed, frames):
    from acestep_core.v15.tasks import build_task_inputs

    task, our_opts, their_args = ORACLE_CASES[name]
    model, pipe, ours, source = _oracle_setup(seed, frames)
    batch = 2
    seeds = [seed * 7 + 1, seed * 7 + 2]
    noise = seed_noise(seeds, batch, frames, source.shape[-1])
    span = None
    if task in ("repaint", "lego"):
        start = max(0, frames // 4)
        end = min(frames, start + max(1, frames // 3))
        span = (start, end)
        # diffusers converts seconds with int(s·25), which float rounding can put one frame low (0.48·25 < 12):
        # give it mid-frame times so that both sides use the same frames.
        their_args = dict(their_args, repainting_start=(start + 0.5) / 25, repainting_end=(end + 0.5) / 25)
    built = build_task_inputs(
        task, batch=batch, length=frames, silence_latent=ours["silence_latent"],
        source_latents=None if task == "text2music" else source,
        spans=None if span is None else [span, span], chunk_mask_mode="explicit",
    )
    got = generate_audio(
        model, **ours, src_latents=built.src_latents, chunk_masks=built.chunk_masks, is_covers=built.is_covers,
        repaint_mask=built.repaint_mask, clean_src_latents=built.clean_src_latents,
        options=SamplerOptions(**our_opts), seed=seeds,
    )
    if task != "text2music":
        pipe.vae = _FakeVAE(source)
        their_args = dict(their_args, src_audio=torch.zeros(2, frames * 1920))
    if "guidance_scale" not in their_args:
        their_args = dict(their_args, guidance_scale=1.0)
    want = pipe(
        prompt=["x"] * batch, audio_duration=frames / 25, latents=noise, output_type="latent", task_type=task,
        **their_args,
    ).audios
    assert got.shape == want.shape
    assert rel(got, want) <= RTOL, (name, seed, frames, rel(got, want))


def test_official_deviations_are_real():
    # The four places where diffusers deviates from the official code are not no-ops on these shapes: the
    # un-mirrored interval, injection + crossfade, the auto 2.0 mask and the cover switch all change the result.
    seed, frames = 0, 30
    model, pipe, ours, source = _oracle_setup(seed, frames)
    from acestep_core.v15.tasks import build_task_inputs

    def run(task, opts, mode="explicit", span=None, **extra):
        built = build_task_inputs(task, batch=2, length=frames, silence_latent=ours["silence_latent"],
                                  source_latents=None if task == "text2music" else source,
                                  spans=None if span is None else [span, span], chunk_mask_mode=mode)
        return generate_audio(model, **ours, src_latents=built.src_latents, chunk_masks=built.chunk_masks,
                              is_covers=built.is_covers, repaint_mask=built.repaint_mask,
                              clean_src_latents=built.clean_src_latents, options=SamplerOptions(**opts),
                              seed=[1, 2], **extra)

    base = dict(variant="base", steps=6, shift=3.0, guidance_scale=4.0)
    assert rel(run("text2music", dict(base, cfg_interval=(0.0, 0.6))),
               run("text2music", dict(base, cfg_interval=(0.4, 1.0)))) > 1e-3  # D4
    assert rel(run("repaint", dict(variant="turbo"), span=(5, 15)),
               run("repaint", dict(variant="turbo", repaint_injection_ratio=0.0, repaint_crossfade_frames=0),
                   span=(5, 15))) > 1e-3  # D2
    assert rel(run("text2music", dict(variant="turbo"), mode="auto"),
               run("text2music", dict(variant="turbo"))) > 1e-4  # D1
    states = (ours["text_hidden_states"].flip(0), ours["text_attention_mask"])
    switched = run("cover", dict(variant="turbo", audio_cover_strength=0.5), non_cover_text_hidden_states=states[0],
                   non_cover_text_attention_mask=states[1])
    assert rel(switched, run("cover", dict(variant="turbo"))) > 1e-3  # D3


# ------------------------------------------------------------------- options the fixtures and diffusers lack (D5)
# The official Heun/SDE samplers, velocity clamp/EMA, cover noise strength and ADG have no numeric oracle here
# (diffusers lacks them, the fixtures run Euler/ODE). These tests pin their documented structure: call counts,
# start points, limits and the per-item randomness.


class _Spy:
    """Wraps the model: counts decoder calls and keeps their inputs."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.null_condition_emb = model.null_condition_emb

    def prepare_condition(self, **kw):
        return self.model.prepare_condition(**kw)

    def decoder(self, **kw):
        self.calls.append({k: kw[k] for k in ("hidden_states", "timestep")})
        return self.model.decoder(**kw)


def _fixture_run(case: str, model=None, **option_overrides):
    meta = case_meta(case)
    inputs = load_file(str(case_dir(case) / "inputs.safetensors"))
    inputs.pop("noise")
    model = model or load_case_model(case)
    options = options_from_case(meta)
    options = SamplerOptions(**{**options.__dict__, **option_overrides})
    return generate_audio(model, **inputs, options=options, seed=meta["call"]["args"]["seed"]), inputs


def test_callback_and_interrupt():
    seen = []
    meta = case_meta("turbo_text2music_shift3")
    inputs = load_file(str(case_dir("turbo_text2music_shift3") / "inputs.safetensors"))
    inputs.pop("noise")
    model = load_case_model("turbo_text2music_shift3")
    generate_audio(model, **inputs, options=options_from_case(meta), seed=meta["call"]["args"]["seed"],
                   callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))))
    assert seen == [(i, 8, (1, 25, 8)) for i in range(8)]

    class Stop(Exception):
        pass

    spy, count = _Spy(model), {"n": 0}

    def interrupt():
        count["n"] += 1
        if count["n"] == 4:
            raise Stop

    with pytest.raises(Stop):
        generate_audio(spy, **inputs, options=options_from_case(meta), seed=meta["call"]["args"]["seed"],
                       interrupt=interrupt)
    assert len(spy.calls) == 3  # stopped before the fourth model call


def test_heun_call_counts_and_endpoints():
    # Official turbo: the last step jumps to x0 without a corrector (2N − 1 calls); base corrects every step.
    model = load_case_model("turbo_text2music_shift3")
    spy = _Spy(model)
    _fixture_run("turbo_text2music_shift3", model=spy, sampler="heun")
    assert len(spy.calls) == 2 * 8 - 1
    t = [float(c["timestep"][0]) for c in spy.calls]
    assert t[1] == pytest.approx(0.9545454382896423) and t[0] == 1.0  # corrector at the next table value

    base = _Spy(load_case_model("base_text2music_apg"))
    _fixture_run("base_text2music_apg", model=base, sampler="heun")
    assert len(base.calls) == 2 * 8 and float(base.calls[-1]["timestep"][0]) == 0.0
    assert base.calls[0]["hidden_states"].shape[0] == 2  # CFG rows in the corrector too


def test_sde_is_reproducible():
    # SDE re-noises from each item's own generator (batch independence: test_batch_items_are_independent).
    a, _ = _fixture_run("turbo_text2music_shift1", infer_method="sde")
    b, _ = _fixture_run("turbo_text2music_shift1", infer_method="sde")
    ode, _ = _fixture_run("turbo_text2music_shift1")
    assert torch.equal(a, b) and rel(a, ode) > 1e-3


def test_velocity_clamp_and_ema_limits():
    plain, _ = _fixture_run("turbo_text2music_shift3")
    loose, _ = _fixture_run("turbo_text2music_shift3", velocity_norm_threshold=1e6)
    assert torch.equal(plain, loose)  # a threshold far above ‖v‖/‖x‖ never scales
    tight, _ = _fixture_run("turbo_text2music_shift3", velocity_norm_threshold=0.05)
    ema, _ = _fixture_run("turbo_text2music_shift3", velocity_ema_factor=0.5)
    assert rel(tight, plain) > 1e-3 and rel(ema, plain) > 1e-3
    assert tight.abs().max() < plain.abs().max() * 2  # clamped velocities keep the result bounded


def test_cover_noise_strength_starts_from_the_noised_source():
    # Official: nearest schedule t to 1 − strength, x = t·noise + (1 − t)·src, the schedule truncated there.
    case = "turbo_cover_strength1"
    spy = _Spy(load_case_model(case))
    _, inputs = _fixture_run(case, model=spy, cover_noise_strength=0.3)
    t0 = float(spy.calls[0]["timestep"][0])
    assert t0 == pytest.approx(0.75)  # shift-3 table value nearest 0.7
    assert len(spy.calls) == 4  # 0.75, 0.6428…, 0.5, 0.3
    noise = seed_noise(case_meta(case)["call"]["args"]["seed"], 1, 25, 8)
    want = 0.75 * noise + 0.25 * inputs["src_latents"]
    assert torch.allclose(spy.calls[0]["hidden_states"], want, atol=1e-6)


def test_adg_in_the_base_loop():
    adg_out, _ = _fixture_run("base_text2music_apg", guidance="adg")
    apg_out, _ = _fixture_run("base_text2music_apg")
    assert torch.isfinite(adg_out).all() and rel(adg_out, apg_out) > 1e-3


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_batch_items_are_independent(method):
    # Item b of a batch equals the same item generated alone with its own seed (per-item noise, per-item
    # conditions); the tiny model's batched matmuls may differ in the last bits.
    case = "turbo_text2music_shift1"
    meta = case_meta(case)
    inputs = load_file(str(case_dir(case) / "inputs.safetensors"))
    inputs.pop("noise")
    model = load_case_model(case)
    seeds = meta["call"]["args"]["seed"]
    options = SamplerOptions(**{**options_from_case(meta).__dict__, "infer_method": method})
    both = generate_audio(model, **inputs, options=options, seed=seeds)
    one = {k: v[1:] if k not in ("silence_latent",) else v for k, v in inputs.items()}
    one["refer_audio_order_mask"] = torch.zeros(1, dtype=torch.long)
    alone = generate_audio(model, **one, options=options, seed=seeds[1:])
    assert rel(both[1:], alone) <= RTOL


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(seed=None), "exactly one of seed"),
        (dict(noise=torch.zeros(1, 25, 8)), "exactly one of seed"),
        (dict(chunk_masks=torch.ones(1, 24, 8)), "chunk_masks"),
        (dict(repaint_mask=torch.ones(1, 25, dtype=torch.bool)), "both repaint_mask"),
        (dict(is_covers=torch.zeros(2, dtype=torch.bool)), "is_covers"),
        (dict(options=SamplerOptions(audio_cover_strength=0.5)), "non_cover_text_hidden_states"),
        (dict(seed=[1, 2]), "one seed per batch item"),
    ],
)
def test_bad_generate_inputs_raise(change, match):
    case = "turbo_text2music_shift3"
    meta = case_meta(case)
    inputs = load_file(str(case_dir(case) / "inputs.safetensors"))
    inputs.pop("noise")
    kwargs = dict(inputs, options=options_from_case(meta), seed=meta["call"]["args"]["seed"])
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        generate_audio(load_case_model(case), **kwargs)
