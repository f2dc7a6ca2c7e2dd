"""Lyric timing: attention collection during sampling, monotonic alignment, line scores, LRC and picture."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acestep_core import lyric_timing as lt
from acestep_core import tasks
from acestep_core.audio import LATENT_RATE
from acestep_core.conditioning import Conditioning, encode_conditioning
from acestep_core.loading import load_acestep
from acestep_core.models.attention import masked_sdpa
from acestep_core.noise import SeededNoise
from acestep_core.sampling.denoiser import GuidanceConfig
from acestep_core.sampling.schedules import official_sigmas
from conftest import TINY_FOLDER, VOCAB

LRC_LINE = re.compile(r"^\[(\d{2,}):([0-5]\d)\.(\d{2})\](.*)$")
LRC_TAG = re.compile(r"^\[(re|length|ti|#):[^\]\n]*\]$")


# --------------------------------------------------------------------------------------------------
# synthetic attention maps with a known path


def synthetic_song(skip: int | None = None, seed: int = 0, noise: float = 0.02):
    """Lines with token spans, and an attention map [T, L] whose path walks through each line's content tokens
    during known frames (an intro and gaps attend the structure tags / separators). Line `skip` is never sung."""
    rng = np.random.default_rng(seed)
    layout = [("structure", "[verse]", 3), ("lyric", "neon lights they flicker", 9), ("lyric", "over the town", 6),
              ("blank", "", 1), ("structure", "[chorus]", 3), ("lyric", "turn it up tonight", 8),
              ("lyric", "we sing along", 6), ("lyric", "until the morning light", 9)]
    spans, offset = [], 1
    for number, (kind, text, n) in enumerate(layout):
        spans.append(lt.LyricLine(number, text, kind, offset, offset + n))
        offset += n
    tokens = offset
    # (line number, frames) sung in order, with (token, frames) rests in between
    plan = [("tag", 0, 25), (1, 60), ("after", 1, 8), (2, 44), ("tag", 4, 30), (5, 52), (6, 40), ("after", 6, 12),
            (7, 70), ("after", 7, 20)]
    path, truth = [], {}
    for entry in plan:
        if entry[0] == "tag":                                  # instrumental: on the section tag
            path += [spans[entry[1]].start + 1] * entry[2]
            continue
        if entry[0] == "after":                                # a pause: on the last sung line's [SPACE]
            number = entry[1] - 1 if entry[1] == skip else entry[1]
            path += [spans[number].end - 1] * entry[2]
            continue
        number, frames = entry
        lo, hi = spans[number].content
        if number == skip:                                     # not sung: a pause on the previous line's [SPACE]
            path += [spans[number - 1].end - 1] * frames
            continue
        truth[number] = (len(path), len(path) + frames)
        path += list(lo + (np.arange(frames) * (hi - lo)) // frames)
    att = rng.uniform(0, noise, size=(len(path), tokens))
    for t, j in enumerate(path):
        att[t, j] += 0.6
        att[t, max(0, j - 1)] += 0.15
        att[t, min(tokens - 1, j + 1)] += 0.15
    att /= att.sum(axis=1, keepdims=True)
    return spans, att * 0.4, truth                              # lyrics get 40 % of the attention


@pytest.mark.parametrize("seed", range(5))
def test_alignment_recovers_line_times_within_one_frame(seed):
    spans, att, truth = synthetic_song(seed=seed)
    alignment = lt.align_lines(torch.from_numpy(att).float(), spans)
    by_number = {line.number: line for line in alignment.lines}
    errors = []
    for number, (start, end) in truth.items():
        line = by_number[number]
        errors += [abs(line.start * LATENT_RATE - start), abs(line.end * LATENT_RATE - end)]
        assert line.sung and line.score > 0.8
    assert max(errors) <= 1.0 + 1e-9, f"line boundary errors in frames: {errors}"
    assert [line.kind for line in alignment.lines] == ["structure", "lyric", "lyric", "structure", "lyric", "lyric",
                                                       "lyric"]
    assert np.all(np.diff(alignment.path) >= 0)


@pytest.mark.parametrize("skip", [2, 6])
def test_a_skipped_line_is_flagged_and_the_others_are_not(skip):
    spans, att, truth = synthetic_song(skip=skip, seed=skip)
    alignment = lt.align_lines(att, spans)
    flagged = {line.number for line in alignment.lines if line.kind == "lyric" and not line.sung}
    assert flagged == {skip}
    for number, (start, end) in truth.items():
        line = next(x for x in alignment.lines if x.number == number)
        assert abs(line.start * LATENT_RATE - start) <= 1 + 1e-9 and abs(line.end * LATENT_RATE - end) <= 1 + 1e-9


def test_scores_ignore_a_token_that_draws_attention_all_song_long():
    """Models often park attention on one token ([START], a separator); the score counts only attention above
    each token's own median, so the sung lines stay sung and the skipped one stays flagged."""
    spans, att, truth = synthetic_song(skip=5, seed=11, noise=0.2)
    att[:, 0] += 3 * att.sum(axis=1)                                          # a sink taking 75 % of every frame
    alignment = lt.align_lines(att, spans)
    assert {line.number for line in alignment.lines if line.kind == "lyric" and not line.sung} == {5}
    for number, (start, end) in truth.items():
        line = next(x for x in alignment.lines if x.number == number)
        assert abs(line.start * LATENT_RATE - start) <= 3 and abs(line.end * LATENT_RATE - end) <= 3


