"""Model files for the loader combos: ACE-Step checkpoints and LoRAs on disk, and name -> path (docs/comfyui.md, ComfyUI facts §C5).

A combo lists names relative to their model folder (with "/"); a name resolves only if the same listing holds
it, so a crafted name can never point outside the model folders. Single .safetensors files are recognised by
their header (read once per file version): checkpoints by the transformer's `genre_embedder` key, LoRAs by a
`lora_A`/`lora_down` key, ACE-Step 1.5 files (ComfyUI's repackaged DiTs in `diffusion_models`, all-in-one files in
`checkpoints`) by `checkpoint_family`. Folders in the Hugging Face layout (the four component sub-folders) and LoRA folders
holding `pytorch_lora_weights.safetensors` are listed as one entry each.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..acestep_core.loading import ALL_COMPONENTS, LAYOUTS
from ..acestep_core.lora import OFFICIAL_FILENAME
from ..acestep_core.safetensors_header import header_bytes
from ..acestep_core.v15 import repack
from ..acestep_core.v15.loading import V15_MARKER, checkpoint_family
from . import bridge

CHECKPOINT_FOLDERS = tuple(LAYOUTS[c].folder for c in ALL_COMPONENTS)
CHECKPOINT_MARKERS = (b'"model.diffusion_model.genre_embedder.weight"',)
V15_MARKERS = (V15_MARKER.encode() + b'"',)  # a cheap pre-check before checkpoint_family
LORA_MARKERS = (b".lora_A.", b".lora_down.", b'"lora_unet_', b".lokr_w1")  # LoKr: ACE-Step 1.5 (LyCORIS)
MAX_DEPTH = 4


@functools.lru_cache(maxsize=4096)
def _header_has(path: str, mtime_ns: int, size: int, markers: tuple[bytes, ...]) -> bool:
    """Whether the safetensors JSON header of one file version contains any of `markers`."""
    header = header_bytes(path)
    return header is not None and any(m in header for m in markers)


def _file_has(path: Path, markers: tuple[bytes, ...]) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    return _header_has(str(path), stat.st_mtime_ns, stat.st_size, markers)


def is_checkpoint_file(path: Path) -> bool:
    """An all-in-one ACE-Step .safetensors file (ComfyUI layout)."""
    return path.suffix == bridge.SAFETENSORS and _file_has(path, CHECKPOINT_MARKERS)


@functools.lru_cache(maxsize=4096)
def _family(path: str, mtime_ns: int, size: int) -> str | None:
    """checkpoint_family of one file version (header only); None when unreadable."""
    try:
        return checkpoint_family(path)
    except Exception:  # not a readable safetensors file: not listed
        return None


def is_checkpoint15_file(path: Path) -> bool:
    """A .safetensors file holding an ACE-Step 1.5 DiT (ComfyUI's split diffusion model or an all-in-one file),
    told apart by its tensor names (`checkpoint_family`), not its file name."""
    if path.suffix != bridge.SAFETENSORS or not _file_has(path, V15_MARKERS):
        return False
    stat = path.stat()
    return _family(str(path), stat.st_mtime_ns, stat.st_size) == "1.5"


def is_checkpoint_folder(path: Path) -> bool:
    """A folder in the Hugging Face layout: the four component sub-folders."""
    return all((path / name).is_dir() for name in CHECKPOINT_FOLDERS)


def is_checkpoint15_folder(path: Path) -> bool:
    """An ACE-Step 1.5 folder: the main repo's layout (vae/, Qwen3-Embedding-0.6B/ and an acestep-v15-* DiT) or
    a DiT repo's folder (model.safetensors and config.json of an acestep-v15-* model)."""
    if (path / "vae").is_dir() and (path / "Qwen3-Embedding-0.6B").is_dir():
        return any((p / "config.json").is_file() for p in path.glob("acestep-v15*"))
    return path.name.startswith("acestep-v15") and (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def is_lora_file(path: Path) -> bool:
    """A .safetensors file with LoRA keys."""
    return path.suffix == bridge.SAFETENSORS and _file_has(path, LORA_MARKERS) and not _file_has(path, (b'"acestep_stemgen"',))


def is_lora_folder(path: Path) -> bool:
    """A folder as the official trainer saves it (pytorch_lora_weights.safetensors inside)."""
    return (path / OFFICIAL_FILENAME).is_file()


def scan(folders: Iterable[Path], file_ok: Callable[[Path], bool], folder_ok: Callable[[Path], bool]) -> dict[str, Path]:
    """Name (relative path with "/") -> path of every matching file or folder; the first folder wins a name."""
    found: dict[str, Path] = {}
    walked: set[str] = set()  # real paths of the folders listed under one base: a symlink loop is walked once

    def walk(base: Path, folder: Path, depth: int) -> None:
        real = os.path.realpath(folder)
        if real in walked:
            return
        walked.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            name = path.relative_to(base).as_posix()
            if entry.is_dir():
                if folder_ok(path):
                    found.setdefault(name, path)
                elif depth < MAX_DEPTH:
                    walk(base, path, depth + 1)
            elif file_ok(path):
                found.setdefault(name, path)

    for base in folders:
        if base.is_dir():
            walked.clear()
            walk(base, base, 1)
    return found


def checkpoints() -> dict[str, Path]:
    """ACE-Step checkpoints (v1 and 1.5 folders) in the `ace_step` folders, then all-in-one files in `checkpoints`."""
    def folder_ok(path: Path) -> bool:
        return is_checkpoint_folder(path) or is_checkpoint15_folder(path)

    found = scan(bridge.model_folders(bridge.ACE_STEP_CATEGORY), is_checkpoint_file, folder_ok)
    for name, path in scan(bridge.model_folders("checkpoints"), is_checkpoint_file, is_checkpoint_folder).items():
        found.setdefault(name, path)
    # ComfyUI's repackaged ACE-Step 1.5 files: split DiTs in `diffusion_models`, all-in-one files in `checkpoints`
    # (added after, so a name listed before keeps its path)
    for category in ("diffusion_models", "checkpoints"):
        for name, path in _files15(category, is_checkpoint15_file).items():
            found.setdefault(name, path)
    return found


def _files15(category: str, file_ok: Callable[[Path], bool]) -> dict[str, Path]:
    """Matching files of a category's folders, not descending into checkpoint folders (official layouts)."""
    def folder_ok(path: Path) -> bool:
        return is_checkpoint_folder(path) or is_checkpoint15_folder(path)

    return {name: path for name, path in scan(bridge.model_folders(category), file_ok, folder_ok).items()
            if path.is_file()}


def _folder_names(category: str) -> str:
    folders = bridge.model_folders(category)
    return " or ".join(str(f) for f in folders[:2]) or f"models/{category}"


def parts15(dit_file: Path) -> dict[str, Path]:
    """The text encoder, VAE and tokenizer a ComfyUI 1.5 file needs (`hub.load_bundle15` keywords): an all-in-one
    file holds the first two; a split DiT takes them from the `text_encoders` and `vae` folders, chosen by their
    weights (acestep_core/v15/repack.py). The Qwen3 tokenizer is the one ComfyUI ships. One ValueError naming
    what to put where when a part is missing."""
    shapes = repack.shapes_of(dit_file)
    parts: dict[str, Path] = {}
    if not repack.is_all_in_one(shapes):
        def safetensors(category: str) -> list[Path]:
            return list(_files15(category, lambda p: p.suffix == bridge.SAFETENSORS).values())

        name = f"{dit_file.name} (an ACE-Step 1.5 diffusion model)"
        parts["text_path"] = repack.pick_text_encoder(shapes, safetensors("text_encoders"),
                                                      _folder_names("text_encoders"), name)
        parts["vae_path"] = repack.pick_vae(safetensors("vae"), _folder_names("vae"), name)
    tokenizer = bridge.comfy_qwen_tokenizer()
    if tokenizer is None:
        raise ValueError(f"{dit_file.name}: ComfyUI's ACE-Step 1.5 files carry no tokenizer and ComfyUI's own Qwen "
                         "tokenizer (comfy/text_encoders/qwen25_tokenizer) was not found; update ComfyUI, or use the "
                         "official Ace-Step1.5 folder in models/ace_step instead")
    parts["tokenizer_folder"] = tokenizer
    return parts


def loras() -> dict[str, Path]:
    """LoRA files and official LoRA folders in the `loras` folders."""
    return scan(bridge.model_folders("loras"), is_lora_file, is_lora_folder)


def resolve(kind: str, name: str, listing: dict[str, Path]) -> Path:
    """The path of a listed name; a ValueError naming the input and what is available otherwise."""
    if name in listing:
        return listing[name]
    shown = ", ".join(sorted(listing)[:20]) or "nothing"
    raise ValueError(
        f"{kind} {name!r:.200} is not in the model folders (found: {shown}); pick a listed name, or put the file there "
        "and press R in the editor to refresh the list"
    )
