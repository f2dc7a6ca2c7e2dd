"""LoRA and LoKr for the ACE-Step 1.5 model: read PEFT, LyCORIS and ComfyUI-named files, patch weights in place
reversibly.

Formats (facts: official ACE-Step-1.5 `acestep/training/lora_utils.py` / `lokr_utils.py` and handler `load_lora`;
ComfyUI `comfy/lora.py` `model_lora_keys_unet`, ACEStep15 branch; `comfy/weight_adapter/lokr.py`):
- official LoRA: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) trained on
  `model.decoder`; tensors `base_model.model.<decoder path>.lora_A.weight` / `.lora_B.weight`; the scale is PEFT's
  `lora_alpha / r` (`lora_alpha / √r` with rsLoRA; `alpha_pattern` / `rank_pattern` per module);
- LoKr: LyCORIS, trained on `model.decoder`; tensors `lycoris_<decoder path with dots as underscores>.lokr_w1`
  (or `lokr_w1_a` @ `lokr_w1_b`) and `.lokr_w2` (or `lokr_w2_a` @ `lokr_w2_b`), optional `.alpha`;
  ΔW = kron(w1, w2), scaled by alpha / r when a factor is low-rank (r = the inner size of that factor), else 1;
- ComfyUI: besides the two above, `diffusion_model.<model path>` / `lora_unet_<flat model path>` names, and
  `.lora_down/.lora_up` with an optional `.alpha` tensor (scale alpha / r, 1 without alpha).

A module may carry its own `.alpha`; it wins over the adapter config. The final factor is strength · scale. The
patching itself (float32 sum of the deltas, cast once to the weight's dtype, CPU copies of the originals,
`LoraPatch.remove()` restoring them bit for bit, validation of everything before anything is touched) is v1's
(acestep_core/lora.py); only the names and the LoKr delta are new here.
"""
from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora import (LoraPatch, _content_digest, _execute, _parse_adapter_config, _pattern_value,
                    _read_safetensors_header, _shorten)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
METADATA_KEYS = ("lora_adapter_metadata", "adapter_config")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_STRENGTH = 100.0
MAX_RANK = 4096

# name prefix -> (root inside AceStep15Model, flat?)  (longest first)
_PREFIXES = (
    ("model.diffusion_model.", "", False),
    ("base_model.model.", "decoder.", False),   # PEFT on model.decoder (official trainer; ComfyUI maps it the same)
    ("diffusion_model.", "", False),
    ("lycoris_", "decoder.", True),             # LyCORIS on model.decoder
    ("lora_unet_", "", True),                   # kohya-style flat names of the whole model (ComfyUI generic)
)
_LORA_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_down.weight": "down",
    ".lora_B.weight": "up", ".lora_up.weight": "up",
}
_LOKR_SUFFIXES = {
    ".lokr_w1": "w1", ".lokr_w1_a": "w1_a", ".lokr_w1_b": "w1_b",
    ".lokr_w2": "w2", ".lokr_w2_a": "w2_a", ".lokr_w2_b": "w2_b",
}
_REFUSED = (".lokr_t2", ".hada_w1_a", ".hada_w2_a", ".dora_scale", ".lora_mid.weight", ".diff", ".diff_b",
            ".lora_magnitude_vector", ".oft_blocks", ".bias")


