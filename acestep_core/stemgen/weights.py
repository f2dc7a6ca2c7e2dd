"""The StemGen file: one safetensors file holding the control branch and the LoRA of the main transformer.

Tensors
  control.<name>                       the `StemGenControl` state dict (`control.proj_in.*`,
                                       `control.control_in.*`, `control.timbre_proj.weight`,
                                       `control.transformer_blocks.{i}.*`, `control.control_out.{i}.*`)
  lora.<module path>.lora_A.weight     LoRA of the base transformer in the official naming (design §9) behind the
  lora.<module path>.lora_B.weight     prefix `lora.`; the training scale is folded into B, so strength 1.0
                                       with `ΔW = strength·B·A` reproduces the trained model
Header metadata
  "acestep_stemgen": JSON {"version": 1, "config": ControlConfig.to_json(), "lora": {"rank", "target_modules",
                     "trained_alpha", "scale_folded_into_lora_B"} or null, "training": {...}}
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..lora import LoraWeights
from ..models.transformer import AceStepTransformer
from ..safetensors_header import json_entry, metadata
from ..safetensors_header import read_header as read_safetensors_header
from .control import ControlConfig, StemGenControl

METADATA_KEY = "acestep_stemgen"
FORMAT_VERSION = 1
CONTROL_PREFIX = "control."
LORA_PREFIX = "lora."


@dataclass(frozen=True, eq=False)
class StemGenWeights:
    """A parsed StemGen file: config, control tensors, optional LoRA and the header info."""

    config: ControlConfig
    control: Mapping[str, Tensor]
    lora: LoraWeights | None
    info: Mapping[str, Any]
    source: str
    fingerprint: tuple  # (resolved path, mtime_ns, size): changes whenever the file does

    @property
    def task(self) -> str:
        """"stemgen" or "singing2accompaniment"."""
        return self.config.task

    def build_control(self, transformer: AceStepTransformer) -> StemGenControl:
        """The control branch on the transformer's device and dtype, checked against its sizes."""
        self.config.check_base(transformer.config)
        control = StemGenControl.from_state(self.config, self.control)
        parameter = next(transformer.parameters())
        return control.to(device=parameter.device, dtype=parameter.dtype).eval()


def read_header(path: str | Path) -> dict[str, Any] | None:
    """The parsed `acestep_stemgen` header entry of a safetensors file, or None when it has none."""
    path = Path(path)
    header = read_safetensors_header(path)
    text = None if header is None else metadata(header).get(METADATA_KEY)
    return json_entry(text, METADATA_KEY, f"StemGen file {path}")


def is_stemgen_file(path: str | Path) -> bool:
    """A .safetensors file with the StemGen header entry."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return read_header(path) is not None
    except ValueError:
        return False


def load_stemgen(path: str | Path) -> StemGenWeights:
    """Read a StemGen file written by `save_stemgen` (docs/stemgen.md)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"StemGen file {path} does not exist; train one with python -m acestep_core.stemgen.train")
    info = read_header(path)
    if info is None:
        raise ValueError(
            f"{path} is not a StemGen control file (no '{METADATA_KEY}' header); an ordinary LoRA goes into the "
            "ACE-Step LoRA Loader instead"
        )
    if info.get("version") != FORMAT_VERSION:
        raise ValueError(f"StemGen file {path} has format version {info.get('version')!r}; this code reads "
                         f"version {FORMAT_VERSION}")
    config = ControlConfig.from_json(info.get("config"))
    tensors = load_file(str(path), device="cpu")
    control = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
    lora_tensors = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    other = sorted(k for k in tensors if not k.startswith((CONTROL_PREFIX, LORA_PREFIX)))
    if other:
        raise ValueError(f"StemGen file {path} has tensors outside control./lora.: {other[:5]}")
    if not control:
        raise ValueError(f"StemGen file {path} holds no control.* tensors")
    stat = path.stat()
    lora = None
    if lora_tensors:
        lora = LoraWeights.from_state_dict(lora_tensors, source=f"{path} (lora.*)",
                                           fingerprint=(str(path.resolve()), stat.st_mtime_ns, stat.st_size, "lora"))
    return StemGenWeights(config=config, control=control, lora=lora, info=info, source=str(path),
                          fingerprint=(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


def save_stemgen(path: str | Path, control: StemGenControl, lora_tensors: Mapping[str, Tensor] | None = None, *,
                 lora_info: Mapping[str, Any] | None = None, training: Mapping[str, Any] | None = None) -> Path:
    """Write the control branch (+ official-format LoRA tensors, scale folded into B) as one safetensors file."""
    from safetensors.torch import save_file

    tensors = {CONTROL_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in control.state_dict().items()}
    for key, value in (lora_tensors or {}).items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"LoRA tensor {key!r} must end in .lora_A.weight or .lora_B.weight (official naming)")
        tensors[LORA_PREFIX + key] = value.detach().float().cpu().contiguous()
    info = {"version": FORMAT_VERSION, "config": control.config.to_json(),
            "lora": dict(lora_info) if lora_tensors else None, "training": dict(training or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(info)})
    tmp.replace(path)
    return path
