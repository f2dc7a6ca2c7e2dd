"""A tiny ACE-Step 1.5 checkpoint in the official Hugging Face layout, written at test time (no committed binaries).

`<root>/Ace-Step1.5/` holds acestep-v15-turbo/ (config.json, model.safetensors, silence_latent.pt), vae/ and
Qwen3-Embedding-0.6B/ (config, weights, tokenizer files), as the main repo ACE-Step/Ace-Step1.5;
`<root>/acestep-v15-base/` is a DiT repo beside it, as the official downloader places one. The weights are the
parity fixtures' tiny DiTs (tests/data/fixtures-15), a tiny random VAE and a tiny random Qwen3 with a byte-level
tokenizer (test_v15_pipeline).
"""
from __future__ import annotations

from pathlib import Path

MAIN = "Ace-Step1.5"
BASE = "acestep-v15-base"


def write_tiny15(root: Path) -> Path:
    """Write both folders under `root` (once; an existing complete copy is kept) and return `root`."""
    from test_v15_hub import write_dit, write_main
    from test_v15_pipeline import bundle

    root = Path(root)
    if not (root / MAIN / "acestep-v15-turbo" / "model.safetensors").is_file():
        write_main(root / MAIN, bundle("turbo"))
    if not (root / BASE / "model.safetensors").is_file():
        write_dit(root / BASE, bundle("base"))
    return root
