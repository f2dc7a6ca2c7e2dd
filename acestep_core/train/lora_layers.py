"""Trainable LoRA layers for the ACE-Step transformer, injected PEFT-style, saved in the official file format (design §9).

Injection. `LoraSpec` reads the PEFT `LoraConfig` JSON the official trainer uses (`r`, `lora_alpha`,
`target_modules`, `use_rslora`, `lora_dropout`). A list of `target_modules` matches like PEFT: a module whose
path equals an entry or ends with "." + entry (so `to_q` hits `attn.to_q` and `cross_attn.to_q` of every block,
`to_out.0` the output projections, `linear_q` the Conformer queries); a single string is a regular expression
that must match the whole path. Each matched `nn.Linear` becomes a `LinearLora`: the same frozen weight and bias
Parameters plus `lora_A` [r, in] (Kaiming-uniform, as PEFT) and `lora_B` [out, r] (zeros), in float32, with
`y = W·x + b + s·B·A·x` and `s = alpha / r` (or `alpha / √r` with rsLoRA) during training.

Saving. `save_lora` writes `pytorch_lora_weights.safetensors` with the official key names
(`<module path>.lora_A.weight`, `<module path>.lora_B.weight`, no prefix). The official inference path and
ComfyUI ignore alpha and apply `ΔW = strength · B·A` (see acestep_core.lora), so the training scale `s` is
folded into the saved B (`B_saved = s·B`): strength 1.0 with the default loader reproduces the trained model.
The `lora_adapter_metadata` header (as newer diffusers write it) therefore says `lora_alpha = r` and
`use_rslora = false`, so a loader that honours alpha computes the scale 1 and does not apply `s` twice. What was
folded (the trained alpha, rsLoRA flag and `s`) is recorded in a separate `acestep_training` header entry, which
PEFT's `LoraConfig` never sees.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora import METADATA_KEY, OFFICIAL_FILENAME

TRAINING_METADATA_KEY = "acestep_training"
# PEFT LoraConfig keys that are harmless when left at these values; anything else is refused by name.
_IGNORED_KEYS = {
    "peft_type": None, "task_type": None, "base_model_name_or_path": None, "revision": None, "inference_mode": None,
    "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "exclude_modules": None,
    "megatron_config": None, "megatron_core": "megatron.core", "layer_replication": None, "auto_mapping": None,
    "loftq_config": {}, "eva_config": None, "runtime_config": None, "lora_bias": False, "trainable_token_indices": None,
    "corda_config": None, "target_parameters": None,
}


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA hyper-parameters of a PEFT LoraConfig (design §9, official config/zh_rap_lora_config.json)."""

    r: int = 16
    lora_alpha: float = 32.0
    target_modules: tuple[str, ...] | str = ("to_q", "to_k", "to_v", "to_out.0")
    use_rslora: bool = False
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA lora_alpha must be a positive number, got {alpha!r}")
        if not isinstance(self.target_modules, str):
            targets = tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"LoRA target_modules must be module-name suffixes or one regex, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", targets)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoRA lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")

    @property
    def scale(self) -> float:
        """Training-time factor on B·A: alpha/r, or alpha/√r with rsLoRA (PEFT semantics)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_mapping(cls, config: Mapping, source: str = "LoRA config") -> LoraSpec:
        """Build from a PEFT LoraConfig dict; unsupported settings (DoRA, rank_pattern, biases...) are refused."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{source} must be a JSON object (a PEFT LoraConfig), got {type(config).__name__}")
        own = {"r", "lora_alpha", "target_modules", "use_rslora", "lora_dropout", "init_lora_weights"}
        unsupported = [
            f"{k}={v!r}" for k, v in config.items()
            if k not in own and (k not in _IGNORED_KEYS or (v != _IGNORED_KEYS[k] and v not in (None, [], {})))
        ]
        init = config.get("init_lora_weights", True)
        if init is not True:
            unsupported.append(f"init_lora_weights={init!r}")
        if unsupported:
            raise ValueError(
                f"{source}: unsupported LoRA settings {', '.join(unsupported)}; this trainer supports r, lora_alpha, "
                "target_modules, use_rslora and lora_dropout (remove the other keys)"
            )
        if "target_modules" not in config:
            raise ValueError(f"{source}: 'target_modules' is missing, e.g. [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]")
        targets = config["target_modules"]
        return cls(
            r=config.get("r", 8),
            lora_alpha=config.get("lora_alpha", 8),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(config.get("use_rslora", False)),
            lora_dropout=float(config.get("lora_dropout", 0.0)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> LoraSpec:
        """Read a PEFT LoraConfig JSON file (the official --lora_config_path)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--lora_config_path {path} does not exist; give a JSON file like config/zh_rap_lora_config.json")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"LoRA config {path} is not valid JSON ({err})") from None
        return cls.from_mapping(config, str(path))

    def to_json(self) -> dict:
        """The spec as a JSON-ready dict."""
        data = asdict(self)
        data["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return data

    def matches(self, name: str) -> bool:
        """PEFT's rule: suffix match at a dot boundary for a list, whole-path regex for a string."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)


class LinearLora(nn.Linear):
    """nn.Linear with a trainable low-rank update: y = W·x + b + scale·B(A(dropout(x))) (design §9)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] → [..., out]."""
        out = F.linear(x, self.weight, self.bias)
        low_rank = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (low_rank * self.scale).to(out.dtype)


def inject_lora(model: nn.Module, spec: LoraSpec) -> dict[str, LinearLora]:
    """Freeze `model` and wrap every targeted nn.Linear in a LinearLora; returns {module path: layer} (design §9)."""
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules() if name and spec.matches(name)]
    wrong = [f"{name} ({type(module).__name__})" for name, module in targets if type(module) is not nn.Linear]
    if wrong:
        raise ValueError(f"LoRA target_modules {spec.target_modules!r} match modules that are not plain Linear layers: "
                         f"{', '.join(wrong[:10])}; narrow the target names")
    if not targets:
        raise ValueError(
            f"LoRA target_modules {spec.target_modules!r} match no module of the transformer; use names such as "
            "to_q, to_k, to_v, to_out.0 (attention), linear_q/linear_k/linear_v (lyric encoder), speaker_embedder"
        )
    layers: dict[str, LinearLora] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LinearLora(module, spec.r, spec.scale, spec.lora_dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def lora_layers(model: nn.Module) -> dict[str, LinearLora]:
    """Every LinearLora in `model` by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearLora)}


def lora_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The raw trainable tensors `<path>.lora_A.weight` / `.lora_B.weight` (unscaled; for training checkpoints)."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return tensors


def load_lora_parameters(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy raw tensors from `lora_parameters` back into the model's LinearLora layers (resume)."""
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"training checkpoint LoRA tensors do not match this LoRA config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; resume with the same --lora_config_path"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            for ab, linear in (("A", layer.lora_A), ("B", layer.lora_B)):
                value = tensors[f"{name}.lora_{ab}.weight"]
                if value.shape != linear.weight.shape:
                    raise ValueError(f"{name}.lora_{ab}.weight has shape {tuple(value.shape)}, the model needs "
                                     f"{tuple(linear.weight.shape)}; resume with the same LoRA rank")
                linear.weight.copy_(value)


def export_lora_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Official-format tensors with the training scale folded into B: {path.lora_A.weight: A, path.lora_B.weight: s·B}."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_B.weight"] = (layer.lora_B.weight.detach().float() * layer.scale).cpu().contiguous()
    return tensors


def save_lora(model: nn.Module, folder: str | Path, spec: LoraSpec, *, adapter_name: str = "lora_adapter",
              step: int | None = None) -> Path:
    """Write `<folder>/pytorch_lora_weights.safetensors` in the official format (scale folded into B, design §9)."""
    from safetensors.torch import save_file

    tensors = export_lora_tensors(model)
    if not tensors:
        raise ValueError("the model has no LoRA layers to save; call inject_lora first")
    adapter = {
        "peft_type": "LORA", "r": spec.r, "lora_alpha": spec.r, "use_rslora": False, "lora_dropout": spec.lora_dropout,
        "target_modules": spec.to_json()["target_modules"], "bias": "none", "init_lora_weights": True,
    }
    training = {
        "adapter_name": adapter_name, "trained_lora_alpha": spec.lora_alpha, "trained_use_rslora": spec.use_rslora,
        "scale_folded_into_lora_B": spec.scale, "step": step,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / OFFICIAL_FILENAME
    metadata = {"format": "pt", METADATA_KEY: json.dumps(adapter), TRAINING_METADATA_KEY: json.dumps(training)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def drop_unused_modules(transformer: nn.Module, *, keep_projectors: bool) -> list[str]:
    """Delete modules the training forward never runs (cross_attn.add_*/to_add_out; projectors unless REPA).

    Only for LoRA training, where the full state dict is never saved: frees ≈1.26 GB (+0.18 GB of REPA heads)
    of bf16 weights on the real model (design §2.2). Returns the deleted module paths.
    """
    dropped = []
    for name, module in list(transformer.named_modules()):
        for child in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            if name.endswith("cross_attn") and hasattr(module, child):
                delattr(module, child)
                dropped.append(f"{name}.{child}")
    if not keep_projectors and hasattr(transformer, "projectors"):
        del transformer.projectors
        dropped.append("projectors")
    return dropped

