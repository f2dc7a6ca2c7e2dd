"""The ACE-Step 1.5 audio VAE: a 48 kHz stereo Oobleck autoencoder (hop 1920, 64 latent channels, 25 latents/s).

Module and parameter names are diffusers' AutoencoderOobleck (the official `vae/diffusion_pytorch_model.safetensors`),
with legacy weight-norm parameters (`weight_g`, `weight_v`). `comfyui_key_map` gives ComfyUI's stable-audio-tools
names for the same tensors. Encode/decode are tiled the official way (acestep/handler.py tiled_encode /
tiled_decode): overlapping windows, each window's overlap discarded, cores concatenated, so memory is bounded by
the window, not the song. Tensors are channel-first: audio [B, 2, samples], latents [B, 64, frames].
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import load_strict

ProgressFn = Callable[[int, int], None]


@dataclass
class OobleckConfig:
    """AutoencoderOobleck config fields; defaults are the ACE-Step 1.5 VAE (vae/config.json)."""

    encoder_hidden_size: int = 128
    downsampling_ratios: list[int] = field(default_factory=lambda: [2, 4, 4, 6, 10])
    channel_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    decoder_channels: int = 128
    decoder_input_channels: int = 64
    audio_channels: int = 2
    sampling_rate: int = 48000

    def __post_init__(self) -> None:
        for name in ("encoder_hidden_size", "decoder_channels", "decoder_input_channels", "audio_channels",
                     "sampling_rate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"OobleckConfig.{name} must be a positive int, got {value!r}")
        for name in ("downsampling_ratios", "channel_multiples"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                raise ValueError(f"OobleckConfig.{name} must be a non-empty list of positive ints, got {value!r}")
        if len(self.downsampling_ratios) != len(self.channel_multiples):
            raise ValueError("OobleckConfig: downsampling_ratios and channel_multiples must have the same length")
        if self.encoder_hidden_size != 2 * self.decoder_input_channels:
            raise ValueError(f"OobleckConfig: encoder_hidden_size ({self.encoder_hidden_size}) must be twice "
                             f"decoder_input_channels ({self.decoder_input_channels}): the encoder emits mean and scale")
        self.downsampling_ratios = list(self.downsampling_ratios)
        self.channel_multiples = list(self.channel_multiples)

    @property
    def hop_length(self) -> int:
        return math.prod(self.downsampling_ratios)

    @classmethod
    def from_dict(cls, data: Mapping) -> OobleckConfig:
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"VAE config is malformed: {exc}") from exc

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_weights(cls, shapes: Mapping[str, Sequence[int]]) -> OobleckConfig:
        """Sizes and strides from diffusers-named VAE shapes (a ComfyUI file carries no config.json)."""
        try:
            width = int(shapes["encoder.conv1.bias"][0])
            audio = int(shapes["encoder.conv1.weight_v"][1])
            blocks = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")})
            strides = [int(shapes[f"encoder.block.{i}.conv1.weight_v"][2]) // 2 for i in blocks]
            mults = [int(shapes[f"encoder.block.{i}.conv1.bias"][0]) // width for i in blocks]
            dec_width = int(shapes["decoder.conv2.weight_v"][1])
            latent = int(shapes["decoder.conv1.weight_v"][1])
        except (KeyError, IndexError) as exc:
            raise ValueError(f"VAE weights lack {exc.args[0]!r}: not an Oobleck VAE") from exc
        # ComfyUI's rule: the stride-6 (kernel 12) layout is the 48 kHz ACE-Step 1.5 VAE, else Stable Audio.
        rate = 48000 if math.prod(strides) == 1920 else 44100
        return cls(encoder_hidden_size=width, downsampling_ratios=strides, channel_multiples=mults,
                   decoder_channels=dec_width, decoder_input_channels=latent, audio_channels=audio,
                   sampling_rate=rate)


class Snake(nn.Module):
    """x + sin²(e^α x) / (e^β + 1e-9), per channel (log-scale parameters)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = torch.exp(self.alpha), torch.exp(self.beta)
        return x + (beta + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class _WeightNormed(nn.Module):
    """A conv whose weight is g · v / ‖v‖ (norm over every axis but the first), stored as weight_g / weight_v."""

    transposed = False

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                 bias: bool = True):
        super().__init__()
        shape = (c_in, c_out, kernel) if self.transposed else (c_out, c_in, kernel)
        # Registration order = the diffusers state-dict order (bias, then the weight-norm pair).
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.weight_g = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.randn(shape) * 0.02)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class WNConv1d(_WeightNormed):
    pass


