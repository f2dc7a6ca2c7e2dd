"""ACE-Step 1.5 checkpoints by folder, file or repo id (acestep_core/v15/hub.py): the official layouts on disk, the
known repos and what is fetched from each (snapshot_download replaced by a fake that writes the files)."""
from __future__ import annotations

import fnmatch
import json

import pytest
import torch
from safetensors.torch import save_file

from acestep_core.errors import CheckpointError, ModelDownloadError
from acestep_core.v15 import hub
from acestep_core.v15 import pipeline as P
from acestep_core.v15.loading import DIT_REPOS, MAIN_REPO
from test_v15_pipeline import bundle


def write_main(root, b: P.Bundle15, dit_folders=("acestep-v15-turbo",)):
    """The official main-repo layout with the tiny bundle's weights."""
    for name in dit_folders:
        write_dit(root / name, b)
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(json.dumps(b.vae.config.to_dict()))
    save_file({k: v.contiguous() for k, v in b.vae.state_dict().items()},
              str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    te = root / "Qwen3-Embedding-0.6B"
    te.mkdir()
    cfg = b.text_encoder.model.config.to_dict()
    (te / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))
    save_file({k: v.contiguous() for k, v in b.text_encoder.model.state_dict().items()},
              str(te / "model.safetensors"))
    b.text_encoder.tokenizer.save_pretrained(str(te))
    return root


