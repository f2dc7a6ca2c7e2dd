"""The StemGen control branch: a ControlNet-style trainable copy of the first K transformer blocks that reads a
reference track, and the decode that injects it into the frozen base transformer (design §2.3, §8 StemGen note).

Data flow of `controlled_decode` (mirrors `AceStepTransformer.decode` step for step):

    h  = base.proj_in(x_σ)                                     main stream [B, T, D]
    c  = h + control_in(proj_in'(reference)) + timbre_proj(timbre)[:, None]     control stream
    for i in 0..N−1:
        h = base.block_i(h)
        if i < K:  c = block'_i(c);  h = h + scale · control_out_i(c)
    v  = base.final_layer(h)

`proj_in'` and `block'_i` start as copies of the base model's weights; `control_in`, `timbre_proj` and every
`control_out_i` start at zero, so an untrained branch returns exactly the base model's velocity. The spec's own
ControlNet hook (`decode(controlnet_states=…)`, statistics matching after the patch embedding) is not used: its
re-normalisation turns a zero control into `mean(h)` and so changes the output even when the branch is untrained.

Module names are the tensor names of the saved file (prefix `control.`): `proj_in.*` and
`transformer_blocks.{i}.*` use the base model's names; the never-used `cross_attn.add_*`/`to_add_out` layers
are not created.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..loading import parameters_on_meta
from ..models.attention import rope_tables
from ..models.transformer import (
    ERG_DIFFUSION_LAYERS,
    AceStepTransformer,
    LinearTransformerBlock,
    PatchEmbed,
    TransformerConfig,
    timestep_features,
)

UNUSED_CROSS_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TASKS = ("stemgen", "singing2accompaniment")


@dataclass(frozen=True)
class ControlConfig:
    """Shape of a control branch: its task, K copied blocks and the base model it belongs to (docs/stemgen.md)."""

    task: str = "stemgen"
    control_blocks: int = 6
    inner_dim: int = 2560
    num_layers: int = 24
    num_attention_heads: int = 20
    attention_head_dim: int = 128
    ff_hidden: int = 6400
    in_channels: int = 8
    patch_size: tuple[int, int] = (16, 1)
    rope_theta: float = 1_000_000.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("control_blocks", "inner_dim", "num_layers", "num_attention_heads", "attention_head_dim",
                     "ff_hidden", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ControlConfig.{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.control_blocks > self.num_layers:
            raise ValueError(
                f"control_blocks={self.control_blocks} but the base model has only {self.num_layers} blocks; "
                f"choose 1..{self.num_layers}"
            )
        if self.num_attention_heads * self.attention_head_dim != self.inner_dim:
            raise ValueError(
                f"num_attention_heads x attention_head_dim = {self.num_attention_heads} x {self.attention_head_dim} "
                f"must equal inner_dim {self.inner_dim}"
            )

    @classmethod
    def for_transformer(cls, config: TransformerConfig, *, task: str = "stemgen",
                        control_blocks: int = 6) -> ControlConfig:
        """The control shape that fits a base transformer (design §2.1)."""
        return cls(task=task, control_blocks=control_blocks, inner_dim=config.inner_dim,
                   num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
                   attention_head_dim=config.attention_head_dim, ff_hidden=config.ff_hidden,
                   in_channels=config.in_channels, patch_size=config.patch_size, rope_theta=config.rope_theta)

    @property
    def timbre_dim(self) -> int:
        """Length of the pooled instrument-reference vector: channels × mel-bands of one latent frame."""
        return self.in_channels * self.patch_size[0]

    def check_base(self, config: TransformerConfig) -> None:
        """ValueError naming every size in which the base transformer differs from the one this branch was made for."""
        base = {"inner_dim": config.inner_dim, "num_layers": config.num_layers,
                "num_attention_heads": config.num_attention_heads, "attention_head_dim": config.attention_head_dim,
                "ff_hidden": config.ff_hidden, "in_channels": config.in_channels,
                "patch_size": tuple(config.patch_size), "rope_theta": config.rope_theta}
        wrong = [f"{name} {getattr(self, name)} vs model {value}" for name, value in base.items()
                 if getattr(self, name) != value]
        if wrong:
            raise ValueError(
                "this StemGen control branch was made for another ACE-Step transformer (" + "; ".join(wrong) +
                "); load the checkpoint it was trained on"
            )

    def to_json(self) -> dict:
        """JSON-ready dict (the `config` entry of the file header)."""
        return {"task": self.task, "control_blocks": self.control_blocks, "inner_dim": self.inner_dim,
                "num_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
                "attention_head_dim": self.attention_head_dim, "ff_hidden": self.ff_hidden,
                "in_channels": self.in_channels, "patch_size": list(self.patch_size), "rope_theta": self.rope_theta}

    @classmethod
    def from_json(cls, data: dict) -> ControlConfig:
        """Inverse of `to_json`; unknown or missing keys are a ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"StemGen config must be a JSON object, got {type(data).__name__}")
        expected = set(cls().to_json())
        if set(data) != expected:
            raise ValueError(f"StemGen config keys {sorted(data)} differ from the expected {sorted(expected)}")
        return cls(**{**data, "patch_size": tuple(data["patch_size"]), "rope_theta": float(data["rope_theta"])})


