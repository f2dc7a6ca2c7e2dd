"""LoRA for the ACE-Step transformer: read safetensors LoRA files, patch weights in place reversibly (design §9).

Scale semantics. The official pipeline (diffusers `load_lora_adapter` without the header metadata) and ComfyUI
both apply ``ΔW = strength · B·A``: alpha and rsLoRA are ignored. That is the default here (parity with the
fixtures). ``honour_alpha=True`` applies the training-time scale instead: ``alpha / r`` (``alpha / √r`` with
rsLoRA), alpha taken from a per-module ``.alpha`` tensor, else from the ``lora_adapter_metadata`` header
(``alpha_pattern`` then ``lora_alpha``), else ``alpha = r``.

Patching. `apply_loras` validates every LoRA against the model before it touches anything, then adds the summed
float32 deltas to each targeted weight (cast once to the weight's dtype), in place, so the Parameter objects stay
the same. The original of every touched weight is kept as a copy in CPU memory (no extra accelerator memory;
restoring is one host-to-device copy per weight) and `LoraPatch.remove` copies it back bit for bit. Patches on one
model must be removed in the reverse order of their application; `LoraState` / `ensure_loras` keep a single patch
per transformer and switch sets by removing before applying.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .safetensors_header import json_entry, read_header
from .validation import check_tensor_values

OFFICIAL_FILENAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Longest first: "model.diffusion_model." must win over "diffusion_model.".
NAME_PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"
DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight")
UP_SUFFIXES = (".lora_B.weight", ".lora_up.weight")
ALPHA_SUFFIX = ".alpha"
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One low-rank pair: ΔW = up @ down, with an optional per-module alpha (design §9)."""

    down: torch.Tensor  # A: [r, in] (Linear) or [r, in, *kernel] (Conv)
    up: torch.Tensor  # B: [out, r] (Linear) or [out, r, 1, ...] (Conv)
    alpha: float | None

    @property
    def rank(self) -> int:
        """r, the shared inner dimension of A and B."""
        return int(self.down.shape[0])


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A parsed LoRA: per-module pairs keyed by module path (known prefixes stripped), plus header metadata (design §9).

    Kohya-style entries keep their flat underscore name (e.g. ``transformer_blocks_0_attn_to_q``); they are
    resolved against the model's module names when applied.
    """

    modules: Mapping[str, LoraModule]
    adapter_config: Mapping[str, Any] | None  # parsed `lora_adapter_metadata` header (PEFT LoraConfig), if any
    source: str  # file path, or a label for in-memory LoRAs
    fingerprint: tuple  # hashable identity: (path, mtime_ns, size) for files, a content digest otherwise

    @classmethod
    def from_state_dict(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        adapter_config: Mapping[str, Any] | None = None,
        source: str = "<memory>",
        fingerprint: tuple | None = None,
    ) -> LoraWeights:
        """Parse `<prefix><module>.lora_A/lora_B/lora_down/lora_up.weight` and `.alpha` tensors (design §9)."""
        modules = _parse_modules(tensors, source)
        _check_adapter_config(adapter_config, source)
        if fingerprint is None:
            fingerprint = ("content", _content_digest(tensors, adapter_config))
        return cls(modules=modules, adapter_config=adapter_config, source=source, fingerprint=fingerprint)

    def scale(self, name: str, honour_alpha: bool) -> float:
        """Factor on top of the strength: 1 (official), else alpha/r, or alpha/√r with rsLoRA (design §9)."""
        if not honour_alpha:
            return 1.0
        module = self.modules[name]
        config = self.adapter_config or {}
        alpha = module.alpha
        if alpha is None:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name)
        if alpha is None:
            alpha = config.get("lora_alpha")
        if alpha is None:
            alpha = module.rank
        if config.get("use_rslora", False):
            return float(alpha) / math.sqrt(module.rank)
        return float(alpha) / module.rank


def load_lora_file(path: str | Path) -> LoraWeights:
    """Read a LoRA from a .safetensors file or a folder holding pytorch_lora_weights.safetensors (design §9)."""
    file = _resolve_lora_path(Path(path))
    header = _read_safetensors_header(file)
    metadata = header.get("__metadata__") or {}
    adapter_config = _parse_adapter_config(metadata.get(METADATA_KEY), file)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file), device="cpu")
    except Exception as err:  # SafetensorError: truncated or corrupt data behind a valid header
        raise ValueError(f"LoRA file {file} cannot be read as safetensors ({err}); it is truncated or corrupt") from None
    stat = file.stat()
    fingerprint = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    return LoraWeights.from_state_dict(
        tensors, adapter_config=adapter_config, source=str(file), fingerprint=fingerprint
    )


def lora_signature(loras: Sequence[tuple[LoraWeights, float]], *, honour_alpha: bool = False) -> tuple:
    """Hashable description of a LoRA set (file identities, strengths, scale mode); () means no change (design §9).

    Entries with strength 0 are left out: they do not change the model.
    """
    entries = tuple((lora.fingerprint, strength) for lora, strength in _check_lora_list(loras) if strength != 0.0)
    if not entries:
        return ()
    return (("honour_alpha", bool(honour_alpha)), entries)


class LoraPatch:
    """Weights changed in place by `apply_loras`, with CPU copies of their originals; `remove()` restores them."""

    def __init__(self, entries: list[tuple[str, nn.Parameter, torch.Tensor]], signature: tuple):
        self._entries = entries
        self.signature = signature
        self.module_names = tuple(name for name, _, _ in entries)

    @property
    def active(self) -> bool:
        """True until `remove()` has run."""
        return self._entries is not None

    def remove(self) -> None:
        """Copy every original weight back (bit for bit); calling it again does nothing."""
        if self._entries is None:
            return
        _restore(self._entries)
        self._entries = None

    def __enter__(self) -> LoraPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def apply_loras(
    transformer: nn.Module, loras: Sequence[tuple[LoraWeights, float]], *, honour_alpha: bool = False
) -> LoraPatch:
    """Add Σ strength·scale·B·A to each targeted weight in place; validates everything first (design §9)."""
    plan = _plan(transformer, loras, honour_alpha)
    return _execute(plan, lora_signature(loras, honour_alpha=honour_alpha))


class LoraState:
    """The LoRA set currently applied to one transformer; `ensure` switches to another set (design §9)."""

    def __init__(self, transformer: nn.Module):
        self._transformer = weakref.ref(transformer)
        self._patch: LoraPatch | None = None

    @property
    def signature(self) -> tuple:
        """`lora_signature` of the applied set; () when the transformer holds its base weights."""
        return self._patch.signature if self._patch is not None else ()

    def ensure(self, loras: Sequence[tuple[LoraWeights, float]], *, honour_alpha: bool = False) -> bool:
        """Make exactly `loras` applied (remove the old set, apply the new); returns whether anything changed.

        The new set is validated before the old one is removed, so a ValueError leaves the model as it was; a
        failure while patching (e.g. out of memory) leaves the base weights and signature ().
        """
        signature = lora_signature(loras, honour_alpha=honour_alpha)
        if signature == self.signature:
            return False
        transformer = self._transformer()
        if transformer is None:
            raise ValueError("LoraState: its transformer no longer exists; create a new state for the new model")
        plan = _plan(transformer, loras, honour_alpha)
        self.clear()
        if signature:
            self._patch = _execute(plan, signature)
        return True

    def clear(self) -> None:
        """Restore the base weights."""
        if self._patch is not None:
            self._patch.remove()
            self._patch = None


_STATES: weakref.WeakKeyDictionary[nn.Module, LoraState] = weakref.WeakKeyDictionary()


def lora_state(transformer: nn.Module) -> LoraState:
    """The one `LoraState` of this transformer (created on first use, dropped with the transformer)."""
    state = _STATES.get(transformer)
    if state is None:
        state = LoraState(transformer)
        _STATES[transformer] = state
    return state


def ensure_loras(
    transformer: nn.Module, loras: Sequence[tuple[LoraWeights, float]], *, honour_alpha: bool = False
) -> LoraState:
    """Make exactly `loras` applied to `transformer` (no work when that set is already applied) (design §9)."""
    state = lora_state(transformer)
    state.ensure(loras, honour_alpha=honour_alpha)
    return state


# ---------------------------------------------------------------------------------------------------------------
# file reading


def _resolve_lora_path(path: Path) -> Path:
    """The .safetensors file to read: the path itself, or the LoRA file inside a folder."""
    if path.is_dir():
        official = path / OFFICIAL_FILENAME
        if official.is_file():
            return official
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
        if len(candidates) == 1:
            return candidates[0]
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
        if not candidates and pickles:
            raise ValueError(
                f"LoRA folder {path} holds only pickle files {pickles}; pickles can run code and are refused: "
                "convert the LoRA to .safetensors"
            )
        if not candidates:
            raise ValueError(f"LoRA folder {path} has no {OFFICIAL_FILENAME} and no other .safetensors file")
        raise ValueError(
            f"LoRA folder {path} has no {OFFICIAL_FILENAME} but several .safetensors files "
            f"{[p.name for p in candidates]}: pass the file path instead"
        )
    if not path.is_file():
        raise ValueError(f"LoRA path {path} does not exist: give a .safetensors file or a folder holding one")
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"LoRA file {path} is a pickle ({path.suffix}); pickles can run code and are refused: "
            "convert the LoRA to .safetensors"
        )
    return path


def _read_safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; a clear ValueError for pickles and other formats."""
    header = read_header(file)
    if header is not None:
        return header
    with open(file, "rb") as handle:
        head = handle.read(2)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ValueError(
            f"LoRA file {file} is a torch.save/pickle file, not safetensors; pickles can run code and are "
            "refused: convert the LoRA to .safetensors"
        )
    raise ValueError(f"LoRA file {file} is not a safetensors file (no valid JSON header)")


