"""ACE-Step v1 diffusion transformer (`ACEStepTransformer2DModel`): Linear-DiT with cross-attention, design §2."""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import apply_rope, linear_attention, masked_sdpa, rope_tables
from .lyric_encoder import ERG_LYRIC_LAYERS, LyricEncoder, LyricEncoderConfig

ERG_DIFFUSION_LAYERS: tuple[int, ...] = (15, 16, 17, 18, 19)
"""Blocks whose attn.to_q and cross_attn.to_q the official ERG-diffusion tempers (design §7.6)."""

PATCH_CHANNELS_PER_INPUT = 256
"""PatchEmbed's hidden conv width is hard-coded to in_channels·256 (design §2.2)."""

CrossKV = list[tuple[Tensor, Tensor]]
"""Per block (key with RoPE, value), each [B, H, S, head_dim]: the cross-attention K/V of one encoder sequence."""

QScale = float | Tensor
"""ERG-diffusion query temperature: one float for the batch, or fp32 [B, 1, 1] (one per batch item)."""


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the transformer; defaults are the released 3.5B model (design §2.1)."""

    in_channels: int = 8
    out_channels: int = 8
    num_layers: int = 24
    num_attention_heads: int = 20
    attention_head_dim: int = 128
    mlp_ratio: float = 2.5
    patch_size: tuple[int, int] = (16, 1)
    rope_theta: float = 1_000_000.0
    speaker_embedding_dim: int = 512
    text_embedding_dim: int = 768
    lyric_encoder_vocab_size: int = 6693
    lyric_hidden_size: int = 1024
    ssl_latent_dims: tuple[int, ...] = (1024, 768)
    lyric_encoder: LyricEncoderConfig = field(default_factory=LyricEncoderConfig)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("mlp_ratio", "rope_theta"):
                if not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"TransformerConfig.{f.name} must be a positive number, got {value!r}")
            elif f.name in ("patch_size", "ssl_latent_dims"):
                if not all(isinstance(v, int) and v > 0 for v in value):
                    raise ValueError(f"TransformerConfig.{f.name} must hold positive ints, got {value!r}")
            elif f.name != "lyric_encoder" and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"TransformerConfig.{f.name} must be a positive int, got {value!r}")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "ssl_latent_dims", tuple(self.ssl_latent_dims))
        if len(self.patch_size) != 2:
            raise ValueError(f"TransformerConfig.patch_size must be (height, width), got {self.patch_size!r}")
        if self.attention_head_dim % 2:
            raise ValueError(f"TransformerConfig.attention_head_dim must be even for RoPE, got {self.attention_head_dim}")
        if self.lyric_hidden_size != self.lyric_encoder.output_size:
            raise ValueError(
                f"TransformerConfig.lyric_hidden_size ({self.lyric_hidden_size}) must equal the lyric encoder "
                f"output_size ({self.lyric_encoder.output_size}): lyric_proj reads the encoder output"
            )

    @property
    def inner_dim(self) -> int:
        """Transformer width D = heads · head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_hidden(self) -> int:
        """GLUMBConv hidden width int(D · mlp_ratio)."""
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def patch_channels(self) -> int:
        """Hidden channels of the patch-embedding convolutions."""
        return self.in_channels * PATCH_CHANNELS_PER_INPUT

    @classmethod
    def from_checkpoint(cls, config: Mapping | None, shapes: Mapping[str, Sequence[int]]) -> TransformerConfig:
        """Build from an optional config.json dict plus tensor shapes (un-prefixed state-dict keys), design §2.1–2.2.

        Every size the weights determine is read from them; the config supplies the rest (heads/head_dim,
        rope_theta) and must agree with the weights. Without a config the head width is assumed to be 128.
        """
        config = dict(config or {})

        def shape(key: str) -> Sequence[int]:
            if key not in shapes:
                raise ValueError(
                    f"transformer weight {key!r} not found; pass the ACE-Step transformer state dict with any "
                    "prefix (e.g. 'model.diffusion_model.') removed"
                )
            return [int(n) for n in shapes[key]]

        def indices(prefix: str) -> set[int]:
            pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
            return {int(m.group(1)) for key in shapes if (m := pattern.match(key))}

        blocks = indices("transformer_blocks.")
        if not blocks:
            prefixed = next((k for k in shapes if k.endswith(".transformer_blocks.0.scale_shift_table")), None)
            hint = (f"remove the prefix {prefixed[: -len('transformer_blocks.0.scale_shift_table')]!r} from the keys"
                    if prefixed else "is this an ACE-Step transformer state dict?")
            raise ValueError(f"no 'transformer_blocks.N.*' weights found; {hint}")
        inner = shape("transformer_blocks.0.scale_shift_table")[1]
        if "num_attention_heads" in config and "attention_head_dim" in config:
            heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        elif "attention_head_dim" in config:
            head_dim = int(config["attention_head_dim"])
            heads = inner // head_dim
        elif "num_attention_heads" in config:
            heads = int(config["num_attention_heads"])
            head_dim = inner // heads
        else:
            head_dim = cls.attention_head_dim
            heads = inner // head_dim
        if heads * head_dim != inner:
            raise ValueError(
                f"the weights have width {inner} but heads x head_dim = {heads} x {head_dim}; pass the checkpoint's "
                "config.json (num_attention_heads, attention_head_dim) as `config`"
            )

        conv_in = shape("proj_in.early_conv_layers.0.weight")                 # [C*256, C, p0, p1]
        in_channels, patch_size = conv_in[1], (conv_in[2], conv_in[3])
        ff_hidden = shape("transformer_blocks.0.ff.point_conv.conv.weight")[1]
        derived = dict(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0] // (patch_size[0] * patch_size[1]),
            num_layers=max(blocks) + 1,
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            patch_size=patch_size,
            speaker_embedding_dim=shape("speaker_embedder.weight")[1],
            text_embedding_dim=shape("genre_embedder.weight")[1],
            lyric_encoder_vocab_size=shape("lyric_embs.weight")[0],
            lyric_hidden_size=shape("lyric_embs.weight")[1],
            ssl_latent_dims=tuple(shape(f"projectors.{i}.4.weight")[0] for i in sorted(indices("projectors."))),
        )
        for key, value in derived.items():
            if key in config and _as_config_value(config[key]) != value:
                raise ValueError(f"config.json says {key}={config[key]!r} but the weights give {value!r}")
        if "inner_dim" in config and int(config["inner_dim"]) != inner:
            raise ValueError(f"config.json says inner_dim={config['inner_dim']!r} but the weights give {inner}")
        mlp_ratio = float(config.get("mlp_ratio", ff_hidden / inner))
        if int(inner * mlp_ratio) != ff_hidden:
            raise ValueError(
                f"mlp_ratio {mlp_ratio!r} gives a feed-forward width of {int(inner * mlp_ratio)} but the weights "
                f"have {ff_hidden}; fix mlp_ratio in config.json"
            )
        result = cls(
            **derived,
            mlp_ratio=mlp_ratio,
            rope_theta=float(config.get("rope_theta", cls.rope_theta)),
            lyric_encoder=LyricEncoderConfig.from_checkpoint(shapes),
        )
        if shape("proj_in.early_conv_layers.0.weight")[0] != result.patch_channels:
            raise ValueError(
                f"proj_in has {conv_in[0]} hidden channels, expected in_channels*256 = {result.patch_channels}"
            )
        return result


