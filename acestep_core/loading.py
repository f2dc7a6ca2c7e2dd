"""The one ACE-Step v1 checkpoint loader: Hugging Face folders or the ComfyUI all-in-one file, safetensors only (design §10)."""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from .download import hf_download, is_network_error
from .errors import CheckpointError, ModelDownloadError  # noqa: F401  (ModelDownloadError: re-exported)
from .models.dcae import DCAE, DCAEConfig
from .models.transformer import AceStepTransformer, TransformerConfig
from .models.vocoder import MEL_BUFFERS, Vocoder, VocoderConfig, vocoder_key_map
from .validation import check_tensor_values

if TYPE_CHECKING:  # text.py pulls in transformers, lyrics the language detector: imported when first needed
    from .lyrics import LyricTokenizer
    from .text import TextEncoder

DEFAULT_REPO = "ACE-Step/ACE-Step-v1-3.5B"
ALL_COMPONENTS = ("transformer", "dcae", "vocoder", "text")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SPIECE_KEY = "text_encoders.spiece_model"
IGNORED_SINGLE_FILE_KEYS = ("text_encoders.umt5base.logit_scale",)
UMT5_TIED = ("shared.weight", "encoder.embed_tokens.weight")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ComponentLayout:
    """Where one component lives in each layout (design §10.1 folder/file, §10.2 prefix)."""

    name: str
    folder: str
    weights: str
    prefix: str
    optional_keys: tuple[str, ...] = ()


LAYOUTS: dict[str, ComponentLayout] = {
    "transformer": ComponentLayout(
        "transformer", "ace_step_transformer", "diffusion_pytorch_model.safetensors", "model.diffusion_model."
    ),
    "dcae": ComponentLayout("dcae", "music_dcae_f8c8", "diffusion_pytorch_model.safetensors", "vae.dcae."),
    "vocoder": ComponentLayout(
        "vocoder", "music_vocoder", "diffusion_pytorch_model.safetensors", "vae.vocoder.", tuple(MEL_BUFFERS)
    ),
    "text": ComponentLayout("text", "umt5-base", "model.safetensors", "text_encoders.umt5base.transformer."),
}

# Unprefixed keys that betray a single component file of the folder layout passed as a checkpoint.
_FOLDER_FILE_MARKERS = {
    "genre_embedder.weight": "ace_step_transformer",
    "encoder.conv_in.weight": "music_dcae_f8c8",
    "backbone.channel_layers.0.0.weight": "music_vocoder",
    "shared.weight": "umt5-base",
}


@dataclass
class TensorSource:
    """One component's tensors: module key -> key in a safetensors file, plus the shapes (design §10)."""

    file: Path
    keys: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    config: dict | None


@dataclass
class AceStepModel:
    """Every loaded ACE-Step v1 component, with where and how it was loaded (design §10)."""

    transformer: AceStepTransformer | None
    dcae: DCAE | None
    vocoder: Vocoder | None
    text_encoder: TextEncoder | None
    dtype: torch.dtype
    device: torch.device
    source: Path
    layout: str
    lyric_vocab: str | os.PathLike | None = None
    _lyric_tokenizer: LyricTokenizer | None = field(default=None, init=False, repr=False)

    @property
    def lyric_tokenizer(self) -> LyricTokenizer:
        """The lyric tokenizer, built on first use; raises the lyric module's clear error when no vocab is found (design §5.1)."""
        if self._lyric_tokenizer is None:
            from .lyrics import LyricTokenizer, find_lyric_vocab

            checkpoint_dir = self.source if self.layout == "folder" else self.source.parent
            self._lyric_tokenizer = LyricTokenizer(find_lyric_vocab(self.lyric_vocab, checkpoint_dir))
        return self._lyric_tokenizer


