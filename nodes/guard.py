"""Every widget value a node receives is checked against the node's own INPUT_TYPES before the node runs.

ComfyUI checks widget values typed into the editor, but not values that arrive through a link (a primitive node,
another pack's node, an edited workflow file), nor calls from scripts. `guard` wraps each node's FUNCTION so that
every INT, FLOAT, STRING and BOOLEAN input is of its type, finite and within the min/max the node declares, and
every text is valid Unicode of bounded length, with a ValueError naming the input (docs/bad-inputs.md). Combo
inputs are checked by the nodes themselves (their lists can change while ComfyUI runs).
"""
from __future__ import annotations

import functools
import math
from typing import Any

from ..acestep_core.validation import MAX_LYRICS_CHARS, check_text

MAX_STRING_CHARS = MAX_LYRICS_CHARS
"""Longest text any STRING input takes (lyrics are the longest text a node reads)."""

_SPECS: dict[type, dict[str, tuple[str, dict]]] = {}


def _widget_specs(cls: type) -> dict[str, tuple[str, dict]]:
    """name -> (kind, options) of the node's INT/FLOAT/STRING/BOOLEAN inputs (read once; they never change)."""
    if cls not in _SPECS:
        types = cls.INPUT_TYPES()
        specs = {**types.get("required", {}), **types.get("optional", {})}
        _SPECS[cls] = {
            name: (spec[0], spec[1] if len(spec) > 1 else {})
            for name, spec in specs.items()
            if isinstance(spec[0], str) and spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")
        }
    return _SPECS[cls]


def _shown(value: Any) -> str:
    return f"{value!r:.80}"


def check_widget(name: str, value: Any, kind: str, options: dict) -> None:
    """A ValueError naming `name` unless `value` is a `kind` value within the declared min/max."""
    low, high = options.get("min"), options.get("max")
    if kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {_shown(value)}")
    elif kind == "STRING":
        check_text(name, value if isinstance(value, str) else _not_text(name, value), MAX_STRING_CHARS)
    elif kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int) or \
                (low is not None and value < low) or (high is not None and value > high):
            shown = _shown(value) if not isinstance(value, int) or abs(value) < 10**15 else "a huge integer"
            raise ValueError(f"{name} must be an integer >= {low} and <= {high}, got {shown}")
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (low is not None and value < low) or (high is not None and value > high):
            shown = _shown(value) if not isinstance(value, int) or abs(value) < 10**15 else "a huge integer"
            raise ValueError(f"{name} must be a finite number from {low} to {high}, got {shown}")


def _not_text(name: str, value: Any) -> str:
    raise ValueError(f"{name} must be text, got {type(value).__name__}")


def guard(cls: type) -> type:
    """Wrap `cls.FUNCTION` so that its widget inputs are checked first (idempotent)."""
    original = getattr(cls, cls.FUNCTION)
    if getattr(original, "_guarded", False):
        return cls

    @functools.wraps(original)
    def checked(self, *args, **kwargs):
        specs = _widget_specs(type(self))
        for name, value in kwargs.items():
            if name in specs:
                check_widget(name, value, *specs[name])
        return original(self, *args, **kwargs)

    checked._guarded = True
    setattr(cls, cls.FUNCTION, checked)
    return cls
