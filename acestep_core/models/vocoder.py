"""Music vocoder (`ADaMoSHiFiGANV1`: ConvNeXt-1D backbone + HiFi-GAN head) and its log-mel front end, design §6.1, §6.3."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dcae import normalise_config_value, check_state_shapes

MEL_BUFFERS = ("mel_transform.spectrogram.window", "mel_transform.mel_scale.fb")
"""Vocoder state-dict entries computed from the config; a file may omit them (design §6.3)."""

_COMFY_WEIGHT_NORM = re.compile(r"^(.*)\.parametrizations\.weight\.original([01])$")

V = TypeVar("V")


def vocoder_key_map(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename weight-norm keys `….parametrizations.weight.original0/1` to `….weight_g/_v` (design §6.3)."""
    renamed: dict[str, V] = {}
    for key, value in state_dict.items():
        if m := _COMFY_WEIGHT_NORM.match(key):
            key = f"{m.group(1)}.weight_{'g' if m.group(2) == '0' else 'v'}"
        renamed[key] = value
    return renamed


def _hz_to_slaney_mel(freq: float) -> float:
    """Slaney mel scale (linear below 1 kHz, logarithmic above), scalar (design §6.1)."""
    f_sp = 200.0 / 3
    if freq < 1000.0:
        return freq / f_sp
    return 1000.0 / f_sp + math.log(freq / 1000.0) / (math.log(6.4) / 27.0)


def _slaney_mel_to_hz(mels: Tensor) -> Tensor:
    """Inverse of the slaney mel scale, element-wise (design §6.1)."""
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    freqs = f_sp * mels
    log_part = 1000.0 * torch.exp(logstep * (mels - min_log_mel))
    return torch.where(mels >= min_log_mel, log_part, freqs)