def load_acestep(
    path_or_repo: str | os.PathLike = DEFAULT_REPO,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    models_dir: str | os.PathLike | None = None,
    components: Sequence[str] = ALL_COMPONENTS,
    lyric_vocab: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    configs: Mapping[str, Mapping] | None = None,
) -> AceStepModel:
    """Load ACE-Step v1 from a folder, an all-in-one .safetensors file or a Hugging Face repo id (design §10).

    `configs` maps a component name to config.json values that override the folder's (or, in the single-file
    layout, supply what the shapes cannot tell, e.g. the transformer's head count); `progress(name, done, total)`
    is called after each component.
    """
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    components = _check_components(components)
    path = resolve_checkpoint(path_or_repo, models_dir=models_dir, components=components)
    layout = detect_layout(path, components)
    sources = folder_sources(path, components) if layout == "folder" else single_file_sources(path, components)
    for name, values in (configs or {}).items():
        if name not in ALL_COMPONENTS:
            raise ValueError(f"configs has an entry for {name!r}; components are {ALL_COMPONENTS}")
        if name in sources:
            sources[name].config = {**(sources[name].config or {}), **values}
    loaded: dict[str, Any] = {}
    for i, name in enumerate(components):
        if name == "text":
            loaded[name] = _build_text_encoder(sources[name], path, layout, dtype, device)
        else:
            loaded[name] = build_component(name, sources[name], dtype, device)
        if progress is not None:
            progress(name, i + 1, len(components))
    return AceStepModel(
        transformer=loaded.get("transformer"),
        dcae=loaded.get("dcae"),
        vocoder=loaded.get("vocoder"),
        text_encoder=loaded.get("text"),
        dtype=dtype,
        device=device,
        source=path,
        layout=layout,
        lyric_vocab=lyric_vocab,
    )


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ('bfloat16', 'float16', 'float32')."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype; use torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def _check_components(components: Sequence[str]) -> tuple[str, ...]:
    """The requested component names, checked against ALL_COMPONENTS."""
    if isinstance(components, str):
        components = (components,)
    unknown = [c for c in components if c not in ALL_COMPONENTS]
    if unknown or not components:
        raise ValueError(f"components={tuple(components)!r}: choose one or more of {ALL_COMPONENTS}")
    return tuple(dict.fromkeys(components))


# ---------------------------------------------------------------------------------------------------------------
# Where the files are: local path, or a Hugging Face repo id downloaded into models_dir.


def resolve_checkpoint(
    path_or_repo: str | os.PathLike, *, models_dir: str | os.PathLike | None, components: Sequence[str]
) -> Path:
    """A local path for a folder, a file or a repo id (downloaded when not on disk) (design §10.1)."""
    text = str(path_or_repo)
    if "\x00" in text:
        raise CheckpointError(f"checkpoint {text[:80]!r}: a path cannot contain a NUL character")
    path = Path(path_or_repo).expanduser()
    try:
        if path.exists():
            return path
    except OSError as exc:  # a name too long for the file system, and the like
        raise CheckpointError(f"checkpoint {text[:80]!r}{'...' if len(text) > 80 else ''} cannot be a path: {exc.strerror}") from None
    if _REPO_ID.match(text) and not _valid_repo_id(text):
        raise CheckpointError(
            f"checkpoint {text[:80]!r}{'...' if len(text) > 80 else ''} is neither a local path nor a valid Hugging Face "
            "repo id (owner/name: at most 96 characters each of letters, digits, '-', '_', '.', not starting or ending "
            "with '-' or '.', without '..' or '--')"
        )
    if not _REPO_ID.match(text):
        raise CheckpointError(
            f"checkpoint {text!r} not found: expected a folder with "
            f"{', '.join(LAYOUTS[c].folder + '/' for c in ALL_COMPONENTS)}, an all-in-one .safetensors file, "
            f"or a Hugging Face repo id such as {DEFAULT_REPO!r}"
        )
    target = Path(models_dir).expanduser() / text.split("/")[-1] if models_dir is not None else None
    if target is not None and all((target / LAYOUTS[c].folder).is_dir() for c in components):
        return target
    return download_repo(text, target, components)


def _valid_repo_id(text: str) -> bool:
    """Hugging Face's rules for owner and repo names (the hub refuses anything else)."""
    return all(
        0 < len(part) <= 96 and ".." not in part and "--" not in part and part[0] not in "-." and part[-1] not in "-."
        for part in text.split("/")
    )


def download_repo(repo_id: str, target: Path | None, components: Sequence[str]) -> Path:
    """snapshot_download of only the component folders, into target (or the HF cache when None) (design §10.1)."""
    patterns = [f"{LAYOUTS[c].folder}/*" for c in components]
    where = str(target) if target is not None else "a local folder (pass its path instead of the repo id)"
    return hf_download(
        repo_id, target, patterns,
        not_found_fix=f"put the folders {', '.join(patterns)} at {where}",
        offline_fix=f"put the folder at {where} with the sub-folders "
                    f"{', '.join(LAYOUTS[c].folder + '/' for c in components)}",
    )


_is_network_error = is_network_error  # the old private name, for callers that still use it


# ---------------------------------------------------------------------------------------------------------------
# Layout detection and key maps (one place for every name change).


