"""Audio codec: music DCAE, vocoder, log-mel front end, resampler and latent ⇄ audio conversion (design §1, §6)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, REAL_KEYS, TINY_COMFY, TINY_FOLDER, Case, case_dirs, case_params
from safetensors.torch import load_file

from acestep_core import audio
from acestep_core.models.dcae import DCAE, DCAEConfig, relu_linear_attention, relu_quadratic_attention
from acestep_core.models.vocoder import (
    MEL_BUFFERS,
    LogMelSpectrogram,
    Vocoder,
    VocoderConfig,
    slaney_mel_filterbank,
    vocoder_key_map,
)

MODULE_ATOL = 1e-4


def _build(module_cls, config_cls, state_dict: dict, config: dict | None):
    """The loader path: shapes → config → meta build → strict load with assign."""
    cfg = config_cls.from_checkpoint(config, {k: v.shape for k, v in state_dict.items()})
    with torch.device("meta"):
        module = module_cls(cfg)
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval()


def _folder(name: str) -> tuple[dict, dict]:
    folder = TINY_FOLDER / name
    return load_file(str(folder / "diffusion_pytorch_model.safetensors")), json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def dcae() -> DCAE:
    return _build(DCAE, DCAEConfig, *_folder("music_dcae_f8c8"))


@pytest.fixture(scope="module")
def vocoder() -> Vocoder:
    return _build(Vocoder, VocoderConfig, *_folder("music_vocoder"))


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=MODULE_ATOL)


# ---------------------------------------------------------------- parity with the official code (fixtures)


@pytest.mark.parametrize("case_dir", case_params("dcae_"))
def test_dcae_fixture(case_dir: Path, dcae: DCAE, vocoder: Vocoder) -> None:
    case = Case(case_dir)
    if "audios" in case.inputs:
        wav, sr = case.inputs["audios"], case.args["sr"]
        latents = audio.encode_audio(dcae, vocoder.mel_transform, wav, sr)
        _close(latents, case.outputs["latents"], case.atol("latents", MODULE_ATOL))
        resampled = -(-wav.shape[-1] * audio.SAMPLE_RATE // sr)
        assert latents.shape[-1] == audio.latent_frames_for_samples(resampled)
        expected_lengths = case.outputs["latent_lengths"].tolist()
        assert [audio.seconds_to_latent_frames(wav.shape[-1] / sr)] * wav.shape[0] == expected_lengths
    else:
        wav = audio.decode_latents(dcae, vocoder, case.inputs["latents"], sample_rate=case.args["sr_out"])
        _close(wav, case.outputs["waveform"], case.atol("waveform", MODULE_ATOL))


def test_vocoder_fixture(vocoder: Vocoder) -> None:
    (case_dir,) = [p.values[0] for p in case_params("vocoder")]
    case = Case(case_dir)
    with torch.no_grad():
        features = vocoder.backbone(case.inputs["mel"])
        wav = vocoder.decode(case.inputs["mel"])
    _close(features, case.intermediates["backbone_out"], MODULE_ATOL)
    _close(wav, case.outputs["waveform"], case.atol("waveform", MODULE_ATOL))


def test_mel_frontend_fixture(vocoder: Vocoder) -> None:
    (case_dir,) = [p.values[0] for p in case_params("mel_frontend")]
    case = Case(case_dir)
    assert case.args["sample_rate"] == vocoder.config.sampling_rate
    assert (case.args["f_min"], case.args["f_max"]) == (vocoder.config.f_min, vocoder.config.f_max)
    with torch.no_grad():
        mel = vocoder.mel_transform(case.inputs["waveform"])
    _close(mel, case.outputs["log_mel"], case.atol("log_mel", MODULE_ATOL))


def test_resample_matches_torchaudio_fixture() -> None:
    """dcae_decode_48k's output is torchaudio Resample(44100→48000) of dcae_decode's output."""
    native = Case(FIXTURES / "dcae_decode").outputs["waveform"]
    resampled = Case(FIXTURES / "dcae_decode_48k").outputs["waveform"]
    _close(audio.resample(native, 44100, 48000), resampled, MODULE_ATOL)


def _pipeline_sources() -> list:
    found = []
    for path in case_dirs("e2e_"):
        meta = json.loads((path / "case.json").read_text())
        if "intermediate.src_latents" in meta["tensors"]:
            found.append(pytest.param(path, id=path.name))
    if not found:
        raise RuntimeError(f"no e2e fixture with intermediate.src_latents under {FIXTURES}")
    return found


@pytest.mark.parametrize("case_dir", _pipeline_sources())
def test_encode_of_pipeline_sources(case_dir: Path, dcae: DCAE, vocoder: Vocoder) -> None:
    """The pipeline's source/reference audio (mono or stereo, any rate) encodes to its src_latents."""
    case = Case(case_dir)
    role = "src" if "src_audio" in case.inputs else "ref"
    wav, rate = case.inputs[f"{role}_audio"], case.meta[f"sample_rate_{role}"]
    latents = audio.encode_audio(dcae, vocoder.mel_transform, wav, rate)
    _close(latents, case.intermediates["src_latents"], MODULE_ATOL)