def _block(config: ControlConfig) -> LinearTransformerBlock:
    """One base block without the never-used cross-attention projections."""
    block = LinearTransformerBlock(config.inner_dim, config.num_attention_heads, config.ff_hidden)
    for name in UNUSED_CROSS_ATTENTION:
        delattr(block.cross_attn, name)
    return block


class StemGenControl(nn.Module):
    """Control branch: patch embedding + K blocks copied from the base, zero-initialised in/out projections."""

    def __init__(self, config: ControlConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.proj_in = PatchEmbed(config.in_channels, config.in_channels * 256, dim, config.patch_size)
        self.control_in = nn.Linear(dim, dim)
        self.timbre_proj = nn.Linear(config.timbre_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(_block(config) for _ in range(config.control_blocks))
        self.control_out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.control_blocks))
        self.zero_projections()

    def zero_projections(self) -> None:
        """Set control_in, timbre_proj and every control_out to zero: the branch then changes nothing."""
        with torch.no_grad():
            for layer in (self.control_in, self.timbre_proj, *self.control_out):
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()

    @classmethod
    def from_state(cls, config: ControlConfig, state: Mapping[str, Tensor]) -> StemGenControl:
        """A branch holding exactly the tensors of `state` (built on meta, then assigned; no random init)."""
        with parameters_on_meta():
            control = cls(config)
        expected = {k: tuple(v.shape) for k, v in control.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
                 if k in state and tuple(state[k].shape) != expected[k]]
        if missing or unexpected or wrong:
            raise ValueError(
                f"the control tensors do not fit a {config.control_blocks}-block branch: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}; re-export the file with "
                "python -m acestep_core.stemgen.train"
            )
        control.load_state_dict(dict(state), strict=True, assign=True)
        return control

    @classmethod
    def from_base(cls, transformer: AceStepTransformer, config: ControlConfig) -> StemGenControl:
        """A fresh float32 branch for `transformer`: proj_in and blocks 0..K−1 copied, projections zero."""
        config.check_base(transformer.config)
        with parameters_on_meta():
            template = cls(config)
        base = transformer.state_dict()
        device = next(transformer.parameters()).device
        state = {key: base[key].detach().to(dtype=torch.float32, copy=True)
                 if key.startswith(("proj_in.", "transformer_blocks.")) else
                 torch.zeros(value.shape, dtype=torch.float32, device=device)
                 for key, value in template.state_dict().items()}
        return cls.from_state(config, state)

    def embed(self, h: Tensor, reference: Tensor, timbre: Tensor | None) -> Tensor:
        """Control stream input c [B,T,D] = h + control_in(proj_in'(reference)) + timbre_proj(timbre)."""
        dtype = self.control_in.weight.dtype
        c = h.to(dtype) + self.control_in(self.proj_in(reference.to(dtype)))           # [B, T, D]
        if timbre is not None:
            c = c + self.timbre_proj(timbre.to(dtype))[:, None, :]
        return c