def _parse_adapter_config(text: str | None, file: Path) -> dict[str, Any] | None:
    """The `lora_adapter_metadata` header entry as a dict (None when absent)."""
    return json_entry(text, METADATA_KEY, f"LoRA file {file}")


def _check_adapter_config(config: Mapping[str, Any] | None, source: str) -> None:
    """Check that the alphas of a PEFT LoraConfig (lora_alpha, alpha_pattern values) are positive numbers."""
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise ValueError(
            f"LoRA {source}: adapter_config must be a mapping (PEFT LoraConfig), got {type(config).__name__}"
        )
    alphas = {"lora_alpha": config.get("lora_alpha")}
    alphas.update({f"alpha_pattern[{k!r}]": v for k, v in (config.get("alpha_pattern") or {}).items()})
    for label, alpha in alphas.items():
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
            raise ValueError(f"LoRA {source}: {label} in the adapter metadata must be a positive number, got {alpha!r}")


# ---------------------------------------------------------------------------------------------------------------
# parsing tensor names


def _strip_prefix(name: str) -> str:
    """Module path without a known checkpoint prefix; kohya names keep their flat underscore form."""
    for prefix in NAME_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    if name.startswith(KOHYA_PREFIX):
        return name[len(KOHYA_PREFIX):]
    return name


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, role) with role in down/up/alpha, or None for an unrecognised tensor."""
    for role, suffixes in (("down", DOWN_SUFFIXES), ("up", UP_SUFFIXES), ("alpha", (ALPHA_SUFFIX,))):
        for suffix in suffixes:
            if key.endswith(suffix):
                return _strip_prefix(key[: -len(suffix)]), role
    return None


def _parse_modules(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, LoraModule]:
    """Group LoRA tensors per module and check that each module has a consistent A/B pair."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    problems: list[str] = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, role = split
        slot = parts.setdefault(name, {})
        if role in slot:
            problems.append(f"{name}: two '{role}' tensors (e.g. {key}) after stripping prefixes")
        slot[role] = tensor
    if unknown:
        problems.append(
            f"unsupported tensors (only LoRA A/B pairs and alphas are supported, not DoRA/LoKr/LoHa/biases/diffs): "
            f"{_shorten(sorted(unknown))}"
        )
    modules: dict[str, LoraModule] = {}
    for name, slot in sorted(parts.items()):
        down, up, alpha = slot.get("down"), slot.get("up"), slot.get("alpha")
        if down is None or up is None:
            problems.append(f"{name}: has {sorted(slot)} but needs both lora_A/lora_down and lora_B/lora_up")
            continue
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0] or any(s != 1 for s in up.shape[2:]):
            problems.append(
                f"{name}: A {tuple(down.shape)} and B {tuple(up.shape)} do not form a low-rank pair "
                "(need A [r, in, ...], B [out, r, 1, ...])"
            )
            continue
        if down.shape[0] == 0:
            problems.append(f"{name}: rank 0 (A {tuple(down.shape)}, B {tuple(up.shape)}): the pair changes nothing")
            continue
        if not (down.is_floating_point() and up.is_floating_point()):
            problems.append(f"{name}: A/B must be floating point, got {down.dtype}/{up.dtype}")
            continue
        try:
            for role, tensor in (("A", down), ("B", up)):
                check_tensor_values(tensor, f"{name} {role}")
        except ValueError as err:
            problems.append(str(err))
            continue
        alpha_value = None
        if alpha is not None:
            if alpha.numel() != 1:
                problems.append(f"{name}: alpha must be a scalar, got shape {tuple(alpha.shape)}")
                continue
            alpha_value = float(alpha.reshape(()).item())
            if not math.isfinite(alpha_value):
                problems.append(f"{name}: alpha must be a finite number, got {alpha_value}")
                continue
        modules[name] = LoraModule(down=down, up=up, alpha=alpha_value)
    if not modules and not problems:
        problems.append("no LoRA tensors found")
    if problems:
        raise ValueError(f"LoRA {source} cannot be read: " + "; ".join(problems))
    return modules


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Any:
    """PEFT-style pattern lookup: a key matches when it matches the end of the module path at a dot boundary."""
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error as err:
            raise ValueError(f"LoRA metadata alpha_pattern key {pattern!r} is not a valid pattern ({err})") from None
        if matched:
            return value
    return None


