"""Schedules, samplers and guidance against the official fixtures, known integrals and the documented defect fixes."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import Case, case_params

from acestep_core.sampling import (
    GuidanceConfig,
    MomentumBuffer,
    apg,
    audio2audio_sigmas,
    cfg,
    cfg_zero_star,
    double_condition,
    euler_step,
    generator_noise,
    guidance_interval,
    guidance_scale_at,
    guided_velocity,
    heun_call_sigmas,
    make_guided_velocity,
    official_sigmas,
    omega_factor,
    oss_sigmas,
    parse_oss_steps,
    sample_euler,
    sample_heun,
    sample_pingpong,
    separate_branches,
)

SCHEDULE_FLOOR = 1e-6


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=atol)


def _sampler_schedule(kind: str, steps: int, shift: float = 3.0, sigma_max: float = 1.0) -> torch.Tensor:
    """The official scheduler's sigma list for a sampler kind (Heun repeats the interior sigmas)."""
    sigmas = official_sigmas(steps, shift, sigma_max)
    return heun_call_sigmas(sigmas) if kind == "heun" else sigmas


# ---------------------------------------------------------------- parity with the official code


@pytest.mark.parametrize("path", case_params("scheduler_timesteps"))
def test_scheduler_timesteps_parity(path):
    case = Case(path)
    for spec in case.args["schedules"]:
        key = spec["key"]
        sigmas = _sampler_schedule(spec["scheduler"], spec["num_inference_steps"], spec["shift"], spec["sigma_max"])
        _close(sigmas, case.outputs[key + ".sigmas"], case.atol(key + ".sigmas", SCHEDULE_FLOOR))
        _close(sigmas[:-1] * 1000, case.outputs[key + ".timesteps"], case.atol(key + ".timesteps", SCHEDULE_FLOOR))


@pytest.mark.parametrize("path", case_params("scheduler_trajectory_"))
def test_sampler_trajectory_parity(path):
    case = Case(path)
    args, c = case.args, case.inputs["c"]
    timesteps, velocities, trajectory = [], [], [case.inputs["x_init"]]

    def standin(x, sigma, index):
        t = sigma * 1000
        timesteps.append(t)
        v = 0.8 * x - 0.3 * (t / 1000) * c + 0.05 * x * x
        velocities.append(v)
        return v

    def record(index, total, x):
        trajectory.append(x)

    sigmas = official_sigmas(args["steps"], args["shift"])
    x_init = case.inputs["x_init"]
    if args["scheduler"] == "euler":
        final = sample_euler(standin, x_init, sigmas, omega_scale=args["omega"], callback=record)
    elif args["scheduler"] == "heun":
        final = sample_heun(standin, x_init, sigmas, omega_scale=args["omega"], callback=record)
    else:
        noise = [case.inputs[k] for k in sorted(k for k in case.inputs if k.startswith("noise_"))]
        final = sample_pingpong(standin, x_init, sigmas, noise_fn=lambda step, shape: noise[step], callback=record)

    _close(torch.stack(timesteps), case.intermediates["timesteps"], SCHEDULE_FLOOR)
    _close(torch.stack(velocities), case.intermediates["velocities"], case.atol("trajectory", SCHEDULE_FLOOR))
    _close(torch.stack(trajectory), case.outputs["trajectory"], case.atol("trajectory", SCHEDULE_FLOOR))
    _close(final, case.outputs["final"], case.atol("final", SCHEDULE_FLOOR))


