"""Download node: a Hugging Face repo (ACE-Step checkpoint or LoRA) into ComfyUI's model folders, with progress.

`huggingface_hub.snapshot_download` into `<models>/ace_step/<repo name>` or `<models>/loras/<repo name>`: an
interrupted download resumes where it stopped, and a repo already on disk is only checked. Its progress bars
(files, and bytes where the hub reports them) are forwarded to the node's progress bar, which also lets Cancel
stop the download. Without network (or with HF_HUB_OFFLINE=1) a repo already on disk is returned as it is, and a
missing one fails with an error that says where to put the files.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..acestep_core.download import hf_download
from ..acestep_core.loading import ALL_COMPONENTS, DEFAULT_REPO, LAYOUTS
from . import bridge, files, v15
from .loaders import is_repo_id
from .wire import CATEGORY

LORA_REPO = "ACE-Step/ACE-Step-v1-chinese-rap-LoRA"
TARGETS = (bridge.ACE_STEP_CATEGORY, "loras")
# Only what the loaders read: the four component folders of a checkpoint; safetensors and notes of a LoRA.
PATTERNS = {
    bridge.ACE_STEP_CATEGORY: [f"{LAYOUTS[c].folder}/*" for c in ALL_COMPONENTS],
    "loras": ["*.safetensors", "*.json", "*.md"],
}
REPORT_INTERVAL = 0.25
"""Seconds between two progress reports to the editor (the last one is always sent)."""


def target_folder(target: str) -> Path:
    """Where a repo of this kind goes: models/ace_step (as the loader's repo_id), or the first `loras` folder."""
    if target == bridge.ACE_STEP_CATEGORY:
        return bridge.download_folder()
    folders = bridge.model_folders("loras")
    return next((f for f in folders if f.name == "loras"), folders[0])


def is_complete(path: Path, target: str) -> bool:
    """A usable checkpoint folder, or a folder holding at least one LoRA file the LoRA loader lists."""
    if target == bridge.ACE_STEP_CATEGORY:
        return files.is_checkpoint_folder(path)
    return files.is_lora_folder(path) or bool(files.scan([path], files.is_lora_file, files.is_lora_folder))


class ProgressSink:
    """Collects every progress bar of one download and reports one value to the node's progress bar.

    Byte bars (unit "B", total known) win over the file-count bar. Updates may come from download threads, so
    reports are serialised and throttled; ComfyUI's Cancel raises from the report (and so stops the download),
    after which the sink reports nothing more.
    """

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._bars: dict[int, tuple[bool, float, float]] = {}
        self._progress: bridge.Progress | None = None
        self._last = -float("inf")
        self._stopped = False
        self._clock = clock

    def report(self, bar: tqdm, final: bool = False) -> None:
        """Record `bar`'s state and forward the download's progress when due."""
        with self._lock:
            self._bars[id(bar)] = (getattr(bar, "counts_bytes", False), float(bar.n or 0), float(bar.total or 0))
            done, total = self.value()
            now = self._clock()
            if self._stopped or total <= 0 or (not final and now - self._last < REPORT_INTERVAL):
                return
            self._last = now
            if self._progress is None:
                self._progress = bridge.Progress(int(total))
            try:
                self._progress.update(int(min(done, total)), int(total))
            except BaseException:
                self._stopped = True                # cancelled: later reports (threads, closing bars) stay quiet
                raise

    def value(self) -> tuple[float, float]:
        """(done, total): the furthest byte bar when any knows its total, else the file bars."""
        byte_bars = [(n, total) for is_bytes, n, total in self._bars.values() if is_bytes and total > 0]
        if byte_bars:
            return max(n for n, _ in byte_bars), max(total for _, total in byte_bars)
        counts = [(n, total) for is_bytes, n, total in self._bars.values() if not is_bytes]
        return sum(n for n, _ in counts), sum(total for _, total in counts)


def forwarding_tqdm(sink: ProgressSink) -> type[tqdm]:
    """A tqdm class for snapshot_download's `tqdm_class` whose bars report to `sink` (and still print)."""

    class ForwardingTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            self.counts_bytes = kwargs.get("unit") == "B"
            super().__init__(*args, **kwargs)
            sink.report(self)

        def update(self, n=1):
            if self.disable:                        # a disabled tqdm stops counting; keep counting for the editor
                self.n += n or 0
            shown = super().update(n)
            sink.report(self)
            return shown

        def close(self):
            if not getattr(self, "_acestep_closed", False):
                self._acestep_closed = True
                sink.report(self, final=True)
            super().close()

    return ForwardingTqdm


def fetch_repo(repo_id: str, target: str) -> Path:
    """snapshot_download `repo_id` into the `target` model folder; the local folder."""
    folder = target_folder(target) / repo_id.split("/")[-1]
    got = hf_download(
        repo_id, folder, PATTERNS[target], progress=forwarding_tqdm(ProgressSink()),
        usable=lambda path: is_complete(path, target),
        not_found_fix=f"check repo_id (e.g. {DEFAULT_REPO} or {LORA_REPO}) or log in with `hf auth login`",
        offline_fix=f"on a machine with network run `hf download {repo_id} --local-dir {folder.name}` and copy "
                    f"that folder to {folder}; a partial download there resumes next time",
    )
    if not is_complete(got, target):
        other = "loras" if target == bridge.ACE_STEP_CATEGORY else bridge.ACE_STEP_CATEGORY
        raise ValueError(
            f"{repo_id} downloaded to {got} but holds no {'ACE-Step checkpoint' if other == 'loras' else 'LoRA'} "
            f"files; is it a {'LoRA' if other == 'loras' else 'checkpoint'}? Then set target to {other}"
        )
    return got


class AceStepDownload:
    DESCRIPTION = (
        "Downloads an ACE-Step checkpoint or LoRA from Hugging Face into ComfyUI's model folder (models/ace_step "
        "or models/loras), with progress; an interrupted download resumes. Afterwards press R in the editor and "
        "pick it in the ACE-Step Loader / LoRA Loader."
    )
    CATEGORY = CATEGORY
    FUNCTION = "download"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The local folder the repo was downloaded to.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "repo_id": ("STRING", {
                    "default": DEFAULT_REPO,
                    "tooltip": f"Hugging Face repo id: {DEFAULT_REPO} (the model, about 8 GB) or {LORA_REPO} (the "
                               "official rap LoRA); ACE-Step 1.5: ACE-Step/Ace-Step1.5 (turbo, VAE, text encoder) "
                               "or a 1.5 DiT repo such as ACE-Step/acestep-v15-base (brings Ace-Step1.5 along).",
                }),
                "target": (list(TARGETS), {
                    "default": bridge.ACE_STEP_CATEGORY,
                    "tooltip": "ace_step for a checkpoint (models/ace_step/<name>), loras for a LoRA "
                               "(models/loras/<name>).",
                }),
            },
        }

    def download(self, repo_id: str, target: str):
        repo_id = (repo_id or "").strip()
        if not is_repo_id(repo_id):
            raise ValueError(f"repo_id {repo_id!r:.200} is not a Hugging Face repo id like {DEFAULT_REPO!r:.200}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r:.200}")
        if v15.is_repo(repo_id):  # a known ACE-Step 1.5 repo
            if target != bridge.ACE_STEP_CATEGORY:
                raise ValueError(f"{repo_id} is an ACE-Step 1.5 checkpoint; set target to "
                                 f"{bridge.ACE_STEP_CATEGORY}")
            return v15.download(repo_id)
        path = fetch_repo(repo_id, target)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}
