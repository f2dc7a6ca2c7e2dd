"""bench/rtf15.py on the tiny configuration: the report's shape and arithmetic, and the command-line checks."""
from __future__ import annotations

import json

import pytest

from bench import rtf15


def test_tiny_report(tmp_path):
    report = rtf15.main(["--tiny", "--seconds", "1", "--variants", "turbo", "base", "--warmup", "0",
                         "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads(open(report["path"]).read())
    assert saved["config"] == "tiny" and saved["threads"] == 1
    assert [r["variant"] for r in saved["runs"]] == ["turbo", "base"]
    assert [r["steps"] for r in saved["runs"]] == [8, 50]
    for r in saved["runs"]:
        assert set(r["phases_s"]) == {"text_encode", "condition_encoder", "diffusion_loop", "vae_decode"}
        assert all(v > 0 for v in r["phases_s"].values())
        assert r["total_s"] == pytest.approx(sum(r["phases_s"].values()))
        assert r["rtf"] == pytest.approx(r["batch"] * r["seconds"] / r["total_s"])
        assert r["finite"] and r["peak_gpu_gib"] is None


@pytest.mark.parametrize("argv", [["--seconds", "1"], ["--tiny", "--seconds", "700"], ["--tiny", "--batch", "0"],
                                  ["--tiny", "--random-weights"], ["--tiny", "--variants", "xl"]])
def test_command_line_refusals(argv):
    with pytest.raises(SystemExit):
        rtf15.parse_args(argv)
