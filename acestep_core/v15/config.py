"""ACE-Step 1.5 model configuration: the official `AceStepConfig` field names, checked, read or inferred.

The field names are those of the official `acestep/models/common/configuration_acestep_v15.py` (AceStepConfig);
the defaults are the released 2B models (turbo, sft and base share them). The XL models add the four
`encoder_*` fields: the condition encoder, tokenizer, detokenizer and `null_condition_emb` then use the encoder
sizes while the DiT decoder uses the main ones (official `xl_*` modeling files).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_VERSIONS = ("turbo", "base", "sft")
LAYER_TYPES = ("sliding_attention", "full_attention")

# Keys of a Hugging Face config.json that describe no model hyper-parameter (kept aside, never an error).
_BOOKKEEPING = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "return_dict", "is_encoder_decoder", "id2label", "label2id", "pad_token_id", "bos_token_id", "eos_token_id",
}


def default_layer_types(num_layers: int) -> list[str]:
    """The official default: sliding attention on even layers, full attention on odd ones."""
    return [LAYER_TYPES[i % 2] for i in range(num_layers)]


@dataclass
class AceStepConfig:
    """Hyper-parameters of the ACE-Step 1.5 DiT and its condition encoder, tokenizer and detokenizer."""

    vocab_size: int = 64003
    fsq_dim: int = 2048
    fsq_input_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    fsq_input_num_quantizers: int = 1
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = True
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    attention_dropout: float = 0.0
    num_lyric_encoder_hidden_layers: int = 8
    audio_acoustic_hidden_dim: int = 64
    pool_window_size: int = 5
    text_hidden_dim: int = 1024
    in_channels: int = 192
    data_proportion: float = 0.5
    timestep_mu: float = -0.4
    timestep_sigma: float = 1.0
    timbre_hidden_dim: int = 64
    num_timbre_encoder_hidden_layers: int = 4
    timbre_fix_frame: int = 750
    patch_size: int = 2
    num_attention_pooler_hidden_layers: int = 2
    num_audio_decoder_hidden_layers: int = 24
    lyric_alignment_layers_config: Any = None
    model_version: str = "turbo"
    # XL only (None: the encoder side uses the main sizes).
    encoder_hidden_size: int | None = None
    encoder_intermediate_size: int | None = None
    encoder_num_attention_heads: int | None = None
    encoder_num_key_value_heads: int | None = None
    # Keys of the config.json this dataclass does not know (kept for reference, never used).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if isinstance(self.layer_types, (list, tuple)):
            self.layer_types = list(self.layer_types)
        if isinstance(self.fsq_input_levels, tuple):
            self.fsq_input_levels = list(self.fsq_input_levels)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot describe a working model."""
        positive = (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "num_lyric_encoder_hidden_layers", "audio_acoustic_hidden_dim",
            "pool_window_size", "text_hidden_dim", "in_channels", "timbre_hidden_dim",
            "num_timbre_encoder_hidden_layers", "timbre_fix_frame", "patch_size",
            "num_attention_pooler_hidden_layers", "fsq_dim", "fsq_input_num_quantizers", "vocab_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AceStepConfig.{name} must be a positive int, got {value!r}")
        for name in ("encoder_hidden_size", "encoder_intermediate_size", "encoder_num_attention_heads",
                     "encoder_num_key_value_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"AceStepConfig.{name} must be a positive int or None, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"AceStepConfig.{name} must be a positive number, got {value!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"AceStepConfig.hidden_act must be 'silu' (the only activation of ACE-Step 1.5), "
                             f"got {self.hidden_act!r}")
        if self.rope_scaling not in (None, {}) and (not isinstance(self.rope_scaling, dict)
                                                    or self.rope_scaling.get("rope_type", "default") != "default"):
            raise ValueError(f"AceStepConfig.rope_scaling {self.rope_scaling!r} is not supported; ACE-Step 1.5 "
                             "uses plain RoPE (rope_scaling null)")
        if self.head_dim % 2:
            raise ValueError(f"AceStepConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for prefix, heads, kv in (("", self.num_attention_heads, self.num_key_value_heads),
                                  ("encoder_", self.encoder_heads, self.encoder_kv_heads)):
            if heads % kv:
                raise ValueError(f"AceStepConfig.{prefix}num_attention_heads ({heads}) must be a multiple of "
                                 f"{prefix}num_key_value_heads ({kv}) for grouped-query attention")
        if self.use_sliding_window and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"AceStepConfig.sliding_window must be a positive int when use_sliding_window is on, "
                             f"got {self.sliding_window!r}")
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers \
                or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"AceStepConfig.layer_types must list {self.num_hidden_layers} entries, each one of "
                             f"{LAYER_TYPES}; got {self.layer_types!r}")
        deepest = max(self.num_lyric_encoder_hidden_layers, self.num_timbre_encoder_hidden_layers,
                      self.num_attention_pooler_hidden_layers)
        if deepest > self.num_hidden_layers:
            # The official encoders index layer_types by layer and run only layers[:num_hidden_layers].
            raise ValueError(f"AceStepConfig: the lyric/timbre/pooler layer counts ({deepest}) must not exceed "
                             f"num_hidden_layers ({self.num_hidden_layers})")
        levels = self.fsq_input_levels
        if not isinstance(levels, (list, tuple)) or not levels or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in levels):
            raise ValueError(f"AceStepConfig.fsq_input_levels must be a non-empty list of ints >= 2, got {levels!r}")
        if self.in_channels != 3 * self.audio_acoustic_hidden_dim:
            # proj_in reads [context latents (source + chunk mask), x_t] concatenated on channels.
            raise ValueError(f"AceStepConfig.in_channels ({self.in_channels}) must be 3 x audio_acoustic_hidden_dim "
                             f"({self.audio_acoustic_hidden_dim}): source latents, chunk mask and x_t")
        if self.model_version not in MODEL_VERSIONS:
            raise ValueError(f"AceStepConfig.model_version must be one of {MODEL_VERSIONS}, got {self.model_version!r}")

    # ------------------------------------------------------------------ sizes of the encoder side (XL split)
    @property
    def encoder_size(self) -> int:
        return self.encoder_hidden_size or self.hidden_size

    @property
    def encoder_ffn(self) -> int:
        return self.encoder_intermediate_size or self.intermediate_size

    @property
    def encoder_heads(self) -> int:
        return self.encoder_num_attention_heads or self.num_attention_heads

    @property
    def encoder_kv_heads(self) -> int:
        return self.encoder_num_key_value_heads or self.num_key_value_heads

    @property
    def is_turbo(self) -> bool:
        return self.model_version == "turbo"

    @property
    def is_xl(self) -> bool:
        return self.encoder_size != self.hidden_size

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AceStepConfig:
        """From a config.json dict; Hugging Face bookkeeping and unknown keys are kept aside in `extra`."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an ACE-Step 1.5 config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "model_version" not in kwargs and "is_turbo" in extra:
            kwargs["model_version"] = "turbo" if extra["is_turbo"] else "base"
        if isinstance(kwargs.get("rope_theta"), int):
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # a wrong type the checks did not reach
            raise ValueError(f"ACE-Step 1.5 config is malformed: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | Path) -> AceStepConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the ACE-Step 1.5 config.json ({exc})") from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        for key in ("encoder_hidden_size", "encoder_intermediate_size", "encoder_num_attention_heads",
                    "encoder_num_key_value_heads"):
            if out[key] is None:
                out.pop(key)
        return out

    @classmethod
    def from_weights(
        cls,
        shapes: Mapping[str, Sequence[int]],
        config: Mapping[str, Any] | None = None,
        model_version: str | None = None,
    ) -> AceStepConfig:
        """Infer every size the weights determine from their shapes (official names, no prefix).

        `config` (a config.json dict) supplies what shapes cannot tell (rope_theta, sliding window, FSQ levels,
        model_version); where both speak they must agree. Without it head_dim is taken as 128 (every released
        1.5 model) and the variant is `model_version` or "turbo": turbo, sft and base weights are
        indistinguishable by shape.
        """
        base = dict(config or {})

        def shape(key: str) -> list[int]:
            if key not in shapes:
                raise ValueError(f"ACE-Step 1.5 weight {key!r} not found; pass the DiT state dict with official "
                                 "names (any 'model.diffusion_model.' prefix removed)")
            return [int(n) for n in shapes[key]]

        def count(prefix: str) -> int:
            pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
            found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
            if not found:
                raise ValueError(f"ACE-Step 1.5 weights have no {prefix}N. blocks")
            if found != set(range(len(found))):
                raise ValueError(f"ACE-Step 1.5 weights: the {prefix}N. blocks are not numbered 0..{len(found) - 1}")
            return len(found)

        head_dim = shape("decoder.layers.0.self_attn.q_norm.weight")[0]
        hidden = shape("decoder.layers.0.self_attn_norm.weight")[0]
        enc_hidden = shape("encoder.lyric_encoder.layers.0.input_layernorm.weight")[0]
        enc_head_dim = shape("encoder.lyric_encoder.layers.0.self_attn.q_norm.weight")[0]
        if enc_head_dim != head_dim:
            raise ValueError(f"ACE-Step 1.5 weights: encoder head_dim {enc_head_dim} differs from the decoder's "
                             f"{head_dim}; this is not a 1.5 checkpoint this loader knows")
        proj_in = shape("decoder.proj_in.1.weight")
        inferred: dict[str, Any] = {
            "hidden_size": hidden,
            "intermediate_size": shape("decoder.layers.0.mlp.gate_proj.weight")[0],
            "num_hidden_layers": count("decoder.layers."),
            "num_attention_heads": shape("decoder.layers.0.self_attn.q_proj.weight")[0] // head_dim,
            "num_key_value_heads": shape("decoder.layers.0.self_attn.k_proj.weight")[0] // head_dim,
            "head_dim": head_dim,
            "in_channels": proj_in[1],
            "patch_size": proj_in[2],
            "audio_acoustic_hidden_dim": shape("decoder.proj_out.1.weight")[1],
            "text_hidden_dim": shape("encoder.text_projector.weight")[1],
            "timbre_hidden_dim": shape("encoder.timbre_encoder.embed_tokens.weight")[1],
            "num_lyric_encoder_hidden_layers": count("encoder.lyric_encoder.layers."),
            "num_timbre_encoder_hidden_layers": count("encoder.timbre_encoder.layers."),
            "num_attention_pooler_hidden_layers": count("tokenizer.attention_pooler.layers."),
            "pool_window_size": shape("detokenizer.special_tokens")[1],
            "fsq_dim": shape("tokenizer.quantizer.project_in.weight")[1],
        }
        codebook_dim = shape("tokenizer.quantizer.project_in.weight")[0]
        detok_layers = count("detokenizer.layers.")
        if detok_layers != inferred["num_attention_pooler_hidden_layers"]:
            raise ValueError(f"ACE-Step 1.5 weights: detokenizer has {detok_layers} layers but the attention pooler "
                             f"{inferred['num_attention_pooler_hidden_layers']}; the official model builds both "
                             "from num_attention_pooler_hidden_layers")
        if enc_hidden != hidden:
            inferred.update(
                encoder_hidden_size=enc_hidden,
                encoder_intermediate_size=shape("encoder.lyric_encoder.layers.0.mlp.gate_proj.weight")[0],
                encoder_num_attention_heads=shape("encoder.lyric_encoder.layers.0.self_attn.q_proj.weight")[0]
                // head_dim,
                encoder_num_key_value_heads=shape("encoder.lyric_encoder.layers.0.self_attn.k_proj.weight")[0]
                // head_dim,
            )
        for key, value in inferred.items():
            if key in base and base[key] is not None and base[key] != value:
                raise ValueError(f"ACE-Step 1.5 config.json says {key}={base[key]!r} but the weights have {value!r}; "
                                 "the config.json does not belong to these weights")
        base.update(inferred)
        if "layer_types" in base and base["layer_types"] is not None and len(base["layer_types"]) != \
                inferred["num_hidden_layers"]:
            raise ValueError("ACE-Step 1.5 config.json layer_types does not match the number of decoder layers")
        if model_version is not None:
            base["model_version"] = model_version
        levels = base.get("fsq_input_levels", [8, 8, 8, 5, 5, 5])
        if isinstance(levels, (list, tuple)) and len(levels) != codebook_dim:
            raise ValueError(f"ACE-Step 1.5 weights: the FSQ projection has {codebook_dim} codes per token but "
                             f"fsq_input_levels lists {len(levels)} levels")
        return cls.from_dict(base)
