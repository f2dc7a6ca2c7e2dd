"""`python -m acestep_core.train.convert <audio folder> <out>`: folder of audio files with official sidecars
(`name_prompt.txt`, `name_lyrics.txt`, or `name.json`) → records JSONL (`<out>.jsonl`, or <out> itself when it
ends in .jsonl), and with --hf also a Hugging Face dataset saved to disk (needs `datasets`), like the official
convert2hf_dataset.py (design §11).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .dataset import Record, records_from_folder, write_jsonl


def convert(folder: str | Path, out: str | Path, *, repeat_count: int = 1, hf: bool = False) -> list[Record]:
    """Read the folder's records, write them (repeated `repeat_count` times) as JSONL and optionally a HF dataset."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of audio files")
    if repeat_count < 1:
        raise ValueError(f"--repeat_count must be >= 1, got {repeat_count}")
    records = records_from_folder(folder)
    if not records:
        raise ValueError(f"{folder} has no audio file with a _prompt.txt or .json sidecar")
    repeated = records * repeat_count
    write_jsonl(repeated, out if out.suffix == ".jsonl" else out.with_suffix(".jsonl"))
    if hf:
        try:
            from datasets import Dataset
        except ImportError:
            raise ValueError("--hf needs the optional 'datasets' package (pip install datasets)") from None
        Dataset.from_list([r.to_json() for r in repeated]).save_to_disk(str(out.with_suffix("")))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acestep_core.train.convert", description=__doc__)
    parser.add_argument("folder", help="folder of audio files with _prompt.txt / _lyrics.txt or .json sidecars")
    parser.add_argument("out", help="output path (a .jsonl file; the HF dataset folder drops the suffix)")
    parser.add_argument("--repeat_count", type=int, default=1, help="repeat the record list (official --repeat_count)")
    parser.add_argument("--hf", action="store_true", help="also save a Hugging Face dataset (needs datasets)")
    args = parser.parse_args(argv)
    try:
        records = convert(args.folder, args.out, repeat_count=args.repeat_count, hf=args.hf)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(records)} record(s) x {args.repeat_count} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