def test_uniform_attention_flags_every_line():
    spans, att, _ = synthetic_song()
    alignment = lt.align_lines(np.ones_like(att), spans)
    assert not any(line.sung for line in alignment.lines)


def test_monotonic_path_takes_the_cheapest_monotone_route():
    cost = np.full((6, 4), 5.0)
    for t, j in enumerate([0, 0, 2, 2, 3, 3]):
        cost[t, j] = 0.0
    assert lt.monotonic_path(cost, 1.0).tolist() == [0, 0, 2, 2, 3, 3]
    cost[1, 1] = 4.0
    assert lt.monotonic_path(cost, 50.0).tolist() == [0, 1, 2, 2, 3, 3]   # skipping token 1 got too dear
    backwards = np.full((4, 3), 5.0)
    for t, j in enumerate([2, 2, 0, 0]):
        backwards[t, j] = 0.0
    assert np.all(np.diff(lt.monotonic_path(backwards, 0.5)) >= 0)


def test_lrc_is_well_formed_with_comments_for_tags_and_unsung_lines():
    spans, att, _ = synthetic_song(skip=6, seed=3)
    alignment = lt.align_lines(att, spans)
    text = lt.to_lrc(alignment.lines, alignment.duration, title="Neon")
    lines = text.strip().split("\n")
    assert all(LRC_LINE.match(x) or LRC_TAG.match(x) for x in lines), text
    assert "[#:verse]" in lines and "[#:chorus]" in lines
    assert any(x.startswith("[#:not sung") and "we sing along" in x for x in lines)
    times = [int(m[1]) * 60 + int(m[2]) + int(m[3]) / 100 for m in map(LRC_LINE.match, lines) if m]
    assert times == sorted(times) and times[-1] <= alignment.duration
    sung = [m[4] for m in map(LRC_LINE.match, lines) if m and m[4]]
    assert sung == [x.text for x in alignment.lines if x.kind == "lyric" and x.sung]
    assert lt.lrc_time(61.234) == "[01:01.23]" and lt.lrc_time(3600) == "[60:00.00]"


def test_picture_is_an_image_tensor_with_the_path_drawn():
    spans, att, _ = synthetic_song(skip=2)
    alignment = lt.align_lines(att, spans)
    image = lt.draw_alignment(alignment, width=400, height=200)
    assert image.shape == (1, 200, 400, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert (image[0] == 1.0).all(dim=-1).sum() >= 400                         # one white path pixel per column
    strip = image[0, 200 - 20:]
    assert (strip == lt.SUNG).all(dim=-1).any() and (strip == lt.UNSUNG).all(dim=-1).any()


def test_bad_alignment_inputs_are_named():
    spans, att, _ = synthetic_song()
    with pytest.raises(ValueError, match="threshold"):
        lt.align_lines(att, spans, threshold=2)
    with pytest.raises(ValueError, match="weights"):
        lt.align_lines(-att, spans)
    with pytest.raises(ValueError, match="tokens"):
        lt.align_lines(att[:, :10], spans)


# --------------------------------------------------------------------------------------------------
# the attention the collector records


def test_lyric_attention_share_is_the_models_softmax():
    """Attention with values = identity is the probability matrix itself (an independent computation)."""
    g = torch.Generator().manual_seed(0)
    b, h, t, s, d = 2, 6, 7, 11, 8
    q, k = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, s, d, generator=g)
    allowed = torch.rand(b, t, s, generator=g) > 0.3
    allowed[0, 3] = False                                                      # a frame with no key at all
    eye = torch.eye(s).expand(b, h, s, s)
    probs = masked_sdpa(q, k, eye, allowed)                                    # [b, h, t, s]
    for start in (0, 4):
        ours = lt.lyric_attention_share(q, k, allowed, start)
        torch.testing.assert_close(ours, probs[..., start:].mean(dim=1), atol=1e-6, rtol=1e-5)
    assert torch.equal(lt.lyric_attention_share(q, k, allowed, 0)[0, 3], torch.zeros(s))


