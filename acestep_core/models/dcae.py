"""Music DCAE: the Sana deep-compression autoencoder (f8c8) that maps normalised stereo log-mels to latents, design §6.2."""
from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RES_BLOCK = "ResBlock"
VIT_BLOCK = "EfficientViTBlock"

FIXED_VARIANTS: dict[str, object] = {
    "downsample_block_type": "Conv",
    "upsample_block_type": "interpolate",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "decoder_conv_act_fn": "relu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
}
"""AutoencoderDC options the music DCAE uses; other values (other architectures) are rejected (design §6.2)."""


def check_state_shapes(
    expected: Mapping[str, Sequence[int]],
    shapes: Mapping[str, Sequence[int]],
    component: str,
    optional: Collection[str] = (),
) -> None:
    """Raise a ValueError unless `shapes` has exactly the names/shapes of `expected` (`optional` keys may be absent)."""
    missing = [k for k in expected if k not in shapes and k not in optional]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [
        f"{k}: weights {list(shapes[k])} vs config {list(expected[k])}"
        for k in expected
        if k in shapes and [int(n) for n in shapes[k]] != [int(n) for n in expected[k]]
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[:3]})")
        raise ValueError(
            f"{component} weights do not match its configuration: " + "; ".join(parts)
            + f". Pass the {component} state dict with any prefix removed, and its own config.json (or none)"
        )


