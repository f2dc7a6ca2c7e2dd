"""The one Hugging Face download of the pack: `snapshot_download` of some folders of a repo, with an optional
progress hook and the same error mapping for the loader (acestep_core.loading) and the download node (design §10.1).

Errors: a missing, gated or unknown repo is a ModelDownloadError saying so; no network (or HF_HUB_OFFLINE=1) is a
ModelDownloadError saying where to put the files, unless the caller's `usable` accepts what is already on disk;
anything else (a bug, a full disk) is raised as it is.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ModelDownloadError

log = logging.getLogger(__name__)


def is_network_error(exc: BaseException) -> bool:
    """OSError family (connection, offline mode, cache miss) or an HTTP client library's own error type."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or module in ("httpx", "httpx2", "requests", "urllib3", "huggingface_hub")


def hf_download(
    repo_id: str,
    local_dir: Path | None,
    patterns: Sequence[str],
    *,
    not_found_fix: str,
    offline_fix: str,
    progress: type | None = None,
    usable: Callable[[Path], bool] | None = None,
) -> Path:
    """snapshot_download the files of `repo_id` matching `patterns` into `local_dir` (the HF cache when None).

    `progress` is a tqdm class for the hub's progress bars (the hook of the download node); `usable(local_dir)`
    decides whether a copy already on disk serves when there is no network. `not_found_fix` / `offline_fix` end the
    two error messages with what the user should do.
    """
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    hook = {} if progress is None else {"tqdm_class": progress}
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, local_dir=str(local_dir) if local_dir is not None else None, allow_patterns=list(patterns), **hook
        ))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise ModelDownloadError(
            f"could not download {repo_id}: the repository does not exist or needs access rights ({exc}); "
            f"{not_found_fix}"
        ) from exc
    except Exception as exc:
        if not is_network_error(exc):
            raise
        if usable is not None and local_dir is not None and usable(local_dir):
            log.warning("ACE-Step download: offline, using %s as it is on disk (%s)", local_dir, exc)
            return local_dir
        raise ModelDownloadError(
            f"could not download {repo_id}: no network or Hugging Face offline mode (HF_HUB_OFFLINE) "
            f"({type(exc).__name__}: {exc}); {offline_fix}"
        ) from exc