def test_timestep_is_read_back_from_the_embedded_features():
    from acestep_core.models.transformer import timestep_features

    t = torch.tensor([0.0, 3.5, 250.0, 999.0, 1000.0])
    torch.testing.assert_close(lt.timestep_from_features(timestep_features(t)), t, atol=1e-2, rtol=1e-4)
    bf16 = lt.timestep_from_features(timestep_features(t).to(torch.bfloat16))
    assert (bf16 - t).abs().max() <= 0.01 * 1000


@pytest.fixture(scope="module")
def transformer():
    model = load_acestep(TINY_FOLDER, components=("transformer",))
    return model.transformer


def random_cond(transformer, lyric_len: int = 12, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    dim = transformer.config.text_embedding_dim
    ids = torch.randint(3, 6000, (1, lyric_len), generator=g)
    return Conditioning("tags", "la " * lyric_len, torch.randn(1, 5, dim, generator=g),
                        torch.ones(1, 5, dtype=torch.long), ids, torch.ones_like(ids),
                        torch.randn(1, 5, dim, generator=g))


def run_t2m(transformer, cond, frames=20, steps=3, **options):
    noise = SeededNoise.from_seeds(1, 1, retake_seed=2)
    opts = tasks.SamplerOptions(steps=steps, **options)
    with torch.no_grad():
        return tasks.text2music(transformer, cond, frames, options=opts, noise=noise)


ERG = GuidanceConfig(guidance_interval=1.0)
DOUBLE = GuidanceConfig(guidance_interval=1.0, guidance_scale_text=5.0, guidance_scale_lyric=2.0)
NO_ERG = GuidanceConfig(guidance_interval=1.0, use_erg_lyric=False, use_erg_diffusion=False)


@pytest.mark.parametrize("guidance,batch_branches", [(ERG, False), (ERG, True), (DOUBLE, True), (NO_ERG, False)],
                         ids=["erg", "erg-batched", "double-batched", "no-erg"])
def test_collector_records_only_the_conditional_branch_and_changes_nothing(transformer, guidance, batch_branches):
    cond = random_cond(transformer)
    options = dict(guidance=guidance, speed=tasks.SpeedOptions(batch_branches=batch_branches))
    plain = run_t2m(transformer, cond, **options)
    with lt.collect_lyric_attention(transformer, cond, blocks=(1, 7)) as collector:
        probed = run_t2m(transformer, cond, **options)
    assert torch.equal(plain, probed), "collecting must not change the result"
    attention = collector.result()
    assert attention.records == 3 * 2, "one conditional call per step and probed block"
    assert attention.weights.shape == (1, 20, 12)
    share = attention.weights.sum(-1)
    assert (share > 0).all() and (share <= 1 + 1e-5).all()
    assert not any(h for blk in transformer.transformer_blocks for h in blk.cross_attn._forward_hooks.values())


def test_collector_follows_every_task_and_the_sigma_window(transformer):
    cond = random_cond(transformer, seed=1)
    other = random_cond(transformer, seed=2)
    source = run_t2m(transformer, cond, frames=16, steps=2)
    opts = tasks.SamplerOptions(steps=2)
    noise = SeededNoise.from_seeds(3, 1, retake_seed=4)
    runs = {
        "repaint": lambda: tasks.repaint(transformer, cond, source, 4, 10, variance=1.0, options=opts, noise=noise),
        "extend": lambda: tasks.extend(transformer, cond, source, 0, 8, options=opts, noise=noise),
        "edit": lambda: tasks.flow_edit(transformer, other, cond, source, options=opts, noise=noise),
    }
    for name, run in runs.items():
        with torch.no_grad(), lt.collect_lyric_attention(transformer, cond, blocks=(0,)) as collector:
            out = run()
        attention = collector.result()
        assert attention.frames == out.shape[-1], name
        assert attention.records >= 1, name
    with torch.no_grad(), lt.collect_lyric_attention(transformer, cond, blocks=(0,), sigma_range=(0.0, 0.5)) as c:
        run_t2m(transformer, cond, frames=16, steps=3)
    inside = int(((official_sigmas(3, 3.0)[:-1] >= 0.0) & (official_sigmas(3, 3.0)[:-1] <= 0.5)).sum())
    assert 0 < inside < 3 and c.result().records == inside
    with torch.no_grad(), lt.collect_lyric_attention(transformer, other, blocks=(0,)) as c:
        run_t2m(transformer, cond, frames=16, steps=2)
    with pytest.raises(ValueError, match="no cross-attention"):
        c.result()


def test_collector_refuses_bad_settings(transformer):
    cond = random_cond(transformer)
    with pytest.raises(ValueError, match="blocks"):
        lt.LyricAttentionCollector(transformer, cond, blocks=(99,))
    with pytest.raises(ValueError, match="sigma_range"):
        lt.LyricAttentionCollector(transformer, cond, sigma_range=(0.6, 0.2))
    empty = Conditioning("t", "", cond.text_states, cond.text_mask, torch.zeros(1, 1, dtype=torch.long),
                         torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="instrumental"):
        lt.LyricAttentionCollector(transformer, empty)


# --------------------------------------------------------------------------------------------------
# end to end on the tiny checkpoint


LYRICS = "[verse]\nNeon lights they flicker bright\nOver the sleeping town\n\n[chorus]\nTurn it up\nSing along tonight"


@pytest.fixture(scope="module")
def model():
    return load_acestep(TINY_FOLDER, lyric_vocab=VOCAB)


def test_lines_follow_the_tokenizer(model):
    cond = encode_conditioning(model, "pop", LYRICS)
    spans = lt.lyric_lines(model.lyric_tokenizer, LYRICS, cond.lyric_ids)
    ids = cond.lyric_ids[0].tolist()
    assert spans[0].start == 1 and spans[-1].end == len(ids)
    assert [s.kind for s in spans] == ["structure", "lyric", "lyric", "blank", "structure", "lyric", "lyric"]
    assert all(ids[s.end - 1] == 2 for s in spans)                             # every line ends with [SPACE]
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="tokenization"):
        lt.lyric_lines(model.lyric_tokenizer, LYRICS.replace("Neon", "Dark"), cond.lyric_ids)


