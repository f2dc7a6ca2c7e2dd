"""Loading ACE-Step 1.5: the official Hugging Face layout and ComfyUI's repackaged files (safetensors only).

Official layout (acestep/model_downloader.py): the main repo `ACE-Step/Ace-Step1.5` holds `acestep-v15-turbo/`
(config.json, model.safetensors or a sharded index, silence_latent.pt), `vae/` (config.json,
diffusion_pytorch_model.safetensors) and `Qwen3-Embedding-0.6B/` (config.json, model.safetensors, tokenizer);
the other DiTs are separate repos (`ACE-Step/acestep-v15-{base,sft,xl-turbo,...}`) with the DiT folder's files
at their root. ComfyUI: `diffusion_models/*.safetensors` (official names, bare or under `model.diffusion_model.`),
`text_encoders/qwen_0.6b_ace15.safetensors` (Qwen3Model names under `model.`), `vae/ace_1.5_vae.safetensors`
(stable-audio-tools names), or one all-in-one file with `model.diffusion_model.`, `vae.`, `text_encoders.`.

`checkpoint_family` tells a v1 checkpoint from a 1.5 one by its tensor names, for the shared Loader node.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..loading import _file_shapes, _open, _read_tensor, _refuse_non_safetensors
from .config import AceStepConfig
from .model import AceStep15Model, model_from_state_dict
from .text_encoder import TextEncoder15, load_tokenizer, read_config, text_encoder_from_state_dict
from .vae import AudioVAE, OobleckConfig, vae_from_state_dict

MAIN_REPO = "ACE-Step/Ace-Step1.5"
DIT_REPOS = {
    "acestep-v15-turbo": MAIN_REPO,
    "acestep-v15-base": "ACE-Step/acestep-v15-base",
    "acestep-v15-sft": "ACE-Step/acestep-v15-sft",
    "acestep-v15-xl-turbo": "ACE-Step/acestep-v15-xl-turbo",
    "acestep-v15-xl-base": "ACE-Step/acestep-v15-xl-base",
    "acestep-v15-xl-sft": "ACE-Step/acestep-v15-xl-sft",
    "acestep-v15-turbo-shift1": "ACE-Step/acestep-v15-turbo-shift1",
    "acestep-v15-turbo-shift3": "ACE-Step/acestep-v15-turbo-shift3",
    "acestep-v15-turbo-continuous": "ACE-Step/acestep-v15-turbo-continuous",
}
VAE_FOLDER, TEXT_FOLDER = "vae", "Qwen3-Embedding-0.6B"
DIT_WEIGHTS, VAE_WEIGHTS, TEXT_WEIGHTS = "model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors"
SILENCE_FILES = ("silence_latent.safetensors", "silence_latent.pt")

# Detection keys (ComfyUI model_detection / sd.py use the same ones).
V15_MARKER = "encoder.lyric_encoder.layers.0.input_layernorm.weight"
V1_MARKER = "genre_embedder.weight"
DIT_PREFIXES = ("model.diffusion_model.", "model.model.", "net.")
VAE_DIFFUSERS_MARKER = "decoder.block.0.snake1.alpha"
VAE_COMFY_MARKER = "decoder.layers.1.layers.0.beta"

ProgressFn = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------- family
def family_of_keys(keys: Iterable[str]) -> str | None:
    """"1.5", "v1" or None from tensor names (any prefix)."""
    keys = list(keys)
    if any(k.endswith(V15_MARKER) for k in keys):
        return "1.5"
    if any(k == V1_MARKER or k.endswith("." + V1_MARKER) for k in keys):
        return "v1"
    return None


def checkpoint_family(path: str | Path) -> str | None:
    """"1.5" or "v1" for a checkpoint file or folder, judged by its weights' names; None when neither.

    Folders: the official 1.5 layouts (main repo or a DiT repo) and v1's `ace_step_transformer/` folder.
    """
    path = Path(path)
    if path.is_file():
        _refuse_non_safetensors(path)
        return family_of_keys(_file_shapes(path))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    for candidate in _dit_weight_files(path) + sorted((path / "ace_step_transformer").glob("*.safetensors")):
        family = family_of_keys(_index_or_file_keys(candidate))
        if family:
            return family
    return None


# ---------------------------------------------------------------------------------------------- reading
def _index_or_file_keys(file: Path) -> list[str]:
    if file.name.endswith(".index.json"):
        return list(_read_index(file))
    return list(_file_shapes(file))


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
    return {k: index.parent / v for k, v in weight_map.items()}


def _dit_weight_files(folder: Path) -> list[Path]:
    """DiT weight files of a folder: itself (a DiT repo) or its acestep-v15-* sub-folders (the main repo)."""
    found = []
    for f in [folder, *sorted(p for p in folder.glob("acestep-v15*") if p.is_dir())]:
        if (f / DIT_WEIGHTS).is_file():
            found.append(f / DIT_WEIGHTS)
        elif (f / (DIT_WEIGHTS + ".index.json")).is_file():
            found.append(f / (DIT_WEIGHTS + ".index.json"))
    return found


def read_tensors(
    files: Mapping[str, Path],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    label: str = "weights",
) -> dict[str, torch.Tensor]:
    """{name: file} -> {name: tensor}, floating tensors converted to `dtype` (default float32) as they are read."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(Path(file), []).append(name)
    total, done = len(files), 0
    for file, names in by_file.items():
        _refuse_non_safetensors(file)
        with _open(file) as f:
            for name in names:
                out[name] = _read_tensor(f, file, name, dtype or torch.float32, torch.device(device))
                done += 1
                if progress is not None and (done % 64 == 0 or done == total):
                    progress(label, done, total)
    return out


