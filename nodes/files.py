"""Model files for the loader combos: ACE-Step checkpoints and LoRAs on disk, and name -> path (docs/comfyui.md, ComfyUI facts §C5).

A combo lists names relative to their model folder (with "/"); a name resolves only if the same listing holds
it, so a crafted name can never point outside the model folders. Single .safetensors files are recognised by
their header (read once per file version): checkpoints by the transformer's `genre_embedder` key, LoRAs by a
`lora_A`/`lora_down` key. Folders in the Hugging Face layout (the four component sub-folders) and LoRA folders
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
from . import bridge

CHECKPOINT_FOLDERS = tuple(LAYOUTS[c].folder for c in ALL_COMPONENTS)
CHECKPOINT_MARKERS = (b'"model.diffusion_model.genre_embedder.weight"',)
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
    return found


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