@pytest.mark.parametrize("path", case_params("guidance"))
def test_guidance_parity(path):
    case = Case(path)
    args, inp, out = case.args, case.inputs, case.outputs

    def tol(name):
        return case.atol(name, SCHEDULE_FLOOR)

    buffer = MomentumBuffer(momentum=args["momentum"])
    for i, scale in enumerate(args["apg_scales_per_call"]):
        v_c, v_u = inp[f"call{i}.pred_cond"], inp[f"call{i}.pred_uncond"]
        got = apg(v_c, v_u, scale, buffer, args["eta"], args["norm_threshold"], args["dims"])
        _close(got, out[f"apg.call{i}"], tol(f"apg.call{i}"))
        _close(buffer.running_average, case.intermediates[f"apg.call{i}.momentum_running_average"], SCHEDULE_FLOOR)
    for i, scale in enumerate(args["cfg_scales_per_call"]):
        got = cfg(inp[f"call{i}.pred_cond"], inp[f"call{i}.pred_uncond"], scale)
        _close(got, out[f"cfg.call{i}"], tol(f"cfg.call{i}"))

    spec = args["apg_no_momentum"]
    got = apg(inp[f"{spec['cond']}.pred_cond"], inp[f"{spec['cond']}.pred_uncond"], spec["guidance_scale"])
    _close(got, out["apg_no_momentum.call0"], tol("apg_no_momentum.call0"))

    star = args["cfg_zero_star"]
    for name in ("i0", "i1", "i5", "i0_nozeroinit"):
        spec = star[name]
        got = cfg_zero_star(
            inp[f"{spec['cond']}.pred_cond"], inp[f"{spec['cond']}.pred_uncond"], star["guidance_scale"],
            spec["i"], star["zero_steps"], spec.get("use_zero_init", True),
        )
        _close(got, out[f"cfg_zero_star.{name}"], tol(f"cfg_zero_star.{name}"))

    spec = args["double_condition"]
    got = double_condition(
        inp[f"{spec['cond']}.pred_cond"], inp[f"{spec['uncond']}.pred_uncond"], inp["only_text_cond"],
        spec["guidance_scale_text"], spec["guidance_scale_lyric"],
    )
    _close(got, out["cfg_double_condition"], tol("cfg_double_condition"))


@pytest.mark.parametrize("path", case_params("e2e_"))
def test_pipeline_schedules_parity(path):
    """The schedule each official run used (its last intermediate.timesteps_K) from the case's arguments."""
    case = Case(path)
    args = case.args
    steps, kind = args["infer_step"], args["scheduler_type"]
    recorded = sorted(k for k in case.intermediates if k.startswith("timesteps_"))
    if args.get("oss_steps"):
        rounding = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.meta["dtype"]]
        sigmas = oss_sigmas(args["oss_steps"], rounding_dtype=rounding)
        first = official_sigmas(max(parse_oss_steps(args["oss_steps"])))
    elif args.get("audio2audio_enable"):
        sigmas = audio2audio_sigmas(steps, args["ref_audio_strength"]).sigmas
        sigmas = heun_call_sigmas(sigmas) if kind == "heun" else sigmas
        first = _sampler_schedule(kind, steps)
    else:
        # flow-edit always builds an Euler schedule
        sigmas = _sampler_schedule("euler" if args["task"] == "edit" else kind, steps)
        first = sigmas
    _close(first[:-1] * 1000, case.intermediates[recorded[0]], SCHEDULE_FLOOR)
    _close(sigmas[:-1] * 1000, case.intermediates[recorded[-1]], SCHEDULE_FLOOR)


# ---------------------------------------------------------------- known integrals