class WNConvTranspose1d(_WeightNormed):
    transposed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding, 0, 1, self.dilation)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.snake1 = Snake(channels)
        self.conv1 = WNConv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake(channels)
        self.conv2 = WNConv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.snake2(self.conv1(self.snake1(x))))
        trim = (x.shape[-1] - out.shape[-1]) // 2
        if trim > 0:
            x = x[..., trim:-trim]
        return x + out


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.res_unit1 = ResidualUnit(c_in, 1)
        self.res_unit2 = ResidualUnit(c_in, 3)
        self.res_unit3 = ResidualUnit(c_in, 9)
        self.snake1 = Snake(c_in)
        self.conv1 = WNConv1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.snake1(self.res_unit3(self.res_unit2(self.res_unit1(x)))))


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.snake1 = Snake(c_in)
        self.conv_t1 = WNConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))
        self.res_unit1 = ResidualUnit(c_out, 1)
        self.res_unit2 = ResidualUnit(c_out, 3)
        self.res_unit3 = ResidualUnit(c_out, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_unit3(self.res_unit2(self.res_unit1(self.conv_t1(self.snake1(x)))))


class OobleckEncoder(nn.Module):
    def __init__(self, c: OobleckConfig):
        super().__init__()
        mult = [1] + c.channel_multiples
        width = c.encoder_hidden_size
        self.conv1 = WNConv1d(c.audio_channels, width, 7, padding=3)
        self.block = nn.ModuleList(EncoderBlock(width * mult[i], width * mult[i + 1], s)
                                   for i, s in enumerate(c.downsampling_ratios))
        self.snake1 = Snake(width * mult[-1])
        self.conv2 = WNConv1d(width * mult[-1], c.encoder_hidden_size, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class OobleckDecoder(nn.Module):
    def __init__(self, c: OobleckConfig):
        super().__init__()
        mult = [1] + c.channel_multiples
        width = c.decoder_channels
        n = len(c.downsampling_ratios)
        self.conv1 = WNConv1d(c.decoder_input_channels, width * mult[-1], 7, padding=3)
        self.block = nn.ModuleList(DecoderBlock(width * mult[n - i], width * mult[n - i - 1], s)
                                   for i, s in enumerate(c.downsampling_ratios[::-1]))
        self.snake1 = Snake(width)
        self.conv2 = WNConv1d(width, c.audio_channels, 7, padding=3, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.conv1(z)
        for block in self.block:
            z = block(z)
        return self.conv2(self.snake1(z))


def _windows(total: int, chunk: int, overlap: int):
    """(window start, window end, trim start, trim end) per tile: the official overlap-discard tiling."""
    if chunk <= 2 * overlap:
        raise ValueError(f"VAE tile size {chunk} must exceed twice the overlap {overlap}")
    stride = chunk - 2 * overlap
    for i in range(math.ceil(total / stride)):
        core_start = i * stride
        core_end = min(core_start + stride, total)
        win_start = max(0, core_start - overlap)
        win_end = min(total, core_end + overlap)
        yield win_start, win_end, core_start - win_start, win_end - core_end


class AudioVAE(nn.Module):
    """Oobleck VAE with tiled, bounded-memory encode and decode."""

    def __init__(self, config: OobleckConfig | None = None):
        super().__init__()
        self.config = config or OobleckConfig()
        self.encoder = OobleckEncoder(self.config)
        self.decoder = OobleckDecoder(self.config)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    # ------------------------------------------------------------------ checks
    def _param(self) -> torch.Tensor:
        return self.decoder.conv1.weight_v

    def _check_audio(self, audio: torch.Tensor) -> torch.Tensor:
        if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
            raise ValueError("VAE encode: audio must be a float tensor [B, channels, samples]")
        if audio.ndim == 2:
            audio = audio.unsqueeze(0)
        ch = self.config.audio_channels
        if audio.ndim != 3 or audio.shape[1] != ch or audio.shape[-1] < 1:
            raise ValueError(f"VAE encode: audio must be [B, {ch}, samples] at {self.sampling_rate} Hz "
                             f"(convert mono to {ch} channels first), got {tuple(audio.shape)}")
        if not torch.isfinite(audio).all():
            raise ValueError("VAE encode: audio contains NaN or infinite samples")
        return audio

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.config.decoder_input_channels
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.ndim != 3 \
                or latents.shape[1] != c or latents.shape[-1] < 1:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"VAE decode: latents must be a float tensor [B, {c}, frames] (channel-first; "
                             f"transpose [B, frames, {c}] DiT latents), got {shape}")
        if not torch.isfinite(latents).all():
            raise ValueError("VAE decode: latents contain NaN or infinite values")
        return latents

    # ------------------------------------------------------------------ encode
    def encode_moments(self, audio: torch.Tensor, chunk: int | None = None, overlap: int | None = None,
                       progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the latent posterior [B, 64, frames], tiled over `chunk` samples (default 30 s) with
        `overlap` samples (default 2 s) discarded on each inner side (official tiled_encode)."""
        audio = self._check_audio(audio)
        sr = self.sampling_rate
        chunk = 30 * sr if chunk is None else int(chunk)
        overlap = 2 * sr if overlap is None else int(overlap)
        param = self._param()
        total = audio.shape[-1]
        tiles = [(0, total, 0, 0)] if total <= chunk else list(_windows(total, chunk, overlap))
        means, stds = [], []
        for i, (start, end, trim_start, trim_end) in enumerate(tiles):
            piece = audio[:, :, start:end].to(device=param.device, dtype=param.dtype)
            h = self.encoder(piece)
            factor = piece.shape[-1] / h.shape[-1]
            lo = int(round(trim_start / factor))
            hi = h.shape[-1] - int(round(trim_end / factor))
            h = h[:, :, lo:hi]
            mean, scale = h.chunk(2, dim=1)
            means.append(mean.to(audio.device))
            stds.append((F.softplus(scale) + 1e-4).to(audio.device))
            if progress is not None:
                progress(i + 1, len(tiles))
        return torch.cat(means, dim=-1), torch.cat(stds, dim=-1)

    def encode(self, audio: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
               chunk: int | None = None, overlap: int | None = None,
               progress: ProgressFn | None = None) -> torch.Tensor:
        """Audio [B, 2, samples] at 48 kHz -> latents [B, 64, frames].

        `sample=True` draws mean + std·ε as the official handler does (latent_dist.sample()), with ε from
        `generator` over the whole length (so tiling does not change the draw); `sample=False` gives the mean.
        """
        mean, std = self.encode_moments(audio, chunk, overlap, progress)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=generator.device if generator is not None else mean.device).to(mean.device)
        return mean + std * noise

    # ------------------------------------------------------------------ decode
    def decode(self, latents: torch.Tensor, chunk: int = 512, overlap: int = 64,
               output_device: torch.device | str | None = None,
               progress: ProgressFn | None = None) -> torch.Tensor:
        """Latents [B, 64, frames] -> audio [B, 2, frames·1920], tiled over `chunk` latent frames with `overlap`
        frames discarded on each inner side (official tiled_decode defaults 512 / 64). Each decoded tile moves
        to `output_device` (default: the latents' device) before the next one runs."""
        latents = self._check_latents(latents)
        if int(chunk) <= 0 or int(overlap) < 0:
            raise ValueError(f"VAE decode: chunk must be > 0 and overlap >= 0, got {chunk}, {overlap}")
        param = self._param()
        out_device = torch.device(output_device) if output_device is not None else latents.device
        total = latents.shape[-1]
        tiles = [(0, total, 0, 0)] if total <= chunk else list(_windows(total, int(chunk), int(overlap)))
        pieces = []
        for i, (start, end, trim_start, trim_end) in enumerate(tiles):
            z = latents[:, :, start:end].to(device=param.device, dtype=param.dtype)
            audio = self.decoder(z)
            factor = audio.shape[-1] / z.shape[-1]
            lo = int(round(trim_start * factor))
            hi = audio.shape[-1] - int(round(trim_end * factor))
            pieces.append(audio[:, :, lo:hi].to(out_device))
            if progress is not None:
                progress(i + 1, len(tiles))
        return torch.cat(pieces, dim=-1)


# ---------------------------------------------------------------------------------------------- key names
def comfyui_key_map(config: OobleckConfig | None = None) -> dict[str, str]:
    """diffusers name -> ComfyUI (stable-audio-tools AudioOobleckVAE) name, for every VAE tensor.

    ComfyUI numbers the modules of nn.Sequential stacks: `encoder.layers.0` = conv1, `.layers.1..N` = blocks,
    then snake1 and conv2; inside an encoder block the three residual units, snake and conv are layers.0-4;
    inside a decoder block snake, transposed conv and residual units are layers.0-4; inside a residual unit
    snake1, conv1, snake2, conv2 are layers.0-3. Snake alpha/beta are [C] there (diffusers [1, C, 1]).
    """
    c = config or OobleckConfig()
    n = len(c.downsampling_ratios)
    unit = {"snake1": "0", "conv1": "1", "snake2": "2", "conv2": "3"}
    enc_block = {"res_unit1": "0", "res_unit2": "1", "res_unit3": "2", "snake1": "3", "conv1": "4"}
    dec_block = {"snake1": "0", "conv_t1": "1", "res_unit1": "2", "res_unit2": "3", "res_unit3": "4"}
    out: dict[str, str] = {}
    for name in _vae_names(c):
        parts = name.split(".")
        side = parts[0]
        if parts[1] == "block":
            idx, sub = int(parts[2]), parts[3]
            table = enc_block if side == "encoder" else dec_block
            mapped = [side, "layers", str(idx + 1), "layers", table[sub]]
            rest = parts[4:]
            if sub.startswith("res_unit"):
                mapped += ["layers", unit[rest[0]]]
                rest = rest[1:]
        else:
            top = {"conv1": "0", "snake1": str(n + 1), "conv2": str(n + 2)}[parts[1]]
            mapped, rest = [side, "layers", top], parts[2:]
        out[name] = ".".join(mapped + rest)
    return out


def _vae_names(c: OobleckConfig) -> list[str]:
    with torch.device("meta"):
        return list(AudioVAE(c).state_dict())


def from_comfyui_state_dict(sd: Mapping[str, torch.Tensor], config: OobleckConfig | None = None
                            ) -> dict[str, torch.Tensor]:
    """ComfyUI-named VAE tensors -> diffusers names and shapes (weight-norm parametrisation names accepted)."""
    inverse = {v: k for k, v in comfyui_key_map(config).items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        name = key.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v")
        if name not in inverse:
            raise ValueError(f"VAE tensor {key!r} is not an ACE-Step 1.5 (Oobleck) VAE name")
        target = inverse[name]
        if target.endswith((".alpha", ".beta")) and tensor.ndim == 1:
            tensor = tensor.reshape(1, -1, 1)
        out[target] = tensor
    return out


def to_comfyui_state_dict(sd: Mapping[str, torch.Tensor], config: OobleckConfig | None = None
                          ) -> dict[str, torch.Tensor]:
    """diffusers-named VAE tensors -> ComfyUI names (Snake parameters flattened to [C])."""
    table = comfyui_key_map(config)
    out = {}
    for key, tensor in sd.items():
        if key not in table:
            raise ValueError(f"VAE tensor {key!r} is not a diffusers AutoencoderOobleck name")
        out[table[key]] = tensor.reshape(-1) if key.endswith((".alpha", ".beta")) else tensor
    return out


def _comfy_config(sd: Mapping[str, torch.Tensor]) -> OobleckConfig:
    """The config a ComfyUI-named VAE needs for its name map: only the number of blocks matters there."""
    blocks = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")}) - 3
    if blocks < 1:
        raise ValueError("VAE tensors do not look like an Oobleck VAE (too few encoder layers)")
    return OobleckConfig(downsampling_ratios=[2] * blocks, channel_multiples=[1] * blocks)


def fold_plain_weights(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a VAE whose weight norm was folded (plain `.weight`): g = ‖w‖ per output row, v = w."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".weight") and k[: -len(".weight")] + ".weight_v" not in sd]:
        w = out.pop(key)
        base = key[: -len(".weight")]
        out[base + ".weight_v"] = w
        out[base + ".weight_g"] = torch.linalg.vector_norm(w.float(), dim=tuple(range(1, w.ndim)),
                                                           keepdim=True).to(w.dtype)
    return out


def vae_from_state_dict(sd: Mapping[str, torch.Tensor], config: OobleckConfig | Mapping | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> AudioVAE:
    """Build on meta and load diffusers- or ComfyUI-named weights (strict, assign)."""
    if config is not None and not isinstance(config, OobleckConfig):
        config = OobleckConfig.from_dict(config)
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):
        sd = from_comfyui_state_dict(sd, config or _comfy_config(sd))
    sd = fold_plain_weights(sd)
    if config is None:
        config = OobleckConfig.from_weights({k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        vae = AudioVAE(config)
    load_strict(vae, sd, "VAE", "the 1.5 Oobleck VAE", dtype=dtype, device=device)
    return vae.eval().requires_grad_(False)