def timbre_vector(latent: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """Instrument reference latent [B,C,16,T] → [B, C·16]: the mean over its (real) frames (docs/stemgen.md)."""
    if latent.ndim != 4:
        raise ValueError(f"instrument latent must be [B, 8, 16, T], got {list(latent.shape)}")
    if frame_mask is None:
        return latent.float().mean(dim=-1).flatten(1)
    weights = frame_mask.float()[:, None, None, :]                                    # [B, 1, 1, T]
    return ((latent.float() * weights).sum(-1) / weights.sum(-1).clamp(min=1)).flatten(1)


def _run_block(block: LinearTransformerBlock, h: Tensor, temb: Tensor, encoder_states: Tensor,
               rope: tuple[Tensor, Tensor], encoder_rope: tuple[Tensor, Tensor], latent_mask: Tensor | None,
               allowed: Tensor | None, q_scale: float | Tensor | None, linear_ff: bool) -> Tensor:
    """One block with its cross-attention K/V computed from encoder_states (so LoRA and checkpointing see them)."""
    kv = block.cross_attn.key_value(encoder_states.to(h.dtype), encoder_rope)
    mask = latent_mask.to(h.dtype) if latent_mask is not None else None
    return block(h, temb.to(h.dtype), rope=rope, latent_mask=mask, cross_kv=kv, cross_allowed=allowed,
                 q_scale=q_scale, linear_ff=linear_ff)


def _check_inputs(transformer: AceStepTransformer, control: StemGenControl, x: Tensor, reference: Tensor,
                  timbre: Tensor | None, attention_mask: Tensor | None, encoder_mask: Tensor | None,
                  encoder_states: Tensor, timestep: Tensor | float,
                  erg_tau: float | Tensor | None) -> tuple[Tensor, Tensor, Tensor, float | Tensor | None]:
    """Validate the decode inputs; returns (attention_mask [B,T] fp32, encoder_mask [B,S] fp32, timestep [B] fp32,
    ERG query scale: a float, fp32 [B,1,1] for a per-item temperature, or None)."""
    cfg = transformer.config
    control.config.check_base(cfg)
    if x.ndim != 4 or x.shape[1:3] != (cfg.in_channels, cfg.patch_size[0]) or not x.is_floating_point():
        raise ValueError(f"x must be a float ACE-Step latent [B, {cfg.in_channels}, {cfg.patch_size[0]}, T], "
                         f"got {list(x.shape)}")
    batch, frames = x.shape[0], x.shape[3]
    if reference.shape != x.shape:
        raise ValueError(
            f"reference latent must have the noisy latent's shape {list(x.shape)} (same batch and frames), got "
            f"{list(reference.shape)}; encode the reference audio and generate a stem of the same length"
        )
    if timbre is not None and tuple(timbre.shape) != (batch, control.config.timbre_dim):
        raise ValueError(f"timbre must be [{batch}, {control.config.timbre_dim}] (timbre_vector of an instrument "
                         f"latent), got {list(timbre.shape)}")
    if encoder_states.ndim != 3 or encoder_states.shape[0] != batch or encoder_states.shape[2] != cfg.inner_dim:
        raise ValueError(f"encoder_states must be [{batch}, S, {cfg.inner_dim}] (from encode), "
                         f"got {list(encoder_states.shape)}")
    device = x.device
    masks = []
    for name, mask, length in (("attention_mask", attention_mask, frames),
                               ("encoder_mask", encoder_mask, encoder_states.shape[1])):
        if mask is None:
            mask = torch.ones(batch, length, device=device)
        elif tuple(mask.shape) != (batch, length):
            raise ValueError(f"{name} must be [{batch}, {length}], got {list(mask.shape)}")
        masks.append(mask.to(device=device, dtype=torch.float32))
    timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1)
    if timestep.numel() == 1:
        timestep = timestep.expand(batch)
    elif timestep.numel() != batch:
        raise ValueError(f"timestep must be a scalar or have {batch} entries, got {timestep.numel()}")
    if isinstance(erg_tau, Tensor):
        if erg_tau.ndim != 1 or erg_tau.shape[0] != batch or not erg_tau.is_floating_point():
            raise ValueError(f"erg_tau as a tensor must hold one float temperature per batch item, shape [{batch}], "
                             f"got {erg_tau.dtype} {list(erg_tau.shape)}")
        erg_tau = erg_tau.to(device=device, dtype=torch.float32)[:, None, None]
    return masks[0], masks[1], timestep, erg_tau


