"""The one checkpoint loader (design §10): both layouts give identical weights; clear errors for every bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from acestep_core.errors import CheckpointError, ModelDownloadError
from acestep_core.loading import (
    ALL_COMPONENTS,
    LAYOUTS,
    component_classes,
    load_acestep,
    map_component_keys,
    materialize_buffers,
    parameters_on_meta,
)
from conftest import REAL_KEYS, TINY_COMFY, TINY_FOLDER

MODULES = {"transformer": "transformer", "dcae": "dcae", "vocoder": "vocoder", "text": "text_encoder"}
TINY_TRANSFORMER_CONFIG = json.loads((TINY_FOLDER / "ace_step_transformer" / "config.json").read_text())
# The single file has no config.json; the tiny transformer's head split (4 x 16) is not in its tensor shapes.
COMFY_CONFIGS = {"transformer": TINY_TRANSFORMER_CONFIG}


@pytest.fixture(scope="module")
def from_folder():
    return load_acestep(TINY_FOLDER)


@pytest.fixture(scope="module")
def from_comfy():
    return load_acestep(TINY_COMFY, configs=COMFY_CONFIGS)


@pytest.fixture(scope="module")
def comfy_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(TINY_COMFY))


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _state(model, component: str) -> dict[str, torch.Tensor]:
    return getattr(model, MODULES[component]).state_dict()


def test_both_layouts_load_identical_weights(from_folder, from_comfy):
    assert (from_folder.layout, from_comfy.layout) == ("folder", "single_file")
    for component in ALL_COMPONENTS:
        a, b = _state(from_folder, component), _state(from_comfy, component)
        assert a.keys() == b.keys(), component
        for key in a:
            assert a[key].dtype == b[key].dtype == (torch.float32 if a[key].is_floating_point() else a[key].dtype)
            assert torch.equal(a[key], b[key]), f"{component}: {key}"
    texts = ["pop, electronic, upbeat, female vocal", "sad piano ballad, 80 bpm"]
    assert torch.equal(from_folder.text_encoder.tokenize(texts)[0], from_comfy.text_encoder.tokenize(texts)[0])


def test_folder_weights_equal_the_files(from_folder):
    for component in ALL_COMPONENTS:
        layout = LAYOUTS[component]
        file = TINY_FOLDER / layout.folder / layout.weights
        state = _state(from_folder, component)
        prefix = "model." if component == "text" else ""
        for key, ref in load_file(str(file)).items():
            assert torch.equal(state[prefix + key], ref), f"{component}: {key}"


REAL_KEY_FILES = {
    "transformer": "ace_step_transformer.json",
    "dcae": "music_dcae_f8c8.json",
    "vocoder": "music_vocoder.json",
    "text": "umt5_base_encoder.json",
}


@pytest.mark.parametrize(
    "component, parametrized_names",
    [(c, False) for c in ALL_COMPONENTS] + [("vocoder", True)],
    ids=list(ALL_COMPONENTS) + ["vocoder-parametrizations"],
)
def test_real_key_lists_map_onto_modules_built_from_shapes_alone(component, parametrized_names):
    """The single-file path (no config.json) on the real 3.5B names and shapes, built on meta."""
    real = json.loads((REAL_KEYS / REAL_KEY_FILES[component]).read_text())["keys"]
    if parametrized_names:
        rename = {".weight_g": ".parametrizations.weight.original0", ".weight_v": ".parametrizations.weight.original1"}
        real = {next((k[: -len(a)] + b for a, b in rename.items() if k.endswith(a)), k): v for k, v in real.items()}
    if component == "text":
        del real["encoder.embed_tokens.weight"]  # safetensors files keep one of the two tied names
    keys = map_component_keys(component, list(real))
    shapes = {k: tuple(real[v]) for k, v in keys.items()}
    make_config, make_module = component_classes(component)
    config = make_config(None, shapes)
    with torch.device("meta"):
        module = make_module(config)
    built = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert built == shapes


def test_bfloat16_load_has_bf16_params_and_no_fp32_weights():
    model = load_acestep(TINY_FOLDER, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    for component in ALL_COMPONENTS:
        module = getattr(model, MODULES[component])
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == {torch.bfloat16}, component
        assert all(not p.requires_grad for p in module.parameters())
    ref = load_file(str(TINY_FOLDER / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"))
    state = model.transformer.state_dict()
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in ref.items())
    assert model.vocoder.state_dict()["mel_transform.mel_scale.fb"].dtype == torch.float32


def test_dtype_may_be_named():
    model = load_acestep(TINY_FOLDER, dtype="bfloat16", components=("dcae",))
    assert {p.dtype for p in model.dcae.parameters()} == {torch.bfloat16}
    assert model.transformer is None and model.text_encoder is None


def test_parameters_are_created_on_meta_and_buffers_are_real():
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4096, 4096)
            self.register_buffer("table", torch.arange(8.0), persistent=False)

    with parameters_on_meta():
        module = WithBuffer()
    assert {p.device.type for p in module.parameters()} == {"meta"}
    assert module.table.device.type == "cpu" and torch.equal(module.table, torch.arange(8.0))
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_tensors_left_on_meta_are_an_error():
    module = torch.nn.Module()
    module.register_buffer("table", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(CheckpointError, match="still on the meta device.*table"):
        materialize_buffers(module, torch.device("cpu"))


def test_progress_is_reported_per_component():
    calls = []
    load_acestep(TINY_FOLDER, components=("dcae", "vocoder"), progress=lambda *a: calls.append(a))
    assert calls == [("dcae", 1, 2), ("vocoder", 2, 2)]


def test_vocoder_parametrization_names_and_absent_mel_buffers(tmp_path, comfy_tensors, from_comfy):
    tensors = {}
    for key, value in comfy_tensors.items():
        if key.startswith("vae.vocoder.mel_transform."):
            continue
        if key.startswith("vae.vocoder.") and key.endswith((".weight_g", ".weight_v")):
            stem, kind = key.rsplit(".", 1)
            key = f"{stem}.parametrizations.weight.original{0 if kind == 'weight_g' else 1}"
        tensors[key] = value
    tensors["text_encoders.umt5base.logit_scale"] = torch.tensor(4.6052)
    assert any(".parametrizations.weight.original0" in k for k in tensors)
    file = _write(tmp_path / "renamed.safetensors", tensors)
    model = load_acestep(file, components=("vocoder", "text"))
    for component in ("vocoder", "text"):
        a, b = _state(model, component), _state(from_comfy, component)
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("mel_transform."):  # recomputed from the config when the file omits them
                torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
            else:
                assert torch.equal(a[key], b[key]), f"{component}: {key}"


def test_stray_tensors_in_single_file_are_named(tmp_path, comfy_tensors):
    tensors = {k: v for k, v in comfy_tensors.items() if k.startswith("vae.dcae.")}
    tensors["cond_stage_model.extra"] = torch.zeros(2)
    file = _write(tmp_path / "stray.safetensors", tensors)
    with pytest.warns(UserWarning, match="ignoring 1 tensor.*cond_stage_model.extra"):
        load_acestep(file, components=("dcae",))


def test_lyric_tokenizer_is_built_on_first_use(vocab_path):
    model = load_acestep(TINY_FOLDER, components=("dcae",), lyric_vocab=vocab_path)
    assert model._lyric_tokenizer is None
    tokenizer = model.lyric_tokenizer
    assert tokenizer is model.lyric_tokenizer


def test_missing_lyric_vocab_fails_only_when_needed(monkeypatch):
    monkeypatch.delenv("ACESTEP_LYRIC_VOCAB", raising=False)
    model = load_acestep(TINY_FOLDER, components=("dcae",))
    with pytest.raises(FileNotFoundError, match="lyric vocabulary"):
        model.lyric_tokenizer


# ------------------------------------------------------------------------------------------------ errors


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*ace_step_transformer/"):
        load_acestep(tmp_path / "nowhere")


def test_folder_without_the_sub_folders(tmp_path):
    (tmp_path / "ace_step_transformer").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError) as err:
        load_acestep(tmp_path)
    message = str(err.value)
    assert "music_dcae_f8c8/" in message and "umt5-base/" in message and "notes.txt" in message


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, monkeypatch, suffix):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    file = tmp_path / f"acestep{suffix}"
    file.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_acestep(file)


def test_pickle_weights_in_a_folder_are_refused(tmp_path):
    root = tmp_path / "ckpt"
    for name in ALL_COMPONENTS:
        (root / LAYOUTS[name].folder).mkdir(parents=True)
    (root / "music_dcae_f8c8" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*pickle"):
        load_acestep(root, components=("dcae",))


def test_not_safetensors(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="expected an all-in-one .safetensors"):
        load_acestep(file)


def test_truncated_safetensors(tmp_path):
    data = TINY_COMFY.read_bytes()
    file = tmp_path / "truncated.safetensors"
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors.*truncated or corrupt"):
        load_acestep(file, configs=COMFY_CONFIGS)


def test_garbage_safetensors(tmp_path):
    file = tmp_path / "garbage.safetensors"
    file.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors.*cannot be read as safetensors"):
        load_acestep(file)


def test_missing_keys_name_the_file_and_keys(tmp_path, comfy_tensors):
    dropped = [
        "text_encoders.umt5base.transformer.encoder.block.5.layer.1.DenseReluDense.wo.weight",
        "text_encoders.umt5base.transformer.encoder.block.7.layer.0.SelfAttention.o.weight",
    ]
    tensors = {k: v for k, v in comfy_tensors.items() if k not in dropped}
    file = _write(tmp_path / "missing.safetensors", tensors)
    with pytest.raises(CheckpointError) as err:
        load_acestep(file, components=("text",))
    message = str(err.value)
    assert str(file) in message and "2 missing key(s)" in message
    assert all(k.removeprefix("text_encoders.umt5base.transformer.") in message for k in dropped)


def test_missing_keys_in_folder_layout_name_the_component_file(tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(TINY_FOLDER, root, copy_function=shutil.copyfile)
    file = root / "music_dcae_f8c8" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    dropped = sorted(k for k in tensors if k.startswith("decoder.") and k.endswith(".bias"))[:12]
    _write(file, {k: v for k, v in tensors.items() if k not in dropped})
    with pytest.raises(CheckpointError) as err:
        load_acestep(root, components=("dcae",))
    message = str(err.value)
    assert str(file) in message and "12 missing" in message and dropped[0] in message


def test_unexpected_and_misshapen_keys(tmp_path, comfy_tensors):
    text = {k: v for k, v in comfy_tensors.items() if k.startswith("text_encoders.")}
    extra = dict(text, **{"text_encoders.umt5base.transformer.encoder.block.0.layer.0.SelfAttention.extra": torch.zeros(3)})
    file = _write(tmp_path / "extra.safetensors", extra)
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*1 unexpected key.*SelfAttention\.extra"):
        load_acestep(file, components=("text",))
    key = "text_encoders.umt5base.transformer.encoder.block.4.layer.1.DenseReluDense.wi_1.weight"
    wrong = dict(text, **{key: text[key].T})
    file = _write(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors.*shape.*block\.4\.layer\.1\.DenseReluDense\.wi_1"):
        load_acestep(file, components=("text",))


def test_component_absent_from_single_file(tmp_path, comfy_tensors):
    file = _write(tmp_path / "dit_only.safetensors", {k: v for k, v in comfy_tensors.items() if k.startswith("model.")})
    with pytest.raises(CheckpointError, match="no dcae, vocoder, text weights"):
        load_acestep(file, configs=COMFY_CONFIGS)
    assert load_acestep(file, components=("transformer",), configs=COMFY_CONFIGS).transformer is not None


def test_wrong_model_family(tmp_path):
    file = _write(tmp_path / "sdxl.safetensors", {"conditioner.embedders.0.weight": torch.zeros(4, 4), "first_stage_model.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"sdxl\.safetensors is not an ACE-Step v1 checkpoint.*model\.diffusion_model\."):
        load_acestep(file)


def test_component_file_of_the_folder_layout_passed_alone():
    with pytest.raises(CheckpointError, match="ace_step_transformer/ weights file of the folder layout"):
        load_acestep(TINY_FOLDER / "ace_step_transformer" / "diffusion_pytorch_model.safetensors")


def test_missing_spiece_model(tmp_path, comfy_tensors):
    text = {k: v for k, v in comfy_tensors.items() if k.startswith("text_encoders.umt5base.")}
    file = _write(tmp_path / "nospiece.safetensors", text)
    with pytest.raises(CheckpointError, match="text_encoders.spiece_model"):
        load_acestep(file, components=("text",))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": torch.int8}, "not a floating torch dtype"),
        ({"dtype": "float64x"}, "not a floating torch dtype"),
        ({"components": ("transformer", "unet")}, "choose one or more of"),
        ({"components": ()}, "choose one or more of"),
        ({"configs": {"unet": {}}}, "configs has an entry for 'unet'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_acestep(TINY_FOLDER, **kwargs)


# ------------------------------------------------------------------------------------------------ repo ids


def test_repo_id_without_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and the files are not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelDownloadError) as err:
        load_acestep("ACE-Step/ACE-Step-v1-3.5B", models_dir=tmp_path)
    message = str(err.value)
    assert "could not download ACE-Step/ACE-Step-v1-3.5B" in message and "no network" in message
    assert str(tmp_path / "ACE-Step-v1-3.5B") in message and "umt5-base/" in message


def test_repo_id_connection_error(tmp_path, monkeypatch):
    import huggingface_hub

    def no_route(*args, **kwargs):
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_route)
    with pytest.raises(ModelDownloadError, match="no network.*put the folder at"):
        load_acestep("ACE-Step/ACE-Step-v1-3.5B", models_dir=tmp_path, components=("dcae",))


def test_repo_id_downloads_only_the_component_folders(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_download(repo_id, *, local_dir=None, allow_patterns=None, **kwargs):
        seen.update(repo_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns)
        shutil.copytree(TINY_FOLDER, local_dir, copy_function=shutil.copyfile)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = load_acestep("ACE-Step/ACE-Step-v1-3.5B", models_dir=tmp_path, components=("dcae", "text"))
    assert seen["repo_id"] == "ACE-Step/ACE-Step-v1-3.5B"
    assert Path(seen["local_dir"]) == tmp_path / "ACE-Step-v1-3.5B"
    assert sorted(seen["allow_patterns"]) == ["music_dcae_f8c8/*", "umt5-base/*"]
    assert model.layout == "folder" and model.source == tmp_path / "ACE-Step-v1-3.5B"

    def must_not_download(*args, **kwargs):
        raise AssertionError("the folder is already there")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", must_not_download)
    again = load_acestep("ACE-Step/ACE-Step-v1-3.5B", models_dir=tmp_path, components=("dcae",))
    assert all(torch.equal(a, b) for a, b in zip(again.dcae.state_dict().values(), model.dcae.state_dict().values()))


def test_download_bugs_are_not_reported_as_network_errors(tmp_path, monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise TypeError("unexpected keyword argument")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_acestep("ACE-Step/ACE-Step-v1-3.5B", models_dir=tmp_path)


def test_unknown_repo(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
        Exception.__init__(error, "404 Client Error: Repository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(ModelDownloadError, match="does not exist or needs access rights"):
        load_acestep("someone/not-a-model", models_dir=tmp_path)

