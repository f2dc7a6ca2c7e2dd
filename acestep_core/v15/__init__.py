"""ACE-Step 1.5 in plain PyTorch: config, model (DiT, condition encoder, tokenizer/detokenizer), VAE, text
encoder and loading (model side); schedules, guidance, generation loop, tasks and prompts (generation side).

Import the modules directly (`from acestep_core.v15.model import AceStep15Model`); this package imports nothing.
"""
