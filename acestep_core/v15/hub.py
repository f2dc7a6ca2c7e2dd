"""ACE-Step 1.5 checkpoints by folder, file or Hugging Face repo id: the known repos, what to download from each,
and where the DiT, VAE and text encoder of a local layout are.

Layouts (official `acestep/model_downloader.py`): the main repo `ACE-Step/Ace-Step1.5` holds `acestep-v15-turbo/`,
`vae/` and `Qwen3-Embedding-0.6B/` (and 5 Hz LM folders we do not fetch); every other DiT is its own repo with the
DiT files at its root, downloaded by the official code into a folder named after it beside the main repo's folders
(`checkpoints/acestep-v15-base/` next to `checkpoints/vae/`). Here a repo goes to `<models_dir>/<repo name>`, and a
DiT repo takes its VAE and text encoder from the main repo's folder `<models_dir>/Ace-Step1.5` (downloaded too).

Loading itself is `loading.load_acestep15`; `pipeline.load_bundle` / `load_bundle15` here give a ready bundle.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ModelDownloadError
from ..loading import _is_network_error
from .loading import DIT_REPOS, DIT_WEIGHTS, MAIN_REPO, TEXT_FOLDER, VAE_FOLDER, variant_from_name

DEFAULT_DIT = "acestep-v15-turbo"
_DIT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
              "silence_latent.pt", "silence_latent.safetensors")
_MAIN_FILES = tuple(f"{DEFAULT_DIT}/{f}" for f in _DIT_FILES) + (
    f"{VAE_FOLDER}/config.json", f"{VAE_FOLDER}/diffusion_pytorch_model.safetensors",
    f"{TEXT_FOLDER}/*.json", f"{TEXT_FOLDER}/*.txt", f"{TEXT_FOLDER}/model.safetensors",
)
KNOWN_REPOS_15: dict[str, tuple[str, ...]] = {MAIN_REPO: _MAIN_FILES}
KNOWN_REPOS_15.update({repo: _DIT_FILES for repo in DIT_REPOS.values() if repo != MAIN_REPO})
"""Every 1.5 repo id we know -> the files to fetch (safetensors, configs, tokenizer and the silence latent; no code,
no 5 Hz LM). The download node adds these to v1's repos."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_known_repo(repo_id: str) -> bool:
    return repo_id in KNOWN_REPOS_15


def allow_patterns(repo_id: str) -> list[str]:
    """The files to fetch from a 1.5 repo (ValueError for a repo this module does not know)."""
    if repo_id not in KNOWN_REPOS_15:
        raise ValueError(f"{repo_id!r} is not a known ACE-Step 1.5 repo; known: {', '.join(KNOWN_REPOS_15)}")
    return list(KNOWN_REPOS_15[repo_id])


@dataclass(frozen=True)
class Paths15:
    """Where each component is: `dit` a DiT folder or .safetensors file; `vae` / `text` folders or files (None:
    the same file as `dit`, an all-in-one checkpoint)."""

    dit: Path
    vae: Path | None
    text: Path | None


def _is_dit_folder(folder: Path) -> bool:
    return (folder / DIT_WEIGHTS).is_file() or (folder / (DIT_WEIGHTS + ".index.json")).is_file()


def _has_main_parts(folder: Path) -> bool:
    return (folder / VAE_FOLDER).is_dir() and (folder / TEXT_FOLDER).is_dir()