def controlled_decode(transformer: AceStepTransformer, control: StemGenControl, x: Tensor,
                      attention_mask: Tensor | None, encoder_states: Tensor, encoder_mask: Tensor | None,
                      timestep: Tensor | float, *, reference: Tensor, timbre: Tensor | None = None,
                      control_scale: float = 1.0, erg_tau: float | Tensor | None = None,
                      erg_layers: Collection[int] = ERG_DIFFUSION_LAYERS, linear_ff: bool = False,
                      checkpointing: bool = False) -> Tensor:
    """Velocity [B,C,16,T] of the base transformer with the control branch injected after blocks 0..K−1.

    Same math and options as `AceStepTransformer.decode` (design §2.3: masks None = all ones, both None skip the
    mask arithmetic; erg_tau a float or one temperature per item; linear_ff) plus the control residuals;
    `reference` is the reference track's latent (same shape as x), `timbre` an optional `timbre_vector`. With
    control_scale 0 or an untrained branch the result equals `transformer.decode(...)` with the same options.
    """
    unmasked = attention_mask is None and encoder_mask is None
    attention_mask, encoder_mask, timestep, q_scale = _check_inputs(
        transformer, control, x, reference, timbre, attention_mask, encoder_mask, encoder_states, timestep, erg_tau)
    cfg, dtype = transformer.config, transformer.dtype
    emb = transformer.timestep_embedder(timestep_features(timestep).to(dtype))         # [B, D]
    temb = transformer.t_block(emb)                                                     # [B, 6D]
    h = transformer.proj_in(x.to(dtype))                                                # [B, T, D]
    c = control.embed(h, reference, timbre)                                             # [B, T, D]
    rope = rope_tables(h.shape[1], cfg.attention_head_dim, cfg.rope_theta, dtype=dtype, device=h.device)
    encoder_rope = rope_tables(encoder_states.shape[1], cfg.attention_head_dim, cfg.rope_theta, dtype=dtype,
                               device=h.device)
    control_rope = tuple(t.to(c.dtype) for t in rope)
    control_encoder_rope = tuple(t.to(c.dtype) for t in encoder_rope)
    latent_mask = allowed = None
    if not unmasked:
        latent_mask = attention_mask[:, None, :, None]                                   # [B, 1, T, 1]
        allowed = (attention_mask[:, :, None] * encoder_mask[:, None, :]) == 1          # [B, T, S]

    def run(block: LinearTransformerBlock, state: Tensor, *rest) -> Tensor:
        args = (block, state, *rest)
        return checkpoint(_run_block, *args, use_reentrant=False) if checkpointing else _run_block(*args)

    for index, block in enumerate(transformer.transformer_blocks):
        scale = q_scale if index in erg_layers else None
        h = run(block, h, temb, encoder_states, rope, encoder_rope, latent_mask, allowed, scale, linear_ff)
        if index < control.config.control_blocks:
            c = run(control.transformer_blocks[index], c, temb, encoder_states, control_rope, control_encoder_rope,
                    latent_mask, allowed, scale, linear_ff)
            h = h + (control.control_out[index](c) * control_scale).to(h.dtype)
    return transformer.final_layer(h, emb)                                              # [B, C, 16, T]