def test_generation_with_timing_gives_a_monotonic_lrc_inside_the_song(model):
    cond = encode_conditioning(model, "pop, synth", LYRICS)
    frames = tasks.frames_for_seconds(8.0)
    noise = SeededNoise.from_seeds(7, 1, retake_seed=8)
    with torch.no_grad(), lt.collect_lyric_attention(model.transformer, cond) as collector:
        latent = tasks.text2music(model.transformer, cond, frames, options=tasks.SamplerOptions(steps=3), noise=noise)
    alignment = lt.align_lyrics(collector.result(), model.lyric_tokenizer, threshold=0.0)
    text = lt.to_lrc(alignment.lines, alignment.duration)
    lines = text.strip().split("\n")
    assert all(LRC_LINE.match(x) or LRC_TAG.match(x) for x in lines), text
    times = [int(m[1]) * 60 + int(m[2]) + int(m[3]) / 100 for m in map(LRC_LINE.match, lines) if m]
    duration = latent.shape[-1] / LATENT_RATE
    assert times and times == sorted(times) and 0 <= times[0] and times[-1] <= duration + 0.005
    lyric = [x for x in alignment.lines if x.kind == "lyric"]
    assert len(lyric) == 4 and all(0 <= x.start <= x.end <= duration for x in lyric)
    assert all(a.start <= b.start for a, b in zip(lyric, lyric[1:]))
    image = lt.draw_alignment(alignment)
    assert image.shape[0] == 1 and image.shape[-1] == 3 and torch.isfinite(image).all()
    assert F.adaptive_avg_pool2d(image[0].permute(2, 0, 1), 1).sum() > 0


# --------------------------------------------------------------------------------------------------
# the node (imported from the pack as ComfyUI imports it)


@pytest.fixture(scope="module")
def pack_nodes():
    import importlib

    from pack_loader import load_pack

    pack = load_pack()
    names = ("nodes.timing", "nodes.loaders", "nodes.model", "acestep_core.tasks", "acestep_core.noise",
             "acestep_core.conditioning")
    return [importlib.import_module(f"{pack.__name__}.{name}") for name in names]


