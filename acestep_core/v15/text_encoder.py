"""The ACE-Step 1.5 text encoder: Qwen3-Embedding-0.6B as transformers' Qwen3Model, used the official way.

The official handler (acestep/handler.py, infer_text_embeddings / infer_lyric_embeddings) uses one model two ways:
- prompt: `text_encoder(input_ids).last_hidden_state` on right-padded ids, WITHOUT an attention mask (the model is
  causal, so every real token's state equals the unpadded one; pad positions get states too and the DiT attends
  them, since its cross-attention ignores masks);
- lyrics: `text_encoder.embed_tokens(ids)`, the token embeddings only (the DiT's lyric encoder does the rest).

Weights: the official folder `Qwen3-Embedding-0.6B/` (config.json + model.safetensors, Qwen3Model names) or
ComfyUI's `text_encoders/qwen_0.6b_ace15.safetensors` (the same names under `model.`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .layers import load_strict

# Qwen/Qwen3-Embedding-0.6B config.json values (used when a ComfyUI single file carries no config).
QWEN3_EMBEDDING_06B = {
    "vocab_size": 151669, "max_position_embeddings": 32768, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": False,
    "tie_word_embeddings": True, "model_type": "qwen3",
}
COMFY_PREFIX = "model."


def qwen3_config(config: Mapping[str, Any] | None = None):
    """transformers Qwen3Config from a config.json dict (default: Qwen3-Embedding-0.6B)."""
    from transformers import Qwen3Config

    data = dict(QWEN3_EMBEDDING_06B if config is None else config)
    data.pop("architectures", None)
    data.pop("model_type", None)
    data.pop("_attn_implementation", None)
    data["attn_implementation"] = "sdpa"  # what AutoModel.from_pretrained picks for the official handler
    try:
        return Qwen3Config(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Qwen3 text-encoder config is malformed: {exc}") from exc


def strip_comfy_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's `model.`-prefixed names -> Qwen3Model names; official names pass through unchanged."""
    if sd and all(k.startswith(COMFY_PREFIX) for k in sd):
        return {k[len(COMFY_PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def add_comfy_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {COMFY_PREFIX + k: v for k, v in sd.items()}


def config_from_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The Qwen3 sizes a state dict (Qwen3Model names) determines; the rest are Qwen3-Embedding-0.6B values."""
    try:
        head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
        vocab, hidden = shapes["embed_tokens.weight"]
        inter = shapes["layers.0.mlp.gate_proj.weight"][0]
        heads = shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim
        kv = shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim
    except KeyError as exc:
        raise ValueError(f"text-encoder weights lack {exc.args[0]!r}: not a Qwen3 model") from exc
    layers = len({k.split(".")[1] for k in shapes if k.startswith("layers.")})
    return dict(QWEN3_EMBEDDING_06B, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)


def build_text_model(config: Mapping[str, Any] | None = None, device: str | torch.device = "meta"):
    """transformers Qwen3Model at `config`, parameters on `device` (meta by default: no memory)."""
    from transformers import Qwen3Model

    cfg = qwen3_config(config)
    with torch.device(device):
        return Qwen3Model(cfg)


class TextEncoder15:
    """Qwen3-Embedding for ACE-Step 1.5 prompts and lyric token embeddings (official handler usage)."""

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def _check_ids(self, input_ids: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64) \
                or input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"{what}: token ids must be an int tensor [B, L] with L >= 1")
        vocab = int(self.model.config.vocab_size)
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"{what}: token ids must lie in [0, {vocab}); use the Qwen3 tokenizer of this model")
        return input_ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt token ids [B, L] -> last hidden states [B, L, 1024].

        Official usage passes no attention mask (`attention_mask=None`, the default); a mask may be given to
        encode left-padded batches, which the official handler never produces.
        """
        ids = self._check_ids(input_ids, "encode_text")
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def embed_lyrics(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Lyric token ids [B, L] -> token embeddings [B, L, 1024] (official infer_lyric_embeddings)."""
        return self.model.embed_tokens(self._check_ids(input_ids, "embed_lyrics"))


def text_encoder_from_state_dict(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                                 tokenizer=None) -> TextEncoder15:
    """Build Qwen3Model on meta and load official or ComfyUI-named weights (strict, assign)."""
    sd = strip_comfy_prefix(sd)
    sd.pop("lm_head.weight", None)  # tied to embed_tokens; Qwen3Model has no head
    if config is None:
        config = config_from_weights({k: tuple(v.shape) for k, v in sd.items()})
    model = build_text_model(config, "meta")
    load_strict(model, sd, "text-encoder", "Qwen3Model", dtype=dtype, device=device)
    # Non-persistent buffers (rotary inv_freq) were made on meta: rebuild them on the weights' device.
    target = next(model.parameters()).device
    rotary = getattr(model, "rotary_emb", None)
    if rotary is not None:
        with torch.device(target):
            fresh = type(rotary)(config=model.config)
        for name, buf in list(rotary.named_buffers(recurse=False)):
            if buf.is_meta:
                rotary.register_buffer(name, getattr(fresh, name), persistent=False)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise ValueError(f"text encoder buffers left on the meta device: {leftover[:5]}")
    return TextEncoder15(model.eval().requires_grad_(False), tokenizer)


def load_tokenizer(folder: str | Path):
    """The Qwen3 tokenizer from the official `Qwen3-Embedding-0.6B/` folder (tokenizer.json and friends)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise ValueError(f"{folder}: no Qwen3 tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                         "download the Qwen3-Embedding-0.6B folder of ACE-Step/Ace-Step1.5")
    return AutoTokenizer.from_pretrained(str(folder))


def read_config(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the text-encoder config ({exc})") from exc
