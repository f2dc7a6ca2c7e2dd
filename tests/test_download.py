"""The download node with snapshot_download replaced (no network): folders, patterns, progress, offline errors."""
from __future__ import annotations

import importlib
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from pack_loader import load_pack

pack = load_pack()
download = importlib.import_module(f"{pack.__name__}.nodes.download")
loaders = importlib.import_module(f"{pack.__name__}.nodes.loaders")
errors = importlib.import_module(f"{pack.__name__}.acestep_core.errors")
loading = importlib.import_module(f"{pack.__name__}.acestep_core.loading")

NODE = download.AceStepDownload()
MODEL_REPO = loading.DEFAULT_REPO
LORA_REPO = download.LORA_REPO
COMPONENT_FOLDERS = [loading.LAYOUTS[c].folder for c in loading.ALL_COMPONENTS]
# What the fake hub holds: repo id -> {file: size in bytes}.
REPOS = {
    MODEL_REPO: {
        **{f"{folder}/diffusion_pytorch_model.safetensors": 3000 for folder in COMPONENT_FOLDERS},
        **{f"{folder}/config.json": 100 for folder in COMPONENT_FOLDERS},
        "README.md": 50,
    },
    LORA_REPO: {"pytorch_lora_weights.safetensors": 5000, "README.md": 40, "training.ckpt": 999},
}


def matches(name: str, patterns: list[str]) -> bool:
    return any(Path(name).match(p) or (p.endswith("/*") and name.startswith(p[:-1])) for p in patterns)