def _file_map(weights: Path) -> dict[str, Path]:
    if weights.name.endswith(".index.json"):
        return _read_index(weights)
    return {k: weights for k in _file_shapes(weights)}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _strip_dit_prefix(keys: Iterable[str]) -> dict[str, str]:
    """official name -> file name, whatever DiT prefix the file uses."""
    keys = list(keys)
    marker = next((k for k in keys if k.endswith(V15_MARKER)), None)
    if marker is None:
        raise CheckpointError("no ACE-Step 1.5 DiT weights found (expected encoder.lyric_encoder.* tensors); "
                              "this is not a 1.5 diffusion model file")
    prefix = marker[: -len(V15_MARKER)]
    if prefix and prefix not in DIT_PREFIXES:
        raise CheckpointError(f"unexpected prefix {prefix!r} in front of the 1.5 DiT tensor names")
    roots = ("decoder.", "encoder.", "tokenizer.", "detokenizer.", "null_condition_emb")
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(roots)}


# ---------------------------------------------------------------------------------------------- components
@dataclass
class AceStep15Checkpoint:
    """What was loaded; components not asked for are None."""

    model: AceStep15Model | None = None
    vae: AudioVAE | None = None
    text_encoder: TextEncoder15 | None = None
    silence_latent: torch.Tensor | None = None  # [1, T, 64]
    config: AceStepConfig | None = None
    sources: dict[str, str] = field(default_factory=dict)


def variant_from_name(name: str) -> str | None:
    """"turbo" / "base" / "sft" from a folder or file name (weights cannot tell them apart)."""
    low = name.lower()
    for variant in ("sft", "base", "turbo"):
        if variant in low:
            return variant
    return None