def _content_digest(tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any] | None) -> str:
    """sha256 over names, dtypes, shapes, bytes and config: the identity of an in-memory LoRA."""
    digest = hashlib.sha256(json.dumps(adapter_config, sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _shorten(items: Sequence[str]) -> str:
    """At most MAX_LISTED_PROBLEMS items, then a count of the rest."""
    shown = ", ".join(items[:MAX_LISTED_PROBLEMS])
    rest = len(items) - MAX_LISTED_PROBLEMS
    return shown + (f" ... and {rest} more" if rest > 0 else "")


# ---------------------------------------------------------------------------------------------------------------
# validation and patching


def _check_lora_list(loras: Sequence[tuple[LoraWeights, float]]) -> list[tuple[LoraWeights, float]]:
    """Check the (LoraWeights, strength) list; strengths become Python floats."""
    if isinstance(loras, (str, bytes)) or not isinstance(loras, Sequence):
        raise ValueError(f"loras must be a list of (LoraWeights, strength) pairs, got {type(loras).__name__}")
    checked = []
    for index, item in enumerate(loras):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], LoraWeights)):
            raise ValueError(f"loras[{index}] must be a (LoraWeights, strength) pair, got {item!r:.80}")
        strength = item[1]
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"loras[{index}] strength must be a finite number, got {strength!r}")
        checked.append((item[0], float(strength)))
    return checked


