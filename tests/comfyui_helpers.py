"""Helpers of the real-ComfyUI tests (tests/test_comfyui_real.py, tests/test_comfyui_memory.py): the ComfyUI
environment check, waiting for /history, the StemGen files the StemGen workflows load, and a probe node that reports
what ComfyUI's memory manager holds.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
HISTORY_TIMEOUT = 60.0
PROBE_NODE = "AceStepTestMemoryProbe"
PROBE_FILE = "acestep_test_memory_probe.py"
# Class names of the pack's components in ComfyUI's memory manager (nodes/comfy_models.py).
PACK_CLASSES = ("AceStepPackTransformer", "AceStepPackTextEncoder", "AceStepPackDCAE", "AceStepPackVocoder",
                "AceStepPackStemGen")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def comfyui_mark():
    """Skip without COMFYUI_DIR, except in CI (CI=true): there the tests run and `require_comfyui` fails them."""
    return pytest.mark.skipif(
        not COMFYUI_DIR and not in_ci(),
        reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its interpreter) to run the "
               "real-server integration test; see docs/comfyui.md",
    )


def require_comfyui() -> None:
    """Fail (CI=true without a ComfyUI environment) instead of skipping."""
    if not COMFYUI_DIR:
        pytest.fail("CI=true but COMFYUI_DIR is not set: .ci/run must build the ComfyUI environment and export "
                    "COMFYUI_DIR and COMFYUI_PYTHON (see docs/comfyui.md)")


def wait_for_history(server, prompt_id: str, timeout: float = HISTORY_TIMEOUT) -> dict:
    """The /history entry of a prompt; ComfyUI writes it just after it reports the prompt finished."""
    deadline = time.monotonic() + timeout
    while True:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            return entry
        if time.monotonic() > deadline:
            pytest.fail(f"/history/{prompt_id} stayed empty for {timeout:.0f} s after the prompt finished")
        time.sleep(0.1)


def write_stemgen_files(folder: Path, checkpoint: Path) -> list[Path]:
    """Untrained StemGen and singing-to-accompaniment files for the tiny checkpoint (the names the example
    workflows load), written with the trainer's own file writer; an untrained branch leaves the base model as it is."""
    from acestep_core.loading import load_acestep
    from acestep_core.stemgen.control import ControlConfig, StemGenControl
    from acestep_core.stemgen.weights import save_stemgen

    transformer = load_acestep(checkpoint, components=("transformer",)).transformer
    written = []
    for task, name in (("stemgen", "acestep-stemgen.safetensors"),
                       ("singing2accompaniment", "acestep-singing2accompaniment.safetensors")):
        config = ControlConfig.for_transformer(transformer.config, task=task, control_blocks=2)
        control = StemGenControl.from_base(transformer, config)
        written.append(save_stemgen(folder / name, control, training={"step": 0}))
    return written


PROBE_SOURCE = '''"""Test-only node (written by tests/comfyui_helpers.py): what ComfyUI's memory manager holds."""
import gc
import json
import sys


class AceStepTestMemoryProbe:
    CATEGORY = "testing"
    FUNCTION = "probe"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("STRING", {"default": ""})}}

    def probe(self, nonce):
        import comfy.model_management as mm

        gc.collect()
        caches = [m for name, m in list(sys.modules.items())
                  if name.endswith("nodes.cache") and hasattr(m, "MODELS")]
        report = {
            "loaded": [type(patcher.model).__name__ for patcher in mm.loaded_models()],
            "cached": sum(len(m.MODELS) for m in caches),
            "alive": sum(1 for o in gc.get_objects() if type(o).__name__ == "AceStepModel"),
        }
        return {"ui": {"text": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"AceStepTestMemoryProbe": AceStepTestMemoryProbe}
'''


def install_probe(custom_nodes: Path) -> None:
    """Put the probe node in the server's custom_nodes folder (a temporary one; never in the pack)."""
    (custom_nodes / PROBE_FILE).write_text(PROBE_SOURCE)


def probe(server, run_prompt) -> dict:
    """{"loaded": class names ComfyUI's memory manager holds loaded, "cached": models in the pack's cache,
    "alive": AceStepModel objects alive in the server}."""
    prompt = {"1": {"class_type": PROBE_NODE, "inputs": {"nonce": f"{time.monotonic_ns()}"}}}
    prompt_id, _ = run_prompt(server, prompt)
    (text,) = wait_for_history(server, prompt_id)["outputs"]["1"]["text"]
    return json.loads(text)


def pack_loaded(report: dict) -> list[str]:
    """The pack's components in a probe report's loaded list."""
    return sorted(name for name in report["loaded"] if name in PACK_CLASSES)


def free(server, **flags) -> None:
    """POST /free (as the editor's "Unload models" / "Free model and node cache" buttons do)."""
    status, _ = server.post("/free", flags)
    assert status == 200, f"/free answered {status}"


def wait_for(condition, what: str, timeout: float = 60.0, interval: float = 0.5):
    """Poll `condition()` until it returns a true value (returned); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (urllib.error.URLError, ConnectionError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)