def slaney_mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> Tensor:
    """Triangular mel filters [n_freqs, n_mels] on the slaney scale with slaney (area) normalisation, fp32 (design §6.1)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(_hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max), n_mels + 2)
    f_pts = _slaney_mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]                                       # [n_mels + 1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)                 # [n_freqs, n_mels + 2]
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.min(down, up), min=0.0)
    return fb * (2.0 / (f_pts[2:n_mels + 2] - f_pts[:n_mels])).unsqueeze(0)


@dataclass(frozen=True)
class VocoderConfig:
    """Hyper-parameters of `ADaMoSHiFiGANV1`; defaults are the released `music_vocoder` (design §6.3)."""

    input_channels: int = 128
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (128, 256, 384, 512)
    kernel_sizes: tuple[int, ...] = (7,)
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11, 13)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5), (1, 3, 5))
    num_mels: int = 512
    upsample_initial_channel: int = 1024
    pre_conv_kernel_size: int = 13
    post_conv_kernel_size: int = 13
    sampling_rate: int = 44100
    n_fft: int = 2048
    win_length: int = 2048
    hop_length: int = 512
    f_min: float = 40.0
    f_max: float = 16000.0
    n_mels: int = 128

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("f_min", "f_max"):
                if not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"VocoderConfig.{f.name} must be a non-negative number, got {value!r}")
            elif f.name == "resblock_dilation_sizes":
                if not all(isinstance(d, int) and d > 0 for ds in value for d in ds):
                    raise ValueError(f"VocoderConfig.resblock_dilation_sizes must hold positive ints, got {value!r}")
            elif isinstance(value, tuple):
                if not value or not all(isinstance(v, int) and v > 0 for v in value):
                    raise ValueError(f"VocoderConfig.{f.name} must be a non-empty tuple of positive ints, got {value!r}")
            elif not isinstance(value, int) or value <= 0:
                raise ValueError(f"VocoderConfig.{f.name} must be a positive int, got {value!r}")
        if len(self.depths) != len(self.dims):
            raise ValueError(f"VocoderConfig depths {self.depths} and dims {self.dims} must have the same length")
        if len(self.kernel_sizes) != 1:
            raise ValueError(f"VocoderConfig.kernel_sizes must hold one kernel got {self.kernel_sizes}")
        if self.dims[-1] != self.num_mels:
            raise ValueError(f"VocoderConfig.num_mels {self.num_mels} must equal dims[-1] {self.dims[-1]}")
        if self.input_channels != self.n_mels:
            raise ValueError(f"VocoderConfig.input_channels {self.input_channels} must equal n_mels {self.n_mels}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError(
                f"VocoderConfig upsample_rates {self.upsample_rates} and upsample_kernel_sizes "
                f"{self.upsample_kernel_sizes} must have the same length"
            )
        if any(k < u or (k - u) % 2 for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes)):
            raise ValueError(
                f"VocoderConfig: every upsample kernel must be >= its rate with an even difference, got rates "
                f"{self.upsample_rates} and kernels {self.upsample_kernel_sizes}"
            )
        if math.prod(self.upsample_rates) != self.hop_length:
            raise ValueError(
                f"VocoderConfig: the product of upsample_rates {self.upsample_rates} must equal hop_length "
                f"{self.hop_length}"
            )
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise ValueError(
                f"VocoderConfig.upsample_initial_channel {self.upsample_initial_channel} must be divisible by "
                f"2^{len(self.upsample_rates)}"
            )
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("VocoderConfig resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
        if any(k % 2 == 0 for k in (*self.resblock_kernel_sizes, self.pre_conv_kernel_size, self.post_conv_kernel_size)):
            raise ValueError("VocoderConfig resblock/pre/post conv kernel sizes must be odd ('same' padding)")
        if self.win_length > self.n_fft or self.hop_length > self.win_length:
            raise ValueError(
                f"VocoderConfig needs hop_length <= win_length <= n_fft, got {self.hop_length}/{self.win_length}/"
                f"{self.n_fft}"
            )
        if not self.f_min < self.f_max <= self.sampling_rate / 2:
            raise ValueError(
                f"VocoderConfig needs f_min < f_max <= sampling_rate/2, got {self.f_min}/{self.f_max}/{self.sampling_rate}"
            )

    @classmethod
    def from_checkpoint(cls, config: Mapping | None, shapes: Mapping[str, Sequence[int]]) -> VocoderConfig:
        """Build from an optional config.json dict plus un-prefixed tensor shapes (either weight-norm naming), design §6.3.

        Sizes come from the weights and the config must agree with them. Without a config the upsample rates are
        taken as half the kernel sizes (true of the released vocoder) and the dilations and mel settings are the
        defaults. `drop_path_rate` (training only) is ignored; `use_template` must be false.
        """
        config = dict(config or {})
        shapes = vocoder_key_map(shapes)
        if config.get("use_template", False):
            raise ValueError("vocoder config.json use_template=true is not supported (the released vocoder uses false)")

        def shape(key: str) -> list[int]:
            if key not in shapes:
                raise ValueError(
                    f"vocoder weight {key!r} not found; pass the music_vocoder state dict with any prefix "
                    "(e.g. 'vae.vocoder.') removed"
                )
            return [int(n) for n in shapes[key]]

        def count(pattern: str) -> int:
            regex = re.compile(pattern)
            return len({m.group(1) for key in shapes if (m := regex.match(key))})

        n_stages = count(r"^backbone\.stages\.(\d+)\.")
        n_ups = count(r"^head\.ups\.(\d+)\.")
        if not n_stages or not n_ups:
            raise ValueError("no 'backbone.stages.N.*' / 'head.ups.N.*' weights found; is this the ACE-Step vocoder?")
        n_kernels = count(r"^head\.resblocks\.(\d+)\.") // n_ups
        stem = shape("backbone.channel_layers.0.0.weight")
        pre = shape("head.conv_pre.weight_v")
        ups = [shape(f"head.ups.{i}.weight_v")[2] for i in range(n_ups)]
        derived: dict[str, Any] = dict(
            input_channels=stem[1],
            depths=tuple(count(rf"^backbone\.stages\.{s}\.(\d+)\.") for s in range(n_stages)),
            dims=(stem[0], *(shape(f"backbone.channel_layers.{s}.1.weight")[0] for s in range(1, n_stages))),
            kernel_sizes=(shape("backbone.stages.0.0.dwconv.weight")[2],),
            upsample_kernel_sizes=tuple(ups),
            resblock_kernel_sizes=tuple(shape(f"head.resblocks.{j}.convs1.0.weight_v")[2] for j in range(n_kernels)),
            num_mels=pre[1],
            upsample_initial_channel=pre[0],
            pre_conv_kernel_size=pre[2],
            post_conv_kernel_size=shape("head.conv_post.weight_v")[2],
            n_mels=stem[1],
        )
        if MEL_BUFFERS[1] in shapes:
            derived["n_fft"] = 2 * (shape(MEL_BUFFERS[1])[0] - 1)
        if MEL_BUFFERS[0] in shapes:
            derived["win_length"] = shape(MEL_BUFFERS[0])[0]
        for key, value in derived.items():
            if key in config and normalise_config_value(config[key]) != value:
                raise ValueError(f"vocoder config.json says {key}={config[key]!r} but the weights give {value!r}")
        values = {f.name: normalise_config_value(config[f.name]) for f in fields(cls) if f.name in config}
        values.update(derived)
        values.setdefault("upsample_rates", tuple(k // 2 for k in ups))
        result = cls(**values)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in Vocoder(result).state_dict().items()}
        check_state_shapes(expected, shapes, "vocoder", optional=MEL_BUFFERS)
        return result


class LinearSpectrogram(nn.Module):
    """Reflect pad, STFT (center=False, periodic Hann) in fp32, magnitude `sqrt(re²+im²+1e-6)` (design §6.1)."""

    def __init__(self, n_fft: int, win_length: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.register_buffer("window", self._default_window())

    def _default_window(self) -> Tensor:
        return torch.hann_window(self.win_length, device="cpu")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "window" not in state_dict:
            state_dict[prefix + "window"] = self._default_window()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, wav: Tensor) -> Tensor:
        left = (self.win_length - self.hop_length) // 2
        right = (self.win_length - self.hop_length + 1) // 2
        padded = F.pad(wav.unsqueeze(1), (left, right), mode="reflect").squeeze(1)   # [N, L + win - hop]
        spec = torch.stft(
            padded.float(), self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
            window=self.window.to(device=padded.device, dtype=torch.float32),
            center=False, normalized=False, onesided=True, return_complex=True,
        )                                                                              # [N, n_fft/2+1, frames]
        magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-6)
        return magnitude.to(wav.dtype)


class MelScale(nn.Module):
    """Linear spectrogram [N, n_freqs, frames] → mel [N, n_mels, frames] with the stored filterbank `fb` (design §6.1)."""

    def __init__(self, n_mels: int, sample_rate: int, f_min: float, f_max: float, n_freqs: int) -> None:
        super().__init__()
        self.settings = (n_freqs, f_min, f_max, n_mels, sample_rate)
        self.register_buffer("fb", self._default_fb())

    def _default_fb(self) -> Tensor:
        with torch.device("cpu"):
            return slaney_mel_filterbank(*self.settings)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "fb" not in state_dict:
            state_dict[prefix + "fb"] = self._default_fb()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, spec: Tensor) -> Tensor:
        return torch.matmul(spec.transpose(-1, -2), self.fb.to(spec)).transpose(-1, -2)


class LogMelSpectrogram(nn.Module):
    """Waveform [..., L] at 44.1 kHz → natural-log mel [..., n_mels, frames] clamped at 1e-5 (design §6.1)."""

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.sample_rate = config.sampling_rate
        self.hop_length = config.hop_length
        self.min_samples = (config.win_length - config.hop_length + 1) // 2 + 1
        self.spectrogram = LinearSpectrogram(config.n_fft, config.win_length, config.hop_length)
        self.mel_scale = MelScale(
            config.n_mels, config.sampling_rate, config.f_min, config.f_max, config.n_fft // 2 + 1
        )

    def forward(self, wav: Tensor) -> Tensor:
        if wav.shape[-1] < self.min_samples or not wav.is_floating_point():
            raise ValueError(
                f"audio for the mel front end must be a float tensor of at least {self.min_samples} samples, "
                f"got {wav.dtype} of shape {tuple(wav.shape)}"
            )
        lead = wav.shape[:-1]
        spec = self.spectrogram(wav.reshape(-1, wav.shape[-1]))                        # [N, n_freqs, frames]
        mel = self.mel_scale(spec)                                                     # [N, n_mels, frames]
        return torch.log(torch.clamp(mel, min=1e-5)).reshape(*lead, *mel.shape[1:])


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of [B, C, T] with biased variance, eps 1e-6 (design §6.3)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None] * x + self.bias[:, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise conv → LayerNorm → Linear d→4d → GELU → Linear 4d→d → ×gamma → + input, [B, d, T] (design §6.3)."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).transpose(1, 2)                                 # [B, T, d]
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class ConvNeXtBackbone(nn.Module):
    """ConvNeXt-1D encoder: log-mel [B, 128, F] → features [B, num_mels, F] (design §6.3)."""

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        dims = config.dims
        stem = nn.Sequential(
            nn.Conv1d(config.input_channels, dims[0], 7, padding=3, padding_mode="replicate"),
            ChannelsFirstLayerNorm(dims[0]),
        )
        transitions = [
            nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv1d(dims[i], dims[i + 1], 1))
            for i in range(len(dims) - 1)
        ]
        self.channel_layers = nn.ModuleList([stem, *transitions])
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dim, config.kernel_sizes[0]) for _ in range(depth)))
            for dim, depth in zip(dims, config.depths)
        )
        self.norm = ChannelsFirstLayerNorm(dims[-1])

    def forward(self, mel: Tensor) -> Tensor:
        x = mel
        for channel_layer, stage in zip(self.channel_layers, self.stages):
            x = stage(channel_layer(x))
        return self.norm(x)


def weight_norm_weight(g: Tensor, v: Tensor) -> Tensor:
    """Weight-norm reparametrisation `g · v / ‖v‖`, the norm over every dim except 0 (design §6.3)."""
    return v * (g / v.norm(dim=tuple(range(1, v.ndim)), keepdim=True))


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is stored as `weight_g` [out,1,1] / `weight_v` [out,in,k] (design §6.3)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = dilation
        self.padding = (kernel_size * dilation - dilation) // 2
        self.weight_g = nn.Parameter(torch.ones(out_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size).uniform_(-0.01, 0.01))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        weight = weight_norm_weight(self.weight_g, self.weight_v)
        return F.conv1d(x, weight, self.bias, padding=self.padding, dilation=self.dilation)


class WeightNormConvTranspose1d(nn.Module):
    """ConvTranspose1d with `weight_g` [in,1,1] / `weight_v` [in,out,k] (norm per input channel), design §6.3."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.padding = (kernel_size - stride) // 2
        self.weight_g = nn.Parameter(torch.ones(in_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(in_channels, out_channels, kernel_size).uniform_(-0.01, 0.01))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        weight = weight_norm_weight(self.weight_g, self.weight_v)
        return F.conv_transpose1d(x, weight, self.bias, stride=self.stride, padding=self.padding)


class ResBlock1(nn.Module):
    """Three `x + conv(SiLU(dilated conv(SiLU(x))))` steps, dilations (1, 3, 5) (design §6.3)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(WeightNormConv1d(channels, channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(WeightNormConv1d(channels, channels, kernel_size) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.silu(conv1(F.silu(x))))
        return x


class HiFiGANHead(nn.Module):
    """HiFi-GAN generator: features [B, num_mels, F] → waveform [B, 1, F·hop] in (-1, 1) (design §6.3)."""

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        channels = config.upsample_initial_channel
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.conv_pre = WeightNormConv1d(config.num_mels, channels, config.pre_conv_kernel_size)
        self.ups = nn.ModuleList(
            WeightNormConvTranspose1d(channels // 2**i, channels // 2 ** (i + 1), k, u)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            ResBlock1(channels // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        self.conv_post = WeightNormConv1d(channels // 2 ** len(self.ups), 1, config.post_conv_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_pre(x)                                                    # [B, C0, F]
        for i, up in enumerate(self.ups):
            x = up(F.silu(x))                                                   # [B, C0/2^(i+1), F·u0…ui]
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / self.num_kernels
        return torch.tanh(self.conv_post(F.silu(x)))                            # [B, 1, F·hop]


class Vocoder(nn.Module):
    """`ADaMoSHiFiGANV1`: keys `backbone.*`, `head.*` (weight_g/weight_v) and `mel_transform.*` buffers (design §6.3)."""

    def __init__(self, config: VocoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or VocoderConfig()
        self.backbone = ConvNeXtBackbone(self.config)
        self.head = HiFiGANHead(self.config)
        self.mel_transform = LogMelSpectrogram(self.config)

    def decode(self, mel: Tensor) -> Tensor:
        """Log-mel [B, n_mels, F] → mono waveform [B, 1, F·hop] at `sampling_rate` (design §6.3)."""
        if mel.ndim != 3 or mel.shape[1] != self.config.n_mels or mel.shape[2] == 0:
            raise ValueError(f"mel must be [B, {self.config.n_mels}, frames] with frames > 0, got {tuple(mel.shape)}")
        return self.head(self.backbone(mel))

    def forward(self, mel: Tensor) -> Tensor:
        return self.decode(mel)