class FakeHub:
    """snapshot_download stand-in: writes the allowed files into local_dir, driving tqdm_class bars as the hub does
    (a file-count bar advanced from the calling thread, a byte bar advanced from download threads)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.error: BaseException | None = None

    def __call__(self, repo_id, *, local_dir, allow_patterns, tqdm_class):
        self.calls.append({"repo_id": repo_id, "local_dir": local_dir, "allow_patterns": allow_patterns})
        if self.error is not None:
            raise self.error
        wanted = {n: s for n, s in REPOS[repo_id].items() if matches(n, allow_patterns)}
        files = tqdm_class(total=len(wanted), desc=f"Fetching {len(wanted)} files")
        nbytes = tqdm_class(total=0, initial=0, unit="B", unit_scale=True, desc="Downloading bytes")
        nbytes.total = sum(wanted.values())
        for name, size in wanted.items():
            def fetch(name=name, size=size):
                for _ in range(4):
                    nbytes.update(size // 4)
                path = Path(local_dir) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\0" * size)
            with ThreadPoolExecutor(max_workers=1) as pool:
                pool.submit(fetch).result()                                        # errors reach the caller
            files.update(1)
        nbytes.close()
        files.close()
        return str(local_dir)


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


@pytest.fixture
def outside_comfyui(monkeypatch, tmp_path):
    """No ComfyUI: the model root is $ACESTEP_MODELS_DIR."""
    for name in ("comfy", "comfy.utils", "comfy.model_management", "folder_paths"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(tmp_path / "root"))
    return tmp_path / "root"


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture
def comfyui(monkeypatch, tmp_path):
    """Fake `comfy.utils` (recording progress bars), `comfy.model_management` and `folder_paths`."""
    state = types.SimpleNamespace(bars=[], interrupt_after=None, checks=0)

    class ProgressBar:
        def __init__(self, total):
            self.total, self.updates = total, []
            state.bars.append(self)

        def update_absolute(self, value, total=None):
            self.updates.append((value, total))

    def throw_if_interrupted():
        state.checks += 1
        if state.interrupt_after is not None and state.checks > state.interrupt_after:
            raise Interrupted("cancelled")

    comfy, utils, mm = (types.ModuleType(n) for n in ("comfy", "comfy.utils", "comfy.model_management"))
    utils.ProgressBar = ProgressBar
    mm.throw_exception_if_processing_interrupted = throw_if_interrupted
    comfy.utils, comfy.model_management = utils, mm
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.supported_pt_extensions = {".safetensors"}
    state.lora_folder = tmp_path / "models" / "loras"
    fp.folder_names_and_paths = {"checkpoints": ([str(tmp_path / "models" / "checkpoints")], {".safetensors"}),
                                 "loras": ([str(state.lora_folder), str(tmp_path / "more_loras")], {".safetensors"})}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    for name, module in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm), ("folder_paths", fp)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(download, "REPORT_INTERVAL", 0.0)
    state.models = tmp_path / "models"
    return state


# ---------------------------------------------------------------------------------------------------------------
# where the files go


def test_checkpoint_goes_to_models_ace_step_and_the_loader_lists_it(hub, comfyui):
    out = NODE.download(repo_id=MODEL_REPO, target="ace_step")
    folder = comfyui.models / "ace_step" / "ACE-Step-v1-3.5B"
    assert out["result"] == (str(folder),) and out["ui"]["text"] == [str(folder)]
    (call,) = hub.calls
    assert call["local_dir"] == str(folder)
    assert sorted(call["allow_patterns"]) == sorted(f"{f}/*" for f in COMPONENT_FOLDERS)
    assert all((folder / f / "diffusion_pytorch_model.safetensors").is_file() for f in COMPONENT_FOLDERS)
    assert not (folder / "README.md").exists()
    assert "ACE-Step-v1-3.5B" in loaders.AceStepLoader.INPUT_TYPES()["required"]["checkpoint"][0]
    assert loaders.repo_path(MODEL_REPO) == folder                                   # the loader's repo_id finds it


def test_lora_goes_to_the_first_loras_folder_and_the_lora_loader_lists_it(hub, comfyui):
    (path,) = NODE.download(repo_id=f"  {LORA_REPO} ", target="loras")["result"]
    folder = comfyui.lora_folder / "ACE-Step-v1-chinese-rap-LoRA"
    assert path == str(folder)
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "README.md").is_file()
    assert not (folder / "training.ckpt").exists()                                   # safetensors only
    assert "ACE-Step-v1-chinese-rap-LoRA" in loaders.AceStepLoraLoader.INPUT_TYPES()["required"]["lora_name"][0]


def test_outside_comfyui_the_models_root_is_used(hub, outside_comfyui):
    (model,) = NODE.download(repo_id=MODEL_REPO, target="ace_step")["result"]
    (lora,) = NODE.download(repo_id=LORA_REPO, target="loras")["result"]
    assert model == str(outside_comfyui / "ACE-Step-v1-3.5B")
    assert lora == str(outside_comfyui / "loras" / "ACE-Step-v1-chinese-rap-LoRA")


def test_wrong_target_says_which_one_to_use(hub, comfyui):
    with pytest.raises(ValueError, match="set target to loras"):
        NODE.download(repo_id=LORA_REPO, target="ace_step")


def test_bad_repo_id_and_target_are_refused_before_any_download(hub, comfyui):
    with pytest.raises(ValueError, match="not a Hugging Face repo id"):
        NODE.download(repo_id="not a repo", target="ace_step")
    with pytest.raises(ValueError, match="target must be one of"):
        NODE.download(repo_id=MODEL_REPO, target="vae")
    assert hub.calls == []


# ---------------------------------------------------------------------------------------------------------------
# progress


def test_progress_is_forwarded_in_bytes_to_one_bar(hub, comfyui):
    NODE.download(repo_id=MODEL_REPO, target="ace_step")
    (bar,) = comfyui.bars
    total = sum(n for name, n in REPOS[MODEL_REPO].items() if name != "README.md")
    first = next(i for i, (_, t) in enumerate(bar.updates) if t == total)
    assert all(value == 0 for value, _ in bar.updates[:first])                        # 0 of n files, before bytes
    values = [value for value, t in bar.updates[first:] if t == total]
    assert len(values) == len(bar.updates) - first                                   # then bytes only
    assert bar.updates[-1] == (total, total)
    assert values == sorted(values) and len(set(values)) > 4                          # climbs in many steps
    assert comfyui.checks == len(bar.updates)                                        # every report checks Cancel


def test_file_count_is_used_when_the_hub_reports_no_bytes_even_with_bars_disabled(comfyui):
    sink = download.ProgressSink()
    bar = download.forwarding_tqdm(sink)(total=3, disable=True)
    bar.update(1)
    bar.update(2)
    bar.close()
    (progress,) = comfyui.bars
    assert progress.updates[-1] == (3, 3) and (1, 3) in progress.updates


def test_reports_are_throttled_but_the_last_one_always_arrives(comfyui, monkeypatch):
    monkeypatch.setattr(download, "REPORT_INTERVAL", 60.0)
    sink = download.ProgressSink()
    bar = download.forwarding_tqdm(sink)(total=100, unit="B", disable=True)
    for _ in range(100):
        bar.update(1)
    bar.close()
    (progress,) = comfyui.bars
    assert progress.updates == [(0, 100), (100, 100)]


def test_cancel_stops_the_download(hub, comfyui):
    comfyui.interrupt_after = 3
    with pytest.raises(Interrupted):
        NODE.download(repo_id=MODEL_REPO, target="ace_step")
    (bar,) = comfyui.bars
    assert len(bar.updates) == 4 and comfyui.checks == 4                             # nothing after the cancel


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_offline_error_says_where_to_put_the_files(hub, comfyui):
    hub.error = LocalEntryNotFoundError("outgoing traffic has been disabled (HF_HUB_OFFLINE=1)")
    folder = comfyui.models / "ace_step" / "ACE-Step-v1-3.5B"
    with pytest.raises(errors.ModelDownloadError) as info:
        NODE.download(repo_id=MODEL_REPO, target="ace_step")
    message = str(info.value)
    assert "no network" in message and "HF_HUB_OFFLINE" in message
    assert f"hf download {MODEL_REPO}" in message and str(folder) in message


def test_offline_with_the_repo_on_disk_returns_it(hub, comfyui):
    NODE.download(repo_id=MODEL_REPO, target="ace_step")
    hub.error = ConnectionError("no route to host")
    (path,) = NODE.download(repo_id=MODEL_REPO, target="ace_step")["result"]
    assert path == str(comfyui.models / "ace_step" / "ACE-Step-v1-3.5B")


def test_unknown_repo_is_reported_as_such(hub, comfyui):
    response = types.SimpleNamespace(headers={}, request=None)
    hub.error = RepositoryNotFoundError("404 Client Error", response=response)
    with pytest.raises(errors.ModelDownloadError, match="does not exist or needs access rights"):
        NODE.download(repo_id="someone/missing", target="loras")


def test_other_failures_are_not_disguised(hub, comfyui):
    hub.error = RuntimeError("disk quota")
    with pytest.raises(RuntimeError, match="disk quota"):
        NODE.download(repo_id=MODEL_REPO, target="ace_step")
