"""Building blocks shared by the ACE-Step 1.5 DiT, condition encoder, tokenizer and detokenizer.

Formulas from the official `acestep/models/turbo/modeling_acestep_v15_turbo.py` (AceStepAttention,
AceStepEncoderLayer, create_4d_mask) and the Qwen3 parts it borrows from transformers (RMSNorm, SwiGLU MLP,
rotary embedding with the rotate-half layout). No buffers: RoPE tables and masks are computed per call, so a
model built on the meta device has nothing left to materialise after load_state_dict(assign=True).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    """Qwen3 MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype):
    """(cos, sin) of shape [1, length, head_dim] for positions 0..length-1 (Qwen3 default RoPE, halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    positions = torch.arange(length, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, D]; cos/sin: [1, L, D]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def additive_mask(
    length: int,
    dtype: torch.dtype,
    device: torch.device,
    padding: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor | None:
    """The official bidirectional additive mask: 0 where a query may see a key, finfo.min elsewhere.

    Keys are hidden where `padding` ([B, L], 1 = valid) is 0 and, with `window`, where |i - j| > window.
    Returns None when nothing is hidden (same numbers as an all-zero mask). Shape [B or 1, 1, L, L].
    """
    if padding is None and (window is None or window >= length - 1):
        return None
    idx = torch.arange(length, device=device)
    valid = torch.ones((length, length), dtype=torch.bool, device=device)
    if window is not None:
        valid = (idx[:, None] - idx[None, :]).abs() <= window
    valid = valid[None, None]
    if padding is not None:
        valid = valid & padding.reshape(padding.shape[0], 1, 1, length).to(torch.bool)
    mask = torch.full(valid.shape, torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.masked_fill_(valid, 0.0)


class Attention(nn.Module):
    """GQA attention with per-head RMSNorm on queries and keys; RoPE on self-attention only."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        source = x if context is None else context
        q = self.q_norm(self.q_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(source).view(b, source.shape[1], -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(source).view(b, source.shape[1], -1, self.head_dim).transpose(1, 2)
        if context is None and rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if self.kv_heads != self.heads:  # repeat_kv, as the official SDPA path does
            groups = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, groups, *k.shape[2:]).reshape(b, self.heads, *k.shape[2:])
            v = v[:, :, None].expand(b, self.kv_heads, groups, *v.shape[2:]).reshape(b, self.heads, *v.shape[2:])
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block of the lyric/timbre encoders, the attention pooler and the detokenizer."""

    def __init__(self, dim: int, ffn: int, heads: int, kv_heads: int, head_dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.self_attn = Attention(dim, heads, kv_heads, head_dim, eps, bias)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, ffn)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask=mask, rope=rope)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_encoder_layers(
    layers: nn.ModuleList,
    layer_types: list[str],
    x: torch.Tensor,
    head_dim: int,
    theta: float,
    window: int | None,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [B, L, D] through EncoderLayers with shared RoPE and the official per-layer masks: layer i uses the sliding
    band when layer_types[i] is "sliding_attention", else full attention; `padding` [B, L] hides padded keys."""
    length = x.shape[1]
    rope = rope_tables(length, head_dim, theta, x.device, x.dtype)
    full = additive_mask(length, x.dtype, x.device, padding)
    sliding = additive_mask(length, x.dtype, x.device, padding, window) if window is not None else full
    for i, layer in enumerate(layers):
        x = layer(x, rope, sliding if layer_types[i] == "sliding_attention" else full)
    return x


def load_strict(module: nn.Module, state_dict, what: str, target: str, *, dtype=None, device=None,
                hint: str = "") -> None:
    """Load `state_dict` into `module` (built on meta) with strict names and shapes and assign=True, cast to
    `dtype` (floating tensors) and moved to `device`; a mismatch is one ValueError naming `what` and `target`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} weights do not match {target}: {len(missing)} missing (first: {missing[:5]}), "
                         f"{len(unexpected)} unexpected (first: {unexpected[:5]}){hint}")
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{what} weights have {len(wrong)} shape(s) unlike the config: {wrong[:5]}")
    state = {}
    for k, v in state_dict.items():
        v = v.to(device=device) if device is not None else v
        state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    module.load_state_dict(state, strict=True, assign=True)