def write_dit(folder, b: P.Bundle15):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(b.model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in b.model.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(b.silence_latent.transpose(1, 2).contiguous(), str(folder / "silence_latent.pt"))


def test_main_layout_loads_a_working_bundle(tmp_path):
    b = bundle()
    write_main(tmp_path / "Ace-Step1.5", b)
    loaded = hub.load_bundle15(tmp_path / "Ace-Step1.5")
    assert loaded.variant == "turbo"
    assert torch.equal(loaded.silence_latent, b.silence_latent)
    got = P.text2music(loaded, "folk", "la", duration=1.0, seed=5)
    want = P.text2music(b, "folk", "la", duration=1.0, seed=5)
    assert torch.equal(got.latents, want.latents) and torch.equal(got.audio, want.audio)


def test_variant_picks_the_dit_folder_and_dit_repos_find_the_main_parts(tmp_path):
    b = bundle()
    main = write_main(tmp_path / "Ace-Step1.5", b, ("acestep-v15-base", "acestep-v15-turbo"))
    assert hub.locate(main).dit.name == "acestep-v15-turbo"  # turbo by default, not the first name
    assert hub.locate(main, "base").dit.name == "acestep-v15-base"
    with pytest.raises(CheckpointError, match="no acestep-v15-sft"):
        hub.locate(main, "sft")
    beside = tmp_path / "acestep-v15-sft"
    write_dit(beside, b)
    p = hub.locate(beside)
    assert p.dit == beside and p.vae == main and p.text == main
    inside = hub.locate(main / "acestep-v15-base")
    assert inside.vae == main
    lonely = tmp_path / "elsewhere" / "deep" / "dit"
    write_dit(lonely, b)
    with pytest.raises(CheckpointError, match="vae_path"):
        hub.locate(lonely)


class FakeHub:
    """snapshot_download stand-in: writes the repo's files that match allow_patterns (and records the call)."""

    def __init__(self, files):
        self.files, self.calls = files, []

    def __call__(self, repo_id, *, local_dir, allow_patterns):
        self.calls.append((repo_id, tuple(allow_patterns)))
        from pathlib import Path
        for rel, writer in self.files[repo_id].items():
            if any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                target = Path(local_dir) / rel
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    writer(target)
        return local_dir


def _repo_files(tmp_path, b):
    """Files of the fake main repo and base repo, copied from a written layout (with extras we must not fetch)."""
    src = write_main(tmp_path / "src", b)
    write_dit(tmp_path / "srcdit", b)

    def copy(path):
        return lambda t: t.write_bytes(path.read_bytes())

    main = {str(p.relative_to(src)): copy(p) for p in src.rglob("*") if p.is_file()}
    main["acestep-5Hz-lm-1.7B/model.safetensors"] = lambda t: t.write_bytes(b"LM")
    main["acestep-v15-turbo/modeling_acestep.py"] = lambda t: t.write_text("code")
    base = {p.name: copy(p) for p in (tmp_path / "srcdit").iterdir()}
    base["handler.py"] = lambda t: t.write_text("code")
    return {MAIN_REPO: main, "ACE-Step/acestep-v15-base": base}


def test_repo_ids_download_only_what_is_needed(tmp_path):
    b = bundle()
    fake = FakeHub(_repo_files(tmp_path, b))
    models = tmp_path / "models"
    paths = hub.resolve("ACE-Step/acestep-v15-base", models_dir=models, snapshot_download=fake)
    assert [c[0] for c in fake.calls] == [MAIN_REPO, "ACE-Step/acestep-v15-base"]
    assert paths.dit == models / "acestep-v15-base" and paths.vae == models / "Ace-Step1.5"
    assert not list(models.rglob("*.py")) and not (models / "Ace-Step1.5" / "acestep-5Hz-lm-1.7B").exists()
    assert (models / "Ace-Step1.5" / "Qwen3-Embedding-0.6B" / "tokenizer.json").is_file()
    loaded = hub.load_bundle15("ACE-Step/acestep-v15-base", models_dir=models, snapshot_download=fake)
    assert loaded.variant == "turbo"  # the tiny config says turbo; config.json wins over the folder name
    again = hub.resolve(MAIN_REPO, models_dir=models, snapshot_download=fake)
    assert again.dit == models / "Ace-Step1.5" / "acestep-v15-turbo"


def test_known_repos_cover_every_official_dit():
    assert MAIN_REPO in hub.KNOWN_REPOS_15
    for name, repo in DIT_REPOS.items():
        assert hub.is_known_repo(repo)
        patterns = hub.allow_patterns(repo)
        assert not any(p.endswith(".py") or p == "*" for p in patterns)
    assert any(p.startswith("Qwen3-Embedding-0.6B/") for p in hub.allow_patterns(MAIN_REPO))
    with pytest.raises(ValueError, match="not a known"):
        hub.allow_patterns("ACE-Step/ACE-Step-v1-3.5B")


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        hub.resolve(str(tmp_path / "nothing" / "here"))
    with pytest.raises(CheckpointError, match="not a known"):
        hub.resolve("someone/else", models_dir=tmp_path)
    with pytest.raises(CheckpointError, match="models_dir"):
        hub.resolve(MAIN_REPO)
    with pytest.raises(CheckpointError, match="not sft"):
        hub.resolve("ACE-Step/acestep-v15-base", models_dir=tmp_path, variant="sft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an ACE-Step 1.5"):
        hub.locate(tmp_path / "empty")

    def offline(*a, **k):
        raise OSError("offline mode")

    with pytest.raises(ModelDownloadError, match="put its files"):
        hub.resolve(MAIN_REPO, models_dir=tmp_path, snapshot_download=offline)


def test_comfyui_split_files_load_a_working_bundle(tmp_path):
    from acestep_core.v15.text_encoder import add_comfy_prefix
    from acestep_core.v15.vae import to_comfyui_state_dict

    b = bundle()
    dit = tmp_path / "diffusion_models" / "acestep_v1.5_turbo.safetensors"
    dit.parent.mkdir()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in b.model.state_dict().items()}, str(dit))
    vae = tmp_path / "ace_1.5_vae.safetensors"
    save_file({k: v.contiguous() for k, v in to_comfyui_state_dict(b.vae.state_dict(), b.vae.config).items()},
              str(vae))
    text = tmp_path / "qwen_0.6b_ace15.safetensors"
    save_file({k: v.contiguous() for k, v in add_comfy_prefix(b.text_encoder.model.state_dict()).items()}, str(text))
    tok = tmp_path / "tokenizer"
    b.text_encoder.tokenizer.save_pretrained(str(tok))
    with pytest.raises(ValueError, match="tokenizer"):
        hub.load_bundle15(dit, vae_path=vae, text_path=text)
    loaded = hub.load_bundle15(dit, vae_path=vae, text_path=text, tokenizer_folder=tok)
    assert loaded.variant == "turbo" and loaded.silence_latent.shape[2] == 8  # silence from the VAE (no file)
    r = P.text2music(loaded, "folk", duration=1.0, seed=2)
    assert torch.isfinite(r.audio).all() and r.audio.shape == (1, 2, P.SAMPLE_RATE)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