@dataclass(frozen=True)
class DCAEConfig:
    """Hyper-parameters of the music DCAE; defaults are the released `music_dcae_f8c8` (design §6.2)."""

    in_channels: int = 2
    latent_channels: int = 8
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] = (RES_BLOCK, RES_BLOCK, RES_BLOCK, VIT_BLOCK)
    decoder_block_types: tuple[str, ...] = (RES_BLOCK, RES_BLOCK, RES_BLOCK, VIT_BLOCK)
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (5,), (5,))

    def __post_init__(self) -> None:
        for name in ("in_channels", "latent_channels", "attention_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DCAEConfig.{name} must be a positive int, got {value!r}")
        for side in ("encoder", "decoder"):
            types = getattr(self, f"{side}_block_types")
            widths = getattr(self, f"{side}_block_out_channels")
            layers = getattr(self, f"{side}_layers_per_block")
            scales = getattr(self, f"{side}_qkv_multiscales")
            if not (len(types) == len(widths) == len(layers) == len(scales)) or not types:
                raise ValueError(
                    f"DCAEConfig {side}_block_types/_block_out_channels/_layers_per_block/_qkv_multiscales must have "
                    f"one equal, non-zero length, got {len(types)}/{len(widths)}/{len(layers)}/{len(scales)}"
                )
            if any(t not in (RES_BLOCK, VIT_BLOCK) for t in types):
                raise ValueError(f"DCAEConfig.{side}_block_types must be {RES_BLOCK!r} or {VIT_BLOCK!r}, got {types!r}")
            if any(not isinstance(n, int) or n <= 0 for n in (*widths, *layers)):
                raise ValueError(
                    f"DCAEConfig.{side}_block_out_channels and _layers_per_block must be positive ints, got "
                    f"{widths!r} / {layers!r}"
                )
            for t, width, ks in zip(types, widths, scales):
                if t == VIT_BLOCK and width % self.attention_head_dim:
                    raise ValueError(
                        f"DCAEConfig: {side} width {width} is not a multiple of attention_head_dim "
                        f"{self.attention_head_dim}"
                    )
                if any(not isinstance(k, int) or k <= 0 or k % 2 == 0 for k in ks):
                    raise ValueError(f"DCAEConfig.{side}_qkv_multiscales must hold odd kernel sizes, got {scales!r}")
            if widths[-1] % self.latent_channels:
                raise ValueError(
                    f"DCAEConfig: {side} width {widths[-1]} is not a multiple of latent_channels {self.latent_channels}"
                )
            if any(4 * a % b for a, b in zip(widths, widths[1:])):
                raise ValueError(
                    f"DCAEConfig.{side}_block_out_channels: each width must divide 4x the previous one, got {widths!r}"
                )

    @property
    def downsample_factor(self) -> int:
        """Mel frames (and mel bins) per latent frame (bin): 2 per stage transition (design §1)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_checkpoint(cls, config: Mapping | None, shapes: Mapping[str, Sequence[int]]) -> DCAEConfig:
        """Build from an optional diffusers config.json dict plus un-prefixed tensor shapes, design §6.2.

        Every size is read from the weights and the config must agree with them; the multiscale kernels of
        ResBlock stages (unused, no weights) come from the config or the defaults.
        """
        config = dict(config or {})
        for key, value in FIXED_VARIANTS.items():
            given = config.get(key, value)
            if any(v != value for v in ([given] if isinstance(given, (str, bool)) else given)):
                raise ValueError(f"DCAE config.json {key}={given!r} is not supported; the music DCAE uses {value!r}")

        def shape(key: str) -> list[int]:
            if key not in shapes:
                raise ValueError(
                    f"DCAE weight {key!r} not found; pass the music_dcae_f8c8 state dict with any prefix "
                    "(e.g. 'vae.dcae.') removed"
                )
            return [int(n) for n in shapes[key]]

        derived: dict[str, object] = {
            "in_channels": shape("encoder.conv_in.weight")[1],
            "latent_channels": shape("encoder.conv_out.weight")[0],
        }
        for side, prefix in (("encoder", "encoder.down_blocks."), ("decoder", "decoder.up_blocks.")):
            key = f"{side}_qkv_multiscales"
            unused_scales = normalise_config_value(config.get(key, getattr(cls, key)))
            derived.update(_describe_stages(side, prefix, shapes, shape, unused_scales))
        head_dims = {shape(k)[1] for k in shapes if k.endswith(".attn.to_qkv_multiscale.0.proj_out.weight")}
        if len(head_dims) > 1:
            raise ValueError(f"DCAE attention blocks disagree on the head width: {sorted(head_dims)}")
        derived["attention_head_dim"] = (
            head_dims.pop() if head_dims else int(config.get("attention_head_dim", cls.attention_head_dim))
        )
        for key, value in derived.items():
            if key not in config:
                continue
            given = config[key]
            if isinstance(given, str) and key.endswith("block_types"):
                given = [given] * len(value)  # type: ignore[arg-type]
            if normalise_config_value(given) != value:
                raise ValueError(f"DCAE config.json says {key}={config[key]!r} but the weights give {value!r}")
        result = cls(**derived)  # type: ignore[arg-type]
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in DCAE(result).state_dict().items()}
        check_state_shapes(expected, shapes, "DCAE")
        return result


def normalise_config_value(value: object) -> object:
    """Config JSON lists → tuples (recursively), so they compare with dataclass fields."""
    if isinstance(value, (list, tuple)):
        return tuple(normalise_config_value(v) for v in value)
    return value


def _describe_stages(
    side: str,
    prefix: str,
    shapes: Mapping[str, Sequence[int]],
    shape: Callable[[str], list[int]],
    unused_scales: object,
) -> dict[str, tuple]:
    """Block types, widths, layer counts and multiscale kernels of one side, read from the weight names/shapes."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\d+)\.(conv1|attn\.to_q|conv)\.weight$")
    kinds: dict[int, dict[int, str]] = {}
    for key in shapes:
        if m := pattern.match(key):
            kinds.setdefault(int(m.group(1)), {})[int(m.group(2))] = m.group(3)
    if not kinds or sorted(kinds) != list(range(len(kinds))):
        raise ValueError(f"DCAE weights '{prefix}N.*' are missing or not numbered 0..N-1")
    types, widths, counts, scales = [], [], [], []
    for s in range(len(kinds)):
        blocks = sorted(j for j, kind in kinds[s].items() if kind != "conv")
        if not blocks:
            raise ValueError(f"DCAE {side} stage {s} has no ResBlock/EfficientViT weights")
        first = f"{prefix}{s}.{blocks[0]}."
        is_vit = kinds[s][blocks[0]] == "attn.to_q"
        types.append(VIT_BLOCK if is_vit else RES_BLOCK)
        widths.append(shape(first + ("attn.to_q.weight" if is_vit else "conv1.weight"))[0])
        counts.append(len(blocks))
        if is_vit:
            n = 0
            while f"{first}attn.to_qkv_multiscale.{n}.proj_in.weight" in shapes:
                n += 1
            scales.append(tuple(shape(f"{first}attn.to_qkv_multiscale.{i}.proj_in.weight")[-1] for i in range(n)))
        else:
            scales.append(unused_scales[s] if isinstance(unused_scales, tuple) and s < len(unused_scales) else ())
    return {
        f"{side}_block_types": tuple(types),
        f"{side}_block_out_channels": tuple(widths),
        f"{side}_layers_per_block": tuple(counts),
        f"{side}_qkv_multiscales": tuple(scales),
    }


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel dim of [B, C, H, W] with weight and bias, eps 1e-5, statistics in fp32 (design §6.2)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(1, keepdim=True)
        y = (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class ResBlock(nn.Module):
    """`x + RMSNorm(Conv3x3_nobias(SiLU(Conv3x3(x))))` (design §6.2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """Depthwise k×k conv then a grouped 1×1 conv (groups = 3·heads) over the stacked q/k/v channels (design §6.2)."""

    def __init__(self, channels: int, heads: int, kernel_size: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(
            3 * channels, 3 * channels, kernel_size, padding=kernel_size // 2, groups=3 * channels, bias=False
        )
        self.proj_out = nn.Conv2d(3 * channels, 3 * channels, 1, groups=3 * heads, bias=False)

    def forward(self, qkv: Tensor) -> Tensor:
        return self.proj_out(self.proj_in(qkv))


def relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-15) -> Tensor:
    """`(V₊Kᵀ)Q` with a ones row appended to V as the normaliser; inputs [B, G, d, N] in fp32 (design §6.2)."""
    v = F.pad(v, (0, 0, 0, 1), value=1.0)
    out = (v @ k.transpose(-1, -2)) @ q
    out = out.float()
    return out[:, :, :-1] / (out[:, :, -1:] + eps)


def relu_quadratic_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-15) -> Tensor:
    """`V·(KᵀQ normalised over keys)`; the same kernel attention for short sequences, [B, G, d, N] (design §6.2)."""
    scores = (k.transpose(-1, -2) @ q).float()
    scores = scores / (scores.sum(dim=2, keepdim=True) + eps)
    return v @ scores.to(v.dtype)


class MultiscaleLinearAttention(nn.Module):
    """Sana multiscale ReLU linear attention with RMSNorm and residual (design §6.2)."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        heads = channels // head_dim
        self.head_dim = head_dim
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(channels, heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(channels * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = ChannelRMSNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        use_linear = h * w > self.head_dim
        x_last = x.movedim(1, -1)                                                    # [B, H, W, C]
        qkv = torch.cat([self.to_q(x_last), self.to_k(x_last), self.to_v(x_last)], dim=-1).movedim(-1, 1)
        qkv = torch.cat([qkv, *(proj(qkv) for proj in self.to_qkv_multiscale)], dim=1)  # [B, 3C(1+S), H, W]
        if use_linear:
            qkv = qkv.float()
        # consecutive groups of 3·head_dim channels, each split into q | k | v (the official grouping)
        qkv = qkv.reshape(b, -1, 3 * self.head_dim, h * w)                           # [B, G, 3d, N]
        q, k, v = qkv.chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        if use_linear:
            out = relu_linear_attention(q, k, v).to(x.dtype)
        else:
            out = relu_quadratic_attention(q, k, v)
        out = out.reshape(b, -1, h, w)                                               # [B, C(1+S), H, W]
        out = self.to_out(out.movedim(1, -1)).movedim(-1, 1)                         # [B, C, H, W]
        return x + self.norm_out(out)


class GLUMBConv(nn.Module):
    """Gated bottleneck: 1×1 C→8C, SiLU, depthwise 3×3, `a·SiLU(g)`, 1×1 4C→C, RMSNorm, residual (design §6.2)."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_depth(F.silu(self.conv_inverted(x)))
        a, gate = y.chunk(2, dim=1)
        return x + self.norm(self.conv_point(a * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """Multiscale linear attention then GLUMBConv, each with its own residual (design §6.2)."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """Stride-2 3×3 conv plus the pixel-unshuffle shortcut averaged over channel groups (design §6.2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.group = in_channels * 4 // out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group)).mean(dim=2)
        return self.conv(x) + shortcut


class UpBlock(nn.Module):
    """Nearest ×2 upsampling then 3×3 conv, plus the repeat-interleave + pixel-shuffle shortcut (design §6.2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.repeats = out_channels * 4 // in_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest")) + shortcut


def _block(kind: str, channels: int, head_dim: int, kernel_sizes: Sequence[int]) -> nn.Module:
    return ResBlock(channels) if kind == RES_BLOCK else EfficientViTBlock(channels, head_dim, kernel_sizes)


class DCAEEncoder(nn.Module):
    """Normalised mel [B, 2, 128, F] → raw latent [B, 8, 16, F/8] (design §6.2)."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        widths = config.encoder_block_out_channels
        self.group = widths[-1] // config.latent_channels
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        stages = []
        for i, (kind, width, n, ks) in enumerate(zip(
            config.encoder_block_types, widths, config.encoder_layers_per_block, config.encoder_qkv_multiscales
        )):
            layers = [_block(kind, width, config.attention_head_dim, ks) for _ in range(n)]
            if i + 1 < len(widths):
                layers.append(DownBlock(width, widths[i + 1]))
            stages.append(nn.Sequential(*layers))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, padding=1)

    def forward(self, mel: Tensor) -> Tensor:
        x = self.conv_in(mel)                                           # [B, 128, 128, F]
        for stage in self.down_blocks:
            x = stage(x)                                                # … → [B, 1024, 16, F/8]
        shortcut = x.unflatten(1, (-1, self.group)).mean(dim=2)        # [B, 8, 16, F/8]
        return self.conv_out(x) + shortcut


class DCAEDecoder(nn.Module):
    """Raw latent [B, 8, 16, T] → normalised mel [B, 2, 128, 8T] (design §6.2)."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        widths = config.decoder_block_out_channels
        self.repeats = widths[-1] // config.latent_channels
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        stages = []
        for i, (kind, width, n, ks) in enumerate(zip(
            config.decoder_block_types, widths, config.decoder_layers_per_block, config.decoder_qkv_multiscales
        )):
            layers = [UpBlock(widths[i + 1], width)] if i + 1 < len(widths) else []
            layers += [_block(kind, width, config.attention_head_dim, ks) for _ in range(n)]
            stages.append(nn.Sequential(*layers))
        self.up_blocks = nn.ModuleList(stages)
        self.norm_out = ChannelRMSNorm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z) + z.repeat_interleave(self.repeats, dim=1)  # [B, 1024, 16, T]
        for stage in reversed(self.up_blocks):
            x = stage(x)                                                # … → [B, 128, 128, 8T]
        return self.conv_out(F.relu(self.norm_out(x)))                  # [B, 2, 128, 8T]


class DCAE(nn.Module):
    """The AutoencoderDC pair; state-dict keys `encoder.*` / `decoder.*` as in `music_dcae_f8c8` (design §6.2)."""

    def __init__(self, config: DCAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or DCAEConfig()
        self.encoder = DCAEEncoder(self.config)
        self.decoder = DCAEDecoder(self.config)

    def encode(self, mel: Tensor) -> Tensor:
        """Normalised mel [B, in_channels, H, F] (H, F multiples of 8) → raw latent [B, latent, H/8, F/8]."""
        f = self.config.downsample_factor
        if mel.ndim != 4 or mel.shape[1] != self.config.in_channels or mel.shape[2] % f or mel.shape[3] % f:
            raise ValueError(
                f"mel must be [B, {self.config.in_channels}, H, F] with H and F multiples of {f}, got "
                f"{tuple(mel.shape)}"
            )
        return self.encoder(mel)

    def decode(self, latent: Tensor) -> Tensor:
        """Raw latent [B, latent, h, T] → normalised mel [B, in_channels, 8h, 8T]."""
        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels or 0 in latent.shape:
            raise ValueError(
                f"latent must be non-empty [B, {self.config.latent_channels}, h, T], got {tuple(latent.shape)}"
            )
        return self.decoder(latent)