def _as_config_value(value: object) -> object:
    """config.json lists become tuples so they compare with derived sizes."""
    return tuple(value) if isinstance(value, list) else value


def temper_queries(q: Tensor, scale: QScale | None) -> Tensor:
    """q·τ in q's dtype, the product taken in fp32 when τ is per item (as the official in-place ×τ, design §7.6)."""
    if scale is None:
        return q
    return (q * scale).to(q.dtype)


def timestep_features(timestep: Tensor, dim: int = 256) -> Tensor:
    """Sinusoidal features [B, dim] in fp32, cos half first, f_k = exp(−ln(10⁴)·k/(dim/2)) (design §2.3)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]        # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Parameter-free RMSNorm with the variance in fp32 (design §2.4)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def match_statistics(control: Tensor, reference: Tensor) -> Tensor:
    """Give `control` [B,T,D] the per-sample mean/std (over T and D, unbiased) of `reference` (design §2.3 step 3)."""
    ref_mean, ref_std = reference.mean(dim=(1, 2), keepdim=True), reference.std(dim=(1, 2), keepdim=True)
    mean, std = control.mean(dim=(1, 2), keepdim=True), control.std(dim=(1, 2), keepdim=True)
    return (control - mean) * (ref_std / (std + 1e-12)) + ref_mean


class TimestepEmbedding(nn.Module):
    """linear_2(SiLU(linear_1(features))) (design §2.3)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: Tensor) -> Tensor:
        """[B, 256] → [B, D]."""
        return self.linear_2(F.silu(self.linear_1(features)))