@dataclass(frozen=True, eq=False)
class Adapter:
    """One module's adapter: kind "lora" (down [r, in], up [out, r]) or "lokr" (w1 / w1_a,w1_b and w2 / w2_a,w2_b)."""

    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        """LoRA: r. LoKr: the inner size of the low-rank factor (w2 wins, as LyCORIS/ComfyUI), None when both
        factors are full matrices."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if "w2_b" in t:
            return int(t["w2_b"].shape[0])
        if "w1_b" in t:
            return int(t["w1_b"].shape[0])
        return None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA: (up [out, r], down [r, in]); LoKr: (w1, w2) as full matrices, in float32."""
        t = {k: v.to(torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            return t["up"], t["down"]
        w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
        w2 = t["w2"] if "w2" in t else t["w2_a"] @ t["w2_b"]
        return w1, w2

    def out_in(self) -> tuple[int, int]:
        """[out, in] of the ΔW this adapter gives (without building it)."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["up"].shape[0]), int(t["down"].shape[1])

        def dims(side: str) -> tuple[int, int]:
            if side in t:
                return int(t[side].shape[0]), int(t[side].shape[1])
            return int(t[side + "_a"].shape[0]), int(t[side + "_b"].shape[1])

        (a, b), (c, d) = dims("w1"), dims("w2")
        return a * c, b * d

    def delta(self) -> torch.Tensor:
        """The unscaled ΔW [out, in] in float32: B·A, or kron(w1, w2)."""
        a, b = self.factors()
        return a @ b if self.kind == "lora" else torch.kron(a, b)


@dataclass(frozen=True, eq=False)
class Adapters15:
    """A parsed 1.5 LoRA/LoKr file: adapters keyed by their module path in `AceStep15Model` (flat names are kept
    as `flat:<name>` until they meet a model), the PEFT adapter config (if any), its source and identity."""

    modules: Mapping[str, Adapter]
    adapter_config: Mapping[str, Any] | None
    source: str
    fingerprint: tuple

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], *, adapter_config: Mapping[str, Any] | None = None,
                        source: str = "<memory>", fingerprint: tuple | None = None) -> Adapters15:
        _check_config(adapter_config, source)
        modules = _parse(tensors, source)
        if fingerprint is None:
            fingerprint = ("content", _content_digest(tensors, adapter_config))
        return cls(modules, adapter_config, source, fingerprint)

    def scale(self, name: str) -> float:
        """The factor on top of the strength (see the module docstring)."""
        adapter = self.modules[name]
        config = self.adapter_config or {}
        if adapter.kind == "lokr":
            rank = adapter.rank
            if adapter.alpha is None or rank is None:
                return 1.0
            return adapter.alpha / rank
        rank = adapter.rank
        alpha = adapter.alpha
        key = name.split(":", 1)[-1]
        key = key[len("decoder."):] if key.startswith("decoder.") else key
        if alpha is None and config:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, key)
            if alpha is None:
                alpha = config.get("lora_alpha")
        if alpha is None:
            return 1.0
        if config.get("use_rslora", False):
            return float(alpha) / math.sqrt(rank)
        return float(alpha) / rank


def load_adapter_file(path: str | Path) -> Adapters15:
    """Read a 1.5 LoRA/LoKr: a PEFT adapter folder (adapter_model.safetensors + adapter_config.json), a folder with
    one .safetensors, or a .safetensors file (an adapter_config.json beside it is read too). Pickles are refused."""
    path = Path(path)
    if path.is_dir():
        file = path / PEFT_WEIGHTS
        if not file.is_file():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
            if len(found) != 1:
                pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                hint = f" (only pickles {pickles}: they can run code and are refused)" if pickles and not found else ""
                raise ValueError(f"LoRA folder {path}: expected {PEFT_WEIGHTS} or exactly one .safetensors file, "
                                 f"found {[p.name for p in found]}{hint}")
            file = found[0]
    else:
        file = path
    if not file.is_file():
        raise ValueError(f"LoRA path {path} does not exist: give a .safetensors file or a PEFT adapter folder")
    if file.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"LoRA file {file} is a pickle; pickles can run code and are refused: convert it to "
                         ".safetensors")
    header = _read_safetensors_header(file)
    metadata = header.get("__metadata__") or {}
    config = None
    for key in METADATA_KEYS:
        if key in metadata:
            config = _parse_adapter_config(metadata[key], file)
            break
    side = file.parent / PEFT_CONFIG
    if side.is_file():
        try:
            config = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{side}: not a readable adapter config ({exc})") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{side}: the adapter config must be a JSON object")
    from safetensors.torch import load_file

    tensors = load_file(str(file), device="cpu")
    stat = file.stat()
    return Adapters15.from_state_dict(tensors, adapter_config=config, source=str(file),
                                      fingerprint=(str(file.resolve()), stat.st_mtime_ns, stat.st_size,
                                                   side.stat().st_mtime_ns if side.is_file() else 0))


# ------------------------------------------------------------------------------------------------- parsing
def _check_config(config, source: str) -> None:
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise ValueError(f"LoRA {source}: adapter_config must be a mapping (PEFT LoraConfig)")
    values = {"lora_alpha": config.get("lora_alpha"), "r": config.get("r")}
    values.update({f"alpha_pattern[{k!r}]": v for k, v in (config.get("alpha_pattern") or {}).items()})
    for label, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise ValueError(f"LoRA {source}: {label} in the adapter config must be a positive number, got {v!r}")
    peft_type = config.get("peft_type")
    if peft_type not in (None, "LORA"):
        raise ValueError(f"LoRA {source}: adapter type {peft_type!r} is not supported (LoRA and LyCORIS LoKr are)")
    if config.get("use_dora"):
        raise ValueError(f"LoRA {source}: DoRA adapters are not supported")


def _module_name(stem: str) -> str:
    for prefix, root, flat in _PREFIXES:
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            return f"flat:{(root.replace('.', '_') + rest)}" if flat else root + rest
    return stem


def _parse(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, Adapter]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    unknown, problems = [], []
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{key}: not a tensor")
            continue
        if key.endswith(_REFUSED):
            unknown.append(key)
            continue
        role = kind = None
        for table, k in ((_LORA_SUFFIXES, "lora"), (_LOKR_SUFFIXES, "lokr")):
            for suffix, r in table.items():
                if key.endswith(suffix):
                    role, kind, stem = r, k, key[: -len(suffix)]
        if role is None and key.endswith(".alpha"):
            role, stem = "alpha", key[: -len(".alpha")]
        if role is None:
            unknown.append(key)
            continue
        name = _module_name(stem)
        slot = parts.setdefault(name, {})
        if role in slot:
            problems.append(f"{name}: two '{role}' tensors")
        slot[role] = tensor
        if kind:
            kinds.setdefault(name, set()).add(kind)
    if unknown:
        problems.append(f"unsupported tensors (LoRA A/B and LoKr w1/w2 with alphas are supported; not Tucker "
                        f"LoKr, LoHa, DoRA, OFT, diffs or biases): {_shorten(sorted(unknown))}")
    modules: dict[str, Adapter] = {}
    for name, slot in sorted(parts.items()):
        alpha_t = slot.pop("alpha", None)
        k = kinds.get(name, set())
        if len(k) != 1:
            problems.append(f"{name}: " + ("mixes LoRA and LoKr tensors" if k else "has an alpha but no weights"))
            continue
        kind = k.pop()
        problem = _shape_problem(kind, slot)
        if problem is None:
            bad = [r for r, t in slot.items() if not t.is_floating_point() or not bool(torch.isfinite(t).all())]
            if bad:
                problem = f"tensors {bad} hold NaN/inf or are not floating point"
        alpha = None
        if problem is None and alpha_t is not None:
            if alpha_t.numel() != 1 or not bool(torch.isfinite(alpha_t.float()).all()) or float(alpha_t) <= 0:
                problem = f"alpha must be one positive finite number, got shape {tuple(alpha_t.shape)}"
            else:
                alpha = float(alpha_t.reshape(()).float())
        if problem is not None:
            problems.append(f"{name}: {problem}")
            continue
        modules[name] = Adapter(kind, dict(slot), alpha)
    if not modules and not problems:
        problems.append("no LoRA or LoKr tensors found")
    if problems:
        raise ValueError(f"LoRA {source} cannot be read: " + "; ".join(problems))
    return modules


def _shape_problem(kind: str, t: Mapping[str, torch.Tensor]) -> str | None:
    if kind == "lora":
        down, up = t.get("down"), t.get("up")
        if down is None or up is None:
            return f"has {sorted(t)} but needs both lora_A/lora_down and lora_B/lora_up"
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            return (f"A {tuple(down.shape)} and B {tuple(up.shape)} do not form a low-rank pair (need A [r, in], "
                    "B [out, r]; the 1.5 model has Linear layers only)")
        if not 1 <= down.shape[0] <= MAX_RANK:
            return f"rank {down.shape[0]} outside [1, {MAX_RANK}]"
        return None
    for side in ("w1", "w2"):
        full, a, b = t.get(side), t.get(side + "_a"), t.get(side + "_b")
        if full is not None and (a is not None or b is not None):
            return f"has both lokr_{side} and lokr_{side}_a/_b"
        if full is None and (a is None or b is None):
            return f"needs lokr_{side} or both lokr_{side}_a and lokr_{side}_b"
        if full is not None and full.ndim != 2:
            return f"lokr_{side} must be a matrix, got {tuple(full.shape)} (convolution LoKr is not for this model)"
        if full is None and (a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]):
            return f"lokr_{side}_a {tuple(a.shape)} and lokr_{side}_b {tuple(b.shape)} do not multiply"
        if full is None and not 1 <= b.shape[0] <= MAX_RANK:
            return f"lokr_{side} rank {b.shape[0]} outside [1, {MAX_RANK}]"
    return None


# ------------------------------------------------------------------------------------------------ patching
def _check_list(adapters) -> list[tuple[Adapters15, float]]:
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise ValueError("loras must be a list of (Adapters15, strength) pairs")
    out = []
    for i, item in enumerate(adapters):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Adapters15)):
            raise ValueError(f"loras[{i}] must be an (Adapters15, strength) pair (see load_adapter_file)")
        s = item[1]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or abs(s) > MAX_STRENGTH:
            raise ValueError(f"loras[{i}] strength must be a finite number in [-{MAX_STRENGTH}, {MAX_STRENGTH}], "
                             f"got {s!r}")
        out.append((item[0], float(s)))
    return out


def signature(adapters) -> tuple:
    """Hashable identity of a set (files, strengths); () means the base weights."""
    return tuple((a.fingerprint, s) for a, s in _check_list(adapters) if s != 0.0)


def _plan(model: nn.Module, adapters) -> dict[str, tuple[nn.Module, list[tuple[Adapter, float]]]]:
    checked = _check_list(adapters)
    modules = dict(model.named_modules())
    flat: dict[str, str | None] = {}
    for name in modules:
        key = name.replace(".", "_")
        flat[key] = None if key in flat else name
    plan: dict[str, tuple[nn.Module, list[tuple[Adapter, float]]]] = {}
    unknown, misfits = [], []
    for lora, strength in checked:
        for name, adapter in lora.modules.items():
            path = flat.get(name[5:]) if name.startswith("flat:") else (name if name in modules else None)
            if path is None:
                unknown.append(f"{name.removeprefix('flat:')} ({lora.source})")
                continue
            module = modules[path]
            if not isinstance(module, nn.Linear):
                misfits.append(f"{path}: is {type(module).__name__}, not a Linear layer ({lora.source})")
                continue
            w = module.weight
            if w.device.type == "meta" or not w.is_floating_point():
                misfits.append(f"{path}: weights not loaded ({w.device}, {w.dtype})")
                continue
            out_f, in_f = adapter.out_in()
            if (out_f, in_f) != tuple(w.shape):
                misfits.append(f"{path}: {adapter.kind} gives [{out_f}, {in_f}], the weight is {tuple(w.shape)} "
                               f"({lora.source})")
                continue
            if strength != 0.0:
                plan.setdefault(path, (module, []))[1].append((adapter, strength * lora.scale(name)))
    if unknown or misfits:
        lines = []
        if unknown:
            lines.append(f"{len(unknown)} module(s) not in this ACE-Step 1.5 model: {_shorten(unknown)}")
        if misfits:
            lines.append(f"{len(misfits)} module(s) that do not fit: {_shorten(misfits)}")
        raise ValueError("LoRA does not match this ACE-Step 1.5 model (a LoRA for v1 or another model size?); "
                         "nothing was applied. " + " | ".join(lines))
    return plan


def apply_adapters(model: nn.Module, adapters: Sequence[tuple[Adapters15, float]]) -> LoraPatch:
    """Add Σ strength·scale·ΔW to each targeted weight of `model` (the AceStep15Model container) in place; every
    adapter is checked first, so a ValueError leaves the model untouched. `remove()` on the result restores the
    base weights bit for bit. Patches must be removed in the reverse order of their application."""
    plan = _plan(model, adapters)
    return _execute(plan, signature(adapters), delta=lambda adapter, weight: adapter.delta().to(weight.device))


_APPLIED: "weakref.WeakKeyDictionary[nn.Module, LoraPatch]" = weakref.WeakKeyDictionary()


def ensure_adapters(model: nn.Module, adapters: Sequence[tuple[Adapters15, float]]) -> bool:
    """Make exactly `adapters` applied to `model` (one set per model, as a node re-run wants): nothing happens when
    that set is already applied; otherwise the new set is checked, the old one removed (exact base weights) and the
    new one applied. Returns whether the weights changed. An empty list (or all strengths 0) restores the base."""
    wanted = signature(adapters)
    current = _APPLIED.get(model)
    if (current.signature if current is not None else ()) == wanted:
        return False
    _plan(model, adapters)  # a bad set raises here, before the applied one is touched
    if current is not None:
        current.remove()
        del _APPLIED[model]
    if wanted:
        _APPLIED[model] = apply_adapters(model, adapters)
    return True


def decoder_keys_peft(model: nn.Module) -> list[str]:
    """Official PEFT names (`base_model.model.<decoder path>`) of the decoder's Linear layers, for writers/tests."""
    return [f"base_model.model.{n}" for n, m in model.decoder.named_modules() if isinstance(m, nn.Linear)]


def comfy_key(path: str, style: str = "peft") -> str:
    """The module stem ComfyUI maps to model path `path` ("decoder.layers.0.self_attn.q_proj"): style "peft"
    (`base_model.model.` + decoder path), "lycoris" (`lycoris_` + flat decoder path), "diffusion_model" or
    "lora_unet"."""
    if style in ("peft", "lycoris"):
        if not path.startswith("decoder."):
            raise ValueError(f"{style} names cover the decoder only, got {path!r}")
        rest = path[len("decoder."):]
        return f"base_model.model.{rest}" if style == "peft" else "lycoris_" + rest.replace(".", "_")
    if style == "diffusion_model":
        return "diffusion_model." + path
    if style == "lora_unet":
        return "lora_unet_" + path.replace(".", "_")
    raise ValueError(f"style must be peft, lycoris, diffusion_model or lora_unet, got {style!r}")

