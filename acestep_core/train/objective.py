"""Training objective of ACE-Step v1: flow-matching noising, the x0-preconditioned masked MSE, logit-normal
timesteps through the shifted 1000-entry table, condition dropout and the REPA alignment loss (design §11).

`training_forward` runs the transformer the way `AceStepTransformer.encode` + `decode` do, but block by block from
the transformer's own submodules, so that each transformer and Conformer block can be wrapped in
`torch.utils.checkpoint` (the cross-attention K/V are computed inside the checkpointed block, so LoRA on
`cross_attn.to_k/to_v` is recomputed too) and the hidden states after block `REPA_BLOCK` can be returned for REPA. With checkpointing off and the same inputs it
gives the same velocity as `transformer(...)` (tests check this).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..models.attention import rope_tables
from ..models.lyric_encoder import relative_position_table
from ..models.transformer import AceStepTransformer, LinearTransformerBlock, timestep_features
from ..sampling.schedules import NUM_TRAIN_TIMESTEPS, flow_shift

REPA_BLOCK = 8
"""Hidden states after this block (0-based) feed both REPA projectors (official ssl_encoder_depths [8, 8], design §11)."""
TEXT_DROPOUT = 0.15
SPEAKER_DROPOUT = 0.5
LYRIC_DROPOUT = 0.15


def training_sigmas(shift: float = 3.0, num_steps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The official training table [1000] in float32, entry k = shift((1000 − k)/1000): 1.0 down to shift(0.001) (design §11)."""
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (ACE-Step trains with 3.0), got {shift!r}")
    s = torch.arange(num_steps, 0, -1, dtype=torch.float32) / num_steps
    return flow_shift(s, float(shift)).to(torch.float32)


