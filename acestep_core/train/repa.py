"""REPA target features: the official chunked SSL feature extraction (MERT-v1-330M, mHuBERT-147) around any
audio model, and how a feature extractor is named on the command line (design §11).

An extractor is any callable `(stereo waveform [2, L], sample_rate) -> [features of projector 0, 1, ...]`
with each feature tensor [T_i, d_i] (d_0 = 1024 for MERT, d_1 = 768 for mHuBERT on the real model). The cache
stores its output keyed by its `cache_id`, so it runs once per audio file.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..audio import resample

SSL_HOP = 320
"""Both SSL models emit one frame per 320 input samples (75 Hz at 24 kHz, 50 Hz at 16 kHz)."""
OFFICIAL_MODELS = (("m-a-p/MERT-v1-330M", 24000, 5), ("utter-project/mHuBERT-147", 16000, 30))
"""(Hugging Face id, sample rate, chunk seconds) of the official REPA targets, in projector order (design §11)."""


class ChunkedSSLExtractor:
    """One SSL model run the official way: mono mean, resample, per-item zero-mean/unit-variance (eps 1e-7),
    zero-padded chunks, `last_hidden_state`, ceil(chunk length/320) frames kept per chunk (design §11)."""

    def __init__(self, model: nn.Module, sample_rate: int, chunk_seconds: float, *, cache_id: str,
                 hop: int = SSL_HOP):
        self.model = model
        self.sample_rate = sample_rate
        self.chunk = int(sample_rate * chunk_seconds)
        self.hop = hop
        self.cache_id = cache_id

    @torch.no_grad()
    def __call__(self, waveform: Tensor, sample_rate: int) -> Tensor:
        """Stereo [2, L] at sample_rate → features [T, d] (float32, CPU)."""
        length = waveform.shape[-1] * self.sample_rate // sample_rate
        mono = resample(waveform.float().mean(0), sample_rate, self.sample_rate)[:length]
        mono = (mono - mono.mean()) / torch.sqrt(mono.var() + 1e-7)
        starts = range(0, length, self.chunk)
        chunks = torch.stack([F.pad(mono[s:s + self.chunk], (0, self.chunk - mono[s:s + self.chunk].shape[0]))
                              for s in starts])                                     # [N, chunk]
        device = next(self.model.parameters()).device
        out = self.model(chunks.to(device))
        hidden = getattr(out, "last_hidden_state", out)                             # [N, frames, d]
        kept = [hidden[i, : -(-min(self.chunk, length - s) // self.hop)] for i, s in enumerate(starts)]
        return torch.cat(kept, dim=0).float().cpu()


class MultiSSLExtractor:
    """Several extractors, one per REPA projector, called on the same audio."""

    def __init__(self, extractors: Sequence[Callable[[Tensor, int], Tensor]]):
        self.extractors = list(extractors)
        self.cache_id = "+".join(getattr(e, "cache_id", type(e).__name__) for e in self.extractors)

    def __call__(self, waveform: Tensor, sample_rate: int) -> list[Tensor]:
        return [extract(waveform, sample_rate) for extract in self.extractors]


def official_extractor(device: torch.device, *, trust_remote_code: bool = False) -> MultiSSLExtractor:
    """MERT-v1-330M and mHuBERT-147 from Hugging Face (downloaded on first use; MERT needs trust_remote_code)."""
    from transformers import AutoModel

    extractors = []
    for repo, rate, seconds in OFFICIAL_MODELS:
        model = AutoModel.from_pretrained(repo, trust_remote_code=trust_remote_code).eval().to(device)
        model.requires_grad_(False)
        extractors.append(ChunkedSSLExtractor(model, rate, seconds, cache_id=repo))
    return MultiSSLExtractor(extractors)


def load_extractor(spec: str, device: torch.device, *, trust_remote_code: bool = False):
    """`official` (MERT + mHuBERT) or `package.module:factory`, a function of (device) returning an extractor."""
    if spec == "official":
        return official_extractor(device, trust_remote_code=trust_remote_code)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--repa_extractor {spec!r}: use 'official' or 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--repa_extractor {spec!r} cannot be imported ({err})") from None
    return factory(device)
