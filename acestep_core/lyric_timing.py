"""Lyric timing: when each lyric line is sung, read from the transformer's cross-attention during sampling.

Every block's cross-attention lets each latent frame attend to the condition sequence [speaker | text | lyrics]
(design §2.3, §2.5). While a task samples, :func:`collect_lyric_attention` hooks the chosen blocks and averages,
over heads, blocks and steps, the attention of the conditional branch from every frame to every lyric token
(no second pass, nothing installed when off). :func:`align_lyrics` then finds a monotonic path of lyric tokens
over the frames (dynamic programming on −log attention, tokens may be skipped at a cost), reads off each lyric
line's start and end, scores how clearly the line's tokens were attended along its path, and flags lines below
a threshold as probably not sung. :func:`to_lrc` writes an LRC file and :func:`draw_alignment` a picture.

Lines follow the tokenizer (design §5.2): ``[START]``, then per text line ``[lang]`` + its tokens + ``[SPACE]``
(id 2, which also separates words inside a line), an empty line a lone ``[SPACE]``. A line that is only a
structure tag (``[verse]``) is kept as an LRC comment and not timed.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .latent import LATENT_RATE
from .conditioning import Conditioning
from .models.attention import apply_rope
from .models.transformer import split_heads
from .sampling.branch_rows import current_conditional_rows
from .preview import SECTION, SUNG, UNSUNG, draw_alignment  # noqa: F401  (the picture lives in preview.py)

STRUCTURE_LINE = re.compile(r"\[[^\[\]]*\]")
"""A line made of one bracket tag only ([verse], [chorus], ...): a section marker, not sung text."""
HEAD_CHUNK = 4
"""Heads whose attention probabilities are materialised at once (bounds the extra memory to T x S x 4 floats)."""
DEFAULT_THRESHOLD = 0.5
DEFAULT_SKIP_PENALTY = 2.0
"""Cost (nats) of skipping one lyric token; visiting a token nobody attends costs about log(tokens) per frame."""
FLOOR = 1e-6


# --------------------------------------------------------------------------------------------------
# lyric lines and their token spans


@dataclass(frozen=True)
class LyricLine:
    """One line of the lyrics text and its tokens [start, end) in the lyric ids (design §5.2)."""

    number: int  # 0-based line number in the lyrics text
    text: str  # stripped
    kind: str  # "lyric", "structure" or "blank"
    start: int
    end: int

    @property
    def content(self) -> tuple[int, int]:
        """The sung tokens: without the leading [lang] token and the trailing [SPACE]."""
        return (self.start + 1, self.end - 1) if self.end - self.start > 2 else (self.start, self.end)


def lyric_lines(tokenizer, lyrics: str, lyric_ids: Tensor | None = None) -> list[LyricLine]:
    """Token span of every line of `lyrics`, checked against the ids the model saw (design §5.2).

    Lines past a truncation of `lyric_ids` (the 4096-token cap) are dropped.
    """
    if not isinstance(lyrics, str) or not lyrics.strip():
        raise ValueError("there are no lyrics to time (instrumental); give lyrics to ACE-Step Text Encode")
    lines, ids, offset = [], [], 1
    for number, raw in enumerate(lyrics.split("\n")):
        text = raw.strip()
        tokens = tokenizer.encode(text)[1:] if text else [2]
        kind = "blank" if not text else "structure" if STRUCTURE_LINE.fullmatch(text) else "lyric"
        lines.append(LyricLine(number, text, kind, offset, offset + len(tokens)))
        ids += tokens
        offset += len(tokens)
    if lyric_ids is not None:
        given = [int(i) for i in lyric_ids.reshape(-1).tolist()]
        expected = [given[0]] + ids if given else []
        if given != expected[:len(given)]:
            raise ValueError(
                "the conditioning's lyric ids are not the tokenization of its lyrics by this model's tokenizer; "
                "encode the lyrics with ACE-Step Text Encode of the same model"
            )
        lines = [line for line in lines if line.end <= len(given)]
    return lines


# --------------------------------------------------------------------------------------------------
# collecting cross-attention during sampling


@dataclass(frozen=True)
class LyricAttention:
    """Cross-attention of the conditional branch from latent frames to lyric tokens, averaged over heads, the
    probed blocks and the decode calls of a sampling run (design §2.5)."""

    weights: Tensor  # [B, T, Ll] fp32 CPU: share of each frame's attention that goes to each lyric token
    lyrics: str
    lyric_ids: Tensor  # [Ll]
    blocks: tuple[int, ...]
    records: int  # (block, call) pairs averaged

    @property
    def frames(self) -> int:
        """Latent frames T the attention covers."""
        return self.weights.shape[1]


def timestep_from_features(features: Tensor) -> Tensor:
    """Read t (= σ·1000) [B] back from the sinusoidal features [B, 2h] the transformer embeds (design §2.3, step 1).

    The lowest frequency f = 10⁴^(−(h−1)/h) keeps t·f below 0.11 rad, so atan2 gives t to the features' precision.
    """
    half = features.shape[-1] // 2
    freq = math.exp(-math.log(10000.0) * (half - 1) / half)
    return torch.atan2(features[:, -1].float(), features[:, half - 1].float()) / freq


def lyric_attention_share(q: Tensor, k: Tensor, allowed: Tensor | None, lyric_start: int) -> Tensor:
    """Softmax cross-attention q [b,H,T,hd], k [b,H,S,hd] (mask `allowed` [b,T,S]) summed over the keys from
    `lyric_start` on and averaged over heads: [b, T, S − lyric_start] fp32 (design §2.5)."""
    heads, scale = q.shape[1], q.shape[-1] ** -0.5
    total = torch.zeros(q.shape[0], q.shape[2], k.shape[2] - lyric_start, device=q.device, dtype=torch.float32)
    for h0 in range(0, heads, HEAD_CHUNK):
        scores = torch.matmul(q[:, h0:h0 + HEAD_CHUNK].float(), k[:, h0:h0 + HEAD_CHUNK].float().transpose(-1, -2))
        scores = scores * scale                                                    # [b, h, T, S]
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                      # a row with no key -> 0
        total += probs[..., lyric_start:].sum(dim=1)
    return total / heads


class LyricAttentionCollector:
    """Forward hooks on the cross-attention of chosen blocks that average the conditional branch's attention to
    the lyric tokens (design §2.5). Use :func:`collect_lyric_attention`; nothing runs while it is detached.

    The task layer says which rows of each model call are the conditional branch of which conditioning
    (acestep_core.sampling.branch_rows); only the calls of `cond` itself (the very object the task was given) are
    kept, so the unconditional and text-only branches and flow-edit's source prompt are left out. So this works for
    every task and guidance setting.
    `sigma_range` keeps only calls whose noise level σ lies in it (σ = 1 is pure noise).
    """

    def __init__(self, transformer, cond: Conditioning, *, blocks: Collection[int] | None = None,
                 sigma_range: tuple[float, float] = (0.0, 1.0)):
        if cond.instrumental:
            raise ValueError("the conditioning has no lyrics (instrumental): there is nothing to time")
        n = transformer.config.num_layers
        chosen = tuple(sorted(set(range(n) if blocks is None else (int(b) for b in blocks))))
        if not chosen or any(not 0 <= b < n for b in chosen):
            raise ValueError(f"blocks must be indices in [0, {n}) (the model has {n} blocks), got {blocks!r}")
        lo, hi = (float(s) for s in sigma_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"sigma_range must be (low, high) with 0 <= low < high <= 1, got {sigma_range!r}")
        self.transformer, self.cond, self.blocks, self.sigma_range = transformer, cond, chosen, (lo, hi)
        self.lyric_start = 1 + cond.text_mask.shape[1]                            # after speaker + text tokens
        self._queries: dict[int, Tensor] = {}
        self._sigma: Tensor | None = None
        self._sum: Tensor | None = None
        self._count = 0
        self._handles: list = []

    # -- hooks -------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        if self.sigma_range != (0.0, 1.0):
            self._handles.append(self.transformer.timestep_embedder.register_forward_pre_hook(self._read_sigma))
        for index in self.blocks:
            attn = self.transformer.transformer_blocks[index].cross_attn
            self._handles.append(attn.to_q.register_forward_hook(self._keep_query(index)))
            self._handles.append(attn.register_forward_hook(self._record(index)))

    def detach(self) -> None:
        """Remove the hooks; the collected attention stays available."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._queries.clear()

    def _read_sigma(self, module, args) -> None:
        self._sigma = timestep_from_features(args[0]) / 1000

    def _keep_query(self, index: int):
        def hook(module, args, output):
            self._queries[index] = output
        return hook

    def _record(self, index: int):
        def hook(module, args, output):
            _, (k, _), rope, allowed, q_scale = args
            q = self._queries.pop(index, None)
            if q is None:
                return
            if self._sigma is not None:
                lo, hi = self.sigma_range
                if not lo <= float(self._sigma[0]) <= hi:
                    return
            rows = self._conditional_rows(index, k)
            if rows.numel() == 0:
                return
            if q_scale is not None:
                q = (q * (q_scale[rows] if isinstance(q_scale, Tensor) else q_scale)).to(q.dtype)
            q = apply_rope(split_heads(q[rows], module.heads), *rope)                   # [b, H, T, hd]
            self._add(lyric_attention_share(q, k[rows], None if allowed is None else allowed[rows], self.lyric_start))
        return hook

    def _conditional_rows(self, index: int, k: Tensor) -> Tensor:
        """Batch rows of the running call that are the conditional branch of `cond`, as the task layer says."""
        announced = current_conditional_rows()
        if announced is None or announced[0] is not self.cond:
            return torch.empty(0, dtype=torch.long, device=k.device)
        rows = announced[1]
        return torch.arange(rows.start, rows.stop, device=k.device)

    def _add(self, share: Tensor) -> None:
        if self._sum is not None and self._sum.shape != share.shape:
            self._sum, self._count = None, 0                                     # a new run (other length): restart
        self._sum = share if self._sum is None else self._sum + share
        self._count += 1

    # -- result ------------------------------------------------------------------------------------------
    def result(self) -> LyricAttention:
        """The averaged attention of what was collected; a ValueError when nothing was."""
        if self._sum is None:
            raise ValueError(
                "no cross-attention of the conditional branch was recorded: the sampler made no model call with "
                "this conditioning (inside sigma_range), or the transformer blocks are compiled (turn compile off)"
            )
        return LyricAttention(
            weights=(self._sum / self._count).to("cpu", torch.float32),
            lyrics=self.cond.lyrics,
            lyric_ids=self.cond.lyric_ids[0].detach().to("cpu"),
            blocks=self.blocks,
            records=self._count,
        )