def detect_layout(path: Path, components: Sequence[str]) -> str:
    """'folder' (the four HF sub-folders) or 'single_file' (ComfyUI all-in-one .safetensors); anything else is an error."""
    if path.is_dir():
        missing = [LAYOUTS[c].folder for c in components if not (path / LAYOUTS[c].folder).is_dir()]
        if missing:
            found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
            raise CheckpointError(
                f"{path} is not an ACE-Step v1 checkpoint folder: missing sub-folder(s) {', '.join(m + '/' for m in missing)}; "
                f"found {', '.join(found[:12]) or 'nothing'}{' ...' if len(found) > 12 else ''}. Expected "
                f"{', '.join(LAYOUTS[c].folder + '/' for c in ALL_COMPONENTS)} (the Hugging Face repo {DEFAULT_REPO}) "
                "or an all-in-one .safetensors file"
            )
        return "folder"
    _refuse_non_safetensors(path)
    return "single_file"


def _refuse_non_safetensors(path: Path) -> None:
    """Refuse pickle checkpoints (never torch.load) and anything that is not .safetensors."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: {suffix} files are Python pickles, which can run code when loaded and are refused; "
            "use the .safetensors release of the checkpoint"
        )
    if suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: expected an all-in-one .safetensors file or a checkpoint folder, got a '{suffix or 'no'}' file"
        )


def _open(file: Path) -> Any:
    """safe_open with a clear error naming the file when it is truncated or not safetensors."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{file}: cannot be read as safetensors ({exc}); the file is truncated or corrupt - download it again"
        ) from exc


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape in a safetensors file, read from its header only."""
    with _open(file) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def folder_sources(root: Path, components: Sequence[str]) -> dict[str, TensorSource]:
    """Tensor sources of the HF folder layout: unprefixed keys and config.json per sub-folder (design §10.1)."""
    sources = {}
    for name in components:
        layout = LAYOUTS[name]
        folder = root / layout.folder
        file = _component_file(folder, layout.weights)
        shapes = _file_shapes(file)
        config_file = folder / "config.json"
        config = _read_config(config_file) if config_file.is_file() else None
        keys = map_component_keys(name, list(shapes))
        sources[name] = TensorSource(file, keys, {k: shapes[v] for k, v in keys.items()}, config)
    return sources


def _read_config(file: Path) -> dict:
    """A config.json as a dict; a CheckpointError naming the file when it is not a JSON object."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); restore it from the checkpoint release") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{file} must hold a JSON object of settings, got {type(config).__name__}; restore it from the release"
        )
    return config


def _component_file(folder: Path, weights: str) -> Path:
    """The weights file of one sub-folder; pickles are refused, a lone differently named .safetensors is accepted."""
    if (folder / weights).is_file():
        return folder / weights
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _refuse_non_safetensors(pickles[0])
    raise CheckpointError(
        f"{folder}: expected the weights file {weights}, found {', '.join(p.name for p in folder.iterdir()) or 'nothing'}"
    )


def single_file_sources(file: Path, components: Sequence[str]) -> dict[str, TensorSource]:
    """Tensor sources of the ComfyUI all-in-one file: prefixes stripped, configs derived from shapes (design §10.2)."""
    shapes = _file_shapes(file)
    _check_family(file, shapes)
    missing = [c for c in components if not any(k.startswith(LAYOUTS[c].prefix) for k in shapes)]
    if missing:
        raise CheckpointError(
            f"{file} has no {', '.join(missing)} weights (no keys under "
            f"{', '.join(LAYOUTS[c].prefix for c in missing)}); load it with components= the parts it has, "
            "or use a full checkpoint"
        )
    known = tuple(layout.prefix for layout in LAYOUTS.values()) + (SPIECE_KEY,) + IGNORED_SINGLE_FILE_KEYS
    stray = [k for k in shapes if not k.startswith(known)]
    if stray:
        warnings.warn(
            f"{file}: ignoring {len(stray)} tensor(s) that belong to no ACE-Step component "
            f"({', '.join(stray[:10])}{' ...' if len(stray) > 10 else ''})",
            stacklevel=3,
        )
    sources = {}
    for name in components:
        prefix = LAYOUTS[name].prefix
        stripped = {k[len(prefix):]: k for k in shapes if k.startswith(prefix)}
        local = map_component_keys(name, list(stripped))
        keys = {k: stripped[v] for k, v in local.items()}
        sources[name] = TensorSource(file, keys, {k: shapes[v] for k, v in keys.items()}, None)
    return sources