def _flat_names(modules: Mapping[str, nn.Module]) -> dict[str, str | None]:
    """Kohya flat name (dots -> underscores) -> module path; None where two paths flatten alike."""
    flat: dict[str, str | None] = {}
    for name in modules:
        key = name.replace(".", "_")
        flat[key] = None if key in flat else name
    return flat


def _module_problem(name: str, module: nn.Module, pair: LoraModule) -> str | None:
    """Why `pair` cannot patch `module`, or None when it fits."""
    if not isinstance(module, SUPPORTED_LAYERS):
        return f"{name}: is {type(module).__name__}, LoRA supports Linear/Conv1d/Conv2d"
    weight = module.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        return f"{name}: weight is {weight.dtype} on {weight.device}; load real floating-point weights first"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        return f"{name}: grouped convolution (groups={module.groups}) is not supported"
    rank = pair.rank
    want_down = (rank, *weight.shape[1:])
    want_up = (weight.shape[0], rank, *([1] * (weight.ndim - 2)))
    if tuple(pair.down.shape) != want_down or tuple(pair.up.shape) != want_up:
        return (
            f"{name}: LoRA A {tuple(pair.down.shape)} / B {tuple(pair.up.shape)} do not fit weight "
            f"{tuple(weight.shape)} (need A {want_down}, B {want_up})"
        )
    return None