@contextmanager
def collect_lyric_attention(transformer, cond: Conditioning, *, blocks: Collection[int] | None = None,
                            sigma_range: tuple[float, float] = (0.0, 1.0)) -> Iterator[LyricAttentionCollector]:
    """Collect the lyric cross-attention of every model call made inside the `with` block (any task)."""
    collector = LyricAttentionCollector(transformer, cond, blocks=blocks, sigma_range=sigma_range)
    collector.attach()
    try:
        yield collector
    finally:
        collector.detach()


# --------------------------------------------------------------------------------------------------
# alignment


def monotonic_path(cost: np.ndarray, skip_penalty: float) -> np.ndarray:
    """Token index per frame [T] minimising Σ cost[t, j_t] + skip_penalty·(tokens skipped), j non-decreasing.

    A frame stays on the previous frame's token or moves to any later one; moving past k tokens without
    visiting them costs k·skip_penalty (also before the first and after the last frame).
    """
    frames, tokens = cost.shape
    ar = np.arange(tokens)
    best = cost[0].astype(np.float64) + ar * skip_penalty
    back = np.empty((frames, tokens), dtype=np.int32)
    back[0] = -1
    for t in range(1, frames):
        shifted = best - ar * skip_penalty                                        # moving k -> j costs (j-k-1)·p
        run_min = np.minimum.accumulate(shifted)
        run_arg = np.maximum.accumulate(np.where(shifted <= run_min, ar, 0))
        move = np.full(tokens, np.inf)
        move[1:] = run_min[:-1] + (ar[1:] - 1) * skip_penalty
        take = move < best
        back[t] = np.where(take, np.concatenate([[0], run_arg[:-1]]), ar)
        best = np.where(take, move, best) + cost[t]
    path = np.empty(frames, dtype=np.int64)
    path[-1] = int(np.argmin(best + (tokens - 1 - ar) * skip_penalty))
    for t in range(frames - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


@dataclass(frozen=True)
class LineTiming:
    """Timing of one lyric line (times in seconds from the start of the song); structure lines are untimed."""

    number: int
    text: str
    kind: str  # "lyric" or "structure"
    start: float | None
    end: float | None
    score: float  # 0..1: how much more the line's tokens are attended along its path than elsewhere
    sung: bool

    def as_dict(self) -> dict:
        """JSON-ready values (times rounded to milliseconds)."""
        start, end = (None if v is None else round(v, 3) for v in (self.start, self.end))
        return {"line": self.number, "text": self.text, "kind": self.kind, "start": start, "end": end,
                "score": round(self.score, 3), "sung": self.sung}


@dataclass(frozen=True)
class Alignment:
    """Line timings, the token path and the per-frame token distribution it was found on."""

    lines: tuple[LineTiming, ...]
    path: np.ndarray  # [T] lyric token index per latent frame
    probabilities: np.ndarray  # [T, Ll] attention renormalised over the lyric tokens
    spans: tuple[LyricLine, ...]
    frame_rate: float = LATENT_RATE

    @property
    def duration(self) -> float:
        """Seconds covered (T frames)."""
        return self.path.shape[0] / self.frame_rate

    def to_json(self) -> str:
        """Per-line timings and scores as a JSON list."""
        return json.dumps([line.as_dict() for line in self.lines], ensure_ascii=False, indent=1)


def normalise_rows(weights: np.ndarray) -> np.ndarray:
    """Each frame's weights as a distribution over the tokens, floored at FLOOR (a frame with none is uniform)."""
    rows = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30) + FLOOR
    return rows / rows.sum(axis=1, keepdims=True)


