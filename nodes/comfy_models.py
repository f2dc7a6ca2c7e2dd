"""The pack's models inside ComfyUI's memory manager (docs/comfyui.md, "Memory").

Inside ComfyUI every component of a cached model (transformer with its LoRAs, text encoder, DCAE, vocoder, and a
StemGen control branch) gets its own ComfyUI ModelPatcher, and a node has ComfyUI load the components it is about
to run (`use`). ComfyUI then counts them, moves them between its load and offload devices, unloads them for other
models when memory is short, and unloads them on "Unload models" / POST /free. Once ComfyUI has unloaded every
component of a model (or before it has loaded any), the pack's cache lets go of it (`ModelCache.release`): from
then on only node outputs that ComfyUI still caches keep it in memory (the loader's ACESTEP_MODEL handle holds it),
as for ComfyUI's own models, and POST /free with free_memory (which clears ComfyUI's node cache) frees it; while it
lives, the cache takes it back instead of reading it again.

Outside ComfyUI (command line, scripts, tests) `use` does nothing and the plain cache keeps the models.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from . import bridge

# component name -> (AceStepModel attribute, ComfyUI offload rule, class name ComfyUI shows in its log)
COMPONENTS = {
    "transformer": ("transformer", "unet", "AceStepPackTransformer"),
    "text": ("text_encoder", "text", "AceStepPackTextEncoder"),
    "dcae": ("dcae", "vae", "AceStepPackDCAE"),
    "vocoder": ("vocoder", "vae", "AceStepPackVocoder"),
}
STEMGEN = ("stemgen", "unet", "AceStepPackStemGen")
ALL = tuple(COMPONENTS)
# the same for an ACE-Step 1.5 bundle (acestep_core.v15.pipeline.Bundle15; dotted attribute paths)
COMPONENTS_15 = {
    "dit": ("model", "unet", "AceStep15PackDiT"),
    "text": ("text_encoder.model", "text", "AceStep15PackTextEncoder"),
    "vae": ("vae", "vae", "AceStep15PackVAE"),
}
ALL_15 = tuple(COMPONENTS_15)


class ComponentSlot(torch.nn.Module):
    """Holds one component for ComfyUI's ModelPatcher, which writes its own bookkeeping attributes (device, loaded
    memory, ...) on the module it manages: they land on this slot, never on the pack's modules."""

    def __init__(self, component: torch.nn.Module):
        super().__init__()
        self.component = component


_SLOT_CLASSES: dict[str, type] = {}


def slot_for(component: torch.nn.Module, class_name: str) -> ComponentSlot:
    """A slot whose class name says what it holds (ComfyUI logs "Requested to load <class name>")."""
    cls = _SLOT_CLASSES.get(class_name)
    if cls is None:
        cls = _SLOT_CLASSES[class_name] = type(class_name, (ComponentSlot,), {"__doc__": ComponentSlot.__doc__})
    return cls(component)


@dataclass
class Managed:
    """One cached model's patchers and which of them ComfyUI holds loaded."""

    model: weakref.ref
    release: Callable[[object], None]
    patchers: dict[str, object] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    attached: set[str] = field(default_factory=set)

    def detached(self, name: str) -> None:
        """ComfyUI unloaded component `name`; when none is left loaded the cache lets go of the model."""
        self.attached.discard(name)
        if self.attached:
            return
        model = self.model()
        if model is not None:
            self.release(model)


_MANAGED: dict[int, Managed] = {}
# Patchers of freed models, emptied of their component. A model is often freed while ComfyUI is unloading its last
# component (the cache lets go of it from that patcher's detach); ComfyUI still reads the patcher after detach
# returns, so it must outlive that call: these are dropped at the next `use`.
_RETIRED: list = []
_LOCK = threading.RLock()


def _forget(model_id: int) -> None:
    """A managed model was freed: its patchers let go of its modules (freeing the weights) and retire."""
    with _LOCK:
        record = _MANAGED.pop(model_id, None)
        if record is None:
            return
        for patcher in record.patchers.values():
            patcher.model.component = None
        _RETIRED.extend(record.patchers.values())
        record.patchers.clear()
        record.modules.clear()


def _record(model, release: Callable[[object], None]) -> Managed:
    with _LOCK:
        record = _MANAGED.get(id(model))
        if record is None or record.model() is not model:
            record = _MANAGED[id(model)] = Managed(weakref.ref(model), release)
            weakref.finalize(model, _forget, id(model))
        return record


def _patcher(record: Managed, name: str, module: torch.nn.Module, kind: str, class_name: str, device: torch.device):
    """The record's patcher for `name`, made (again) when it is missing or holds another module."""
    if record.modules.get(name) is module:
        return record.patchers[name]

    def on_detach(patcher, record=record, name=name):
        if record.patchers.get(name) is patcher:
            record.detached(name)

    patcher = bridge.model_patcher(slot_for(module, class_name), device, bridge.offload_device(kind, device),
                                   on_detach)
    record.patchers[name], record.modules[name] = patcher, module
    return patcher


def use(model, device: torch.device, components: Iterable[str], release: Callable[[object], None],
        extra: dict[str, torch.nn.Module] | None = None, table: dict | None = None) -> None:
    """Have ComfyUI load `components` of `model` (and `extra` modules, e.g. {"stemgen": control}) on `device` before
    a node runs them; `release(model)` is called once ComfyUI holds none of them loaded. No-op outside ComfyUI.
    `table` names the components (COMPONENTS for a v1 model, COMPONENTS_15 for a 1.5 bundle)."""
    if bridge.memory_manager() is None:
        return
    table = COMPONENTS if table is None else table
    with _LOCK:
        _RETIRED.clear()
        record = _record(model, release)
        wanted = []
        for name in components:
            attribute, kind, class_name = table[name]
            module = model
            for part in attribute.split("."):
                module = getattr(module, part)
            if module is not None:
                wanted.append((name, _patcher(record, name, module, kind, class_name, device)))
        for name, module in (extra or {}).items():
            wanted.append((name, _patcher(record, name, module, STEMGEN[1], STEMGEN[2], device)))
    bridge.load_models([patcher for _, patcher in wanted])
    with _LOCK:
        record.attached.update(name for name, _ in wanted)
        if not record.attached:  # nothing of it in ComfyUI's memory manager (a loader node): the handle holds it
            release(model)


def loaded_components(model) -> list[str]:
    """The components of `model` ComfyUI's memory manager holds loaded right now (empty outside ComfyUI)."""
    record = _MANAGED.get(id(model))
    if record is None or record.model() is not model:
        return []
    loaded = {id(p) for p in bridge.loaded_patchers()}
    return [name for name, patcher in record.patchers.items() if id(patcher) in loaded]
