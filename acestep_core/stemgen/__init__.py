"""StemGen and singing-to-accompaniment for ACE-Step v1: a trainable ControlNet-style branch plus a LoRA over the
frozen base transformer (design §2.3, §8 StemGen note; docs/stemgen.md). No pretrained weights exist; train them
with `python -m acestep_core.stemgen.train`.

`control` (the branch and the controlled decode) → `weights` (the file format) → `generate` (sampling and
mixing); `dataset` (song folders, pairs, latent cache), `train` (the loop and its command line), `synth`
(synthetic multi-track songs for tests).
"""