def _plan(
    transformer: nn.Module, loras: Sequence[tuple[LoraWeights, float]], honour_alpha: bool
) -> dict[str, tuple[nn.Module, list[tuple[LoraModule, float]]]]:
    """Module path -> (module, [(pair, strength·scale)]) for every non-zero LoRA; ValueError listing every misfit."""
    checked = _check_lora_list(loras)
    modules = dict(transformer.named_modules())
    flat = _flat_names(modules)
    plan: dict[str, tuple[nn.Module, list[tuple[LoraModule, float]]]] = {}
    unknown: list[str] = []
    misfits: list[str] = []
    for lora, strength in checked:
        for name, pair in lora.modules.items():
            path = name if name in modules else flat.get(name)
            if path is None:
                unknown.append(f"{name} ({lora.source})")
                continue
            problem = _module_problem(path, modules[path], pair)
            if problem is not None:
                misfits.append(f"{problem} ({lora.source})")
                continue
            if strength != 0.0:
                plan.setdefault(path, (modules[path], []))[1].append((pair, strength * lora.scale(name, honour_alpha)))
    if unknown or misfits:
        lines = []
        if unknown:
            lines.append(f"{len(unknown)} LoRA module(s) not in this transformer: {_shorten(unknown)}")
        if misfits:
            lines.append(f"{len(misfits)} LoRA module(s) that do not fit: {_shorten(misfits)}")
        raise ValueError(
            "LoRA does not match this ACE-Step transformer (a LoRA for another model?); nothing was applied. "
            + " | ".join(lines)
        )
    return plan


def _delta(pair: LoraModule, weight: torch.Tensor) -> torch.Tensor:
    """B·A in float32 on the weight's device, shaped like the weight."""
    rank = pair.rank
    down = pair.down.to(device=weight.device, dtype=torch.float32).reshape(rank, -1)
    up = pair.up.to(device=weight.device, dtype=torch.float32).reshape(-1, rank)
    return (up @ down).reshape(weight.shape)


def _execute(plan: dict[str, tuple[nn.Module, list[tuple[Any, float]]]], signature: tuple,
             delta: Callable[[Any, torch.Tensor], torch.Tensor] | None = None) -> LoraPatch:
    """Patch the planned weights with Σ factor·delta(term, weight) (float32; default: a LoRA pair's B·A); if
    anything fails midway, restore what was patched and re-raise. ACE-Step 1.5 adapters pass their own delta."""
    delta = delta or _delta
    entries: list[tuple[str, nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for path, (module, terms) in plan.items():
                weight = module.weight
                total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                for term, factor in terms:
                    total.add_(delta(term, weight), alpha=factor)
                backup = weight.detach().to("cpu", copy=True)
                patched = (weight.detach().to(torch.float32) + total).to(weight.dtype)
                if not bool(torch.isfinite(patched).all()):
                    raise ValueError(
                        f"LoRA makes weight {path} non-finite (its A·B times strength and alpha scale overflow "
                        f"{weight.dtype}); nothing was applied. Lower the strength or check the LoRA file"
                    )
                entries.append((path, weight, backup))
                weight.copy_(patched)
    except BaseException:
        _restore(entries)
        raise
    return LoraPatch(entries, signature)


def _restore(entries: list[tuple[str, nn.Parameter, torch.Tensor]]) -> None:
    """Copy each backup into its weight."""
    with torch.no_grad():
        for _, weight, backup in entries:
            weight.copy_(backup)
