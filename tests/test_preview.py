"""The preview image: layout, value range, spectrogram and envelope content, latent strip, region highlight, PNG."""
from __future__ import annotations

import importlib
import math
import struct
import tempfile
import zlib

import pytest
import torch

from pack_loader import load_pack

pack = load_pack()
core = importlib.import_module(f"{pack.__name__}.acestep_core.preview")
node_module = importlib.import_module(f"{pack.__name__}.nodes.preview")
latents = importlib.import_module(f"{pack.__name__}.nodes.latents")
LATENT_RATE = importlib.import_module(f"{pack.__name__}.acestep_core.audio").LATENT_RATE

CONFIG = core.PreviewConfig(width=256, spectrogram_height=64, envelope_height=32)
NODE = node_module.AceStepPreviewImage()


@pytest.fixture(autouse=True)
def temp_dir(monkeypatch, tmp_path):
    """The node's PNG files go to a fresh temp folder (outside ComfyUI: the system temp)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def tone(freq: float, seconds: float, rate: int, channels: int = 1, amplitude: float = 0.5) -> torch.Tensor:
    """A sine [channels, N]."""
    t = torch.arange(int(seconds * rate)) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).expand(channels, -1).clone()


def audio_height(config: core.PreviewConfig) -> int:
    return config.spectrogram_height + config.gap + config.envelope_height


def latent_height(config: core.PreviewConfig) -> int:
    return 8 * 16 * config.latent_row_pixels


def footer(config: core.PreviewConfig) -> int:
    return config.gap + config.axis_height


def colour(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# layout and range


@pytest.mark.parametrize("channels, rate", [(1, 44100), (2, 44100), (2, 48000), (1, 22050), (6, 48000)])
def test_node_returns_one_image_per_item_in_range(channels, rate, temp_dir):
    audio = {"waveform": tone(440, 1.5, rate, channels)[None], "sample_rate": rate}
    out = NODE.preview(width=512, height=128, start_seconds=0.0, end_seconds=0.0, audio=audio)
    (image,) = out["result"]
    config = core.PreviewConfig(width=512, spectrogram_height=128)
    assert image.shape == (1, audio_height(config) + footer(config), 512, 3)
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    (entry,) = out["ui"]["images"]
    assert entry["type"] == "temp" and (temp_dir / "acestep_pack" / entry["filename"]).is_file()


def test_batch_gives_one_image_per_item_and_latent_adds_its_strip():
    audio = {"waveform": torch.stack([tone(300, 1.0, 44100), tone(3000, 1.0, 44100)]), "sample_rate": 44100}
    latent = {"samples": torch.randn(2, 8, 16, 11), "type": "audio"}
    (image,) = NODE.preview(256, 64, 0.0, 0.0, audio=audio, latent=latent)["result"]
    config = core.PreviewConfig(width=256, spectrogram_height=64)
    assert image.shape == (2, audio_height(config) + config.gap + latent_height(config) + footer(config), 256, 3)
    assert not torch.equal(image[0], image[1])


def test_latent_only_needs_no_model():
    latent = latents.AceStepEmptyLatent().make(seconds=3.0, batch_size=1)[0]
    latent = {**latent, "samples": torch.randn_like(latent["samples"])}
    (image,) = NODE.preview(256, 64, 0.0, 0.0, latent=latent)["result"]
    config = core.PreviewConfig(width=256)
    assert image.shape == (1, latent_height(config) + footer(config), 256, 3)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="connect audio, latent or both"):
        NODE.preview(256, 64, 0.0, 0.0)
    audio = {"waveform": tone(440, 1.0, 44100)[None], "sample_rate": 44100}
    with pytest.raises(ValueError, match="end_seconds .* must be after start_seconds"):
        NODE.preview(256, 64, 0.5, 0.2, audio=audio)
    with pytest.raises(ValueError, match="NaN"):
        NODE.preview(256, 64, 0.0, 0.0, audio={"waveform": torch.full((1, 1, 100), math.nan), "sample_rate": 8000})
    with pytest.raises(ValueError, match=r"\[batch, 8, 16, frames\]"):
        NODE.preview(256, 64, 0.0, 0.0, latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="width"):
        core.PreviewConfig(width=10)


# ---------------------------------------------------------------------------------------------------------------
# content


def test_spectrogram_puts_low_tones_low_and_high_tones_high():
    rows = CONFIG.spectrogram_height
    low = core.render(tone(150, 1.0, 44100), 44100, config=CONFIG)[:rows].mean(dim=(1, 2))   # brightness per row
    high = core.render(tone(6000, 1.0, 44100), 44100, config=CONFIG)[:rows].mean(dim=(1, 2))
    assert int(low.argmax()) > int(high.argmax())
    assert int(low.argmax()) >= rows // 2 > int(high.argmax())


def test_silence_is_dark_not_bright():
    image = core.render(torch.zeros(1, 44100), 44100, config=CONFIG)
    bottom = core.colormap(torch.zeros(()), core.SPECTRUM_STOPS)
    assert torch.allclose(image[:CONFIG.spectrogram_height], bottom.expand(CONFIG.spectrogram_height, 256, 3))


def test_envelope_spans_the_peak_amplitude():
    amplitude = 0.5
    image = core.render(tone(200, 1.0, 44100, amplitude=amplitude), 44100, config=CONFIG)
    top = CONFIG.spectrogram_height + CONFIG.gap
    strip = image[top:top + CONFIG.envelope_height, CONFIG.width // 2]                   # one column [H, 3]
    drawn = ~(strip == colour(core.BACKGROUND)).all(dim=1)
    span = int(drawn.sum())
    expected = amplitude * (CONFIG.envelope_height - 1)
    assert expected <= span <= expected + 3
    assert drawn[CONFIG.envelope_height // 2]                                             # centred on zero


def test_loudness_shows_where_the_sound_is():
    rate = 44100
    audio = torch.cat([torch.zeros(1, rate), tone(500, 1.0, rate)], dim=1)              # silence, then a tone
    image = core.render(audio, rate, config=CONFIG)
    spectrogram = image[:CONFIG.spectrogram_height]
    first, second = spectrogram[:, : CONFIG.width // 2 - 2], spectrogram[:, CONFIG.width // 2 + 2:]
    assert second.mean() > first.mean() + 0.05


def test_shorter_panel_leaves_background_after_its_end():
    latent = torch.randn(8, 16, int(2 * LATENT_RATE))                                   # 2 s of latent
    image = core.render(tone(440, 1.0, 44100), 44100, latent, config=CONFIG)             # 1 s of audio
    right = image[:CONFIG.spectrogram_height, 3 * CONFIG.width // 4]
    assert torch.equal(right, colour(core.BACKGROUND).expand_as(right))
    lat_top = audio_height(CONFIG) + CONFIG.gap
    assert not torch.equal(image[lat_top:lat_top + 8, 3 * CONFIG.width // 4], colour(core.BACKGROUND).expand(8, 3))


def test_latent_channels_are_scaled_separately():
    samples = torch.randn(8, 16, 40) * torch.logspace(-3, 2, 8)[:, None, None]
    image = core.latent_panel(samples, 40 / LATENT_RATE, CONFIG)
    per_channel = image.reshape(8, -1, CONFIG.width, 3).std(dim=(1, 2, 3))
    assert per_channel.min() > 0.5 * per_channel.max()                                  # tiny channels still visible


def test_time_axis_has_a_tick_at_every_labelled_second():
    duration = 4.0
    axis = core.axis_panel(duration, CONFIG)
    step = core.tick_step(duration, CONFIG.width, len(core.label_text(duration, 0.1)) * 4 * CONFIG.font_scale)
    ticks = (axis[0] == colour(core.AXIS_TEXT)).all(dim=1).nonzero().flatten().tolist()
    expected = [min(core.column_of(k * step, duration, CONFIG.width), CONFIG.width - 1)
                for k in range(int(duration / step) + 1)]
    assert ticks == expected


# ---------------------------------------------------------------------------------------------------------------
# region highlight


def region_columns(image: torch.Tensor, plain: torch.Tensor) -> list[int]:
    """Columns where two renders differ above the axis."""
    body = image.shape[0] - footer(CONFIG)
    return (image[:body] != plain[:body]).any(dim=2).any(dim=0).nonzero().flatten().tolist()


def test_region_tints_exactly_its_columns_and_draws_its_edges():
    audio = tone(440, 2.0, 48000, channels=2)
    plain = core.render(audio, 48000, config=CONFIG)
    marked = core.render(audio, 48000, regions=[(0.5, 1.25)], config=CONFIG)
    left, right = core.column_of(0.5, 2.0, CONFIG.width), core.column_of(1.25, 2.0, CONFIG.width)
    assert region_columns(marked, plain) == list(range(left, right))
    body = marked.shape[0] - footer(CONFIG)
    edge = colour(core.HIGHLIGHT).expand(body, 3)
    assert torch.equal(marked[:body, left], edge) and torch.equal(marked[:body, right - 1], edge)
    assert torch.equal(marked[body:], plain[body:])                                     # axis untouched


def test_repaint_mark_is_highlighted_like_the_same_seconds():
    audio = {"waveform": tone(440, 2.0, 44100)[None], "sample_rate": 44100}
    source = {"samples": torch.randn(1, 8, 16, 22), "type": "audio"}
    marked = latents.AceStepRepaintRegion().mark(source, start_seconds=0.5, end_seconds=1.5, variance=0.5)[0]
    (from_mark,) = NODE.preview(256, 64, 0.0, 0.0, audio=audio, latent=marked)["result"]
    start, end = marked["acestep"]["start_frame"] / LATENT_RATE, marked["acestep"]["end_frame"] / LATENT_RATE
    (explicit,) = NODE.preview(256, 64, start, end, audio=audio, latent=source)["result"]
    (plain,) = NODE.preview(256, 64, 0.0, 0.0, audio=audio, latent=source)["result"]
    assert torch.equal(from_mark, explicit)
    assert not torch.equal(from_mark, plain)


def test_noise_mask_runs_become_regions():
    mask = torch.zeros(1, 1, 22)
    mask[..., 3:7] = 1
    mask[..., 15:20] = 1
    regions = core.mask_regions(mask[0], 22)
    assert regions == [(3 / LATENT_RATE, 7 / LATENT_RATE), (15 / LATENT_RATE, 20 / LATENT_RATE)]
    latent = {"samples": torch.randn(1, 8, 16, 22), "noise_mask": mask}
    assert node_module.latent_regions(latent, 0) == regions


def test_explicit_region_wins_over_the_mark():
    source = {"samples": torch.randn(1, 8, 16, 22), "type": "audio"}
    marked = latents.AceStepRepaintRegion().mark(source, start_seconds=0.5, end_seconds=1.5, variance=0.5)[0]
    (image,) = NODE.preview(256, 64, 0.2, 0.4, latent=marked)["result"]
    (expected,) = NODE.preview(256, 64, 0.2, 0.4, latent=source)["result"]
    assert torch.equal(image, expected)


def test_extend_mark_highlights_nothing():
    source = {"samples": torch.randn(1, 8, 16, 22), "type": "audio"}
    marked = latents.AceStepExtend().mark(source, left_seconds=0.0, right_seconds=1.0, variance=1.0)[0]
    assert node_module.latent_regions(marked, 0) == []


# ---------------------------------------------------------------------------------------------------------------
# PNG


def decode_png(data: bytes) -> torch.Tensor:
    """Pixels [H, W, 3] uint8 of an 8-bit RGB PNG with filter 0 on every row (what png_bytes writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        offset += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour_type) == (8, 2) and b"IEND" in chunks
    raw = torch.frombuffer(bytearray(zlib.decompress(chunks[b"IDAT"])), dtype=torch.uint8)
    rows = raw.reshape(height, 1 + width * 3)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_png_holds_the_image_pixels(temp_dir):
    audio = {"waveform": tone(440, 1.0, 44100)[None], "sample_rate": 44100}
    out = NODE.preview(256, 64, 0.2, 0.6, audio=audio)
    (image,), (entry,) = out["result"], out["ui"]["images"]
    pixels = decode_png((temp_dir / "acestep_pack" / entry["filename"]).read_bytes())
    assert torch.equal(pixels, (image[0] * 255).round().to(torch.uint8))