def test_seconds_to_latent_frames_matches_pipeline_lengths() -> None:
    cases = [Case(p) for p in case_dirs("e2e_text2music")]
    assert cases
    for case in cases:
        assert audio.seconds_to_latent_frames(case.args["audio_duration"]) == case.outputs["latents"].shape[-1]


# ---------------------------------------------------------------- real-size structure (meta device)


@pytest.mark.parametrize(
    ("module_cls", "config_cls", "keys_file"),
    [(DCAE, DCAEConfig, "music_dcae_f8c8.json"), (Vocoder, VocoderConfig, "music_vocoder.json")],
)
def test_real_state_dict_names_and_shapes(module_cls, config_cls, keys_file: str) -> None:
    real = json.loads((REAL_KEYS / keys_file).read_text())
    with torch.device("meta"):
        module = module_cls()
    ours = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert sorted(set(real["keys"]) - set(ours)) == []
    assert sorted(set(ours) - set(real["keys"])) == []
    assert ours == real["keys"]
    assert sum(math.prod(s) for s in ours.values()) == real["numel"]
    assert config_cls.from_checkpoint(None, real["keys"]) == config_cls()


def test_tiny_configs_from_shapes_alone_match_config_json() -> None:
    for module_cls, config_cls, name in ((DCAE, DCAEConfig, "music_dcae_f8c8"), (Vocoder, VocoderConfig, "music_vocoder")):
        state_dict, config = _folder(name)
        shapes = {k: v.shape for k, v in state_dict.items()}
        assert config_cls.from_checkpoint(config, shapes) == config_cls.from_checkpoint(None, shapes)


def test_config_disagreeing_with_weights_is_rejected() -> None:
    state_dict, config = _folder("music_dcae_f8c8")
    shapes = {k: v.shape for k, v in state_dict.items()}
    with pytest.raises(ValueError, match="latent_channels"):
        DCAEConfig.from_checkpoint({**config, "latent_channels": 4}, shapes)
    with pytest.raises(ValueError, match="upsample_block_type"):
        DCAEConfig.from_checkpoint({**config, "upsample_block_type": "pixel_shuffle"}, shapes)
    with pytest.raises(ValueError, match="missing"):
        DCAEConfig.from_checkpoint(config, {k: s for k, s in shapes.items() if "norm_out" not in k})
    state_dict, config = _folder("music_vocoder")
    shapes = {k: v.shape for k, v in state_dict.items()}
    with pytest.raises(ValueError, match="upsample_initial_channel"):
        VocoderConfig.from_checkpoint({**config, "upsample_initial_channel": 64}, shapes)
    with pytest.raises(ValueError, match="hop_length"):
        VocoderConfig.from_checkpoint({**config, "upsample_rates": [4, 4, 4, 4, 4]}, shapes)


# ---------------------------------------------------------------- loading variants


