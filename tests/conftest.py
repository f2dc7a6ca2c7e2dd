"""Shared test helpers: where the fixtures and tiny checkpoints live, and how to read a case."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Test data lives in the repository (tests/data/README.md says how it was made); each folder can be pointed
# elsewhere with an environment variable that holds a folder of the same layout.
DATA = REPO / "tests" / "data"
FIXTURES = Path(os.environ.get("ACESTEP_FIXTURES_DIR", DATA / "fixtures"))
FIXTURES_15 = Path(os.environ.get("ACESTEP15_FIXTURES_DIR", DATA / "fixtures-15"))
TINY = Path(os.environ.get("ACESTEP_TINY_DIR", DATA / "tiny"))
TINY_FOLDER = TINY / "acestep-v1-tiny"
TINY_COMFY = TINY / "acestep-v1-tiny-comfy.safetensors"
TINY_LORA = TINY / "acestep-v1-tiny-lora"
VOCAB = Path(os.environ.get("ACESTEP_LYRIC_VOCAB", DATA / "lyric-vocab" / "ace_lyrics_vocab.json"))
REAL_KEYS = DATA / "real-keys"
REAL_KEYS_15 = DATA / "real-keys-15"

# The tiny models are overhead-bound: one thread is as fast as two on an idle machine and 3-5x faster on a busy one.
torch.set_num_threads(int(os.environ.get("ACESTEP_TEST_THREADS", "1")))


def case_dirs(prefix: str) -> list[Path]:
    """Every fixture case folder whose name starts with `prefix` (parametrise tests over these)."""
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if p.is_dir() and p.name.startswith(prefix))


def case_params(prefix: str):
    """pytest params (ids = case names) for the case folders that start with `prefix`.

    A missing fixture folder is an error, not a skip: parity tests must run.
    """
    dirs = case_dirs(prefix)
    if not dirs:
        raise RuntimeError(
            f"no fixture cases named {prefix}* under {FIXTURES}; set ACESTEP_FIXTURES_DIR to the fixture folder"
        )
    return [pytest.param(d, id=d.name) for d in dirs]


class Case:
    """One fixture case: its tensors split by role and its case.json."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        self.path = Path(path)
        self.name = self.path.name
        self.meta = json.loads((self.path / "case.json").read_text())
        tensors = load_file(str(self.path / "io.safetensors"))
        self.inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
        self.outputs = {k[len("output."):]: v for k, v in tensors.items() if k.startswith("output.")}
        self.intermediates = {
            k[len("intermediate."):]: v for k, v in tensors.items() if k.startswith("intermediate.")
        }
        self.args = self.meta.get("args", {})

    def atol(self, output_name: str, floor: float) -> float:
        """The case's suggested tolerance for one output, never tighter than `floor`."""
        sugg = self.meta.get("tolerance", {}).get("suggested_atol", {}).get("output." + output_name, 0.0)
        return max(float(sugg), floor)


@pytest.fixture(scope="session")
def tiny_folder() -> Path:
    assert TINY_FOLDER.is_dir(), f"tiny checkpoint missing at {TINY_FOLDER} (set ACESTEP_TINY_DIR)"
    return TINY_FOLDER


@pytest.fixture(scope="session")
def vocab_path() -> Path:
    assert VOCAB.is_file(), f"lyric vocabulary missing at {VOCAB} (set ACESTEP_LYRIC_VOCAB)"
    return VOCAB