class PatchEmbed(nn.Module):
    """Conv(k=patch) → GroupNorm(32) over the whole sequence → Conv 1×1, giving one token per frame (design §2.3)."""

    def __init__(self, in_channels: int, hidden: int, dim: int, patch_size: tuple[int, int]):
        super().__init__()
        self.early_conv_layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size),
            nn.GroupNorm(32, hidden, eps=1e-6),
            nn.Conv2d(hidden, dim, kernel_size=1),
        )

    def forward(self, latent: Tensor) -> Tensor:
        """[B, C, 16, T] → [B, T, D]."""
        patch, norm, project = self.early_conv_layers
        if latent.device.type == "cpu" and latent.dtype == torch.bfloat16:
            h = patch_conv_as_matmul(patch, latent)  # the CPU's bf16 conv kernel is wrong for this shape
        else:
            h = patch(latent)
        return project(norm(h)).flatten(2).transpose(1, 2)


def patch_conv_as_matmul(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A Conv2d whose stride equals its kernel (non-overlapping patches) as one matrix product; the same numbers.

    PyTorch's CPU (oneDNN) bfloat16 convolution returns wrong values for the patch embedding's (16, 1) kernel at
    many lengths (e.g. T = 16 or 100 frames: ~110% relative error, found by tests/test_dtypes.py); the product
    is exact up to rounding on every device.
    """
    (ph, pw), (b, c, h, w) = conv.kernel_size, x.shape
    hp, wp = h // ph, w // pw
    patches = x[..., :hp * ph, :wp * pw].reshape(b, c, hp, ph, wp, pw).permute(0, 2, 4, 1, 3, 5)
    weight = conv.weight.reshape(conv.out_channels, -1)
    out = F.linear(patches.reshape(b, hp, wp, c * ph * pw), weight, conv.bias)      # [B, H', W', out]
    return out.permute(0, 3, 1, 2)


class LinearSelfAttention(nn.Module):
    """ReLU linear self-attention with RoPE and latent masking ("LiteLA", design §2.5)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, q_scale: QScale | None) -> Tensor:
        """h [B,T,D], rope tables [T,hd], mask [B,1,T,1] (activation dtype; None = every frame valid) → [B,T,D]."""
        q = temper_queries(self.to_q(h), q_scale)                              # ERG-diffusion (design §7.6)
        q, k, v = (split_heads(t, self.heads) for t in (q, self.to_k(h), self.to_v(h)))  # [B, H, T, hd]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if mask is not None:
            q, k, v = q * mask, k * mask, v * mask
        out = self.to_out[0](merge_heads(linear_attention(q, k, v).to(h.dtype)))   # [B, T, D]
        if out.dtype == torch.float16:
            out = out.clamp(-65504, 65504)                                     # as the official fp16 path
        return out


