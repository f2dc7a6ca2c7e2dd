"""The ACE-Step 1.5 model container: one nn.Module whose state_dict names are the official checkpoint's.

Interface (names and arguments mirror the official `AceStepConditionGenerationModel`; all tensors batch-first):

    model = build_model(config, device="meta"); model.load_state_dict(sd, strict=True, assign=True)
    # or: model = model_from_state_dict(sd, config=None, dtype=torch.bfloat16, device="cuda")

    model.decoder(hidden_states, timestep, timestep_r, attention_mask, encoder_hidden_states,
                  encoder_attention_mask, context_latents) -> velocity [B, T, C]
        x_t [B, T, C]; t, r [B]; context_latents [B, T, 2C] (source latents + chunk mask); encoder states
        [B, L, D]. Returns the velocity tensor itself (the official returns a tuple; take [0] there). Both masks
        are ignored, as in the official forward. No KV cache: the result equals the cached official one.
    model.encoder(text_hidden_states, text_attention_mask, lyric_hidden_states, lyric_attention_mask,
                  refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask)
        -> (encoder_hidden_states [B, L, D], encoder_attention_mask [B, L] bool)
    model.tokenize(x, silence_latent, attention_mask) -> (quantized [B, T/5, D], indices [B, T/5, 1] int32,
        attention_mask [B, T/5]); x is padded with silence_latent to a multiple of the pool window.
    model.detokenize(quantized) -> hints [B, 5·T', C]
    model.tokenizer.quantizer.get_output_from_indices(indices) -> quantized [B, T', D]
    model.prepare_condition(text_hidden_states, text_attention_mask, lyric_hidden_states, lyric_attention_mask,
                            refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask, hidden_states,
                            attention_mask, silence_latent, src_latents, chunk_masks, is_covers,
                            precomputed_lm_hints_25Hz=None, audio_codes=None)
        -> (encoder_hidden_states, encoder_attention_mask, context_latents [B, T, 2C])
    model.null_condition_emb [1, 1, D]: the unconditional states for CFG (expand_as the encoder states).

`silence_latent` is not part of the DiT checkpoint (a separate silence_latent.pt, [1, T, 64] in the official
layout); the caller passes it. Everything runs under torch.no_grad() by the caller's choice; nothing here keeps
state between calls.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import AceStepConfig
from .dit import AceStepDiT
from .encoders import AudioTokenDetokenizer, AudioTokenizer, ConditionEncoder
from .layers import load_strict


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


class AceStep15Model(nn.Module):
    """decoder (DiT), encoder (conditions), tokenizer, detokenizer and the null condition embedding."""

    def __init__(self, config: AceStepConfig):
        super().__init__()
        if not isinstance(config, AceStepConfig):
            raise ValueError(f"AceStep15Model needs an AceStepConfig, got {type(config).__name__}")
        self.config = config
        self.decoder = AceStepDiT(config)
        self.encoder = ConditionEncoder(config)
        self.tokenizer = AudioTokenizer(config)
        self.detokenizer = AudioTokenDetokenizer(config)
        self.null_condition_emb = nn.Parameter(torch.randn(1, 1, config.encoder_size))

    # ------------------------------------------------------------------ audio tokens
    def tokenize(self, x: torch.Tensor, silence_latent: torch.Tensor, attention_mask: torch.Tensor):
        """Quantise 25 Hz latents to 5 Hz tokens (official AceStepConditionGenerationModel.tokenize)."""
        c = self.config
        p = c.pool_window_size
        _check(x.ndim == 3 and x.shape[-1] == c.audio_acoustic_hidden_dim and x.shape[1] > 0,
               f"tokenize: x must be [B, T, {c.audio_acoustic_hidden_dim}] latents, got {tuple(x.shape)}")
        _check(attention_mask.ndim == 2 and tuple(attention_mask.shape) == tuple(x.shape[:2]),
               f"tokenize: attention_mask must be [B, T] = {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}")
        x = x.to(self.tokenizer.audio_acoustic_proj.weight.dtype)
        pad = (-x.shape[1]) % p
        if pad:
            _check(silence_latent.ndim == 3 and silence_latent.shape[1] >= pad
                   and silence_latent.shape[-1] == x.shape[-1],
                   f"tokenize: silence_latent must be [1, >= {pad}, {x.shape[-1]}], got {tuple(silence_latent.shape)}")
            fill = silence_latent[:1, :pad].to(device=x.device, dtype=x.dtype).repeat(x.shape[0], 1, 1)
            x = torch.cat([x, fill], dim=1)
            attention_mask = F.pad(attention_mask, (0, pad), mode="constant", value=0)
        windows = x.reshape(x.shape[0], x.shape[1] // p, p, x.shape[2])
        tokens = windows.shape[1]
        chunk = math.ceil(attention_mask.shape[1] / tokens)
        pooled = F.max_pool1d(attention_mask.to(x.dtype).unsqueeze(1), kernel_size=chunk, stride=chunk,
                              ceil_mode=True).squeeze(1)
        quantized, indices = self.tokenizer(windows)
        return quantized, indices, pooled

    def detokenize(self, quantized: torch.Tensor) -> torch.Tensor:
        """5 Hz quantised tokens -> 25 Hz hints [B, T·pool_window, C] (official detokenize)."""
        _check(quantized.ndim == 3 and quantized.shape[-1] == self.config.encoder_size,
               f"detokenize: quantized must be [B, T, {self.config.encoder_size}], got {tuple(quantized.shape)}")
        return self.detokenizer(quantized.to(self.detokenizer.embed_tokens.weight.dtype))

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def prepare_condition(
        self,
        text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor,
        lyric_hidden_states: torch.Tensor,
        lyric_attention_mask: torch.Tensor,
        refer_audio_acoustic_hidden_states_packed: torch.Tensor,
        refer_audio_order_mask: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        silence_latent: torch.Tensor,
        src_latents: torch.Tensor,
        chunk_masks: torch.Tensor,
        is_covers: torch.Tensor,
        precomputed_lm_hints_25Hz: torch.Tensor | None = None,
        audio_codes: torch.Tensor | None = None,
    ):
        """Encoder states and context latents (official AceStepConditionGenerationModel.prepare_condition).

        Cover items (`is_covers` > 0) replace their source latents with hints: `precomputed_lm_hints_25Hz`
        when given, else detokenize(codes -> quantized) when `audio_codes` is given, else
        detokenize(tokenize(hidden_states)). The hints are cropped to the source length.
        The official `audio_codes` branch calls `self.tokenize.quantizer`, which does not exist (it raises);
        here it uses the tokenizer's quantiser, the evident intent.
        """
        c = self.config
        b, t = src_latents.shape[:2]
        _check(src_latents.ndim == 3 and src_latents.shape[-1] == c.audio_acoustic_hidden_dim,
               f"prepare_condition: src_latents must be [B, T, {c.audio_acoustic_hidden_dim}], "
               f"got {tuple(src_latents.shape)}")
        _check(tuple(chunk_masks.shape) == tuple(src_latents.shape),
               f"prepare_condition: chunk_masks must match src_latents {tuple(src_latents.shape)}, "
               f"got {tuple(chunk_masks.shape)}")
        _check(is_covers.shape == (b,), f"prepare_condition: is_covers must be [B] = [{b}], "
                                        f"got {tuple(is_covers.shape)}")
        dtype = hidden_states.dtype
        states, mask = self.encoder(
            text_hidden_states=text_hidden_states,
            text_attention_mask=text_attention_mask,
            lyric_hidden_states=lyric_hidden_states,
            lyric_attention_mask=lyric_attention_mask,
            refer_audio_acoustic_hidden_states_packed=refer_audio_acoustic_hidden_states_packed,
            refer_audio_order_mask=refer_audio_order_mask,
        )
        if precomputed_lm_hints_25Hz is not None:
            hints = precomputed_lm_hints_25Hz[:, :t, :]
        else:
            if audio_codes is not None:
                quantized = self.tokenizer.quantizer.get_output_from_indices(audio_codes)
            else:
                quantized, _, _ = self.tokenize(hidden_states, silence_latent, attention_mask)
            hints = self.detokenize(quantized)[:, :t, :]
        _check(tuple(hints.shape) == tuple(src_latents.shape),
               f"prepare_condition: cover hints {tuple(hints.shape)} do not cover src_latents "
               f"{tuple(src_latents.shape)}; give hints/codes for the whole length")
        src = torch.where(is_covers.unsqueeze(-1).unsqueeze(-1) > 0, hints, src_latents)
        context = torch.cat([src, chunk_masks.to(dtype)], dim=-1)
        return states, mask, context

    def forward(self, *args, **kwargs):  # the official forward is the training loss; not provided
        raise NotImplementedError("AceStep15Model has no forward: call decoder / encoder / prepare_condition")


def build_model(config: AceStepConfig, device: str | torch.device = "meta",
                dtype: torch.dtype | None = None) -> AceStep15Model:
    """The model at `config`; on the meta device (default) it holds no memory until loaded with assign=True."""
    with torch.device(device):
        model = AceStep15Model(config)
    if dtype is not None and torch.device(device).type != "meta":
        model = model.to(dtype)
    return model


def model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: AceStepConfig | Mapping | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    model_version: str | None = None,
) -> AceStep15Model:
    """Build on meta and load official-named weights (strict, assign). The config is inferred from the shapes
    when not given; a given config.json dict is checked against them."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    if not isinstance(config, AceStepConfig):
        config = AceStepConfig.from_weights(shapes, config, model_version=model_version)
    model = build_model(config, "meta")
    load_strict(model, state_dict, "ACE-Step 1.5", "the model", dtype=dtype, device=device,
                hint="; pass the DiT file with official names")
    return model.eval().requires_grad_(False)
