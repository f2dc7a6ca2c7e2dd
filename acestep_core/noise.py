"""Where a generation's random numbers come from (design §7.9, §8 draw order).

The official pipeline keeps two lists of per-item generators, "manual" seeds (the base noise) and
"retake" seeds (retake/repaint/extend noise, and every draw of flow-edit). Batched draws take one
``[1, ...]`` slice from each item's generator; PingPong's per-step noise takes the whole batch from
the first generator. A :class:`SeededNoise` reproduces that; a :class:`ReplayNoise` hands out
recorded tensors in order (parity tests, or a user's own noise).

From a node's seed to noise there is one rule, :func:`noise_for_seed` (every node that draws noise uses it;
docs/seeds.md):

- the "manual" stream (the base noise, and PingPong's per-step noise) is seeded by ``seed``, the "retake"
  stream (retake, repaint and extension noise, every flow-edit draw) by ``retake_seed``;
- item ``i`` of a batch uses ``seed + i`` (``+ batch_index[i]`` when the latent carries ComfyUI batch
  indices), wrapped to 32 bits, so item 0 draws exactly the official pipeline's noise for that seed;
- a node without a ``retake_seed`` input uses ``seed + 1`` for the retake stream, so the base and the
  extension noise of one seed differ (long form); flow edit, whose only stream is the retake one, gives its
  seed as the retake seed (official: the edit noise comes from the retake seeds);
- the generators live on the model's device and draw in its dtype (same seed, same device: same song).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

STREAMS = ("manual", "retake")
MAX_SEED = 2**32 - 1


class NoiseSource(Protocol):
    """Anything that can hand out the draws of one generation."""

    def draw(self, stream: str, shape: Sequence[int]) -> torch.Tensor:
        """A batched draw: item ``i`` from the stream's generator ``i``."""

    def draw_shared(self, stream: str, shape: Sequence[int]) -> torch.Tensor:
        """A whole-batch draw from the stream's first generator (PingPong's per-step noise)."""


def resolve_seeds(seeds: int | Sequence[int] | None, batch_size: int) -> list[int]:
    """Per-item seeds as the official ``set_seeds``: a list is padded with its last value, one int is
    repeated, ``None`` draws fresh seeds."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seeds is None or (not isinstance(seeds, int) and len(seeds) == 0):
        return [random.randint(0, MAX_SEED) for _ in range(batch_size)]
    if isinstance(seeds, int):
        seeds = [seeds]
    out = [int(seeds[min(i, len(seeds) - 1)]) for i in range(batch_size)]
    for s in out:
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed {s} is outside [0, 2**32 - 1]; pick a seed in that range")
    return out


@dataclass
class SeededNoise:
    """Official per-item generators living on the inference device (same seed, same device -> same song)."""

    seeds: list[int]
    retake_seeds: list[int]
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    _gens: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.seeds) != len(self.retake_seeds):
            raise ValueError(
                f"seeds ({len(self.seeds)}) and retake_seeds ({len(self.retake_seeds)}) need one entry per batch item"
            )
        self.device = torch.device(self.device)
        for name, values in (("manual", self.seeds), ("retake", self.retake_seeds)):
            gens = []
            for s in values:
                g = torch.Generator(device=self.device)
                g.manual_seed(int(s))
                gens.append(g)
            self._gens[name] = gens

    @classmethod
    def from_seeds(
        cls,
        seed: int | Sequence[int] | None,
        batch_size: int,
        *,
        retake_seed: int | Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "SeededNoise":
        """Build both generator lists for a batch (missing seeds drawn at random, as official)."""
        return cls(resolve_seeds(seed, batch_size), resolve_seeds(retake_seed, batch_size), device, dtype)

    def _stream(self, stream: str) -> list[torch.Generator]:
        if stream not in self._gens:
            raise ValueError(f"unknown noise stream {stream!r}; expected one of {STREAMS}")
        return self._gens[stream]

    def draw(self, stream: str, shape: Sequence[int]) -> torch.Tensor:
        gens = self._stream(stream)
        if shape[0] != len(gens):
            raise ValueError(f"a draw of batch {shape[0]} needs {shape[0]} seeds, this generation has {len(gens)}")
        item = (1, *shape[1:])
        return torch.cat(
            [torch.randn(item, generator=g, device=self.device, dtype=self.dtype) for g in gens], dim=0
        )

    def draw_shared(self, stream: str, shape: Sequence[int]) -> torch.Tensor:
        g = self._stream(stream)[0]
        return torch.empty(tuple(shape), device=self.device, dtype=torch.float32).normal_(generator=g)


def item_seeds(seed: int, offsets: Sequence[int]) -> list[int]:
    """Per-item seeds `seed + offset`, wrapped to 32 bits (the node seed rule, see the module docstring)."""
    return [(int(seed) + int(i)) % (MAX_SEED + 1) for i in offsets]


def noise_for_seed(
    seed: int,
    batch: int,
    *,
    retake_seed: int | None = None,
    offsets: Sequence[int] | None = None,
    manual_seeds: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SeededNoise:
    """The one rule from a node's seed to its noise (module docstring): manual stream `seed + i`, retake stream
    `retake_seed + i` (`seed + 1 + i` when the node has no retake seed); `offsets` replace i (batch indices);
    `manual_seeds`, one per item (the app's manual seed list), replace the manual stream's seeds."""
    if offsets is None or len(offsets) != batch:
        offsets = range(batch)
    retake = int(seed) + 1 if retake_seed is None else int(retake_seed)
    manual = item_seeds(seed, offsets) if manual_seeds is None else [int(s) for s in manual_seeds]
    if len(manual) != batch:
        raise ValueError(f"seeds lists {len(manual)} seeds for a batch of {batch}; give one seed per item")
    return SeededNoise(manual, item_seeds(retake, offsets), device, dtype)


@dataclass
class ReplayNoise:
    """Hands out given tensors in order, whatever the stream; checks shapes (parity tests)."""

    tensors: list[torch.Tensor]
    position: int = 0

    def _next(self, shape: Sequence[int]) -> torch.Tensor:
        if self.position >= len(self.tensors):
            raise ValueError(f"replayed noise exhausted after {len(self.tensors)} draws")
        t = self.tensors[self.position]
        self.position += 1
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"replayed draw {self.position - 1} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def draw(self, stream: str, shape: Sequence[int]) -> torch.Tensor:
        return self._next(shape)

    def draw_shared(self, stream: str, shape: Sequence[int]) -> torch.Tensor:
        return self._next(shape)