def locate(path: str | os.PathLike, variant: str | None = None) -> Paths15:
    """The components of a local 1.5 checkpoint: the main-repo folder (its `acestep-v15-<variant>` sub-folder,
    turbo by default), a DiT folder (VAE and text encoder from a folder beside or above it that holds `vae/` and
    `Qwen3-Embedding-0.6B/`), or a .safetensors file (all-in-one)."""
    path = Path(path).expanduser()
    if path.is_file():
        return Paths15(path, None, None)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if _has_main_parts(path):
        dits = sorted(p for p in path.glob("acestep-v15*") if p.is_dir() and _is_dit_folder(p))
        if not dits:
            raise CheckpointError(f"{path}: has {VAE_FOLDER}/ and {TEXT_FOLDER}/ but no acestep-v15-* DiT folder")
        want = f"acestep-v15-{variant}" if variant else DEFAULT_DIT
        chosen = next((d for d in dits if d.name == want), None)
        if chosen is None:
            if variant:
                raise CheckpointError(f"{path}: no {want}/ folder; found {[d.name for d in dits]}")
            chosen = dits[0]
        return Paths15(chosen, path, path)
    if _is_dit_folder(path):
        for parent in (path.parent, path.parent.parent):
            if _has_main_parts(parent):
                return Paths15(path, parent, parent)
            main = parent / MAIN_REPO.split("/")[-1]
            if _has_main_parts(main):
                return Paths15(path, main, main)
        raise CheckpointError(f"{path}: a DiT folder without {VAE_FOLDER}/ and {TEXT_FOLDER}/ beside it; download "
                              f"{MAIN_REPO} next to it or pass vae_path and text_path")
    raise CheckpointError(f"{path}: not an ACE-Step 1.5 checkpoint (expected {VAE_FOLDER}/, {TEXT_FOLDER}/ and an "
                          "acestep-v15-* folder, a DiT folder, or a .safetensors file)")


Downloader = Callable[..., str]


def download(repo_id: str, models_dir: str | os.PathLike, snapshot_download: Downloader | None = None) -> Path:
    """Fetch a known 1.5 repo's files into `<models_dir>/<repo name>` (resumes; files on disk are only checked)."""
    patterns = allow_patterns(repo_id)
    target = Path(models_dir).expanduser() / repo_id.split("/")[-1]
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    try:
        got = snapshot_download(repo_id, local_dir=str(target), allow_patterns=patterns)
    except Exception as exc:
        if not _is_network_error(exc) and "RepositoryNotFound" not in type(exc).__name__:
            raise
        raise ModelDownloadError(f"could not download {repo_id} ({type(exc).__name__}: {exc}); put its files "
                                 f"({', '.join(patterns[:4])}, ...) under {target}") from exc
    return Path(got)


def resolve(path_or_repo: str | os.PathLike, *, models_dir: str | os.PathLike | None = None,
            variant: str | None = None, snapshot_download: Downloader | None = None) -> Paths15:
    """A local path (see `locate`), or a known 1.5 repo id: fetched into `models_dir` when not there yet; a DiT
    repo brings the main repo (VAE, text encoder) along."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return locate(path, variant)
    text = str(path_or_repo)
    if not _REPO_ID.match(text):
        raise CheckpointError(f"ACE-Step 1.5 checkpoint {text!r} not found: give a folder, a .safetensors file or "
                              f"a repo id ({', '.join(KNOWN_REPOS_15)})")
    if text not in KNOWN_REPOS_15:
        raise CheckpointError(f"{text!r} is not a known ACE-Step 1.5 repo; known: {', '.join(KNOWN_REPOS_15)}")
    if models_dir is None:
        raise CheckpointError(f"to download {text} give models_dir (the folder the checkpoints go into)")
    if text != MAIN_REPO and variant not in (None, variant_from_name(text)):
        raise CheckpointError(f"{text} is the {variant_from_name(text)} model, not {variant}")
    main = download(MAIN_REPO, models_dir, snapshot_download)
    if text == MAIN_REPO:
        return locate(main, variant)
    dit = download(text, models_dir, snapshot_download)
    return Paths15(dit, main, main)


def load_bundle15(path_or_repo: str | os.PathLike, *, models_dir=None, variant: str | None = None, dtype=None,
                  device="cpu", vae_path=None, text_path=None, tokenizer_folder=None, progress=None,
                  snapshot_download: Downloader | None = None):
    """A ready `pipeline.Bundle15` from a folder, file or repo id. ComfyUI split files: the DiT file with
    `vae_path`, `text_path` and `tokenizer_folder` (the Qwen3 tokenizer; a ComfyUI text-encoder file has none)."""
    from .pipeline import load_bundle

    paths = resolve(path_or_repo, models_dir=models_dir, variant=variant, snapshot_download=snapshot_download)
    version = variant if variant in ("turbo", "base", "sft") else None
    return load_bundle(paths.dit, dtype=dtype, device=device, model_version=version,
                       vae_path=vae_path or paths.vae, text_path=text_path or paths.text,
                       tokenizer_folder=tokenizer_folder, progress=progress)