class CrossAttention(nn.Module):
    """Softmax cross-attention from latent tokens to the condition sequence, RoPE on q and k (design §2.5).

    add_q_proj/add_k_proj/add_v_proj/to_add_out exist in the checkpoint but are never used.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.add_q_proj = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.to_add_out = nn.Linear(dim, dim)

    def key_value(self, encoder_states: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """encoder_states [B,S,D] → (k with RoPE, v), each [B,H,S,hd]."""
        k = apply_rope(split_heads(self.to_k(encoder_states), self.heads), *rope)
        return k, split_heads(self.to_v(encoder_states), self.heads)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], rope: tuple[Tensor, Tensor],
                allowed: Tensor | None, q_scale: QScale | None) -> Tensor:
        """x [B,T,D], kv from key_value, latent rope tables, allowed [B,T,S] bool (None = all) → [B,T,D]."""
        q = temper_queries(self.to_q(x), q_scale)                              # ERG-diffusion (design §7.6)
        q = apply_rope(split_heads(q, self.heads), *rope)                      # [B, H, T, hd]
        out = masked_sdpa(q, *kv, allowed)                                     # [B, H, T, hd]
        return self.to_out[0](merge_heads(out))


class ConvUnit(nn.Module):
    """A named Conv1d (checkpoint keys `<name>.conv.*`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, groups: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, T] → [B, C', T]."""
        return self.conv(x)


class GLUMBConv(nn.Module):
    """1×1 conv + SiLU → depthwise k=3 → GLU (a·SiLU(g)) → 1×1 conv (design §2.4)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inverted_conv = ConvUnit(dim, 2 * hidden, 1)
        self.depth_conv = ConvUnit(2 * hidden, 2 * hidden, 3, groups=2 * hidden)
        self.point_conv = ConvUnit(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor, *, as_linear: bool = False) -> Tensor:
        """[B, T, D] → [B, T, D]; `as_linear` runs the 1×1 convolutions as matrix products on [B, T, C]."""
        if as_linear:
            return self._forward_linear(x)
        u = F.silu(self.inverted_conv(x.transpose(1, 2)))                     # [B, 2H, T]
        a, g = self.depth_conv(u).chunk(2, dim=1)                              # [B, H, T] each
        return self.point_conv(a * F.silu(g)).transpose(1, 2)

    def _forward_linear(self, x: Tensor) -> Tensor:
        """The same GLUMBConv with F.linear for the 1×1 convolutions (GEMM kernels instead of conv kernels)."""
        inverted, point = self.inverted_conv.conv, self.point_conv.conv
        u = F.silu(F.linear(x, inverted.weight[..., 0], inverted.bias))       # [B, T, 2H]
        u = self.depth_conv(u.transpose(1, 2)).transpose(1, 2)                 # [B, T, 2H]
        a, g = u.chunk(2, dim=-1)                                              # [B, T, H] each
        return F.linear(a * F.silu(g), point.weight[..., 0])                   # [B, T, D]


class LinearTransformerBlock(nn.Module):
    """adaLN-single block: gated linear self-attn, ungated cross-attn, gated GLUMBConv (design §2.4)."""

    def __init__(self, dim: int, heads: int, ff_hidden: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn = LinearSelfAttention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.ff = GLUMBConv(dim, ff_hidden)

    def forward(self, x: Tensor, temb: Tensor, *, rope: tuple[Tensor, Tensor], latent_mask: Tensor | None,
                cross_kv: tuple[Tensor, Tensor], cross_allowed: Tensor | None, q_scale: QScale | None,
                linear_ff: bool = False) -> Tensor:
        """x [B,T,D], temb [B,6D] → [B,T,D]."""
        modulation = self.scale_shift_table[None] + temb.view(x.shape[0], 6, -1)          # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        h = rms_norm(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn(h, rope, latent_mask, q_scale)
        x = x + self.cross_attn(x, cross_kv, rope, cross_allowed, q_scale)
        h = rms_norm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h, as_linear=linear_ff)


class FinalLayer(nn.Module):
    """RMSNorm modulated by the timestep embedding `emb` (not temb), Linear, unpatchify (design §2.3 step 6)."""

    def __init__(self, dim: int, patch_size: tuple[int, int], out_channels: int):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.linear = nn.Linear(dim, patch_size[0] * patch_size[1] * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B,T',D], emb [B,D] → [B, C, p0, T'·p1]."""
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)    # [B, 1, D] each
        x = self.linear(rms_norm(x) * (1 + scale) + shift)                   # [B, T', p0*p1*C]
        p0, p1 = self.patch_size
        b, frames, _ = x.shape
        x = x.view(b, frames, p0, p1, self.out_channels)                      # feature o -> (band, col, channel)
        return x.permute(0, 4, 2, 1, 3).reshape(b, self.out_channels, p0, frames * p1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, H·d] → [B, H, S, d]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, S, d] → [B, S, H·d]."""
    return x.transpose(1, 2).flatten(2)


class AceStepTransformer(nn.Module):
    """ACE-Step v1 transformer; state-dict names and shapes equal the official checkpoint (design §2.2)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.transformer_blocks = nn.ModuleList(
            LinearTransformerBlock(dim, config.num_attention_heads, config.ff_hidden) for _ in range(config.num_layers)
        )
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.speaker_embedder = nn.Linear(config.speaker_embedding_dim, dim)
        self.genre_embedder = nn.Linear(config.text_embedding_dim, dim)
        self.lyric_embs = nn.Embedding(config.lyric_encoder_vocab_size, config.lyric_hidden_size)
        self.lyric_encoder = LyricEncoder(config.lyric_encoder, config.lyric_hidden_size)
        self.lyric_proj = nn.Linear(config.lyric_hidden_size, dim)
        self.projectors = nn.ModuleList(                                       # REPA heads, training only
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(),
                          nn.Linear(2 * dim, ssl_dim))
            for ssl_dim in config.ssl_latent_dims
        )
        self.proj_in = PatchEmbed(config.in_channels, config.patch_channels, dim, config.patch_size)
        self.final_layer = FinalLayer(dim, config.patch_size, config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (that of the weights)."""
        return self.final_layer.linear.weight.dtype

    def encode(self, text_states: Tensor, text_mask: Tensor, speaker: Tensor, lyric_ids: Tensor, lyric_mask: Tensor,
               *, lyric_erg_tau: float | None = None,
               lyric_erg_layers: Collection[int] = ERG_LYRIC_LAYERS) -> tuple[Tensor, Tensor]:
        """Condition sequence [speaker | text | lyrics] → (encoder_states [B,S,D], encoder_mask [B,S] fp32), design §2.3."""
        self._check_conditions(text_states, text_mask, speaker, lyric_ids, lyric_mask)
        dtype, batch = self.dtype, text_states.shape[0]
        speaker_tokens = self.speaker_embedder(speaker.to(dtype))[:, None]   # [B, 1, D]
        text_tokens = self.genre_embedder(text_states.to(dtype))               # [B, Lt, D]
        lyric_states = self.lyric_encoder(
            self.lyric_embs(lyric_ids), lyric_mask, erg_tau=lyric_erg_tau, erg_layers=lyric_erg_layers
        )                                                                      # [B, Ll, Dl]
        lyric_tokens = self.lyric_proj(lyric_states)                           # [B, Ll, D]
        states = torch.cat([speaker_tokens, text_tokens, lyric_tokens], dim=1)
        speaker_mask = torch.ones(batch, 1, dtype=torch.float32, device=states.device)
        mask = torch.cat([speaker_mask, text_mask.to(torch.float32), lyric_mask.to(torch.float32)], dim=1)
        return states, mask

    def cross_kv(self, encoder_states: Tensor) -> CrossKV:
        """Cross-attention K (with RoPE) and V of every block; compute once per generation and pass to decode."""
        if encoder_states.ndim != 3 or encoder_states.shape[-1] != self.config.inner_dim:
            raise ValueError(
                f"encoder_states must be [B, S, {self.config.inner_dim}] (the output of encode), "
                f"got {list(encoder_states.shape)}"
            )
        encoder_states = encoder_states.to(self.dtype)
        rope = rope_tables(encoder_states.shape[1], self.config.attention_head_dim, self.config.rope_theta,
                           dtype=encoder_states.dtype, device=encoder_states.device)
        return [block.cross_attn.key_value(encoder_states, rope) for block in self.transformer_blocks]

    def decode(self, x: Tensor, attention_mask: Tensor | None, encoder_states: Tensor, encoder_mask: Tensor | None,
               timestep: Tensor, *, erg_tau: float | Tensor | None = None,
               erg_layers: Collection[int] = ERG_DIFFUSION_LAYERS, controlnet_states: Tensor | None = None,
               controlnet_scale: float = 1.0, cross_kv: CrossKV | None = None, linear_ff: bool = False) -> Tensor:
        """Velocity [B,C,16,T] for latent x at timestep (= σ·1000) given encode's output (design §2.3).

        erg_tau scales attn.to_q and cross_attn.to_q in `erg_layers`: a float for the whole batch or a [B] tensor,
        one temperature per item (1 = untempered), so tempered and plain guidance branches share one call;
        cross_kv (from `cross_kv`) skips recomputing the encoder K/V; masks may be None for "all ones" (both None
        skips the mask arithmetic and lets SDPA use its unmasked kernels); linear_ff runs the feed-forward 1×1
        convolutions as matrix products. The last three are speed options with the same result up to rounding.
        """
        batch, frames = self._check_latent(x, "x")
        dtype, device = self.dtype, x.device
        bad = [i for i in erg_layers if not 0 <= i < self.config.num_layers]
        if bad:
            raise ValueError(f"erg_layers {sorted(bad)} out of range: the model has {self.config.num_layers} blocks")
        unmasked = attention_mask is None and encoder_mask is None
        attention_mask = _check_mask(attention_mask, "attention_mask", batch, frames, device)
        if encoder_states.ndim != 3 or encoder_states.shape[0] != batch:
            raise ValueError(f"encoder_states must be [{batch}, S, D] (from encode), got {list(encoder_states.shape)}")
        encoder_mask = _check_mask(encoder_mask, "encoder_mask", batch, encoder_states.shape[1], device)
        timestep = _check_timestep(timestep, batch, device)
        q_scale = _check_erg_tau(erg_tau, batch, device)

        emb = self.timestep_embedder(timestep_features(timestep).to(dtype))   # [B, D]
        temb = self.t_block(emb)                                               # [B, 6D]
        h = self.proj_in(x.to(dtype))                                          # [B, T, D]
        if controlnet_states is not None:
            if controlnet_states.shape != h.shape:
                raise ValueError(
                    f"controlnet_states must be {list(h.shape)} (one token per latent frame), "
                    f"got {list(controlnet_states.shape)}"
                )
            h = h + match_statistics(controlnet_states.to(dtype), h) * controlnet_scale

        rope = rope_tables(h.shape[1], self.config.attention_head_dim, self.config.rope_theta,
                           dtype=dtype, device=device)                         # latent positions 0..T-1
        if cross_kv is None:
            cross_kv = self.cross_kv(encoder_states)
        elif len(cross_kv) != self.config.num_layers:
            raise ValueError(f"cross_kv must hold {self.config.num_layers} (k, v) pairs from cross_kv(), got {len(cross_kv)}")
        latent_mask = cross_allowed = None
        if not unmasked:
            latent_mask = attention_mask.to(dtype)[:, None, :, None]          # [B, 1, T, 1]
            cross_allowed = (attention_mask[:, :, None] * encoder_mask[:, None, :]) == 1   # [B, T, S]

        for index, block in enumerate(self.transformer_blocks):
            h = block(h, temb, rope=rope, latent_mask=latent_mask, cross_kv=cross_kv[index],
                      cross_allowed=cross_allowed, q_scale=q_scale if index in erg_layers else None,
                      linear_ff=linear_ff)
        return self.final_layer(h, emb)                                        # [B, C, 16, T]

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, encoder_text_hidden_states: Tensor,
                text_attention_mask: Tensor, speaker_embeds: Tensor, lyric_token_idx: Tensor, lyric_mask: Tensor,
                timestep: Tensor) -> Tensor:
        """encode then decode with the official argument names; returns the velocity [B,C,16,T] (design §2.3)."""
        self._check_latent(hidden_states, "hidden_states")
        encoder_states, encoder_mask = self.encode(
            encoder_text_hidden_states, text_attention_mask, speaker_embeds, lyric_token_idx, lyric_mask
        )
        return self.decode(hidden_states, attention_mask, encoder_states, encoder_mask, timestep)

    def _check_latent(self, x: Tensor, name: str) -> tuple[int, int]:
        """Raise a ValueError naming `name` unless x is [B, in_channels, patch_height, T]; return (B, tokens)."""
        c, (p0, p1) = self.config.in_channels, self.config.patch_size
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != p0 or x.shape[3] % p1 or x.shape[3] == 0:
            raise ValueError(
                f"{name} must be an ACE-Step music latent [B, {c}, {p0}, T] (8 channels x 16 mel bands x frames), "
                f"got shape {list(x.shape)}; image latents (e.g. [B, 4, 64, 64]) or other models' latents cannot "
                "be used: encode audio with the ACE-Step music DCAE or start from an empty ACE-Step latent"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        return x.shape[0], x.shape[3] // p1

    def _check_conditions(self, text_states: Tensor, text_mask: Tensor, speaker: Tensor, lyric_ids: Tensor,
                          lyric_mask: Tensor) -> None:
        """Raise a ValueError naming the first condition input with a wrong shape or dtype."""
        cfg = self.config
        if text_states.ndim != 3 or text_states.shape[-1] != cfg.text_embedding_dim:
            raise ValueError(
                f"text_states must be [B, Lt, {cfg.text_embedding_dim}] (UMT5 encoder states), "
                f"got {list(text_states.shape)}"
            )
        batch, text_len = text_states.shape[:2]
        if tuple(text_mask.shape) != (batch, text_len):
            raise ValueError(f"text_mask must be [{batch}, {text_len}] like text_states, got {list(text_mask.shape)}")
        if tuple(speaker.shape) != (batch, cfg.speaker_embedding_dim):
            raise ValueError(
                f"speaker must be [{batch}, {cfg.speaker_embedding_dim}] (zeros when there is no speaker), "
                f"got {list(speaker.shape)}"
            )
        if lyric_ids.ndim != 2 or lyric_ids.shape[0] != batch or lyric_ids.is_floating_point():
            raise ValueError(
                f"lyric_ids must be integer token ids [{batch}, Ll], got {lyric_ids.dtype} {list(lyric_ids.shape)}"
            )
        if tuple(lyric_mask.shape) != tuple(lyric_ids.shape):
            raise ValueError(f"lyric_mask must be {list(lyric_ids.shape)} like lyric_ids, got {list(lyric_mask.shape)}")
        if lyric_ids.numel() and (int(lyric_ids.min()) < 0 or int(lyric_ids.max()) >= cfg.lyric_encoder_vocab_size):
            raise ValueError(
                f"lyric_ids must lie in [0, {cfg.lyric_encoder_vocab_size}), got {int(lyric_ids.min())}.."
                f"{int(lyric_ids.max())}; use the ACE-Step lyric tokenizer"
            )


def _check_mask(mask: Tensor | None, name: str, batch: int, length: int, device: torch.device) -> Tensor:
    """Validate a [B, L] 0/1 mask (None = all ones) and return it as fp32."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.float32, device=device)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must be [{batch}, {length}], got {list(mask.shape)}")
    return mask.to(device=device, dtype=torch.float32)


def _check_erg_tau(erg_tau: float | Tensor | None, batch: int, device: torch.device) -> QScale | None:
    """A float τ passes through; a per-item τ [B] becomes fp32 [B, 1, 1] to broadcast over tokens and features."""
    if erg_tau is None or not isinstance(erg_tau, Tensor):
        return erg_tau
    if erg_tau.ndim != 1 or erg_tau.shape[0] != batch or not erg_tau.is_floating_point():
        raise ValueError(
            f"erg_tau as a tensor must hold one float temperature per batch item, shape [{batch}], "
            f"got {erg_tau.dtype} {list(erg_tau.shape)}"
        )
    return erg_tau.to(device=device, dtype=torch.float32)[:, None, None]


def _check_timestep(timestep: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Accept a scalar, [1] or [B] timestep (= σ·1000) and return [B] fp32."""
    timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1)
    if timestep.numel() == 1:
        return timestep.expand(batch)
    if timestep.numel() != batch:
        raise ValueError(f"timestep must be a scalar or have {batch} entries (one per batch item), got {timestep.numel()}")
    return timestep