def _check_family(file: Path, shapes: Mapping[str, Sequence[int]]) -> None:
    """Reject safetensors files that are not an ACE-Step v1 all-in-one checkpoint, saying what they look like."""
    prefixes = [layout.prefix for layout in LAYOUTS.values()]
    if any(k.startswith(p) for k in shapes for p in prefixes):
        return
    for marker, folder in _FOLDER_FILE_MARKERS.items():
        if marker in shapes:
            raise CheckpointError(
                f"{file} is the {folder}/ weights file of the folder layout, not a whole checkpoint; "
                f"pass the folder that contains {folder}/ and its three sibling folders"
            )
    sample = ", ".join(list(shapes)[:5])
    raise CheckpointError(
        f"{file} is not an ACE-Step v1 checkpoint: none of its {len(shapes)} tensors ({sample}{', ...' if len(shapes) > 5 else ''}) "
        f"has the prefixes {', '.join(prefixes)}"
    )


def map_component_keys(name: str, file_keys: Sequence[str]) -> dict[str, str]:
    """Module state-dict key -> file key for one component, prefix already stripped (design §10)."""
    if name == "vocoder":
        keys = vocoder_key_map({k: k for k in file_keys})
    else:
        keys = {k: k for k in file_keys}
    if name == "text":
        present = [k for k in UMT5_TIED if k in keys]
        for k in UMT5_TIED:
            if present and k not in keys:
                keys[k] = keys[present[0]]
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Building modules without allocating their weights, then assigning the tensors in the target dtype/device.


_RANDOM_FILLS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("normal_", "uniform_", "log_normal_", "exponential_", "cauchy_", "geometric_", "random_", "bernoulli_")
)


class _SkipRandomInitOnMeta(TorchFunctionMode):
    """Initialisers are no-ops on meta tensors (torch runs meta normal_ through a slow reference path)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while inside; buffers (rope tables, mel filters) stay real.

    It patches nn.Module.register_parameter for the duration, so build nothing else in other threads meanwhile.
    """
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        with _SkipRandomInitOnMeta():
            yield
    finally:
        torch.nn.Module.register_parameter = original


def assign_weights(
    module: torch.nn.Module,
    source: TensorSource,
    dtype: torch.dtype,
    device: torch.device,
    optional_keys: Sequence[str] = (),
) -> torch.nn.Module:
    """Check keys/shapes against the module, then load_state_dict(strict, assign) tensor by tensor (design §10)."""
    expected = module.state_dict()
    param_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    missing = [k for k in expected if k not in source.keys and k not in optional_keys]
    unexpected = [k for k in source.keys if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source.file}: keys do not match the model: {_key_report(missing, unexpected)}; the file is incomplete "
            "or belongs to another model - download the ACE-Step v1 checkpoint again"
        )
    wrong = [
        f"{k}: file {list(source.shapes[k])} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in source.shapes and tuple(v.shape) != tuple(source.shapes[k])
    ]
    if wrong:
        raise CheckpointError(
            f"{source.file}: {len(wrong)} tensor shape(s) do not match the model: {'; '.join(wrong[:10])}"
            f"{' ...' if len(wrong) > 10 else ''}; the config.json beside it does not describe these weights, or "
            "they belong to another model"
        )
    state: dict[str, torch.Tensor] = {}
    read: dict[str, torch.Tensor] = {}
    with _open(source.file) as f:
        for key, ref in expected.items():
            file_key = source.keys.get(key)
            if file_key is None:
                state[key] = ref.to(device)
                continue
            if file_key not in read:
                target = dtype if key in param_names else ref.dtype
                read[file_key] = _read_tensor(f, source.file, file_key, target, device)
                _check_loaded(read[file_key], ref, source.file, file_key)
            state[key] = read[file_key]
    module.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(module, device)
    return module.eval().requires_grad_(False)


def _check_loaded(tensor: torch.Tensor, ref: torch.Tensor, file: Path, key: str) -> None:
    """A tensor read for a floating model tensor must be floating (not int8/quantized) and hold finite, sane values.

    The value check is one aminmax pass over the tensor just read (docs/bad-inputs.md).
    """
    if ref.is_floating_point() and not tensor.is_floating_point():
        raise CheckpointError(
            f"{file}: tensor {key!r} is stored as {str(tensor.dtype).removeprefix('torch.')}, not floating point; "
            "quantized (int8/fp8-scaled) checkpoints are not supported - use the bf16/fp32 release"
        )
    try:
        check_tensor_values(tensor, f"tensor {key!r}")
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}; download it again") from None


