"""ComfyUI's repackaged ACE-Step 1.5 files: which file is what, judged by tensor names and shapes (headers only).

Comfy-Org publishes them as `Comfy-Org/ace_step_1.5_ComfyUI_files`: `split_files/diffusion_models/acestep_v1.5_*.safetensors`
(the DiT), `split_files/text_encoders/qwen_0.6b_ace15.safetensors` (the Qwen3-Embedding-0.6B text encoder, beside
the 1.7B / 4B audio-code LMs `qwen_1.7b_ace15` / `qwen_4b_ace15` that this pack does not use),
`split_files/vae/ace_1.5_vae.safetensors` (the 48 kHz Oobleck VAE in stable-audio-tools names), and all-in-one files
`checkpoints/ace_step_1.5_*_aio.safetensors`. Names and detection keys: tests/data/real-keys-15/comfyui-repack.md
(ComfyUI `comfy/model_detection.py`, `comfy/sd.py`).

A split DiT file needs a text encoder and a VAE from other files: `pick_text_encoder` and `pick_vae` choose them
among candidate files by their weights, or raise one CheckpointError naming the folder and the file to download.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..errors import CheckpointError
from ..loading import _file_shapes, _refuse_non_safetensors
from .loading import V15_MARKER, VAE_COMFY_MARKER, VAE_DIFFUSERS_MARKER

COMFY_REPO = "Comfy-Org/ace_step_1.5_ComfyUI_files"
TEXT_FILE = "qwen_0.6b_ace15.safetensors"
VAE_FILE = "ace_1.5_vae.safetensors"
TEXT_PROJECTOR = "encoder.text_projector.weight"
QWEN_NORM = "layers.0.self_attn.q_norm.weight"
QWEN_EMBED = "embed_tokens.weight"
# 48 kHz Oobleck (strides 2,4,4,6,10): this decoder conv has kernel 12; Stable Audio's 44.1 kHz VAE has 16 (sd.py).
VAE_RATE_KEYS = ("decoder.layers.2.layers.1.weight_v", "decoder.layers.2.layers.1.parametrizations.weight.original1")
VAE_RATE_KERNEL = 12

Shapes = Mapping[str, tuple[int, ...]]


def shapes_of(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a .safetensors file (header only)."""
    path = Path(path)
    _refuse_non_safetensors(path)
    return _file_shapes(path)


def dit_prefix(shapes: Shapes) -> str | None:
    """The prefix in front of the official DiT names ('' or 'model.diffusion_model.'), None without a 1.5 DiT."""
    marker = next((k for k in shapes if k.endswith(V15_MARKER)), None)
    return None if marker is None else marker[: -len(V15_MARKER)]


def text_width_wanted(shapes: Shapes) -> int:
    """The text encoder width a 1.5 DiT reads (in-features of encoder.text_projector: 1024 for the released ones)."""
    prefix = dit_prefix(shapes)
    shape = shapes.get(f"{prefix}{TEXT_PROJECTOR}") if prefix is not None else None
    if shape is None or len(shape) != 2:
        raise CheckpointError(f"no {TEXT_PROJECTOR} in the ACE-Step 1.5 DiT file; is it complete?")
    return int(shape[1])


def text_encoder_width(shapes: Shapes) -> int | None:
    """The width of the narrowest Qwen3 model in a file (names bare, under `model.` or an all-in-one prefix);
    None when the file holds no Qwen3 (ComfyUI sd.detect_te_model reads the same q_norm key)."""
    widths = [shape[1] for key, shape in shapes.items()
              if key.endswith(QWEN_EMBED) and len(shape) == 2
              and key[: -len(QWEN_EMBED)] + QWEN_NORM in shapes
              and key[: -len(QWEN_EMBED)] + "embed_tokens.bias" not in shapes]
    return min(widths) if widths else None


def is_vae48(shapes: Shapes) -> bool:
    """An Oobleck VAE at 48 kHz (ACE-Step 1.5's), bare names or under `vae.`; diffusers names count as well."""
    for prefix in ("", "vae."):
        if prefix + VAE_DIFFUSERS_MARKER in shapes:
            return True
        if prefix + VAE_COMFY_MARKER in shapes:
            kernel = next((shapes[prefix + k] for k in VAE_RATE_KEYS if prefix + k in shapes), None)
            return kernel is not None and kernel[-1] == VAE_RATE_KERNEL
    return False


def is_all_in_one(shapes: Shapes) -> bool:
    """A 1.5 file that also holds the VAE and the text encoder (ComfyUI's `*_aio` checkpoints)."""
    return dit_prefix(shapes) is not None and is_vae48(shapes) and text_encoder_width(shapes) is not None


def _pick(candidates: Iterable[Path], ok: Callable[[Shapes], bool], preferred: str) -> Path | None:
    """The first candidate whose header passes `ok`, the file with the preferred (Comfy-Org) name first."""
    files = sorted(candidates, key=lambda p: (p.name != preferred, str(p)))
    for file in files:
        try:
            shapes = shapes_of(file)
        except (CheckpointError, OSError):
            continue  # unreadable or not safetensors: not a candidate
        if ok(shapes):
            return file
    return None


def pick_text_encoder(dit_shapes: Shapes, candidates: Iterable[Path], folder: str,
                      model_name: str = "this ACE-Step 1.5 diffusion model") -> Path:
    """The Qwen3 text encoder whose width the DiT reads (never the 1.7B / 4B LM files) among `candidates`."""
    width = text_width_wanted(dit_shapes)
    found = _pick(candidates, lambda s: text_encoder_width(s) == width and dit_prefix(s) is None, TEXT_FILE)
    if found is None:
        raise CheckpointError(
            f"{model_name} needs its text encoder (Qwen3-Embedding-0.6B, width {width}): put "
            f"{TEXT_FILE} (from {COMFY_REPO}, split_files/text_encoders/) into {folder}; no such text encoder is "
            "there (qwen_1.7b / qwen_4b are the audio-code LMs, not used here)")
    return found


def pick_vae(candidates: Iterable[Path], folder: str, model_name: str = "this ACE-Step 1.5 diffusion model") -> Path:
    """The 48 kHz Oobleck VAE among `candidates`."""
    found = _pick(candidates, lambda s: is_vae48(s) and dit_prefix(s) is None, VAE_FILE)
    if found is None:
        raise CheckpointError(
            f"{model_name} needs the ACE-Step 1.5 VAE (48 kHz Oobleck): put {VAE_FILE} (from "
            f"{COMFY_REPO}, split_files/vae/) into {folder}; no such VAE is there")
    return found