def test_comfy_single_file_and_parametrization_names(vocoder: Vocoder) -> None:
    """The AIO file's vae.dcae./vae.vocoder. groups load; torch-parametrisation weight-norm names map to weight_g/v."""
    tensors = load_file(str(TINY_COMFY))
    groups = {
        prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for prefix in ("vae.dcae.", "vae.vocoder.")
    }
    _build(DCAE, DCAEConfig, groups["vae.dcae."], None)
    renamed = {
        re.sub(r"weight_([gv])$", lambda m: f"parametrizations.weight.original{'0' if m[1] == 'g' else '1'}", k): v
        for k, v in groups["vae.vocoder."].items()
    }
    assert any(".parametrizations.weight." in k for k in renamed)
    mapped = vocoder_key_map(renamed)
    assert mapped.keys() == groups["vae.vocoder."].keys()
    loaded = _build(Vocoder, VocoderConfig, mapped, None)
    assert loaded.config == vocoder.config
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, vocoder.state_dict()[name], atol=0, rtol=0)


def test_vocoder_file_without_mel_buffers(vocoder: Vocoder) -> None:
    state_dict, config = _folder("music_vocoder")
    stored = {name: state_dict.pop(name) for name in MEL_BUFFERS}
    loaded = _build(Vocoder, VocoderConfig, state_dict, config)
    assert loaded.mel_transform.spectrogram.window.device.type == "cpu"
    torch.testing.assert_close(loaded.mel_transform.spectrogram.window, stored[MEL_BUFFERS[0]], atol=0, rtol=0)
    torch.testing.assert_close(loaded.mel_transform.mel_scale.fb, stored[MEL_BUFFERS[1]], atol=1e-6, rtol=0)