def load_dit(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    model_version: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[AceStep15Model, str]:
    """The 1.5 DiT from a DiT folder (config.json + model.safetensors[.index.json]) or a single .safetensors
    file (ComfyUI split or all-in-one). Returns (model, source path)."""
    path = Path(path)
    config_dict = None
    if path.is_dir():
        files = _dit_weight_files(path)
        if not files:
            raise CheckpointError(f"{path}: no ACE-Step 1.5 DiT here (expected {DIT_WEIGHTS} or an acestep-v15-*"
                                  " sub-folder holding it)")
        weights = files[0]
        config_dict = _read_json(weights.parent / "config.json")
        file_map = _file_map(weights)
        name_source = weights.parent.name
    else:
        _refuse_non_safetensors(path)
        weights = path
        file_map = {k: path for k in _file_shapes(path)}
        name_source = path.stem
    names = _strip_dit_prefix(file_map)
    version = model_version
    if version is None and not (config_dict and ("model_version" in config_dict or "is_turbo" in config_dict)):
        version = variant_from_name(name_source)  # the weights cannot tell turbo, base and sft apart
    # Read only the DiT tensors (an all-in-one file also holds the VAE and text encoder).
    raw = read_tensors({v: file_map[v] for v in names.values()}, dtype, device, progress, "diffusion model")
    state = {official: raw[file_key] for official, file_key in names.items()}
    try:
        config = (AceStepConfig.from_weights({k: tuple(v.shape) for k, v in state.items()}, config_dict,
                                             model_version=version))
        model = model_from_state_dict(state, config, dtype=dtype, device=device)
    except ValueError as exc:
        raise CheckpointError(f"{weights}: {exc}") from exc
    return model, str(weights)


def load_silence_latent(folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, channels: int = 64) -> torch.Tensor | None:
    """The official silence latent of a DiT folder as [1, T, channels], or None when the folder has none.

    `silence_latent.pt` is a plain tensor [1, 64, T] read with torch.load(weights_only=True), which refuses
    anything but tensors (no code can run); a `silence_latent.safetensors` (key `silence_latent`) is preferred.
    """
    folder = Path(folder)
    tensor = None
    st = folder / SILENCE_FILES[0]
    pt = folder / SILENCE_FILES[1]
    if st.is_file():
        with _open(st) as f:
            if "silence_latent" not in f.keys():
                raise CheckpointError(f"{st}: no 'silence_latent' tensor")
            tensor = f.get_tensor("silence_latent")
    elif pt.is_file():
        try:
            tensor = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{pt}: not a plain tensor file ({exc}); download it again") from exc
    else:
        return None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim != 3 \
            or tensor.shape[0] != 1 or tensor.shape[1] != channels:
        raise CheckpointError(f"silence latent in {folder} must be a float [1, {channels}, T] tensor, got "
                              f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    tensor = tensor.transpose(1, 2)  # official file layout [1, 64, T]; the model wants [1, T, 64]
    return tensor.to(device=device, dtype=dtype).contiguous()


@torch.no_grad()
def silence_latent_from_vae(vae: AudioVAE, frames: int = 15000, chunk_frames: int = 750) -> torch.Tensor:
    """Fallback silence latent [1, frames, 64] for layouts without silence_latent.pt (ComfyUI files): the VAE
    posterior mean of digital silence. Not the official file's numbers; the official file is used when present."""
    if frames < 1:
        raise ValueError(f"silence latent frames must be >= 1, got {frames}")
    hop = vae.hop_length
    one = vae.encode(torch.zeros(1, vae.config.audio_channels, chunk_frames * hop), sample=False)
    reps = -(-frames // one.shape[-1])
    return one.repeat(1, 1, reps)[:, :, :frames].transpose(1, 2).contiguous()


def load_vae(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             progress: ProgressFn | None = None) -> tuple[AudioVAE, str]:
    """The 1.5 VAE from a `vae/` folder, a diffusers/ComfyUI .safetensors file, or an all-in-one file."""
    path = Path(path)
    config = None
    if path.is_dir():
        folder = path / VAE_FOLDER if (path / VAE_FOLDER).is_dir() else path
        file = folder / VAE_WEIGHTS
        if not file.is_file():
            raise CheckpointError(f"{folder}: no {VAE_WEIGHTS} (the 1.5 VAE folder is vae/ of {MAIN_REPO})")
        config = _read_json(folder / "config.json")
    else:
        _refuse_non_safetensors(path)
        file = path
    keys = list(_file_shapes(file))
    prefix = ""
    if any(k.startswith("vae.") for k in keys) and not any(k.startswith(("encoder.", "decoder.")) for k in keys):
        prefix = "vae."
    names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if not any(k.endswith(VAE_DIFFUSERS_MARKER) or k.endswith(VAE_COMFY_MARKER) for k in names):
        raise CheckpointError(f"{file}: no Oobleck VAE tensors (ACE-Step 1.5 uses the 48 kHz Oobleck VAE)")
    raw = read_tensors({v: file for v in names.values()}, dtype, device, progress, "VAE")
    try:
        cfg = OobleckConfig.from_dict(config) if config else None
        vae = vae_from_state_dict({k: raw[v] for k, v in names.items()}, cfg, dtype=dtype, device=device)
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc
    return vae, str(file)


def load_text_encoder(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      progress: ProgressFn | None = None, tokenizer_folder: str | Path | None = None
                      ) -> tuple[TextEncoder15, str]:
    """Qwen3-Embedding-0.6B from its folder (tokenizer included), a ComfyUI file, or an all-in-one file.

    A ComfyUI file carries no tokenizer: pass `tokenizer_folder` (any folder with the Qwen3 tokenizer files).
    """
    path = Path(path)
    config = None
    tokenizer = None
    if path.is_dir():
        folder = path / TEXT_FOLDER if (path / TEXT_FOLDER).is_dir() else path
        file = folder / TEXT_WEIGHTS
        if not file.is_file():
            raise CheckpointError(f"{folder}: no {TEXT_WEIGHTS} (the text encoder folder is {TEXT_FOLDER}/ of "
                                  f"{MAIN_REPO})")
        config = read_config(folder)
        if tokenizer_folder is None and ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            tokenizer_folder = folder
    else:
        _refuse_non_safetensors(path)
        file = path
    shapes = _file_shapes(file)
    prefix = _text_prefix(shapes, file)
    names = {k[len(prefix):]: k for k in shapes if k.startswith(prefix)}
    raw = read_tensors({v: file for v in names.values()}, dtype, device, progress, "text encoder")
    if tokenizer_folder is not None:
        tokenizer = load_tokenizer(tokenizer_folder)
    try:
        enc = text_encoder_from_state_dict({k: raw[v] for k, v in names.items()}, config, dtype=dtype,
                                           device=device, tokenizer=tokenizer)
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc
    return enc, str(file)


def _text_prefix(shapes: Mapping[str, tuple[int, ...]], file: Path) -> str:
    """The name prefix in front of Qwen3Model names: '' (official), 'model.' (ComfyUI) or an all-in-one one."""
    candidates = [k[: -len("embed_tokens.weight")] for k, s in shapes.items()
                  if k.endswith("embed_tokens.weight") and len(s) == 2]
    # Qwen3 has q_norm; its embed_tokens is an nn.Embedding (no bias), unlike the DiT's Linear embed_tokens.
    candidates = [p for p in candidates
                  if p + "layers.0.self_attn.q_norm.weight" in shapes and p + "embed_tokens.bias" not in shapes]
    if not candidates:
        raise CheckpointError(f"{file}: no Qwen3 text encoder (embed_tokens + layers.N.self_attn.q_norm) found")
    # An all-in-one file may also hold the 1.7B/4B audio-code LM: the embedder is the narrowest Qwen3 there.
    return min(candidates, key=lambda p: (shapes[p + "embed_tokens.weight"][1], len(p)))


def load_acestep15(
    path: str | Path,
    components: Iterable[str] = ("dit", "vae", "text"),
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    model_version: str | None = None,
    vae_path: str | Path | None = None,
    text_path: str | Path | None = None,
    tokenizer_folder: str | Path | None = None,
    progress: ProgressFn | None = None,
    silence_fallback: bool = True,
) -> AceStep15Checkpoint:
    """Load the asked components from the official main-repo folder, a DiT repo folder (with `vae_path` /
    `text_path` for the rest) or ComfyUI files (a split DiT file with `vae_path` / `text_path`, or one
    all-in-one file). The silence latent comes from the DiT folder, else from the VAE (see
    silence_latent_from_vae)."""
    comps = tuple(components)
    unknown = set(comps) - {"dit", "vae", "text"}
    if unknown:
        raise ValueError(f"unknown 1.5 components {sorted(unknown)}; choose from dit, vae, text")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    out = AceStep15Checkpoint()
    if "dit" in comps:
        out.model, out.sources["dit"] = load_dit(path, dtype, device, model_version, progress)
        out.config = out.model.config
        dit_folder = Path(out.sources["dit"]).parent
        out.silence_latent = load_silence_latent(dit_folder, device, dtype or torch.float32,
                                                 out.config.audio_acoustic_hidden_dim) if path.is_dir() else None
    if "vae" in comps:
        out.vae, out.sources["vae"] = load_vae(vae_path or path, dtype, device, progress)
        if out.model is not None and out.silence_latent is None and silence_fallback:
            out.silence_latent = silence_latent_from_vae(out.vae).to(dtype or torch.float32)
    if "text" in comps:
        out.text_encoder, out.sources["text"] = load_text_encoder(text_path or path, dtype, device, progress,
                                                                  tokenizer_folder)
    return out


def config_dict_for(model: AceStep15Model) -> dict[str, Any]:
    """The config.json content describing a loaded model (official field names)."""
    return model.config.to_dict()
