"""The ACE-Step 1.5 diffusion transformer (official `AceStepDiTModel`, the checkpoint's `decoder.` prefix).

x_t is concatenated with the context latents on channels, padded to a multiple of the patch size, patched with a
strided Conv1d, run through DiT layers (AdaLN self-attention with RoPE, sliding or full by layer, cross-attention
to the condition states, AdaLN SwiGLU MLP), un-patched with a ConvTranspose1d and cropped back. The time
conditioning is time_embed(t) + time_embed_r(t - r) (official AceStepDiTModel.forward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AceStepConfig
from .layers import Attention, RMSNorm, SwiGLU, rope_tables


class TimestepEmbedding(nn.Module):
    """Sinusoid of 1000·t (cos half first), two-layer MLP, and a 6-way AdaLN projection."""

    def __init__(self, in_channels: int, dim: int, scale: float = 1000.0):
        super().__init__()
        self.in_channels = in_channels
        self.scale = scale
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.time_proj = nn.Linear(dim, dim * 6)

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        t = t * self.scale
        half = self.in_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.in_channels % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.linear_2(F.silu(self.linear_1(self.sinusoid(t).to(t.dtype))))
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class DiTLayer(nn.Module):
    """AdaLN-modulated self-attention, plain cross-attention, AdaLN-modulated MLP."""

    def __init__(self, config: AceStepConfig, layer_type: str):
        super().__init__()
        c = config
        dim, eps = c.hidden_size, c.rms_norm_eps
        self.layer_type = layer_type
        self.self_attn_norm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, c.num_attention_heads, c.num_key_value_heads, c.head_dim, eps, c.attention_bias)
        self.cross_attn_norm = RMSNorm(dim, eps)
        self.cross_attn = Attention(dim, c.num_attention_heads, c.num_key_value_heads, c.head_dim, eps,
                                    c.attention_bias)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, c.intermediate_size)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, rope, mod, self_mask, context, cross_mask) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + mod).chunk(6, dim=1)
        h = (self.self_attn_norm(x) * (1 + scale) + shift).type_as(x)
        x = (x + self.self_attn(h, mask=self_mask, rope=rope) * gate).type_as(x)
        h = self.cross_attn_norm(x).type_as(x)
        x = x + self.cross_attn(h, mask=cross_mask, context=context)
        h = (self.mlp_norm(x) * (1 + c_scale) + c_shift).type_as(x)
        return (x + self.mlp(h) * c_gate).type_as(x)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


class _Transpose(nn.Module):
    """Swap the time and channel axes (keeps the official Sequential index 1 for the conv weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class AceStepDiT(nn.Module):
    """Predicts the flow velocity for x_t given t, r, context latents and condition states."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        c = config
        self.config = c
        dim = c.hidden_size
        self.patch_size = c.patch_size
        self.layers = nn.ModuleList(DiTLayer(c, c.layer_types[i]) for i in range(c.num_hidden_layers))
        self.proj_in = nn.Sequential(
            _Transpose(), nn.Conv1d(c.in_channels, dim, kernel_size=c.patch_size, stride=c.patch_size), _Transpose()
        )
        self.time_embed = TimestepEmbedding(256, dim)
        self.time_embed_r = TimestepEmbedding(256, dim)
        self.condition_embedder = nn.Linear(c.encoder_size, dim)
        self.norm_out = RMSNorm(dim, c.rms_norm_eps)
        self.proj_out = nn.Sequential(
            _Transpose(),
            nn.ConvTranspose1d(dim, c.audio_acoustic_hidden_dim, kernel_size=c.patch_size, stride=c.patch_size),
            _Transpose(),
        )
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def _checked(self, x, t, r, enc, ctx):
        """Shapes checked with one clear message; floating inputs cast to the weights' dtype."""
        c = self.config
        ch = c.audio_acoustic_hidden_dim
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != ch or x.shape[1] < 1:
            raise ValueError(f"decoder: hidden_states must be [B, T, {ch}] latents, got {_shape(x)}")
        b, n = x.shape[:2]
        ctx_ch = c.in_channels - ch
        if not isinstance(ctx, torch.Tensor) or tuple(ctx.shape) != (b, n, ctx_ch):
            raise ValueError(f"decoder: context_latents must be [B, T, {ctx_ch}] = {(b, n, ctx_ch)} (source latents "
                             f"and chunk mask), got {_shape(ctx)}")
        if not isinstance(enc, torch.Tensor) or enc.ndim != 3 or enc.shape[0] != b or enc.shape[1] < 1 \
                or enc.shape[2] != c.encoder_size:
            raise ValueError(f"decoder: encoder_hidden_states must be [{b}, L, {c.encoder_size}] with L >= 1, "
                             f"got {_shape(enc)}")
        steps = []
        for name, v in (("timestep", t), ("timestep_r", r)):
            if isinstance(v, (int, float)):
                v = torch.tensor(float(v), device=x.device)
            if not isinstance(v, torch.Tensor) or v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, b)):
                raise ValueError(f"decoder: {name} must be a scalar or a [{b}] tensor, got {_shape(v)}")
            steps.append(v.reshape(-1).expand(b) if v.numel() == 1 else v)
        dtype = self.scale_shift_table.dtype
        t, r = (v.to(device=x.device, dtype=dtype) for v in steps)
        return x.to(dtype), t, r, enc.to(dtype), ctx.to(dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        timestep_r: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        context_latents: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        """Velocity [B, T, C] for x_t = `hidden_states` [B, T, C].

        `attention_mask` and `encoder_attention_mask` are accepted and ignored, as in the official forward (it
        sets both to None before building its masks), so every frame and condition token is attended.
        Extra keyword arguments of the official signature (use_cache, past_key_values, ...) are accepted and
        ignored: no cache is kept, the result is the same.
        """
        c = self.config
        hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents = self._checked(
            hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents)
        temb_t, proj_t = self.time_embed(timestep)
        temb_r, proj_r = self.time_embed_r(timestep - timestep_r)
        temb = temb_t + temb_r
        mod = proj_t + proj_r

        x = torch.cat([context_latents, hidden_states], dim=-1)
        length = x.shape[1]
        pad = (-length) % self.patch_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad), mode="constant", value=0)
        x = self.proj_in(x)
        context = self.condition_embedder(encoder_hidden_states)

        tokens = x.shape[1]
        rope = rope_tables(tokens, c.head_dim, c.rope_theta, x.device, x.dtype)
        window = c.sliding_window if c.use_sliding_window else None
        sliding = None
        if window is not None and window < tokens - 1:
            # Boolean band |i - j| <= window (same numbers as the official additive finfo.min mask, half its memory).
            idx = torch.arange(tokens, device=x.device)
            sliding = ((idx[:, None] - idx[None, :]).abs() <= window)[None, None]
        for layer in self.layers:
            self_mask = sliding if layer.layer_type == "sliding_attention" else None
            x = layer(x, rope, mod, self_mask, context, None)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)[:, :length, :]