def sample_sigmas(batch: int, table: Tensor, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Logit-normal indices k = clamp(floor(1000·sigmoid(u)), 0, 999), u ~ N(mean, std) on the CPU; returns table[k] [B] (design §11)."""
    u = torch.normal(mean, std, size=(batch,), generator=generator, device="cpu")
    index = (torch.sigmoid(u) * table.numel()).long().clamp(0, table.numel() - 1)
    return table[index]


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = σ·ε + (1 − σ)·x0 with σ [B] broadcast over [B, C, H, T] (design §11)."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return s * noise + (1 - s) * x0


def denoising_loss(velocity: Tensor, x_sigma: Tensor, x0: Tensor, sigma: Tensor, frame_mask: Tensor) -> Tensor:
    """Per-sample loss [B]: x0̂ = x_σ − σ·v, mean((mask·(x0̂ − x0))²) · mean(mask), in float32 (official trainer, design §11)."""
    s = sigma.float().view(-1, 1, 1, 1)
    pred = x_sigma.float() - s * velocity.float()                              # [B, C, H, T]
    mask = frame_mask.float()[:, None, None, :].expand_as(pred)
    batch = pred.shape[0]
    squared = F.mse_loss((pred * mask).reshape(batch, -1), (x0.float() * mask).reshape(batch, -1), reduction="none")
    return squared.mean(1) * mask.reshape(batch, -1).mean(1)


@dataclass
class Conditions:
    """The condition tensors of one batch (text states, masks, speaker, lyric ids)."""

    text_states: Tensor   # [B, Lt, Dt]
    text_mask: Tensor     # [B, Lt]
    speaker: Tensor       # [B, 512]
    lyric_ids: Tensor     # [B, Ll] long
    lyric_mask: Tensor    # [B, Ll]


def drop_conditions(cond: Conditions, generator: torch.Generator, *, text: float = TEXT_DROPOUT,
                    speaker: float = SPEAKER_DROPOUT, lyrics: float = LYRIC_DROPOUT) -> Conditions:
    """Independent per-item dropout: text states zeroed (mask kept), speaker zeroed, lyric ids and mask zeroed (design §11).

    Three draws of rand(B) on the generator's device in the official order text, speaker, lyrics.
    """
    batch, device = cond.text_states.shape[0], cond.text_states.device
    keep_text, keep_speaker, keep_lyrics = (
        (torch.rand(batch, generator=generator, device=generator.device).to(device) >= p) for p in (text, speaker, lyrics)
    )
    return Conditions(
        text_states=cond.text_states * keep_text[:, None, None].to(cond.text_states.dtype),
        text_mask=cond.text_mask,
        speaker=cond.speaker * keep_speaker[:, None].to(cond.speaker.dtype),
        lyric_ids=cond.lyric_ids * keep_lyrics[:, None].to(cond.lyric_ids.dtype),
        lyric_mask=cond.lyric_mask * keep_lyrics[:, None].to(cond.lyric_mask.dtype),
    )


def _run_block(block: LinearTransformerBlock, h: Tensor, temb: Tensor, encoder_states: Tensor,
               rope: tuple[Tensor, Tensor], encoder_rope: tuple[Tensor, Tensor], latent_mask: Tensor,
               allowed: Tensor) -> Tensor:
    """One block with its cross-attention K/V computed inside (so checkpointing recomputes them)."""
    kv = block.cross_attn.key_value(encoder_states, encoder_rope)
    return block(h, temb, rope=rope, latent_mask=latent_mask, cross_kv=kv, cross_allowed=allowed, q_scale=None)


def training_encode(transformer: AceStepTransformer, cond: Conditions, *,
                    checkpointing: bool = False) -> tuple[Tensor, Tensor]:
    """`transformer.encode` with each Conformer block optionally checkpointed: [speaker | text | lyrics] states
    [B,S,D] and mask [B,S] (design §2.3 encode, §3). Without checkpointing a LoRA in the lyric encoder would keep
    every block's [B,16,L,L] attention maps for the backward pass (≈1 GB each at the 4096-token limit)."""
    dtype = transformer.dtype
    speaker = transformer.speaker_embedder(cond.speaker.to(dtype))[:, None]             # [B, 1, D]
    text = transformer.genre_embedder(cond.text_states.to(dtype))                        # [B, Lt, D]
    encoder = transformer.lyric_encoder
    key_mask = cond.lyric_mask.to(torch.bool)
    x = encoder.embed(transformer.lyric_embs(cond.lyric_ids))                            # [B, Ll, Dl]
    table = relative_position_table(x.shape[1], encoder.config.output_size, dtype=x.dtype, device=x.device)
    for block in encoder.encoders:
        x = checkpoint(block, x, key_mask, table, use_reentrant=False) if checkpointing else block(x, key_mask, table)
    lyrics = transformer.lyric_proj(encoder.after_norm(x))                               # [B, Ll, D]
    ones = torch.ones(speaker.shape[0], 1, dtype=torch.float32, device=speaker.device)
    mask = torch.cat([ones, cond.text_mask.to(torch.float32), cond.lyric_mask.to(torch.float32)], dim=1)
    return torch.cat([speaker, text, lyrics], dim=1), mask


def training_forward(transformer: AceStepTransformer, x: Tensor, frame_mask: Tensor, cond: Conditions,
                     timestep: Tensor, *, checkpointing: bool = False,
                     capture_block: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Velocity [B,C,16,T] of `transformer` at x, plus the hidden states [B,T,D] after `capture_block` (design §2.3, §11)."""
    config = transformer.config
    dtype = transformer.dtype
    encoder_states, encoder_mask = training_encode(transformer, cond, checkpointing=checkpointing)  # [B,S,D], [B,S]
    encoder_states = encoder_states.to(dtype)
    emb = transformer.timestep_embedder(timestep_features(timestep).to(dtype))          # [B, D]
    temb = transformer.t_block(emb)                                                     # [B, 6D]
    h = transformer.proj_in(x.to(dtype))                                                # [B, T, D]
    rope = rope_tables(h.shape[1], config.attention_head_dim, config.rope_theta, dtype=dtype, device=h.device)
    encoder_rope = rope_tables(encoder_states.shape[1], config.attention_head_dim, config.rope_theta, dtype=dtype,
                               device=h.device)
    frame_mask = frame_mask.to(device=h.device, dtype=torch.float32)
    latent_mask = frame_mask.to(dtype)[:, None, :, None]                                # [B, 1, T, 1]
    allowed = (frame_mask[:, :, None] * encoder_mask[:, None, :]) == 1                  # [B, T, S]
    captured = None
    for index, block in enumerate(transformer.transformer_blocks):
        args = (block, h, temb, encoder_states, rope, encoder_rope, latent_mask, allowed)
        h = checkpoint(_run_block, *args, use_reentrant=False) if checkpointing else _run_block(*args)
        if index == capture_block:
            captured = h
    return transformer.final_layer(h, emb), captured


def repa_loss(projected: Sequence[Tensor], targets: Sequence[Sequence[Tensor]], frame_mask: Tensor) -> list[Tensor]:
    """REPA loss per projector: Σ_b mean_t(1 − cos(ẑ, z)) / B with ẑ linearly resampled to the target length (design §11).

    projected[i] is projector i applied to the captured hidden states [B, T, d_i]; targets[i][b] the SSL features
    [T_i, d_i] of item b. Only an item's real frames (frame_mask) are resampled.
    """
    losses = []
    for estimate, per_item in zip(projected, targets, strict=True):
        batch = estimate.shape[0]
        if len(per_item) != batch:
            raise ValueError(f"REPA targets hold {len(per_item)} items for a batch of {batch}")
        total = estimate.new_zeros((), dtype=torch.float32)
        for b, target in enumerate(per_item):
            frames = int(frame_mask[b].sum().item())
            if target.ndim != 2 or target.shape[1] != estimate.shape[-1]:
                raise ValueError(f"REPA target {b} must be [frames, {estimate.shape[-1]}], got {list(target.shape)}")
            z_hat = estimate[b, :frames].float().T[None]                                 # [1, d, T]
            z_hat = F.interpolate(z_hat, size=target.shape[0], mode="linear", align_corners=False)[0].T
            cos = F.cosine_similarity(F.normalize(z_hat, dim=-1), F.normalize(target.float().to(z_hat.device), dim=-1),
                                      dim=-1)
            total = total + (1 - cos).mean()
        losses.append(total / batch)
    return losses


class TrainingModule(nn.Module):
    """The transformer behind one forward(...) for DDP/FSDP: velocity plus the REPA projections (design §11)."""

    def __init__(self, transformer: AceStepTransformer, *, checkpointing: bool, repa: bool):
        super().__init__()
        self.transformer = transformer
        self.checkpointing = checkpointing
        self.repa = repa
        if repa and REPA_BLOCK >= transformer.config.num_layers:
            raise ValueError(f"REPA reads block {REPA_BLOCK} but the transformer has {transformer.config.num_layers} blocks")

    def forward(self, x: Tensor, frame_mask: Tensor, text_states: Tensor, text_mask: Tensor, speaker: Tensor,
                lyric_ids: Tensor, lyric_mask: Tensor, timestep: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(velocity [B,C,16,T], [projector_i(hidden after block 8)] or [] when REPA is off)."""
        cond = Conditions(text_states, text_mask, speaker, lyric_ids, lyric_mask)
        velocity, hidden = training_forward(
            self.transformer, x, frame_mask, cond, timestep, checkpointing=self.checkpointing and self.training,
            capture_block=REPA_BLOCK if self.repa else None,
        )
        projected = [projector(hidden) for projector in self.transformer.projectors] if self.repa else []
        return velocity, projected
