"""Task-layer behaviour where the official code is broken or silent (design §8; fixtures README, official defects).

Parity with the official code is in test_e2e.py; these check our own, documented behaviour on the tiny model.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_FOLDER

from acestep_core import tasks
from acestep_core.conditioning import Conditioning
from acestep_core.loading import load_acestep
from acestep_core.noise import SeededNoise
from acestep_core.sampling.denoiser import GuidanceConfig

FAST = tasks.SamplerOptions(steps=3, guidance=GuidanceConfig(guidance_interval=1.0))


@pytest.fixture(scope="module")
def transformer():
    return load_acestep(TINY_FOLDER, components=("transformer",)).transformer


def _cond(seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 5, 32, generator=g)
    ids = torch.randint(3, 6000, (1, 7), generator=g)
    return Conditioning("t", "l", text, torch.ones(1, 5, dtype=torch.long), ids, torch.ones_like(ids), text * 0.5)


def _source(frames: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 8, 16, frames, generator=torch.Generator().manual_seed(frames))


def _noise(batch: int = 1) -> SeededNoise:
    return SeededNoise.from_seeds(1, batch, retake_seed=2)


def test_extend_both_sides_keeps_source_and_lengths(transformer):
    src = _source(10)
    out = tasks.extend(transformer, _cond(), src, 3, 4, options=FAST, noise=_noise())
    assert out.shape == (1, 8, 16, 17)
    assert torch.equal(out[..., 3:13], src), "the source frames come back exactly"
    assert torch.isfinite(out).all() and out[..., :3].abs().mean() > 0 and out[..., 13:].abs().mean() > 0


def test_extension_longer_than_source_gets_fresh_noise(transformer):
    src = _source(5)
    out = tasks.extend(transformer, _cond(), src, 0, 12, options=FAST, noise=_noise())
    assert out.shape[-1] == 17 and torch.equal(out[..., :5], src) and torch.isfinite(out).all()


def test_extend_past_the_window_sets_the_far_side_aside(transformer, monkeypatch):
    monkeypatch.setattr(tasks, "MAX_FRAMES", 20)
    src = _source(15)
    right = tasks.extend(transformer, _cond(), src, 0, 10, options=FAST, noise=_noise())
    assert right.shape[-1] == 25 and torch.equal(right[..., :15], src)
    left = tasks.extend(transformer, _cond(), src, 8, 0, options=FAST, noise=_noise())
    assert left.shape[-1] == 23 and torch.equal(left[..., 8:], src)
    both = tasks.extend(transformer, _cond(), src, 4, 6, options=FAST, noise=_noise())
    assert both.shape[-1] == 25 and torch.equal(both[..., 4:19], src) and torch.isfinite(both).all()


def test_extend_rejects_nothing_to_add(transformer):
    with pytest.raises(ValueError, match="left or right"):
        tasks.extend(transformer, _cond(), _source(5), 0, 0, options=FAST, noise=_noise())


def test_repaint_keeps_outside_region(transformer):
    src = _source(12)
    out = tasks.repaint(transformer, _cond(), src, 4, 8, variance=0.7, options=FAST, noise=_noise())
    assert torch.equal(out[..., :4], src[..., :4]) and torch.equal(out[..., 8:], src[..., 8:])
    assert not torch.allclose(out[..., 4:8], src[..., 4:8])


@pytest.mark.parametrize("start,end", [(5, 5), (-1, 3), (2, 13)])
def test_repaint_region_outside_source(transformer, start, end):
    with pytest.raises(ValueError, match="repaint region"):
        tasks.repaint(transformer, _cond(), _source(12), start, end, options=FAST, noise=_noise())


def test_flow_edit_batch_of_two(transformer):
    src = _source(9)
    noise = SeededNoise.from_seeds([1, 5], 2, retake_seed=[2, 6])  # one seed per item (an int is repeated)
    out = tasks.flow_edit(transformer, _cond(0), _cond(1), src, edit=tasks.EditOptions(0.0, 1.0, 1), batch_size=2,
                          options=FAST, noise=noise)
    assert out.shape == (2, 8, 16, 9) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1]), "each item draws its own noise"


def test_heun_with_oss_steps_runs(transformer):
    options = tasks.SamplerOptions(steps=8, scheduler="heun", oss_steps=(2, 5, 8))
    out = tasks.text2music(transformer, _cond(), 6, options=options, noise=_noise())
    assert out.shape == (1, 8, 16, 6) and torch.isfinite(out).all()


def test_decay_with_a_single_guided_step(transformer):
    guidance = GuidanceConfig(guidance_interval_decay=1.0, guidance_interval=0.5)
    options = tasks.SamplerOptions(steps=2, guidance=guidance)
    out = tasks.text2music(transformer, _cond(), 6, options=options, noise=_noise())
    assert torch.isfinite(out).all()


def test_batched_branches_match_separate_calls(transformer, monkeypatch):
    calls = []
    decode = transformer.decode

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return decode(x, *args, **kwargs)

    monkeypatch.setattr(transformer, "decode", counting)
    separate = tasks.text2music(transformer, _cond(), 6, options=tasks.with_options(FAST, batch_branches=False),
                                noise=_noise())
    separate_calls, calls[:] = list(calls), []
    batched = tasks.text2music(transformer, _cond(), 6, options=tasks.with_options(FAST, batch_branches=True),
                               noise=_noise())
    # the two paths differ: one call per branch (batch 1) against one call for both branches (batch 2)
    assert separate_calls == [1] * 2 * FAST.steps and calls == [2] * FAST.steps
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=0)


def test_image_latent_is_refused(transformer):
    with pytest.raises(ValueError, match="ACE-Step audio latent"):
        tasks.repaint(transformer, _cond(), torch.zeros(1, 4, 64, 64), 0, 10, options=FAST, noise=_noise())


def test_too_long_duration_is_refused(transformer):
    with pytest.raises(ValueError, match="240 s"):
        tasks.text2music(transformer, _cond(), tasks.MAX_FRAMES + 1, options=FAST, noise=_noise())


def test_one_seed_rule_for_every_node():
    from acestep_core.noise import MAX_SEED, noise_for_seed

    plain = noise_for_seed(7, 3)
    assert plain.seeds == [7, 8, 9] and plain.retake_seeds == [8, 9, 10]  # no retake seed: seed + 1
    given = noise_for_seed(MAX_SEED, 2, retake_seed=4, offsets=[5, 6])
    assert given.seeds == [4, 5] and given.retake_seeds == [9, 10]  # batch indices replace i, 32-bit wrap
    official = SeededNoise.from_seeds(7, 1, retake_seed=8)
    torch.testing.assert_close(plain.draw("manual", (3, 8, 16, 4))[:1], official.draw("manual", (1, 8, 16, 4)))


def test_command_line_and_official_args_take_the_dataclass_defaults():
    from acestep_core.cli import build_parser
    from acestep_core.pipeline import Request, request_from_official_args

    args = build_parser().parse_args(["generate", "--tags", "rock"])
    d = Request()
    assert d.batch_branches is tasks.SamplerOptions().speed.batch_branches is True  # the nodes' fast path
    assert (args.steps, args.scheduler, args.edit_n_max, args.guidance_scale, args.omega_scale) == (
        d.infer_step, d.scheduler_type, d.edit_n_max, d.guidance.guidance_scale, d.guidance.omega_scale)
    # where the official app's UI differs from the pipeline, the command line takes the app's (params.APP_DEFAULTS)
    from acestep_core.params import APP_DEFAULTS

    assert args.edit_n_min == APP_DEFAULTS["edit_n_min"].app and d.edit_n_min == APP_DEFAULTS["edit_n_min"].pipeline
    assert args.sample_rate == APP_DEFAULTS["sample_rate"].app
    official = request_from_official_args({"task": "edit"})
    assert (official.edit_n_min, official.infer_step, official.guidance) == (d.edit_n_min, d.infer_step, d.guidance)
    assert official.batch_branches is False  # the official separate calls, as the parity fixtures were recorded