def _read_tensor(f: Any, file: Path, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One tensor from an open safetensors file, converted straight to dtype (floating only) and device."""
    try:
        tensor = f.get_tensor(key)
    except Exception as exc:
        raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({exc}); the file is truncated or corrupt") from exc
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def materialize_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Move every buffer (non-persistent ones included) to device; anything still on meta is an error."""
    on_meta = [n for n, b in module.named_buffers() if b.is_meta] + [n for n, p in module.named_parameters() if p.is_meta]
    if on_meta:
        raise CheckpointError(f"tensors never loaded or computed (still on the meta device): {_key_report(on_meta, [])}")
    module.to(device)


def _key_report(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """'N missing keys (first 10: ...); M unexpected keys (first 10: ...)'."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            head = ", ".join(keys[:10])
            parts.append(f"{len(keys)} {label} key(s) ({head}{' ...' if len(keys) > 10 else ''})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Component builders: config from config.json or from shapes, module on meta, weights assigned.


ConfigFn = Callable[[Mapping | None, Mapping[str, Sequence[int]]], Any]


def component_classes(name: str) -> tuple[ConfigFn, Callable[[Any], torch.nn.Module]]:
    """(config-from-checkpoint function, module class) of one component (design §2, §4, §6)."""
    if name == "text":
        from transformers import UMT5EncoderModel

        from .text import umt5_config_from_checkpoint

        return umt5_config_from_checkpoint, UMT5EncoderModel
    classes: dict[str, tuple[ConfigFn, Callable[[Any], torch.nn.Module]]] = {
        "transformer": (TransformerConfig.from_checkpoint, AceStepTransformer),
        "dcae": (DCAEConfig.from_checkpoint, DCAE),
        "vocoder": (VocoderConfig.from_checkpoint, Vocoder),
    }
    return classes[name]


def build_component(name: str, source: TensorSource, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Config from config.json or shapes, module with its parameters on meta, weights assigned (design §10)."""
    make_config, make_module = component_classes(name)
    config = _config_or_error(make_config, source)
    with parameters_on_meta():
        module = make_module(config)
    return assign_weights(module, source, dtype, device, LAYOUTS[name].optional_keys)


def _build_text_encoder(
    source: TensorSource, root: Path, layout: str, dtype: torch.dtype, device: torch.device
) -> TextEncoder:
    """UMT5 encoder + tokenizer: tokenizer.json in the folder, the embedded SentencePiece bytes in the single file (design §4)."""
    from .text import TextEncoder, tokenizer_from_file, tokenizer_from_spiece

    model = build_component("text", source, dtype, device)
    model.set_input_embeddings(model.shared)
    if layout == "folder":
        folder = root / LAYOUTS["text"].folder
        if (folder / "tokenizer.json").is_file():
            tokenizer = tokenizer_from_file(folder / "tokenizer.json")
        elif (folder / "spiece.model").is_file():
            tokenizer = tokenizer_from_spiece((folder / "spiece.model").read_bytes())
        else:
            raise CheckpointError(f"{folder}: no tokenizer.json or spiece.model for the UMT5 tokenizer")
    else:
        tokenizer = tokenizer_from_spiece(_read_spiece(source.file))
    return TextEncoder(model, tokenizer)


def _read_spiece(file: Path) -> bytes:
    """The SentencePiece model bytes stored as a uint8 tensor in the all-in-one file (design §10.2)."""
    with _open(file) as f:
        if SPIECE_KEY not in f.keys():
            raise CheckpointError(f"{file}: no {SPIECE_KEY} tensor, so the UMT5 tokenizer cannot be built")
        data = _read_tensor(f, file, SPIECE_KEY, torch.uint8, torch.device("cpu"))
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise CheckpointError(f"{file}: {SPIECE_KEY} must be a 1-D uint8 tensor, got {data.dtype} {list(data.shape)}")
    return data.numpy().tobytes()


def _config_or_error(make: ConfigFn, source: TensorSource) -> Any:
    """Call XConfig.from_checkpoint(config, shapes), naming the file when the weights do not fit the config."""
    try:
        with _SkipRandomInitOnMeta():
            return make(source.config, source.shapes)
    except KeyError as exc:
        raise CheckpointError(f"{source.file}: tensor {exc} is missing, so the model size cannot be read") from exc
    except (TypeError, AttributeError) as exc:  # a config.json value of the wrong type
        raise CheckpointError(f"{source.file}: its config.json has a setting of the wrong type ({exc})") from exc
    except ValueError as exc:
        raise CheckpointError(f"{source.file}: {exc}") from exc