def test_timing_node_writes_lrc_lines_and_picture(pack_nodes, monkeypatch, tmp_path):
    timing, loaders, node_model, ptasks, pnoise, pcond = pack_nodes
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY_FOLDER.parent))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    monkeypatch.chdir(tmp_path)
    (handle,) = loaders.AceStepLoader().load(checkpoint=TINY_FOLDER.name, dtype="fp32", device="cpu")
    loaded = node_model.model_for(handle)
    cond = pcond.encode_conditioning(loaded, "pop", LYRICS)
    noise = pnoise.SeededNoise([1], [2])
    frames = ptasks.frames_for_seconds(5.0)

    def run():
        return ptasks.text2music(loaded.transformer, cond, frames, options=ptasks.SamplerOptions(steps=2), noise=noise)
    with torch.no_grad():
        samples, attention = timing.sample_collecting(True, loaded.transformer, cond, run)
    assert timing.sample_collecting(False, loaded.transformer, cond, run)[1] is None
    latent = {"samples": samples, "type": "audio", timing.TIMING_KEY: attention}
    node = timing.AceStepLyricTiming()
    out = node.time(model=handle, latent=latent, threshold=0.0, filename_prefix="songs/demo")
    lrc, lines, image = out["result"]
    saved = tmp_path / "output" / "songs" / "demo_00001.lrc"
    assert out["ui"]["text"] == [str(saved)] and saved.read_text(encoding="utf-8") == lrc
    assert all(LRC_LINE.match(x) or LRC_TAG.match(x) for x in lrc.strip().split("\n"))
    entries = json.loads(lines)
    assert [e["text"] for e in entries if e["kind"] == "lyric"] == [
        "Neon lights they flicker bright", "Over the sleeping town", "Turn it up", "Sing along tonight"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    again = node.time(model=handle, latent=latent, threshold=0.5, filename_prefix="songs/demo")
    assert (tmp_path / "output" / "songs" / "demo_00002.lrc").is_file() and again["result"][0]
    assert isinstance(node.time(model=handle, latent=latent, threshold=0.5, filename_prefix=""), tuple)
    with pytest.raises(ValueError, match="collect_lyric_timing"):
        node.time(model=handle, latent={"samples": samples}, threshold=0.5, filename_prefix="")
    with pytest.raises(ValueError, match="outside the output folder"):
        node.time(model=handle, latent=latent, threshold=0.5, filename_prefix="../escape")
    with pytest.raises(ValueError, match="frames"):
        node.time(model=handle, latent={**latent, "samples": samples[..., :-1]}, threshold=0.5, filename_prefix="")


def test_sampler_and_flow_edit_nodes_collect_timing(pack_nodes, monkeypatch, tmp_path):
    """The hook in the sampling nodes: timing rides on the output latent only when asked for."""
    import importlib

    timing, loaders = pack_nodes[0], pack_nodes[1]
    pkg = timing.__name__.rsplit(".", 2)[0]
    sampling = importlib.import_module(f"{pkg}.nodes.sampling")
    text = importlib.import_module(f"{pkg}.nodes.text")
    latents = importlib.import_module(f"{pkg}.nodes.latents")
    monkeypatch.setenv("ACESTEP_MODELS_DIR", str(TINY_FOLDER.parent))
    monkeypatch.setenv("ACESTEP_LYRIC_VOCAB", str(VOCAB))
    monkeypatch.chdir(tmp_path)
    (handle,) = loaders.AceStepLoader().load(checkpoint=TINY_FOLDER.name, dtype="fp32", device="cpu")
    (cond,) = text.AceStepTextEncode().encode(model=handle, tags="pop", lyrics=LYRICS)
    (empty,) = latents.AceStepEmptyLatent().make(seconds=3.0, batch_size=1)
    common = dict(seed=1, steps=2, scheduler="euler", cfg_type="apg", guidance_scale=15.0, omega_scale=10.0)
    (plain,) = sampling.AceStepSampler().sample(model=handle, conditioning=cond, latent=empty, **common)
    (timed,) = sampling.AceStepSampler().sample(model=handle, conditioning=cond, latent=empty,
                                                collect_lyric_timing=True, **common)
    assert timing.TIMING_KEY not in plain and timing.TIMING_KEY in timed
    assert torch.equal(plain["samples"], timed["samples"]), "collecting must not change the song"
    (edited,) = sampling.AceStepFlowEdit().edit(
        model=handle, source_conditioning=cond, target_conditioning=cond, latent=timed, seed=3, steps=2,
        guidance_scale=15.0, scheduler="euler", n_min=0.0, n_max=1.0, n_avg=1, collect_lyric_timing=True)
    lrc = timing.AceStepLyricTiming().time(model=handle, latent=edited, threshold=0.0, filename_prefix="")[0]
    assert all(LRC_LINE.match(x) or LRC_TAG.match(x) for x in lrc.strip().split("\n"))