def above_baseline(probabilities: np.ndarray) -> np.ndarray:
    """Attention minus each token's median over the song, clipped at 0: what a token gets beyond its usual share."""
    return np.maximum(probabilities - np.median(probabilities, axis=0, keepdims=True), 0.0)


def line_score(excess: np.ndarray, frames: np.ndarray, content: tuple[int, int]) -> float:
    """1 − (excess attention on the line's tokens off its frames)/(along its frames), clipped to [0, 1]; `excess`
    from :func:`above_baseline`."""
    if frames.size == 0:
        return 0.0
    mass = excess[:, content[0]:content[1]].sum(axis=1)                         # [T]
    inside = float(mass[frames].mean())
    rest = np.ones(mass.shape[0], dtype=bool)
    rest[frames] = False
    outside = float(mass[rest].mean()) if rest.any() else 0.0
    return 0.0 if inside <= 0 else float(np.clip(1.0 - outside / inside, 0.0, 1.0))


def align_lines(weights: Tensor | np.ndarray, spans: list[LyricLine], *, threshold: float = DEFAULT_THRESHOLD,
                skip_penalty: float = DEFAULT_SKIP_PENALTY, frame_rate: float = LATENT_RATE) -> Alignment:
    """Monotonic alignment of lyric tokens to frames on −log attention, then per-line times and scores.

    The path runs on each token's attention relative to its own mean over the song (renormalised per frame), so
    a token the model attends all song long (an attention sink) does not capture the path.

    `weights` [T, Ll] is one item's attention to the lyric tokens (any non-negative scale); lines whose score is
    below `threshold`, or that the path holds for fewer frames than half their tokens (faster than anyone sings),
    are flagged as not sung.
    """
    att = np.asarray(weights.detach().cpu().numpy() if isinstance(weights, Tensor) else weights, dtype=np.float32)
    if att.ndim != 2 or att.shape[0] < 1 or att.shape[1] < 1 or not np.isfinite(att).all() or (att < 0).any():
        raise ValueError(f"weights must be finite non-negative attention [frames, lyric tokens], got {att.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not (math.isfinite(skip_penalty) and skip_penalty >= 0):
        raise ValueError(f"skip_penalty must be a finite number >= 0, got {skip_penalty}")
    if spans and spans[-1].end > att.shape[1]:
        raise ValueError(f"the lyric lines need {spans[-1].end} tokens but the attention covers {att.shape[1]}")
    probabilities = normalise_rows(att)
    path = monotonic_path(-np.log(normalise_rows(probabilities / probabilities.mean(axis=0, keepdims=True))),
                          skip_penalty)
    excess = above_baseline(probabilities)
    timings = []
    for line in spans:
        if line.kind == "blank":
            continue
        if line.kind == "structure":
            timings.append(LineTiming(line.number, line.text, "structure", None, None, 0.0, False))
            continue
        lo, hi = line.content
        frames = np.flatnonzero((path >= lo) & (path < hi))
        if frames.size:
            start, end = int(frames[0]), int(frames[-1]) + 1
        else:                                                                     # skipped: where the path jumped
            start = end = int(np.searchsorted(path, hi))
        score = line_score(excess, frames, line.content)
        held = frames.size >= max(1, (hi - lo) / 2)                              # at most ~2 tokens per frame
        timings.append(LineTiming(line.number, line.text, "lyric", start / frame_rate, end / frame_rate, score,
                                  held and score >= threshold))
    return Alignment(tuple(timings), path, probabilities, tuple(spans), frame_rate)


def align_lyrics(attention: LyricAttention, tokenizer, *, item: int = 0, threshold: float = DEFAULT_THRESHOLD,
                 skip_penalty: float = DEFAULT_SKIP_PENALTY) -> Alignment:
    """Line timings of batch item `item` from collected attention and the model's lyric tokenizer."""
    if not 0 <= item < attention.weights.shape[0]:
        raise ValueError(f"item must be in [0, {attention.weights.shape[0]}) (the batch size), got {item}")
    spans = lyric_lines(tokenizer, attention.lyrics, attention.lyric_ids)
    return align_lines(attention.weights[item], spans, threshold=threshold, skip_penalty=skip_penalty)


# --------------------------------------------------------------------------------------------------
# LRC and picture


def lrc_time(seconds: float) -> str:
    """[mm:ss.xx] (minutes may pass 59)."""
    centis = max(0, int(round(seconds * 100)))
    return f"[{centis // 6000:02d}:{centis // 100 % 60:02d}.{centis % 100:02d}]"


def to_lrc(lines: Sequence[LineTiming], duration: float, *, gap: float = 2.0, keep_unsung: bool = False,
           title: str = "") -> str:
    """LRC text: `[mm:ss.xx]line` per timed line, structure tags and unsung lines as `[#:...]` comments.

    `[#:...]` is the LRC comment tag (an ID tag players ignore). A line followed by more than `gap` seconds
    without singing gets an empty time tag at its end, so players clear it; `keep_unsung` times flagged lines too.
    """
    out = ["[re:ACE-Step lyric timing (cross-attention)]", f"[length:{int(duration // 60):02d}:{int(duration % 60):02d}]"]
    if title.strip():
        out.insert(0, f"[ti:{title.strip()}]")
    timed = [line for line in lines if line.kind == "lyric" and (line.sung or keep_unsung)]
    starts = [line.start for line in timed]
    for line in lines:
        if line.kind == "structure":
            out.append(f"[#:{line.text.strip('[]')}]")
        elif line.kind != "lyric" or not (line.sung or keep_unsung):
            out.append(f"[#:not sung ({line.score:.2f}): {line.text}]")
        else:
            out.append(lrc_time(line.start) + line.text)
            next_start = min((s for s in starts if s > line.start), default=duration)
            if next_start - line.end > gap:
                out.append(lrc_time(line.end))
    return "\n".join(out) + "\n"
