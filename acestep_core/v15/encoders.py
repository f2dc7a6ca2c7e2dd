"""ACE-Step 1.5 condition encoder, audio tokenizer (attention pooler + residual FSQ) and detokenizer.

Formulas and names from the official `modeling_acestep_v15_turbo.py` (AceStepConditionEncoder,
AceStepLyricEncoder, AceStepTimbreEncoder, pack_sequences, AttentionPooler, AceStepAudioTokenizer,
AudioTokenDetokenizer) and, for the FSQ, vector-quantize-pytorch's ResidualFSQ as the official code uses it
(tanh soft clamp, symmetric rounding; diffusers' `_AceStepResidualFSQ` reproduces it bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AceStepConfig
from .layers import EncoderLayer, RMSNorm, run_encoder_layers


class _Sizes:
    """The encoder-side sizes of a config (they differ from the decoder's only in the XL models)."""

    def __init__(self, c: AceStepConfig):
        self.dim = c.encoder_size
        self.ffn = c.encoder_ffn
        self.heads = c.encoder_heads
        self.kv_heads = c.encoder_kv_heads
        self.head_dim = c.head_dim
        self.eps = c.rms_norm_eps
        self.bias = c.attention_bias
        self.theta = c.rope_theta
        self.window = c.sliding_window if c.use_sliding_window else None
        self.layer_types = list(c.layer_types)

    def layers(self, n: int) -> nn.ModuleList:
        return nn.ModuleList(
            EncoderLayer(self.dim, self.ffn, self.heads, self.kv_heads, self.head_dim, self.eps, self.bias)
            for _ in range(n)
        )

    def run(self, layers: nn.ModuleList, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return run_encoder_layers(layers, self.layer_types, x, self.head_dim, self.theta, self.window, padding)


def pack_sequences(h1: torch.Tensor, h2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor):
    """Concatenate two masked sequences and move the valid tokens first (stable), with a fresh [B, L] bool mask."""
    hidden = torch.cat([h1, h2], dim=1)
    mask = torch.cat([m1, m2], dim=1)
    b, n, d = hidden.shape
    order = mask.argsort(dim=1, descending=True, stable=True)
    packed = torch.gather(hidden, 1, order.unsqueeze(-1).expand(b, n, d))
    lengths = mask.sum(dim=1)
    return packed, torch.arange(n, dtype=torch.long, device=hidden.device).unsqueeze(0) < lengths.unsqueeze(1)


class LyricEncoder(nn.Module):
    """Projects lyric token embeddings (text-model width) and encodes them bidirectionally with the padding mask."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        self.sizes = s = _Sizes(config)
        self.embed_tokens = nn.Linear(config.text_hidden_dim, s.dim)
        self.norm = RMSNorm(s.dim, s.eps)
        self.layers = s.layers(config.num_lyric_encoder_hidden_layers)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.sizes.run(self.layers, self.embed_tokens(inputs_embeds), attention_mask))


class TimbreEncoder(nn.Module):
    """Encodes packed reference latents; the first frame's output is each reference's timbre embedding."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        self.sizes = s = _Sizes(config)
        self.embed_tokens = nn.Linear(config.timbre_hidden_dim, s.dim)
        self.norm = RMSNorm(s.dim, s.eps)
        # Registered and saved by the official model, never used in its forward.
        self.special_token = nn.Parameter(torch.randn(1, 1, s.dim))
        self.layers = s.layers(config.num_timbre_encoder_hidden_layers)

    @staticmethod
    def unpack(embs: torch.Tensor, order: torch.Tensor, batch: int | None = None):
        """[N, D] packed embeddings + item index of each -> ([B, max refs, D], [B, max refs] long mask).

        Same numbers as the official one-hot matmul (each output is one input or zero). `batch` defaults to
        max(order) + 1, as the official code has it.
        """
        n, d = embs.shape
        order = order.long()
        b = int(order.max().item()) + 1 if batch is None else batch
        counts = torch.bincount(order, minlength=b)
        width = int(counts.max().item())
        slot = torch.zeros_like(order)
        for item in range(b):  # position of each reference among its item's references, in packed order
            sel = order == item
            slot[sel] = torch.arange(int(sel.sum().item()), device=order.device)
        out = embs.new_zeros(b * width, d)
        flat = order * width + slot
        out[flat] = embs
        mask = torch.zeros(b * width, dtype=torch.long, device=embs.device)
        mask[flat] = 1
        return out.reshape(b, width, d), mask.reshape(b, width)

    def forward(self, refer_audio_acoustic_hidden_states_packed: torch.Tensor, refer_audio_order_mask: torch.Tensor,
                batch: int | None = None):
        x = self.embed_tokens(refer_audio_acoustic_hidden_states_packed)
        x = self.norm(self.sizes.run(self.layers, x))
        return self.unpack(x[:, 0, :], refer_audio_order_mask, batch)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_conditions(enc, text, text_mask, lyric, lyric_mask, refs, order, dtype):
    """One clear ValueError per malformed condition input; float inputs cast to the weights' dtype."""
    text_dim = enc.text_projector.in_features
    timbre_dim = enc.timbre_encoder.embed_tokens.in_features
    for name, h, m in (("text", text, text_mask), ("lyric", lyric, lyric_mask)):
        if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.ndim != 3 or h.shape[-1] != text_dim \
                or h.shape[1] < 1:
            raise ValueError(f"encoder: {name}_hidden_states must be float [B, L, {text_dim}] with L >= 1, "
                             f"got {_shape(h)}")
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(h.shape[:2]):
            raise ValueError(f"encoder: {name}_attention_mask must be [B, L] = {tuple(h.shape[:2])}, got {_shape(m)}")
    b = text.shape[0]
    if lyric.shape[0] != b:
        raise ValueError(f"encoder: text and lyric batch sizes differ ({b} vs {lyric.shape[0]})")
    if not isinstance(refs, torch.Tensor) or not refs.is_floating_point() or refs.ndim != 3 \
            or refs.shape[-1] != timbre_dim or refs.shape[0] < 1 or refs.shape[1] < 1:
        raise ValueError(f"encoder: refer_audio_acoustic_hidden_states_packed must be float [N, T, {timbre_dim}] "
                         f"with N, T >= 1 (pass silence_latent[:, :750] for items without reference audio), "
                         f"got {_shape(refs)}")
    if not isinstance(order, torch.Tensor) or order.dtype not in (torch.int32, torch.int64) \
            or tuple(order.shape) != (refs.shape[0],):
        raise ValueError(f"encoder: refer_audio_order_mask must be an int tensor [{refs.shape[0]}] (the batch item "
                         f"of each packed reference), got {_shape(order)}")
    if int(order.min()) < 0 or int(order.max()) >= b:
        raise ValueError(f"encoder: refer_audio_order_mask values must lie in [0, {b}), got "
                         f"[{int(order.min())}, {int(order.max())}]")
    return text.to(dtype), lyric.to(dtype), refs.to(dtype)


class ConditionEncoder(nn.Module):
    """Text projector + lyric encoder + timbre encoder, packed into one cross-attention sequence."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        dim = config.encoder_size
        self.text_projector = nn.Linear(config.text_hidden_dim, dim, bias=False)
        self.lyric_encoder = LyricEncoder(config)
        self.timbre_encoder = TimbreEncoder(config)

    def forward(
        self,
        text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor,
        lyric_hidden_states: torch.Tensor,
        lyric_attention_mask: torch.Tensor,
        refer_audio_acoustic_hidden_states_packed: torch.Tensor,
        refer_audio_order_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states [B, L, D], encoder_attention_mask [B, L] bool): lyrics, timbre, then text,
        valid tokens first in each item."""
        dtype = self.text_projector.weight.dtype
        text_hidden_states, lyric_hidden_states, refer_audio_acoustic_hidden_states_packed = _check_conditions(
            self, text_hidden_states, text_attention_mask, lyric_hidden_states, lyric_attention_mask,
            refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask, dtype)
        text = self.text_projector(text_hidden_states)
        lyric = self.lyric_encoder(lyric_hidden_states, lyric_attention_mask)
        timbre, timbre_mask = self.timbre_encoder(
            refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask, batch=text.shape[0]
        )
        states, mask = pack_sequences(lyric, timbre, lyric_attention_mask, timbre_mask)
        return pack_sequences(states, text, mask, text_attention_mask)


class ResidualFSQ(nn.Module):
    """Residual finite scalar quantiser: project_in, tanh soft clamp, per-level rounding, project_out.

    Indices are int32 (as vector-quantize-pytorch returns them), shape [..., num_quantizers].
    """

    def __init__(self, dim: int, levels: list[int], num_quantizers: int):
        super().__init__()
        self.levels = list(levels)
        self.num_quantizers = num_quantizers
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    @property
    def codebook_size(self) -> int:
        size = 1
        for level in self.levels:
            size *= level
        return size

    def _tables(self, device, dtype):
        levels = torch.tensor(self.levels, dtype=torch.long, device=device)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], dtype=torch.long, device=device), dim=0)
        scales = [levels.to(dtype) ** -float(i) for i in range(self.num_quantizers)]
        return levels, basis, scales

    @staticmethod
    def _round(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        steps = levels - 1.0
        return (2.0 / steps) * torch.floor(steps * (x.clamp(-1.0, 1.0) + 1.0) / 2.0 + 0.5) - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = x.dtype
        bias_in = self.project_in.bias.float() if self.project_in.bias is not None else None
        z = F.linear(x.float(), self.project_in.weight.float(), bias_in)
        levels, basis, scales = self._tables(z.device, z.dtype)
        lv = levels.to(z.dtype)
        bound = 1.0 + 1.0 / (lv - 1.0)
        z = (z / bound).tanh() * bound
        total = torch.zeros_like(z)
        residual = z
        indices = []
        for scale in scales:
            q = self._round(residual / scale, lv) * scale
            residual = residual - q
            total = total + q
            codes = q / scale
            indices.append(((codes + 1.0) / (2.0 / (lv - 1.0)) * basis.to(z.dtype)).sum(dim=-1).round())
        bias_out = self.project_out.bias.float() if self.project_out.bias is not None else None
        out = F.linear(total, self.project_out.weight.float(), bias_out).to(dtype)
        return out, torch.stack(indices, dim=-1).to(torch.int32)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [..., num_quantizers] (or [..., ] for one quantiser) -> quantised vectors [..., dim]."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"audio code indices must be integers, got {indices.dtype}")
        if indices.ndim == 2 and self.num_quantizers == 1:
            indices = indices.unsqueeze(-1)  # [B, T] codes of a single quantiser
        if indices.ndim < 2 or indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"audio code indices must be [B, T, {self.num_quantizers}] (or [B, T] for one "
                             f"quantiser), got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"audio codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        levels, basis, scales = self._tables(indices.device, torch.float32)
        total = None
        for i, scale in enumerate(scales):
            digits = (indices[..., i].long().unsqueeze(-1) // basis) % levels
            code = digits.to(torch.float32) * (2.0 / (levels.to(torch.float32) - 1.0)) - 1.0
            total = code * scale if total is None else total + code * scale
        weight = self.project_out.weight
        bias = self.project_out.bias.float() if self.project_out.bias is not None else None
        return F.linear(total, weight.float(), bias).to(weight.dtype)


class AttentionPooler(nn.Module):
    """Pools each window of frames into one vector through a learned leading token."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        self.sizes = s = _Sizes(config)
        self.embed_tokens = nn.Linear(s.dim, s.dim)
        self.norm = RMSNorm(s.dim, s.eps)
        self.special_token = nn.Parameter(torch.randn(1, 1, s.dim) * 0.02)
        self.layers = s.layers(config.num_attention_pooler_hidden_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, p, d = x.shape
        x = self.embed_tokens(x)
        x = torch.cat([self.special_token.expand(b, t, 1, -1), x], dim=2).reshape(b * t, p + 1, -1)
        x = self.norm(self.sizes.run(self.layers, x))
        return x[:, 0, :].reshape(b, t, -1)


class AudioTokenizer(nn.Module):
    """25 Hz acoustic latents -> 5 Hz quantised tokens (project, pool each window, residual FSQ)."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        dim = config.encoder_size
        self.pool_window_size = config.pool_window_size
        self.audio_acoustic_proj = nn.Linear(config.audio_acoustic_hidden_dim, dim)
        self.attention_pooler = AttentionPooler(config)
        self.quantizer = ResidualFSQ(config.fsq_dim, config.fsq_input_levels, config.fsq_input_num_quantizers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T/P, P, C] windows -> (quantized [B, T/P, D], indices [B, T/P, Q] int32)."""
        return self.quantizer(self.attention_pooler(self.audio_acoustic_proj(x)))


class AudioTokenDetokenizer(nn.Module):
    """5 Hz quantised tokens -> 25 Hz acoustic hints: each token is expanded to a window of learned slots."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        self.sizes = s = _Sizes(config)
        self.pool_window_size = config.pool_window_size
        self.embed_tokens = nn.Linear(s.dim, s.dim)
        self.norm = RMSNorm(s.dim, s.eps)
        self.special_tokens = nn.Parameter(torch.randn(1, config.pool_window_size, s.dim) * 0.02)
        self.layers = s.layers(config.num_attention_pooler_hidden_layers)
        self.proj_out = nn.Linear(s.dim, config.audio_acoustic_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        p = self.pool_window_size
        x = self.embed_tokens(x).unsqueeze(2).repeat(1, 1, p, 1)
        x = (x + self.special_tokens.expand(b, t, -1, -1)).reshape(b * t, p, -1)
        x = self.proj_out(self.norm(self.sizes.run(self.layers, x)))
        return x.reshape(b, t * p, -1)
