"""ComfyUI's repackaged ACE-Step 1.5 files in the ACE-Step Loader (nodes/files.py, acestep_core/v15/repack.py).

The tiny 1.5 checkpoint (tests/tiny15.py, official layout) is converted at test time into ComfyUI's layout with the
core's key maps: the DiT under `model.diffusion_model.` in models/diffusion_models, the text encoder under `model.`
in models/text_encoders, the VAE in stable-audio-tools names in models/vae, and an all-in-one file in
models/checkpoints. ComfyUI's `folder_paths` and the `comfy` package (its Qwen tokenizer folder) are faked.
The reference is the official-layout folder holding the same weights; it has no silence_latent.pt, as ComfyUI's files
have none (both then take the silence latent from the VAE, acestep_core/v15/loading.py silence_latent_from_vae).
"""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_helpers import COMFYUI_DIR, comfyui_mark, require_comfyui
from conftest import TINY, VOCAB
from pack_loader import load_pack
from tiny15 import MAIN, write_tiny15

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
nodes = sys.modules[f"{pack.__name__}.nodes"]
v15, files, bridge, model_mod = nodes.v15, nodes.files, nodes.bridge, nodes.model
VAE = sys.modules[f"{pack.__name__}.acestep_core.v15.vae"]
TE = sys.modules[f"{pack.__name__}.acestep_core.v15.text_encoder"]
repack = sys.modules[f"{pack.__name__}.acestep_core.v15.repack"]

SPLIT = "acestep_v1.5_turbo.safetensors"
AIO = "ace_step_1.5_turbo_aio.safetensors"
REFERENCE = "Ace-Step1.5-nosilence"
RELEASED = json.loads((Path(__file__).parent / "data" / "real-keys-15" / "turbo.json").read_text())["config"]
TURBO = dict(seed=4, steps=8, scheduler="euler", cfg_type="apg", guidance_scale=7.0, omega_scale=10.0)


