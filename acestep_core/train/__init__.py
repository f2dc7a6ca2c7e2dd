"""Training of ACE-Step v1 (LoRA and full fine-tuning, one process to many with torchrun), design §11.

`dataset` (records, audio, prompts) → `cache` (encode once) → `objective` (loss, REPA, training forward) →
`trainer` (the loop) with `lora_layers`, `checkpoint`, `distributed`, `evaluation`, `repa`. Command lines:
`python -m acestep_core.train` and `python -m acestep_core.train.convert`.
"""