def _straight_path(shape=(2, 8, 16, 5), seed=0):
    """Data x0, noise, and the exact velocity field (x − x0)/σ of the straight paths through x0."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)

    def velocity(x, sigma, index):
        return (x - x0) / sigma

    return x0, noise, velocity


@pytest.mark.parametrize("omega", [None, 0.0])
def test_euler_lands_on_data_along_straight_path(omega):
    x0, noise, velocity = _straight_path()
    out = sample_euler(velocity, noise, official_sigmas(12), omega_scale=omega)
    _close(out, x0, 1e-5)


def test_heun_lands_on_data_along_straight_path():
    x0, noise, velocity = _straight_path()
    _close(sample_heun(velocity, noise, official_sigmas(9), omega_scale=0.0), x0, 1e-5)


def test_pingpong_lands_on_data_along_straight_path():
    x0, noise, velocity = _straight_path()
    out = sample_pingpong(velocity, noise, official_sigmas(7), generator=torch.Generator().manual_seed(3))
    _close(out, x0, 1e-5)


def test_heun_is_second_order_on_exponential_field():
    """dx/dσ = x integrates to x(0) = x(1)·e^{σ_end − σ_start}: Heun's error shrinks ~4x per halving, Euler's ~2x."""
    x1 = torch.linspace(-2, 2, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    exact = x1 * math.exp(-1.0)

    def velocity(x, sigma, index):
        return x

    def error(sampler, n):
        sigmas = torch.linspace(1.0, 0.0, n + 1)
        return (sampler(velocity, x1, sigmas, omega_scale=None) - exact).abs().max().item()

    euler_ratio = error(sample_euler, 16) / error(sample_euler, 32)
    heun_ratio = error(sample_heun, 16) / error(sample_heun, 32)
    assert 1.8 < euler_ratio < 2.2
    assert 3.5 < heun_ratio < 4.5
    assert error(sample_heun, 16) < error(sample_euler, 16) / 10


# ---------------------------------------------------------------- omega, batch coupling, dtypes


def test_omega_rescale_keeps_mean_and_couples_the_batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 16, 4, generator=g)
    v = torch.randn(2, 8, 16, 4, generator=g) + torch.tensor([3.0, -1.0]).reshape(2, 1, 1, 1)
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.6)
    dx = (sigma_next - sigma) * v
    out = euler_step(x, v, sigma, sigma_next, omega_scale=10.0)
    # the mean step is untouched, deviations from the whole-batch mean are scaled by omega'
    _close((out - x).mean(), dx.mean(), 1e-6)
    _close((out - x) - dx.mean(), (dx - dx.mean()) * omega_factor(10.0), 1e-5)
    # each item alone would use its own mean: the official batch coupling makes the results differ
    alone = torch.cat([euler_step(x[i : i + 1], v[i : i + 1], sigma, sigma_next, 10.0) for i in range(2)])
    assert (alone - out).abs().max() > 1e-3
    assert omega_factor(0.0) == pytest.approx(1.0, abs=1e-12)


def test_updates_run_in_float32_and_keep_the_latent_dtype():
    x0, noise, velocity = _straight_path()
    seen = []

    def bf16_velocity(x, sigma, index):
        seen.append(x.dtype)
        return velocity(x.float(), sigma, index).to(torch.bfloat16)

    out = sample_euler(bf16_velocity, noise.to(torch.bfloat16), official_sigmas(4))
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    out = sample_pingpong(bf16_velocity, noise.to(torch.bfloat16), official_sigmas(4),
                          generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------- Heun call indexing, oss with Heun


def test_heun_calls_and_callback_follow_the_official_timesteps():
    sigmas = official_sigmas(6)
    calls, progress = [], []
    x0, noise, velocity = _straight_path()

    def spy(x, sigma, index):
        calls.append((index, sigma.item()))
        return velocity(x, sigma, index)

    sample_heun(spy, noise, sigmas, callback=lambda i, n, x: progress.append((i, n)))
    expected = heun_call_sigmas(sigmas)[:-1].tolist()
    assert [i for i, _ in calls] == list(range(2 * 6 - 1))
    assert [s for _, s in calls] == expected
    assert progress == [(i, 2 * 6 - 1) for i in range(2 * 6 - 1)]


def test_heun_runs_over_oss_sigmas():
    """The official Heun cannot take oss_steps (crash); here Heun integrates the oss schedule like any other."""
    sigmas = oss_sigmas("2, 5, 9, 14, 20")
    x0, noise, velocity = _straight_path()
    seen = []

    def spy(x, sigma, index):
        seen.append(sigma.item())
        return velocity(x, sigma, index)

    out = sample_heun(spy, noise, sigmas, omega_scale=0.0)
    assert seen == heun_call_sigmas(sigmas)[:-1].tolist()
    _close(out, x0, 1e-5)


def test_heun_guidance_interval_counts_calls_against_n_steps():
    """Official quirk kept for parity: Heun's loop index runs over 2N − 1 calls, the interval is built from N."""
    n_steps = 8
    start, end = guidance_interval(n_steps, 0.5)
    guided = []

    def predict(x, sigma, branches):
        return tuple(torch.zeros_like(x) for _ in branches)

    config = GuidanceConfig(cfg_type="cfg")
    velocity = make_guided_velocity(config, n_steps, predict)

    def spy(x, sigma, index):
        if config.branches(index, n_steps) != ("cond",):
            guided.append(index)
        return velocity(x, sigma, index)

    sample_heun(spy, torch.zeros(1, 2, 3, 4), official_sigmas(n_steps))
    assert guided == list(range(start, end))


# ---------------------------------------------------------------- PingPong randomness


@pytest.mark.parametrize("path", case_params("e2e_text2music_pingpong"))
def test_pingpong_generator_noise_replays_the_official_draws(path):
    """From the case's seeds: base noise per item (pipeline), then every PingPong step's draw (sampler)."""
    case = Case(path)
    generators = [torch.Generator().manual_seed(seed) for seed in case.args["manual_seeds"]]
    names = sorted(k for k in case.inputs if k.startswith("noise_"))
    base = case.inputs[names[0]]
    replayed = torch.cat([torch.randn((1,) + tuple(base.shape[1:]), generator=g) for g in generators])
    assert torch.equal(replayed, base)
    draw = generator_noise(generators)
    assert len(names) - 1 == case.args["infer_step"]
    for step, name in enumerate(names[1:]):
        assert torch.equal(draw(step, base.shape), case.inputs[name])


