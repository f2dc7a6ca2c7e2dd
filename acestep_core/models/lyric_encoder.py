"""Conformer lyric encoder of ACE-Step v1 (WeNet/ESPnet style, rel-pos attention, no conv module), design §3."""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ERG_LYRIC_LAYERS: tuple[int, ...] = (4, 5)
"""Conformer blocks whose query projection the official ERG-lyric tempers (design §7.6)."""


@dataclass(frozen=True)
class LyricEncoderConfig:
    """Conformer sizes; the official code hard-codes the real values below, so derive them from weights (design §3)."""

    output_size: int = 1024
    attention_heads: int = 16
    linear_units: int = 4096
    num_blocks: int = 6

    def __post_init__(self) -> None:
        for name in ("output_size", "attention_heads", "linear_units", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LyricEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.output_size % self.attention_heads:
            raise ValueError(
                f"LyricEncoderConfig.output_size ({self.output_size}) must be divisible by "
                f"attention_heads ({self.attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        """Per-head width d_k."""
        return self.output_size // self.attention_heads

    @classmethod
    def from_checkpoint(cls, shapes: Mapping[str, Sequence[int]], prefix: str = "lyric_encoder.") -> LyricEncoderConfig:
        """Read the sizes from tensor shapes (keys of a transformer state dict), design §3."""
        def shape(key: str) -> Sequence[int]:
            if prefix + key not in shapes:
                raise ValueError(
                    f"lyric encoder weight {prefix + key!r} not found; pass the transformer state dict with its "
                    "prefix (e.g. 'model.diffusion_model.') removed"
                )
            return shapes[prefix + key]

        pattern = re.compile(re.escape(prefix) + r"encoders\.(\d+)\.")
        blocks = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
        if not blocks:
            raise ValueError(f"no '{prefix}encoders.N.*' weights found; is this an ACE-Step transformer state dict?")
        return cls(
            output_size=int(shape("embed.out.0.weight")[0]),
            attention_heads=int(shape("encoders.0.self_attn.pos_bias_u")[0]),
            linear_units=int(shape("encoders.0.feed_forward.w_1.weight")[0]),
            num_blocks=max(blocks) + 1,
        )


def relative_position_table(length: int, d_model: int, *, dtype: torch.dtype,
                            device: torch.device | str | None = None) -> Tensor:
    """ESPnet sinusoids for relative positions L−1 … −(L−1), [1, 2L−1, d_model], built in fp32 (design §3)."""
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )                                                                          # [d/2]
    positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)[:, None]
    angles = positions * div_term                                              # [2L-1, d/2]
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)       # pe[2k]=sin, pe[2k+1]=cos
    return table[None].to(dtype)


def shift_relative(scores: Tensor) -> Tensor:
    """Pad-and-shift [B,H,L,2L−1] scores over relative rows (L−1 … −(L−1)) into [B,H,L,L] with entry (i,j) at i−j."""
    b, h, length, width = scores.shape
    padded = F.pad(scores, (1, 0))                                             # [B, H, L, 2L]
    padded = padded.view(b, h, width + 1, length)[:, :, 1:]                    # drop the first L entries
    return padded.reshape(b, h, length, width)[..., :length]


class ConformerAttention(nn.Module):
    """Transformer-XL relative-position multi-head self-attention (design §3)."""

    def __init__(self, size: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = size // heads
        self.linear_q = nn.Linear(size, size)
        self.linear_k = nn.Linear(size, size)
        self.linear_v = nn.Linear(size, size)
        self.linear_out = nn.Linear(size, size)
        self.linear_pos = nn.Linear(size, size, bias=False)
        self.pos_bias_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(heads, self.head_dim)))
        self.pos_bias_v = nn.Parameter(nn.init.xavier_uniform_(torch.empty(heads, self.head_dim)))

    def forward(self, x: Tensor, key_mask: Tensor, pos_table: Tensor, q_scale: float | None = None) -> Tensor:
        """x [B,L,D], key_mask [B,L] bool, pos_table [1,2L−1,D] → [B,L,D]; q_scale is the ERG temperature."""
        b, length, _ = x.shape
        q = self.linear_q(x)
        if q_scale is not None:
            q = q * q_scale                                                    # ERG-lyric (design §7.6)
        q = q.view(b, length, self.heads, self.head_dim)                       # [B, L, H, d]
        k = self.linear_k(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, d]
        v = self.linear_v(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        p = self.linear_pos(pos_table).view(1, -1, self.heads, self.head_dim).transpose(1, 2)  # [1, H, 2L-1, d]

        q_u = (q + self.pos_bias_u).transpose(1, 2)                            # [B, H, L, d]
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))                       # [B, H, L, L]
        position = shift_relative(torch.matmul(q_v, p.transpose(-2, -1)))      # [B, H, L, L]
        scores = (content + position) / math.sqrt(self.head_dim)

        masked = ~key_mask[:, None, None, :]                                   # [B, 1, 1, L]
        probs = torch.softmax(scores.masked_fill(masked, -math.inf), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(probs, v)                                           # [B, H, L, d]
        return self.linear_out(out.transpose(1, 2).reshape(b, length, -1))


class ConformerFeedForward(nn.Module):
    """Position-wise FFN with SiLU (design §3)."""

    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: Tensor) -> Tensor:
        """[B,L,D] → [B,L,D]."""
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm block: x += MHA(LN(x)); x += FFN(LN(x)) (design §3)."""

    def __init__(self, size: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = ConformerAttention(size, heads)
        self.feed_forward = ConformerFeedForward(size, hidden)
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)

    def forward(self, x: Tensor, key_mask: Tensor, pos_table: Tensor, q_scale: float | None = None) -> Tensor:
        """[B,L,D] → [B,L,D]."""
        x = x + self.self_attn(self.norm_mha(x), key_mask, pos_table, q_scale)
        return x + self.feed_forward(self.norm_ff(x))


class LyricInputEmbed(nn.Module):
    """Input layer: LayerNorm(Linear(x)) · √D (design §3 step 2)."""

    def __init__(self, input_size: int, size: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(input_size, size), nn.LayerNorm(size, eps=1e-5))

    def forward(self, x: Tensor) -> Tensor:
        """[B,L,Din] → [B,L,D]."""
        return self.out(x) * math.sqrt(self.out[0].out_features)


class LyricEncoder(nn.Module):
    """Conformer lyric encoder: Linear+LayerNorm embed (×√D), rel-pos blocks, final LayerNorm (design §3)."""

    def __init__(self, config: LyricEncoderConfig, input_size: int):
        super().__init__()
        self.config = config
        size = config.output_size
        self.embed = LyricInputEmbed(input_size, size)
        self.encoders = nn.ModuleList(
            ConformerBlock(size, config.attention_heads, config.linear_units) for _ in range(config.num_blocks)
        )
        self.after_norm = nn.LayerNorm(size, eps=1e-5)

    def forward(self, x: Tensor, mask: Tensor, *, erg_tau: float | None = None,
                erg_layers: Collection[int] = ERG_LYRIC_LAYERS) -> Tensor:
        """Embedded lyrics x [B,L,Din], mask [B,L] → [B,L,D]; erg_tau scales linear_q in `erg_layers` (design §7.6)."""
        bad = [i for i in erg_layers if not 0 <= i < len(self.encoders)]
        if bad:
            raise ValueError(
                f"lyric erg_layers {sorted(bad)} out of range: the lyric encoder has {len(self.encoders)} blocks"
            )
        key_mask = mask.to(torch.bool)                                         # [B, L]
        x = self.embed(x)                                                      # [B, L, D]
        pos_table = relative_position_table(x.shape[1], self.config.output_size, dtype=x.dtype, device=x.device)
        for index, block in enumerate(self.encoders):
            x = block(x, key_mask, pos_table, erg_tau if index in erg_layers else None)
        return self.after_norm(x)