def _save(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@pytest.fixture(scope="module")
def comfy_root(tmp_path_factory):
    """A ComfyUI-like install: models/{ace_step,diffusion_models,text_encoders,vae,checkpoints} and comfy/."""
    root = tmp_path_factory.mktemp("comfy15")
    official = write_tiny15(root / "tiny") / MAIN
    models = root / "models"
    # the official layout without silence_latent.pt (the reference), and the v1 tiny checkpoint beside it
    ref = models / "ace_step" / REFERENCE
    ref.mkdir(parents=True)
    for part in ("vae", "Qwen3-Embedding-0.6B"):
        (ref / part).symlink_to(official / part, target_is_directory=True)
    (ref / "acestep-v15-turbo").mkdir()
    (ref / "acestep-v15-turbo" / "model.safetensors").symlink_to(official / "acestep-v15-turbo" / "model.safetensors")
    # A ComfyUI file has no config.json: what the weights cannot tell takes the released models' values, which
    # every released config.json has (tests/data/real-keys-15/*.json); the tiny fixture's differ, so the reference
    # folder states the released ones.
    config = json.loads((official / "acestep-v15-turbo" / "config.json").read_text())
    (ref / "acestep-v15-turbo" / "config.json").write_text(json.dumps(
        dict(config, **{k: RELEASED[k] for k in ("sliding_window", "num_audio_decoder_hidden_layers")})))
    for entry in TINY.iterdir():
        (models / "ace_step" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())

    dit = load_file(str(official / "acestep-v15-turbo" / "model.safetensors"))
    vae_cfg = VAE.OobleckConfig.from_dict(json.loads((official / "vae" / "config.json").read_text()))
    vae = VAE.to_comfyui_state_dict(load_file(str(official / "vae" / "diffusion_pytorch_model.safetensors")), vae_cfg)
    text = TE.add_comfy_prefix(load_file(str(official / "Qwen3-Embedding-0.6B" / "model.safetensors")))
    _save({f"model.diffusion_model.{k}": v for k, v in dit.items()}, models / "diffusion_models" / SPLIT)
    _save(text, models / "text_encoders" / repack.TEXT_FILE)
    _save(vae, models / "vae" / repack.VAE_FILE)
    _save({**{f"model.diffusion_model.{k}": v for k, v in dit.items()}, **{f"vae.{k}": v for k, v in vae.items()},
           **{f"text_encoders.qwen3_06b.transformer.{k}": v for k, v in text.items()}},
          models / "checkpoints" / AIO)
    # ComfyUI ships the Qwen tokenizer inside its package (comfy/text_encoders/qwen25_tokenizer)
    tok = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
    tok.mkdir(parents=True)
    for f in (official / "Qwen3-Embedding-0.6B").iterdir():
        if f.name != "model.safetensors" and f.name != "config.json":
            shutil.copy(f, tok / f.name)
    (root / "comfy" / "__init__.py").write_text("")
    return root


@pytest.fixture(autouse=True)
def fake_comfyui(monkeypatch, comfy_root):
    models = comfy_root / "models"
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.supported_pt_extensions = {".safetensors", ".ckpt", ".pt"}
    fp.folder_names_and_paths = {name: ([str(models / name)], set(fp.supported_pt_extensions))
                                 for name in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras")}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    comfy = types.ModuleType("comfy")
    comfy.__file__ = str(comfy_root / "comfy" / "__init__.py")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    return models


def run(name: str, **inputs):
    cls = NODES[name]
    result = getattr(cls(), cls.FUNCTION)(**inputs)
    return result["result"] if isinstance(result, dict) else result


def load(checkpoint: str):
    return run("AceStepLoader", checkpoint=checkpoint, dtype="fp32", device="cpu")[0]


def song(handle) -> torch.Tensor:
    (cond,) = run("AceStepTextEncode", model=handle, tags="folk, guitar", lyrics="[verse]\nla la")
    (latent,) = run("AceStep15EmptyLatent", seconds=1.0, batch_size=1)
    (out,) = run("AceStepSampler", model=handle, conditioning=cond, latent=latent, **TURBO)
    (audio,) = run("AceStepDecode", model=handle, latent=out, sample_rate="48000")
    return audio["waveform"]


def test_the_list_shows_comfyui_files_by_their_weights(fake_comfyui):
    listing = files.checkpoints()
    assert listing[SPLIT] == fake_comfyui / "diffusion_models" / SPLIT
    assert listing[AIO] == fake_comfyui / "checkpoints" / AIO
    assert {REFERENCE, "acestep-v1-tiny"} <= set(listing)
    # neither the text encoder nor the VAE is a checkpoint; a renamed DiT is still one (weights, not names)
    assert not any(n.endswith((repack.TEXT_FILE, repack.VAE_FILE)) for n in listing)
    renamed = fake_comfyui / "diffusion_models" / "sub" / "my_song_model.safetensors"
    renamed.parent.mkdir(exist_ok=True)
    shutil.copy(fake_comfyui / "diffusion_models" / SPLIT, renamed)
    try:
        assert files.checkpoints()["sub/my_song_model.safetensors"] == renamed
        assert NODES["AceStepLoader"].VALIDATE_INPUTS(SPLIT) is True
        assert SPLIT in NODES["AceStepLoader"].INPUT_TYPES()["required"]["checkpoint"][0]
    finally:
        shutil.rmtree(renamed.parent)


def test_split_and_all_in_one_files_make_the_same_song_as_the_official_folder(monkeypatch):
    monkeypatch.setattr(model_mod, "MODELS", type(model_mod.MODELS)())
    reference = song(load(REFERENCE))
    split = load(SPLIT)
    assert isinstance(split, v15.Model15Handle) and split.variant == "turbo"
    assert torch.isfinite(reference).all() and reference.abs().max() > 0
    assert torch.equal(song(split), reference)
    aio = load(AIO)
    assert isinstance(aio, v15.Model15Handle)
    assert torch.equal(song(aio), reference)


@pytest.mark.parametrize("category, expected", [("text_encoders", "qwen_0.6b_ace15.safetensors"),
                                                ("vae", "ace_1.5_vae.safetensors")])
def test_a_missing_part_gives_one_clear_error(fake_comfyui, monkeypatch, tmp_path, category, expected):
    monkeypatch.setattr(model_mod, "MODELS", type(model_mod.MODELS)())
    empty = tmp_path / category
    empty.mkdir()
    # a wrong file there is not taken: a 1.5 DiT is neither a text encoder nor a VAE
    shutil.copy(next((fake_comfyui / "diffusion_models").glob("*.safetensors")), empty / "other.safetensors")
    monkeypatch.setitem(sys.modules["folder_paths"].folder_names_and_paths, category, ([str(empty)], set()))
    with pytest.raises(ValueError) as err:
        load(SPLIT)
    message = str(err.value)
    assert expected in message and str(empty) in message and repack.COMFY_REPO in message and SPLIT in message
    assert "\n" not in message


def test_a_text_encoder_of_another_width_is_not_taken(fake_comfyui, monkeypatch, tmp_path):
    """The audio-code LMs (qwen_1.7b / 4b) sit beside the embedder; only the width the DiT reads is used."""
    folder = tmp_path / "text_encoders"
    folder.mkdir()
    text = load_file(str(fake_comfyui / "text_encoders" / repack.TEXT_FILE))
    wider = {k: torch.zeros(*[s * 2 if s == text["model.embed_tokens.weight"].shape[1] else s for s in v.shape])
             for k, v in text.items()}
    save_file(wider, str(folder / "qwen_1.7b_ace15.safetensors"))
    dit = repack.shapes_of(fake_comfyui / "diffusion_models" / SPLIT)
    with pytest.raises(ValueError, match="qwen_0.6b_ace15.safetensors"):
        repack.pick_text_encoder(dit, [folder / "qwen_1.7b_ace15.safetensors"], str(folder))
    assert repack.pick_text_encoder(dit, [folder / "qwen_1.7b_ace15.safetensors",
                                          fake_comfyui / "text_encoders" / repack.TEXT_FILE], str(folder)) \
        == fake_comfyui / "text_encoders" / repack.TEXT_FILE


def test_without_comfyuis_tokenizer_the_loader_says_so(monkeypatch):
    monkeypatch.setattr(model_mod, "MODELS", type(model_mod.MODELS)())
    monkeypatch.setitem(sys.modules, "comfy", None)  # not inside ComfyUI: no tokenizer to borrow
    assert bridge.comfy_qwen_tokenizer() is None
    with pytest.raises(ValueError, match="qwen25_tokenizer"):
        load(SPLIT)


@comfyui_mark()
def test_comfyuis_own_qwen_tokenizer_is_found_and_fits_the_text_encoder(monkeypatch):
    """In a real ComfyUI checkout the bridge finds comfy/text_encoders/qwen25_tokenizer (the folder ComfyUI's own
    1.5 text encoder reads); its ids fit Qwen3-Embedding-0.6B's table and the prompt's end marker is one token."""
    if not COMFYUI_DIR:
        require_comfyui()
    comfy = types.ModuleType("comfy")
    comfy.__file__ = str(Path(COMFYUI_DIR) / "comfy" / "__init__.py")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    folder = bridge.comfy_qwen_tokenizer()
    assert folder == Path(COMFYUI_DIR) / "comfy" / "text_encoders" / "qwen25_tokenizer"
    tokenizer = TE.load_tokenizer(folder)
    assert len(tokenizer) == TE.QWEN3_EMBEDDING_06B["vocab_size"]
    assert tokenizer("<|endoftext|>")["input_ids"] == [tokenizer.pad_token_id]
