"""ACE-Step 1.5 timestep schedules against the official fixtures (schedule_turbo, schedule_base) and the rules of
the official `generate_audio` (turbo: SHIFT_TIMESTEPS / VALID_TIMESTEPS; base: shifted linspace)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acestep_core.v15 import schedules
from conftest import FIXTURES_15

RTOL = 1e-5


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def _case(name: str):
    folder = FIXTURES_15 / name
    assert folder.is_dir(), f"fixture case {name} missing under {FIXTURES_15} (set ACESTEP15_FIXTURES_DIR)"
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "expected.safetensors"))


def test_turbo_schedules_match_official_fixture():
    meta, expected = _case("schedule_turbo")
    assert len(meta["schedules"]) == len(expected) == 7
    for index, entry in enumerate(meta["schedules"]):
        args = entry["args"]
        t = schedules.turbo_schedule(args["shift"], args.get("timesteps"))
        want = expected[f"timesteps.{index}"]
        assert t.dtype == torch.float32
        assert t.shape == want.shape and len(t) == entry["num_steps"], (index, args)
        assert _rel(t, want) <= RTOL, (index, args)
        assert torch.equal(t, want), (index, args)  # the official values are table look-ups: exact


def test_base_schedules_match_official_fixture():
    meta, expected = _case("schedule_base")
    for index, entry in enumerate(meta["schedules"]):
        args = entry["args"]
        t = schedules.base_schedule(args["infer_steps"], args["shift"])
        assert len(t) == entry["num_steps"] + 1 and float(t[-1]) == 0.0
        want = expected[f"timesteps.{index}"]
        assert _rel(t[:-1], want) <= RTOL, (index, args)


def test_turbo_tables_are_the_shift_formula():
    # The fixed tables are the float64 values of s·t/(1 + (s−1)·t) on linspace(1, 0, 9) (official comment:
    # "all unique timesteps from shift=1,2,3 with fix_nfe=8").
    for shift, table in schedules.SHIFT_TIMESTEPS.items():
        t = torch.linspace(1, 0, 9, dtype=torch.float64)
        want = shift * t / (1 + (shift - 1) * t)
        assert torch.allclose(torch.tensor(table, dtype=torch.float64), want[:-1], atol=1e-15, rtol=0)
    union = sorted({v for table in schedules.SHIFT_TIMESTEPS.values() for v in table}, reverse=True)
    assert list(schedules.VALID_TIMESTEPS) == union and len(union) == 20


def test_turbo_custom_timesteps_rules():
    # 25 values: trailing zeros go first, then only 20 are kept, each snapped.
    raw = [1.0 - i * 0.04 for i in range(22)] + [0.0, 0.0, 0.0]
    got = schedules.turbo_timesteps(3.0, raw)
    assert len(got) == 20
    assert all(v in schedules.VALID_TIMESTEPS for v in got)
    assert got[0] == 1.0 and got[1] == schedules.VALID_TIMESTEPS[1]  # 0.96 → 21/22
    assert schedules.snap_timesteps([0.99, 0.61, 0.05]) == [1.0, 0.625, 0.125]
    # A tensor works like a list (the handler passes torch.tensor(timesteps)).
    assert schedules.turbo_timesteps(1.0, torch.tensor([0.5, 0.25, 0.0])) == [0.5, 0.25]
    # An empty list means "no custom timesteps".
    assert schedules.turbo_timesteps(2.0, []) == list(schedules.SHIFT_TIMESTEPS[2.0])


@pytest.mark.parametrize(
    "timesteps, match",
    [([0.0, 0.0], "no non-zero"), ([0.5, float("nan")], "finite"), ([1.5], r"\[0.0, 1.0\]"), ([-0.1], "lie in")],
)
def test_turbo_bad_timesteps_raise(timesteps, match):
    with pytest.raises(ValueError, match=match):
        schedules.turbo_timesteps(3.0, timesteps)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, 10**6])
def test_base_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="infer_steps"):
        schedules.base_schedule(steps, 1.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("inf")])
def test_bad_shift_raises(shift):
    with pytest.raises(ValueError, match="shift"):
        schedules.base_schedule(8, shift)
    if shift != 0.0 and shift != -1.0:
        with pytest.raises(ValueError, match="shift"):
            schedules.turbo_schedule(shift)
