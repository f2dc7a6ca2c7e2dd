"""The pack's one model cache: loaded ACE-Step models keyed by (resolved path, dtype, device) (docs/comfyui.md, ComfyUI facts §C7).

ComfyUI's own output cache forgets a node's result when the next prompt does not contain that node, so loader
nodes return a cheap key (see `model.ModelHandle`) and the model itself lives here: several loader nodes, or
several workflows, pointing at the same checkpoint share one model, and a key that is not cached (first use,
after `clear()` or after eviction) is simply loaded again. Inside ComfyUI the components also live in ComfyUI's
memory manager (nodes/comfy_models.py): once it has unloaded all of a model, `release` drops it from here.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from . import bridge

T = TypeVar("T")
DEFAULT_CAPACITY = 2


@dataclass(frozen=True)
class ModelKey:
    """What a loaded model depends on: the resolved checkpoint path, the dtype name and the device."""

    path: str
    dtype: str
    device: str


class ModelCache(Generic[T]):
    """Least-recently-used map from ModelKey to a loaded model, holding at most `capacity` models."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._models: OrderedDict[ModelKey, T] = OrderedDict()
        self._released: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.RLock()

    def get(self, key: ModelKey, load: Callable[[], T]) -> T:
        """The cached model for `key`, or `load()`'s result, cached (the least recently used one may be evicted).

        The new model is loaded before anything is evicted: a load that fails (a broken file, a bad setting) leaves
        every cached model in place (docs/bad-inputs.md).
        """
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = self._released.pop(key, None)
            if model is None:
                model = load()
            evicted = False
            while len(self._models) >= self.capacity:
                self._models.popitem(last=False)
                evicted = True
            self._models[key] = model
            if evicted:
                bridge.empty_cache()
            return model

    def release(self, key: ModelKey, model: T) -> bool:
        """Stop holding `model` if it is the one cached for `key` (ComfyUI's memory manager holds none of it, see
        nodes/comfy_models.py). Whatever else holds it (a node output ComfyUI caches) keeps it alive, and while it
        lives `get` takes it back instead of loading it again. True when it was released."""
        with self._lock:
            if key not in self._models or self._models[key] is not model:
                return False
            del self._models[key]
            try:
                self._released[key] = model
            except TypeError:  # not weakly referenceable: simply forgotten
                pass
            return True

    def __contains__(self, key: object) -> bool:
        return key in self._models

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[ModelKey]:
        """Cached keys, least recently used first."""
        return list(self._models)

    def clear(self) -> None:
        """Drop every model and return the freed accelerator memory."""
        with self._lock:
            self._models.clear()
        bridge.empty_cache()


MODELS: ModelCache = ModelCache()