def test_pingpong_draws_from_the_first_generator_only_and_on_the_last_step():
    steps = 5
    x0, noise, velocity = _straight_path()
    first, second = torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)
    second_state = second.get_state()
    out = sample_pingpong(velocity, noise, official_sigmas(steps), generator=[first, second])

    replay = torch.Generator().manual_seed(11)
    recorded = []

    def noise_fn(step, shape):
        draw = torch.empty(shape).normal_(generator=replay)
        recorded.append(draw)
        return draw

    again = sample_pingpong(velocity, noise, official_sigmas(steps), noise_fn=noise_fn)
    assert torch.equal(out, again)
    assert len(recorded) == steps
    assert torch.equal(first.get_state(), replay.get_state())
    assert torch.equal(second.get_state(), second_state)


# ---------------------------------------------------------------- guidance interval, decay, guided velocity


def test_decay_over_a_single_guided_step_uses_the_full_scale():
    """Official ZeroDivisionError case: infer_step=2, interval 0.5 -> one guided step."""
    start, end = guidance_interval(2, 0.5)
    assert end - start == 1
    assert guidance_scale_at(start, start, end, 15.0, decay=1.0, min_scale=3.0) == 15.0


def test_decay_runs_linearly_from_scale_to_min_scale():
    start, end = guidance_interval(60, 0.5)
    scales = [guidance_scale_at(i, start, end, 15.0, 1.0, 3.0) for i in range(start, end)]
    assert scales[0] == 15.0 and scales[-1] == pytest.approx(3.0)
    steps = [b - a for a, b in zip(scales, scales[1:])]
    assert max(steps) == pytest.approx(min(steps))
    assert guidance_scale_at(end - 1, start, end, 15.0, 0.5, 3.0) == pytest.approx(9.0)


def _recording_predict(log):
    """A predict whose branches are distinct fields of x, logging each requested branch tuple."""
    weights = {"cond": 1.0, "text": 0.5, "uncond": -0.25}

    def predict(x, sigma, branches):
        log.append(branches)
        return tuple(weights[b] * x + weights[b] ** 2 for b in branches)

    return predict


def test_guided_velocity_interval_momentum_and_cfg_types():
    n_steps = 8
    start, end = guidance_interval(n_steps, 0.5)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 8, 16, 3, generator=g) for _ in range(n_steps)]
    log = []
    predict = _recording_predict(log)
    velocity = make_guided_velocity(GuidanceConfig(), n_steps, predict)
    reference = MomentumBuffer()
    for i, x in enumerate(xs):
        got = velocity(x, torch.tensor(0.5), i)
        v_c, v_u = x + 1.0, -0.25 * x + 0.0625
        if start <= i < end:
            _close(got, apg(v_c, v_u, 15.0, reference), 1e-6)
        else:
            _close(got, v_c, 0.0)
    assert log == [("cond", "uncond") if start <= i < end else ("cond",) for i in range(n_steps)]

    x = xs[0]
    v_c, v_u, v_t = x + 1.0, -0.25 * x + 0.0625, 0.5 * x + 0.25
    kwargs = dict(n_steps=n_steps, predict=predict, momentum=MomentumBuffer())
    _close(guided_velocity(x, torch.tensor(0.5), start, config=GuidanceConfig(cfg_type="cfg"), **kwargs),
           cfg(v_c, v_u, 15.0), 1e-6)
    star = GuidanceConfig(cfg_type="cfg_star", guidance_interval=1.0)
    assert torch.count_nonzero(guided_velocity(x, torch.tensor(0.5), 1, config=star, **kwargs)) == 0
    _close(guided_velocity(x, torch.tensor(0.5), 2, config=star, **kwargs), cfg_zero_star(v_c, v_u, 15.0, 2), 1e-6)
    double = GuidanceConfig(guidance_scale_text=5.0, guidance_scale_lyric=1.5, guidance_interval_decay=1.0)
    _close(guided_velocity(x, torch.tensor(0.5), start, config=double, **kwargs),
           double_condition(v_c, v_u, v_t, 5.0, 1.5), 1e-6)
    decayed = GuidanceConfig(cfg_type="cfg", guidance_interval_decay=1.0)
    _close(guided_velocity(x, torch.tensor(0.5), end - 1, config=decayed, **kwargs), cfg(v_c, v_u, 3.0), 1e-6)


