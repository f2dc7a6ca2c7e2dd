"""The speed and memory levers users reach (docs/memory-and-speed.md): `--cpu-offload`, `--torch-compile` and
`--overlapped-decode` on the command line give the same audio as without them; low-VRAM mode has exactly one
phase's components on the device at a time; torch.compile falls back to eager with a clear warning when the
compiler is missing or fails, and a small compiled call matches eager; the official flag spellings are aliases."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from conftest import TINY_FOLDER, VOCAB

from acestep_core import cli, fast, pipeline
from acestep_core.loading import load_acestep

ARGS = ["generate", "--tags", "pop, piano", "--lyrics", "[verse]\nhello bright morning", "--duration", "1.5",
        "--steps", "3", "--checkpoint", str(TINY_FOLDER), "--lyric-vocab", str(VOCAB), "--seed", "7"]
TAIL_SECONDS = 0.1
"""The official overlapped decode zero-pads its last vocoder window, so the song's last ~0.1 s differs from the
single-pass decode by more than rounding; everywhere else the two agree within OVERLAP_ATOL."""
OVERLAP_ATOL = 0.01
PCM16_ATOL = 2 / 32768


def _no_compiler(monkeypatch) -> None:
    monkeypatch.setattr(fast, "compiler_problem", lambda device: "no C++ compiler found (test)")


def test_cli_levers_give_the_same_audio(tmp_path, monkeypatch, capsys):
    plain, levered = tmp_path / "plain.wav", tmp_path / "levers.wav"
    assert cli.main([*ARGS, "--out", str(plain)]) == 0
    _no_compiler(monkeypatch)
    with pytest.warns(RuntimeWarning, match="torch.compile is off, running eager.*no C\\+\\+ compiler"):
        code = cli.main([*ARGS, "--out", str(levered), "--cpu-offload", "--torch-compile", "--overlapped-decode"])
    assert code == 0
    assert "torch.compile is off" in capsys.readouterr().out, "the fallback is shown, not only warned"
    a, rate = sf.read(plain)
    b, _ = sf.read(levered)
    n = min(len(a), len(b))
    assert abs(len(a) - len(b)) <= 1 and n == pytest.approx(1.5 * rate, abs=rate * 0.1)
    body = n - int(TAIL_SECONDS * rate)
    diff = np.abs(a[:n] - b[:n])
    assert diff[:body].max() <= OVERLAP_ATOL, "overlapped windows agree with the single pass away from the end"
    assert np.sqrt((diff ** 2).mean()) <= 0.02 * np.sqrt((a ** 2).mean())
    assert np.abs(a).max() > 0.01


def test_cli_offload_and_compile_alone_are_exact(tmp_path, monkeypatch):
    plain, levered = tmp_path / "plain.wav", tmp_path / "levers.wav"
    assert cli.main([*ARGS, "--duration", "1", "--out", str(plain)]) == 0
    _no_compiler(monkeypatch)
    with pytest.warns(RuntimeWarning):
        assert cli.main([*ARGS, "--duration", "1", "--out", str(levered), "--cpu_offload", "true",
                         "--torch_compile", "true"]) == 0
    a, b = sf.read(plain)[0], sf.read(levered)[0]
    assert a.shape == b.shape and np.abs(a - b).max() <= PCM16_ATOL


# --------------------------------------------------------------------------------------------------------------
# low-VRAM mode: one phase on the device at a time


@pytest.fixture(scope="module")
def model():
    return load_acestep(TINY_FOLDER, lyric_vocab=VOCAB)


def _resident(model) -> set[str]:
    """Components whose weights are phase copies ("on the device") right now."""
    names = {"text": model.text_encoder, "transformer": model.transformer, "dcae": model.dcae,
             "vocoder": model.vocoder}
    return {n for n, m in names.items() if any(getattr(t, "_phase_copy", False) for t in fast.module_tensors(m))}


def test_low_vram_moves_each_component_in_only_for_its_phase(model, monkeypatch):
    """On the CPU the device is the home, so this makes phase copies real copies and records who is resident."""
    def copy(self, tensor):
        moved = tensor.detach().clone()
        moved = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
        moved._phase_copy = True
        return moved

    request = pipeline.Request(task="repaint", prompt="pop", lyrics="[verse]\nla la", infer_step=2,
                               manual_seeds=[3], retake_seeds=[4], src_audio=torch.randn(2, 44100) * 0.1,
                               src_sample_rate=44100, repaint_start=0.2, repaint_end=0.6, sample_rate=44100)
    plain = pipeline.generate(model, request)
    seen: dict[str, list[set[str]]] = {}
    for owner, method, label in ((model.text_encoder, "encode", "text"), (model.transformer, "decode", "transformer"),
                                 (model.dcae, "encode", "dcae"), (model.dcae, "decode", "dcae"),
                                 (model.vocoder, "decode", "vocoder")):
        original = getattr(owner, method)

        def recorded(*args, _original=original, _label=label, **kwargs):
            seen.setdefault(_label, []).append(_resident(model))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, method, recorded)
    monkeypatch.setattr(fast.Offloader, "active", property(lambda self: True))
    monkeypatch.setattr(fast.Offloader, "_copy", copy)
    home = {id(t) for m in (model.text_encoder, model.transformer, model.dcae, model.vocoder)
            for t in fast.module_tensors(m)}
    try:
        offloaded = pipeline.generate(model, request, levers=fast.Levers(cpu_offload=True))
        assert model._acestep_parked, "the model remembers it is in low-VRAM mode"
    finally:
        assert fast.placement(model, False) is None and not model._acestep_parked
    assert seen["text"] and all(r == {"text"} for r in seen["text"])
    assert seen["transformer"] and all(r == {"transformer"} for r in seen["transformer"])
    codec = seen["dcae"] + seen["vocoder"]
    assert len(seen["dcae"]) >= 2 and all(r == {"dcae", "vocoder"} for r in codec), "source encode and decode"
    assert _resident(model) == set(), "every phase copy is dropped afterwards"
    assert {id(t) for m in (model.text_encoder, model.transformer, model.dcae, model.vocoder)
            for t in fast.module_tensors(m)} == home
    torch.testing.assert_close(offloaded.latents, plain.latents, atol=0, rtol=0)
    torch.testing.assert_close(offloaded.waveform, plain.waveform, atol=0, rtol=0)


def test_cli_long_songs_keep_one_phase_on_the_device_and_the_same_audio(model, monkeypatch):
    """--cpu-offload past the model's length: each window's decode runs in its own phase inside the transformer's
    (the transformer waits in CPU memory meanwhile and comes back after), with the same audio."""
    import argparse

    from acestep_core import cli_tasks

    def copy(self, tensor):
        moved = tensor.detach().clone()
        moved = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
        moved._phase_copy = True
        return moved

    monkeypatch.setattr(cli_tasks, "MAX_MODEL_SECONDS", 1.0)
    args = argparse.Namespace(task="text2music", window_seconds=1.2, overlap_seconds=0.4, lrc=None)
    request = pipeline.Request(prompt="pop", lyrics="[verse]\nla la", audio_duration=2.5, infer_step=2,
                               manual_seeds=[4], retake_seeds=[5], sample_rate=44100)
    plain = cli_tasks.generate(model, request, args)
    seen: dict[str, list[set[str]]] = {}
    for owner, method, label in ((model.text_encoder, "encode", "text"), (model.transformer, "decode", "transformer"),
                                 (model.dcae, "decode", "dcae")):
        original = getattr(owner, method)

        def recorded(*a, _original=original, _label=label, **kwargs):
            seen.setdefault(_label, []).append(_resident(model))
            return _original(*a, **kwargs)

        monkeypatch.setattr(owner, method, recorded)
    monkeypatch.setattr(fast.Offloader, "active", property(lambda self: True))
    monkeypatch.setattr(fast.Offloader, "_copy", copy)
    try:
        offloaded = cli_tasks.generate(model, request, args, levers=fast.Levers(cpu_offload=True))
    finally:
        assert fast.placement(model, False) is None
    assert seen["text"] and all(r == {"text"} for r in seen["text"])
    assert len(seen["transformer"]) >= 4 and all(r == {"transformer"} for r in seen["transformer"])
    assert len(seen["dcae"]) >= 2 and all(r == {"dcae", "vocoder"} for r in seen["dcae"]), "one decode per window"
    assert _resident(model) == set()
    torch.testing.assert_close(offloaded.waveform, plain.waveform, atol=0, rtol=0)


def test_placement_parks_and_restores_on_a_separate_device(model):
    """With a device unlike the home, low-VRAM mode keeps the weights home and a phase moves only its modules in."""
    class Shell:  # a model whose compute device is "meta", so parking is a real move without a GPU
        def __init__(self, modules):
            self.text_encoder, self.transformer, self.dcae, self.vocoder = modules
            self.device = torch.device("meta")

    shell = Shell([nn.Linear(3, 3), nn.Linear(3, 2), None, nn.Linear(2, 2)])
    offloader = fast.placement(shell, True)
    assert offloader is not None and offloader.active and offloader.home.type == "cpu"
    assert fast.placement(shell, True) is not None, "asking again changes nothing"
    assert all(p.device.type == "cpu" for p in shell.transformer.parameters())
    with fast.phase(offloader, shell.transformer):
        assert all(p.is_meta for p in shell.transformer.parameters())
        assert all(p.device.type == "cpu" for p in shell.text_encoder.parameters())
    assert all(p.device.type == "cpu" for p in shell.transformer.parameters())
    with fast.phase(offloader, shell.transformer):
        with fast.phase(offloader, shell.vocoder):  # e.g. long form decoding a window inside diffusion
            assert all(p.is_meta for p in shell.vocoder.parameters())
            assert all(p.device.type == "cpu" for p in shell.transformer.parameters()), "the outer phase waits home"
        assert all(p.is_meta for p in shell.transformer.parameters())
        assert all(p.device.type == "cpu" for p in shell.vocoder.parameters())
    assert all(p.device.type == "cpu" for m in (shell.transformer, shell.vocoder) for p in m.parameters())


# --------------------------------------------------------------------------------------------------------------
# torch.compile: guarded, with clear fallbacks


class _Block(nn.Module):
    """A small MLP block (its forward is ours: torch.compile does not trace a torch.nn container's own code)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class _Blocks(nn.Module):
    """The smallest thing with `transformer_blocks`: two small MLP blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.transformer_blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x):
        for block in self.transformer_blocks:
            x = x + block(x)
        return x


def test_small_compiled_call_matches_eager_and_reports_its_time():
    if fast.compiler_problem("cpu") is not None:
        pytest.skip(f"no compiler here: {fast.compiler_problem('cpu')} (the fallback tests cover this machine)")
    net, x = _Blocks(), torch.randn(3, 8)
    with torch.no_grad():
        eager = net(x)
        messages: list[str] = []
        assert fast.compile_blocks(net, notify=messages.append)
        compiled = net(x)
        again = net(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5)
    assert messages[0].startswith("torch.compile: compiling") and messages[1].startswith("torch.compile: compiled in")
    assert len(messages) == 2, "the compile time is shown once"


def test_compile_failing_at_the_first_call_falls_back_to_eager():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("cl.exe not found (simulated broken toolchain)")

    net, x = _Blocks(), torch.randn(3, 8)
    with torch.no_grad():
        eager = net(x)
        messages: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fast.compile_blocks(net, notify=messages.append, backend=broken_backend)
            out = net(x)
            out_again = net(x)
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    torch.testing.assert_close(out_again, eager, atol=0, rtol=0)
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1 and "running eager" in texts[0] and "cl.exe not found" in texts[0]
    assert any("running eager" in m for m in messages)
    assert all(b._compiled_call_impl is None for b in net.transformer_blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fast.compile_blocks(net, backend=broken_backend), "no second attempt, no second warning"


def test_model_errors_inside_compiled_blocks_are_not_swallowed():
    net = _Blocks()
    fast.compile_blocks(net, backend="eager", device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falling back" warning: the compiler did not fail, the input did
        with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
            net(torch.randn(3, 5))
    assert all(getattr(b, "_acestep_compiled", False) for b in net.transformer_blocks)


def test_compiler_problem_names_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    problem = fast.compiler_problem("cpu")
    assert problem is not None and "C++ compiler" in problem
    with pytest.warns(RuntimeWarning, match="running eager.*C\\+\\+ compiler"):
        assert not fast.compile_blocks(_Blocks(), device="cpu")
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    assert "pip install triton" in fast.compiler_problem("cuda")


# --------------------------------------------------------------------------------------------------------------
# official flag spellings


def _settings(*extra: str):
    return cli.speed_settings(cli.build_parser().parse_args(["generate", "--tags", "x", *extra]))


def test_official_flag_names_are_aliases():
    assert _settings() == ("auto", "auto", fast.Levers())
    assert _settings("--cpu-offload", "--torch-compile", "--overlapped-decode")[2] == fast.Levers(True, True, True)
    assert _settings("--cpu_offload", "true", "--torch_compile", "false", "--overlapped_decode", "1")[2] == \
        fast.Levers(cpu_offload=True, overlapped_decode=True)
    assert _settings("--bf16")[1] == "bf16" and _settings("--bf16", "false")[1] == "fp32"
    assert _settings("--bf16", "true", "--dtype", "bf16")[1] == "bf16"
    assert _settings("--device_id", "1")[0] == "cuda:1"
    assert _settings("--device", "cuda", "--device_id", "0")[0] == "cuda:0"


def test_clashing_aliases_are_refused():
    with pytest.raises(ValueError, match="--bf16 true asks for bf16 but --dtype is fp16"):
        _settings("--bf16", "--dtype", "fp16")
    with pytest.raises(ValueError, match="--device_id 1 asks for cuda:1 but --device is cpu"):
        _settings("--device_id", "1", "--device", "cpu")
    with pytest.raises(ValueError, match="--device_id must be a GPU number >= 0"):
        _settings("--device_id", "-1")
    with pytest.raises(SystemExit):
        _settings("--cpu_offload", "maybe")


def test_levers_are_checked():
    with pytest.raises(ValueError, match="cpu_offload must be True or False"):
        fast.Levers(cpu_offload="yes")
