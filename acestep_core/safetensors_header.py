"""The one reader of a safetensors file's JSON header (LoRA files, StemGen files), without loading any tensor.

Layout: 8 bytes little-endian header length N, then N bytes of JSON (tensor names → dtype, shape, offsets, and
an optional "__metadata__" dict of strings). Model checkpoints are opened with safetensors' own `safe_open`
(acestep_core.loading), which also checks the tensor offsets.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest header accepted (the safetensors format's own limit)."""


def header_bytes(path: str | Path) -> bytes | None:
    """The raw JSON header of a safetensors file, or None when the file is not one (or cannot be read)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if not 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                return None
            return handle.read(length)
    except OSError:
        return None


def read_header(path: str | Path) -> dict[str, Any] | None:
    """The parsed JSON header of a safetensors file, or None when the file is not one (or cannot be read)."""
    raw = header_bytes(path)
    try:
        header = json.loads(raw) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def metadata(header: dict[str, Any]) -> dict[str, str]:
    """The "__metadata__" entries of a header (empty when it has none)."""
    return header.get("__metadata__") or {}


def json_entry(text: str | None, key: str, what: str) -> dict[str, Any] | None:
    """A JSON-object metadata entry (`text` as stored under `key`) as a dict, None when absent; a ValueError
    naming `what` (the file) when it is not a JSON object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: header '{key}' is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: header '{key}' must be a JSON object, got {type(value).__name__}")
    return value
