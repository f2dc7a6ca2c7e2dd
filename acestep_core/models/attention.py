"""Pure attention math for the ACE-Step transformer: RoPE, linear attention, masked SDPA (design §2.5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope_tables(length: int, head_dim: int, theta: float, *, dtype: torch.dtype,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables [length, head_dim] in the half-split layout, built in fp32 then cast to `dtype` (design §2.5)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)                                  # [head_dim/2]
    positions = torch.arange(length, dtype=torch.int64, device=device).float()
    angles = torch.outer(positions, inv_freq)                              # [length, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)                           # [length, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (2i, 2i+1) of x [..., S, D] with half-split tables, in fp32 (the official quirk, design §2.5)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)                        # [..., S, D/2] each
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)                # [..., S, D]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-15) -> Tensor:
    """ReLU-kernel linear attention in fp32, out = (Σ_t v_t φk_t·φq_s) / (Σ_t φk_t·φq_s + eps) (design §2.5).

    q, k, v: [B, H, S, D] (already masked); returns fp32 [B, H, S, D].
    """
    q = torch.relu(q).float()
    k = torch.relu(k).float()
    v_ones = F.pad(v.float(), (0, 1), value=1.0)                          # [B, H, S, D+1]
    kv = torch.matmul(k.transpose(-1, -2), v_ones)                         # [B, H, D, D+1]
    out = torch.matmul(q, kv)                                              # [B, H, S, D+1]
    return out[..., :-1] / (out[..., -1:] + eps)


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax attention q [B,H,Sq,D], k/v [B,H,Sk,D] with a boolean `allowed` [B,Sq,Sk]; a query row with
    no allowed key gives exactly 0 on every backend (design §2.5)."""
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v)
    row_has_key = allowed.any(dim=-1, keepdim=True)                        # [B, Sq, 1]
    safe = allowed | ~row_has_key                                          # empty rows attend everywhere...
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None])
    return out * row_has_key[:, None].to(out.dtype)                       # ...and are zeroed afterwards