def test_filterbank_matches_torchaudio_numbers_in_checkpoint() -> None:
    """The tiny file's fb buffer was computed by torchaudio MelScale(128, 44100, 40, 16000, 1025, slaney, slaney)."""
    stored = _folder("music_vocoder")[0][MEL_BUFFERS[1]]
    ours = slaney_mel_filterbank(1025, 40, 16000, 128, 44100)
    torch.testing.assert_close(ours, stored, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- DCAE internals


def test_linear_and_quadratic_attention_agree() -> None:
    """Short maps use the quadratic form; it is the same normalised ReLU attention as the linear one."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 20, generator=gen) for _ in range(3))
    q, k = q.relu(), k.relu()
    torch.testing.assert_close(relu_linear_attention(q, k, v), relu_quadratic_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_dcae_shapes(dcae: DCAE) -> None:
    mel = torch.randn(2, 2, 128, 24)
    with torch.no_grad():
        z = dcae.encode(mel)
        assert z.shape == (2, 8, 16, 3)
        assert dcae.decode(z).shape == (2, 2, 128, 24)
    with pytest.raises(ValueError, match="multiples of 8"):
        dcae.encode(torch.randn(1, 2, 128, 20))


# ---------------------------------------------------------------- resampler


@pytest.mark.parametrize(("orig", "new"), [(44100, 48000), (48000, 44100), (22050, 44100), (44100, 16000), (8000, 44100)])
@pytest.mark.parametrize("length", [1, 147, 1000, 4410])
def test_resample_length(orig: int, new: int, length: int) -> None:
    out = audio.resample(torch.zeros(2, 3, length), orig, new)
    assert out.shape == (2, 3, math.ceil(length * new / orig))


@pytest.mark.parametrize(("freq", "orig", "new"), [(1000, 44100, 48000), (440, 48000, 44100), (3000, 22050, 44100)])
def test_resample_keeps_a_sine(freq: float, orig: int, new: int) -> None:
    x = torch.sin(2 * math.pi * freq * torch.arange(orig, dtype=torch.float64) / orig).float()
    y = audio.resample(x, orig, new)
    expected = torch.sin(2 * math.pi * freq * torch.arange(y.shape[-1], dtype=torch.float64) / new).float()
    edge = 200
    assert (y - expected)[edge:-edge].abs().max() < 2e-3


def test_resample_removes_content_above_the_new_nyquist() -> None:
    x = torch.sin(2 * math.pi * 12000 * torch.arange(44100, dtype=torch.float64) / 44100).float()
    assert audio.resample(x, 44100, 16000)[200:-200].abs().max() < 1e-2


def test_resample_identity_and_errors() -> None:
    x = torch.randn(2, 100)
    assert audio.resample(x, 44100, 44100) is x
    with pytest.raises(ValueError, match="orig_sr"):
        audio.resample(x, 0, 44100)
    with pytest.raises(ValueError, match="floating-point"):
        audio.resample(torch.zeros(2, 100, dtype=torch.int16), 44100, 48000)
    with pytest.raises(ValueError, match="common rate"):
        audio.resample(x, 44101, 44100)


# ---------------------------------------------------------------- input preparation and lengths


def test_prepare_audio_channels() -> None:
    gen = torch.Generator().manual_seed(1)
    mono = torch.randn(1, 500, generator=gen)
    out = audio.prepare_audio(mono, 44100)
    assert out.shape == (1, 2, 500)
    torch.testing.assert_close(out[0, 0], mono[0], atol=0, rtol=0)
    torch.testing.assert_close(out[0, 1], mono[0], atol=0, rtol=0)
    surround = torch.randn(3, 6, 500, generator=gen)
    folded = audio.prepare_audio(surround, 44100)
    extra = surround[:, 2:].mean(dim=1) / math.sqrt(2)
    torch.testing.assert_close(folded, surround[:, :2] + extra[:, None])
    assert audio.prepare_audio(torch.randn(2, 480), 48000).shape == (1, 2, 441)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 0),
        torch.zeros(0, 2, 10),
        torch.tensor([[0.0, float("nan")] * 10]),
        torch.tensor([[0.0, float("inf")] * 10]),
        torch.zeros(2, 10, dtype=torch.int16),
        torch.zeros(10),
    ],
    ids=["no-samples", "no-items", "nan", "inf", "integer", "1d"],
)
def test_bad_audio_is_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="audio"):
        audio.prepare_audio(bad, 44100)


def test_bad_sample_rate_and_seconds() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        audio.prepare_audio(torch.zeros(2, 10), -1)
    with pytest.raises(ValueError, match="seconds"):
        audio.seconds_to_latent_frames(-1.0)
    with pytest.raises(ValueError, match="frames"):
        audio.latent_frames_to_seconds(-2)


def test_latent_length_rules(dcae: DCAE, vocoder: Vocoder) -> None:
    assert audio.latent_frames_to_seconds(11) == pytest.approx(11 * 4096 / 44100)
    assert audio.SAMPLES_PER_LATENT == audio.HOP * audio.FRAMES_PER_LATENT
    for samples, rate in ((4096, 44100), (4097, 44100), (3000, 22050)):
        latents = audio.encode_audio(dcae, vocoder.mel_transform, torch.randn(2, samples) * 0.1, rate)
        assert latents.shape == (1, 8, 16, audio.latent_frames_for_samples(math.ceil(samples * 44100 / rate)))


# ---------------------------------------------------------------- windowed encode / decode


class FrameLocalDCAE(torch.nn.Module):
    """Stand-in DCAE whose outputs depend only on their own frames, so any windowing must reproduce a single pass."""

    def __init__(self) -> None:
        super().__init__()
        self.config = DCAEConfig()
        self.gain = torch.nn.Parameter(torch.tensor(1.5))

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(mel, 8).repeat(1, 4, 1, 1) * self.gain                     # [B, 8, 16, F/8]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent[:, :2] * self.gain).repeat_interleave(8, 2).repeat_interleave(8, 3)


class FrameLocalVocoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.01))

    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        return (mel[:, :1] * self.gain).repeat_interleave(audio.HOP, dim=-1)             # [B, 1, F·512]


@pytest.mark.parametrize(("frames", "window"), [(11, 8), (300, 16), (520, 512), (5, 512)])
@pytest.mark.parametrize("rate", [44100, 48000])
def test_overlapped_decode_tiles_exactly(frames: int, window: int, rate: int) -> None:
    latents = torch.randn(1 if frames > 100 else 2, 8, 16, frames, generator=torch.Generator().manual_seed(frames))
    dcae, vocoder = FrameLocalDCAE(), FrameLocalVocoder()
    calls: list[tuple[int, int]] = []
    full = audio.decode_latents(dcae, vocoder, latents, sample_rate=rate)
    windowed = audio.decode_latents(
        dcae, vocoder, latents, sample_rate=rate, overlapped=True, window_frames=window,
        callback=lambda done, total: calls.append((done, total)),
    )
    assert full.shape[-1] == math.ceil(frames * 4096 * rate / 44100)
    assert windowed.shape[-1] == frames * 4096 * rate // 44100
    edge = 0 if rate == 44100 else 16
    n = windowed.shape[-1] - edge
    torch.testing.assert_close(windowed[..., :n], full[..., :n], atol=1e-6, rtol=1e-6)
    total = calls[-1][1]
    assert [c[0] for c in calls] == list(range(1, total + 1)) and all(c[1] == total for c in calls)


@pytest.mark.parametrize("chunk", [4, 8, 12])
def test_chunked_encode_tiles_exactly(chunk: int) -> None:
    wav = torch.randn(2, 2, 40000, generator=torch.Generator().manual_seed(chunk)) * 0.2
    mel = LogMelSpectrogram(VocoderConfig())
    whole = audio.encode_audio(FrameLocalDCAE(), mel, wav, 44100)
    chunked = audio.encode_audio(FrameLocalDCAE(), mel, wav, 44100, chunk_frames=chunk)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_chunked_encode_with_one_window_is_the_single_pass(dcae: DCAE, vocoder: Vocoder) -> None:
    wav = Case(FIXTURES / "dcae_encode").inputs["audios"]
    whole = audio.encode_audio(dcae, vocoder.mel_transform, wav, 44100)
    steps: list[tuple[int, int]] = []
    one = audio.encode_audio(dcae, vocoder.mel_transform, wav, 44100, chunk_frames=16, callback=lambda *a: steps.append(a))
    torch.testing.assert_close(one, whole, atol=0, rtol=0)
    assert steps == [(1, 1)]
    several = audio.encode_audio(dcae, vocoder.mel_transform, wav, 44100, chunk_frames=4)
    assert several.shape == whole.shape and torch.isfinite(several).all()


def test_bad_latents_and_windows_are_rejected(dcae: DCAE, vocoder: Vocoder) -> None:
    with pytest.raises(ValueError, match="latents"):
        audio.decode_latents(dcae, vocoder, torch.zeros(1, 4, 16, 3))
    with pytest.raises(ValueError, match="latents"):
        audio.decode_latents(dcae, vocoder, torch.full((1, 8, 16, 3), float("nan")))
    with pytest.raises(ValueError, match="latents"):
        audio.decode_latents(dcae, vocoder, torch.zeros(1, 8, 16, 0))
    with pytest.raises(ValueError, match="window_frames"):
        audio.decode_latents(dcae, vocoder, torch.zeros(1, 8, 16, 3), overlapped=True, window_frames=6)
    with pytest.raises(ValueError, match="chunk_frames"):
        audio.encode_audio(dcae, vocoder.mel_transform, torch.zeros(2, 5000), 44100, chunk_frames=0)


def test_bfloat16_modules_encode_close_to_official(dcae: DCAE, vocoder: Vocoder) -> None:
    """Cast modules (the official bf16 setting) run end to end; results stay within bf16 accuracy of fp32."""
    case = Case(FIXTURES / "dcae_encode")
    half_dcae = DCAE(dcae.config).to(torch.bfloat16).eval()
    half_dcae.load_state_dict(dcae.state_dict())
    half_mel = LogMelSpectrogram(vocoder.config).to(torch.bfloat16)
    latents = audio.encode_audio(half_dcae, half_mel, case.inputs["audios"], case.args["sr"])
    assert latents.dtype == torch.bfloat16
    reference = case.outputs["latents"]
    assert (latents.float() - reference).abs().max() < 0.05 * reference.abs().max()
