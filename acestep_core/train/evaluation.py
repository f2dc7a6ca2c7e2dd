"""What the trainer does besides stepping: the fixed-noise validation loss and the evaluation clips written every
`--every_plot_step` steps (official `plot_step`: generate, decode, save wav + prompt text), design §11.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..conditioning import Conditioning
from ..noise import SeededNoise
from ..tasks import SamplerOptions, frames_for_seconds, text2music
from .cache import CacheEntry, CachedDataset, collate
from .dataset import TRAIN_SAMPLE_RATE
from .distributed import DistEnv, mean_over_ranks
from .objective import add_noise, denoising_loss, sample_sigmas

VALIDATION_SEED = 1234


@torch.no_grad()
def validation_loss(model: nn.Module, dataset: CachedDataset, table: Tensor, env: DistEnv, *, batch_size: int,
                    autocast: Callable[[], AbstractContextManager]) -> float:
    """Mean denoising loss over `dataset` with the same sigmas and noise every time (no condition dropout)."""
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                              shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    generator = torch.Generator().manual_seed(VALIDATION_SEED + env.rank)
    was_training = model.training
    model.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0
    for batch in loader:
        batch = batch.to(env.device)
        sigma = sample_sigmas(batch.latents.shape[0], table, generator)
        noise = torch.randn(batch.latents.shape, generator=generator).to(env.device)
        x_sigma = add_noise(batch.latents, noise, sigma.to(env.device))
        c = batch.cond
        with autocast():
            velocity, _ = model(x_sigma, batch.frame_mask, c.text_states, c.text_mask, c.speaker, c.lyric_ids,
                                c.lyric_mask, (sigma * 1000).to(env.device))
        losses = denoising_loss(velocity, x_sigma, batch.latents, sigma.to(env.device), batch.frame_mask)
        total += torch.tensor([losses.sum().item(), losses.numel()], dtype=torch.float64)
        count += 1
    model.train(was_training)
    total = mean_over_ranks(env, total)
    return float(total[0] / total[1])


class EvalAudioWriter:
    """Generates a short clip with the training transformer and decodes it with the DCAE + vocoder (kept on the
    CPU between calls), writing `eval_results/step_<S>/pred_wav_<key>_0.wav` and the prompt text (design §11)."""

    def __init__(self, checkpoint: str | Path, log_dir: Path, *, seconds: float, steps: int, seed: int):
        self.checkpoint = checkpoint
        self.log_dir = Path(log_dir)
        self.frames = frames_for_seconds(seconds)
        self.options = SamplerOptions(steps=steps)
        self.seed = seed
        self._codec = None

    def _codec_models(self):
        if self._codec is None:
            from ..loading import load_acestep

            self._codec = load_acestep(self.checkpoint, dtype=torch.float32, device="cpu", components=("dcae", "vocoder"))
        return self._codec

    @torch.no_grad()
    def write(self, transformer: nn.Module, dataset: CachedDataset, step: int, env: DistEnv,
              autocast: Callable[[], AbstractContextManager]) -> Path | None:
        """Generate from item 0's tags-in-file-order prompt and lyrics; rank 0 writes (all ranks run under FSDP)."""
        entry = dataset.entries[0]
        cond = _cached_conditioning(entry, env.device)
        was_training = transformer.training
        transformer.eval()
        with autocast():
            latents = text2music(transformer, cond, self.frames, options=self.options,
                                 noise=SeededNoise.from_seeds(self.seed, 1, device=env.device))
        transformer.train(was_training)
        if not env.is_main:
            return None
        from ..audio import decode_latents

        codec = self._codec_models()
        codec.dcae.to(env.device)
        codec.vocoder.to(env.device)
        wav = decode_latents(codec.dcae, codec.vocoder, latents.float(), sample_rate=TRAIN_SAMPLE_RATE)[0]
        codec.dcae.to("cpu")
        codec.vocoder.to("cpu")
        return _save_clip(self.log_dir / "eval_results" / f"step_{step}", entry.record.keys, wav, cond.tags,
                          cond.lyrics, self.seed)


def _cached_conditioning(entry: CacheEntry, device: torch.device) -> Conditioning:
    """The cached conditions of one item with its tags in file order (the first tag prompt), batch 1."""
    from safetensors import safe_open

    variant = entry.n_recaptions
    with safe_open(str(entry.cond), framework="pt") as f:
        tensors = {name: f.get_tensor(name)[None].to(device) for name in
                   (f"states.{variant}", f"mask.{variant}", "lyric_ids", "lyric_mask")}
    return Conditioning(tags=entry.prompts[variant], lyrics=entry.record.norm_lyrics,
                        text_states=tensors[f"states.{variant}"], text_mask=tensors[f"mask.{variant}"],
                        lyric_ids=tensors["lyric_ids"], lyric_mask=tensors["lyric_mask"])


def _save_clip(folder: Path, key: str, wav: Tensor, tags: str, lyrics: str, seed: int) -> Path:
    """Write the wav (48 kHz, float) and the official key/prompt/lyric/seed text next to it."""
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pred_wav_{key}_0.wav"
    soundfile.write(str(path), wav.float().cpu().numpy().T, TRAIN_SAMPLE_RATE, subtype="FLOAT")
    text = f"# KEY\n\n{key}\n\n\n# PROMPT\n\n{tags}\n\n\n# LYRIC\n\n{lyrics}\n\n# SEED\n\n{seed}\n\n"
    (folder / f"key_prompt_lyric_{key}_0.txt").write_text(text, encoding="utf-8")
    return path