def test_guidance_off_at_scale_one_and_double_condition_needs_both_scales():
    log = []
    predict = _recording_predict(log)
    x = torch.ones(1, 2, 3, 4)
    for config in (GuidanceConfig(guidance_scale=1.0), GuidanceConfig(guidance_scale=0.0, guidance_scale_text=5.0,
                                                                      guidance_scale_lyric=2.0)):
        _close(guided_velocity(x, torch.tensor(0.5), 4, config=config, n_steps=8, predict=predict, momentum=None),
               x + 1.0, 0.0)
    assert log == [("cond",), ("cond",)]
    assert not GuidanceConfig(guidance_scale_text=5.0, guidance_scale_lyric=1.0).double_condition


def test_separate_branches_calls_in_official_order_and_needs_text_for_double_condition():
    order = []

    def branch(name):
        def fn(x, sigma):
            order.append(name)
            return x
        return fn

    predict = separate_branches(branch("cond"), branch("uncond"), branch("text"))
    predict(torch.zeros(1), torch.tensor(0.5), ("cond", "text", "uncond"))
    assert order == ["cond", "text", "uncond"]
    without_text = separate_branches(branch("cond"), branch("uncond"))
    with pytest.raises(ValueError, match="text"):
        without_text(torch.zeros(1), torch.tensor(0.5), ("cond", "text", "uncond"))


# ---------------------------------------------------------------- oss and audio2audio details


def test_oss_bf16_rounding_moves_sigmas_by_at_most_bf16_resolution():
    f32 = oss_sigmas("1, 4, 9, 16, 25", rounding_dtype=torch.float32)
    bf16 = oss_sigmas("1, 4, 9, 16, 25", rounding_dtype=torch.bfloat16)
    assert not torch.equal(f32, bf16)
    assert ((bf16 - f32).abs() <= f32 * 2**-7).all()
    assert parse_oss_steps("") == [] and parse_oss_steps(None) == [] and parse_oss_steps(" 3, 7") == [3, 7]


def test_audio2audio_start_sigma_is_the_first_training_sigma():
    schedule = audio2audio_sigmas(8, 0.5)
    assert schedule.sigmas.numel() == int((1 - 0.5) * 8) + 1
    # the mixing sigma is the scheduler's sigma_max attribute; the first model sigma is shifted once more
    assert schedule.sigmas[0].item() == pytest.approx(3 * schedule.start_sigma / (1 + 2 * schedule.start_sigma))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: official_sigmas(0), "steps"),
        (lambda: official_sigmas(8, shift=float("nan")), "shift"),
        (lambda: oss_sigmas("9, 3"), "oss_steps"),
        (lambda: oss_sigmas("0, 3"), "oss_steps"),
        (lambda: oss_sigmas("a, b"), "oss_steps"),
        (lambda: oss_sigmas(""), "oss_steps"),
        (lambda: audio2audio_sigmas(8, 0.95), "ref_strength"),
        (lambda: audio2audio_sigmas(8, 1.5), "ref_strength"),
        (lambda: guidance_interval(8, 1.5), "guidance_interval"),
        (lambda: guidance_scale_at(1, 0, 4, float("nan")), "guidance_scale"),
        (lambda: GuidanceConfig(guidance_scale=float("nan")), "guidance_scale"),
        (lambda: GuidanceConfig(cfg_type="pag"), "cfg_type"),
        (lambda: GuidanceConfig(guidance_interval_decay=-1.0), "guidance_interval_decay"),
        (lambda: GuidanceConfig(zero_steps=-1), "zero_steps"),
        (lambda: cfg(torch.zeros(2), torch.zeros(3), 2.0), "v_uncond"),
        (lambda: apg(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), float("inf")), "scale"),
        (lambda: sample_euler(lambda x, s, i: x, torch.zeros(2), torch.zeros(2, 2)), "sigmas"),
        (lambda: sample_euler(lambda x, s, i: x, torch.zeros(2), [1.0, float("nan")]), "sigmas"),
        (lambda: sample_euler(lambda x, s, i: x[:1], torch.zeros(2), [1.0, 0.0]), "velocity"),
        (lambda: sample_heun(lambda x, s, i: x, torch.zeros(2), [1.0, 0.0, 0.5, 0.0]), "Heun"),
        (lambda: sample_pingpong(lambda x, s, i: x, torch.zeros(2), [1.0, 0.0]), "noise_fn"),
        (lambda: sample_pingpong(lambda x, s, i: x, torch.zeros(2), [1.0, 0.0], generator=[]), "generator"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, name):
    with pytest.raises(ValueError, match=name):
        call()
