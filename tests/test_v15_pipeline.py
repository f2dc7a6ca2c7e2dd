"""ACE-Step 1.5 pipeline (acestep_core/v15/pipeline.py): every task end to end on a tiny bundle, and the composed
stages under the text encoder against the official loop fixtures (tests/data/fixtures-15).

The tiny bundle: the fixtures' tiny official DiT weights (turbo and base), a tiny random Oobleck VAE at the real
strides (48 kHz, hop 1920), a tiny random Qwen3 (transformers Qwen3Model, the class the official handler loads)
with a byte-level tokenizer, and the fixtures' silence latent.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from acestep_core.v15 import pipeline as P
from acestep_core.v15.generate import SamplerOptions
from acestep_core.v15.prompts import TRACK_NAMES, task_instruction
from test_v15_generate import LOOP_CASES, case_dir, case_meta, load_case_model, options_from_case, rel

SR = P.SAMPLE_RATE


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _text_encoder(hidden: int):
    from acestep_core.v15.text_encoder import QWEN3_EMBEDDING_06B, build_text_model, text_encoder_from_state_dict

    tok = _tokenizer()
    cfg = dict(QWEN3_EMBEDDING_06B, vocab_size=len(tok), hidden_size=hidden, intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in build_text_model(cfg).state_dict().items()}
    return text_encoder_from_state_dict(sd, cfg, tokenizer=tok)


def _vae(channels: int):
    from acestep_core.v15.vae import AudioVAE, OobleckConfig, vae_from_state_dict

    cfg = OobleckConfig(encoder_hidden_size=2 * channels, downsampling_ratios=[2, 4, 4, 6, 10],
                        channel_multiples=[1, 1, 1, 1, 1],
                        decoder_channels=4, decoder_input_channels=channels)
    with torch.device("meta"):
        names = AudioVAE(cfg).state_dict()
    g = torch.Generator().manual_seed(5)
    sd = {}
    for k, t in names.items():
        noise = torch.randn(t.shape, generator=g)
        sd[k] = 0.1 * noise if k.endswith((".alpha", ".beta")) else (
            1 + 0.1 * noise if k.endswith("weight_g") else 0.3 * noise)
    return vae_from_state_dict(sd, cfg)


_BUNDLES: dict[str, P.Bundle15] = {}


def bundle(variant: str = "turbo") -> P.Bundle15:
    if variant not in _BUNDLES:
        case = "turbo_lego" if variant == "turbo" else "base_text2music_apg"
        model = load_case_model(case)
        silence = load_file(str(case_dir(case) / "inputs.safetensors"))["silence_latent"]
        c = model.config
        _BUNDLES[variant] = P.Bundle15(model, _vae(c.audio_acoustic_hidden_dim), _text_encoder(c.text_hidden_dim),
                                       silence)
    return _BUNDLES[variant]


def tone(seconds: float, sr: int = SR, channels: int = 2, freq: float = 220.0) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.1 * torch.sin(2 * math.pi * 3.1 * freq * t)
    return wave.repeat(channels, 1)


# ------------------------------------------------------------------------------- composition vs the fixtures
@pytest.mark.parametrize("case", LOOP_CASES)
def test_composed_stages_match_official_loop(case):
    """`generate_latents` (task tensors from task/source/spans, timbre packing of items without reference, the
    loop) from the fixture's text states and seeds reproduces the official `generate_audio` output."""
    meta = case_meta(case)
    inputs = load_file(str(case_dir(case) / "inputs.safetensors"))
    expected = load_file(str(case_dir(case) / "expected.safetensors"))
    model = load_case_model(case)
    b = P.Bundle15.__new__(P.Bundle15)  # the fixture carries no VAE/text encoder; the stages below need neither
    b.model, b.vae, b.text_encoder, b.silence_latent, b.sources = model, None, None, inputs["silence_latent"], {}
    batch, length, _ = inputs["src_latents"].shape
    seeds = meta["call"]["args"]["seed"]
    packed, order = P.reference_timbre(b, [None] * batch, seeds)
    assert torch.equal(packed, inputs["refer_audio_acoustic_hidden_states_packed"])
    assert torch.equal(order, inputs["refer_audio_order_mask"])
    task = meta["task"]
    source = None if task == "text2music" else inputs.get("clean_src_latents", inputs["src_latents"])
    spans = meta["repaint_ranges_latent_frames"]
    states = P.TextStates(inputs["text_hidden_states"], inputs["text_attention_mask"],
                          inputs["lyric_hidden_states"], inputs["lyric_attention_mask"],
                          inputs.get("non_cover_text_hidden_states"), inputs.get("non_cover_text_attention_mask"))
    out = P.generate_latents(
        b, task, states, length=length, seeds=seeds, refer_packed=packed, refer_order=order,
        source_latents=source, spans=None if spans is None else [tuple(s) if s else None for s in spans],
        chunk_mask_mode="auto" if "auto_mask" in case else "explicit", options=options_from_case(meta).validate())
    assert rel(out, expected["target_latents"]) <= 1e-5


def test_text_states_are_the_handler_encoding():
    """Captions through the whole Qwen3 model without a mask, right-padded with the pad id; lyrics as token
    embeddings; the non-cover captions padded to the caption length (handler `_prepare_batch`)."""
    b = bundle()
    prompts = [P.build_prompts("cover", "rock", "la la", duration=10.0),
               P.build_prompts("cover", "a much longer caption here", "", duration=10.0)]
    s = P.encode_texts(b, prompts, non_cover=True)
    tok, enc = b.text_encoder.tokenizer, b.text_encoder
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p.caption)["input_ids"]])
        n = ids.shape[1]
        assert int(s.text_attention_mask[i].sum()) == n
        assert rel(s.text_hidden_states[i, :n], enc.encode_text(ids)[0]) <= 1e-5
        lids = torch.tensor([tok(p.lyrics)["input_ids"]])
        assert torch.equal(s.lyric_hidden_states[i, :lids.shape[1]], enc.model.embed_tokens.weight[lids[0]])
    assert s.non_cover_text_hidden_states.shape == s.text_hidden_states.shape
    pad = s.text_attention_mask[0] == 0
    assert pad.any()
    # padded positions hold the pad token's states (the handler passes no mask; the DiT sees them)
    full = enc.encode_text(torch.tensor([tok(prompts[0].caption)["input_ids"] + [tok.pad_token_id] * int(pad.sum())]))
    assert rel(s.text_hidden_states[0], full[0]) <= 1e-5


@pytest.mark.parametrize("task, track", [("text2music", None), ("extract", "vocals"), ("lego", "drums")])
def test_text_states_match_diffusers_encode_prompt(task, track):
    """Second oracle: diffusers 0.42.1 `AceStepPipeline.encode_prompt` (batch tokenization, padding "longest",
    256/2048 tokens, the whole model for captions, embeddings for lyrics), given our tiny Qwen3 and tokenizer."""
    from diffusers import AceStepPipeline

    b = bundle()
    pipe = AceStepPipeline.__new__(AceStepPipeline)
    pipe.tokenizer, pipe.text_encoder = b.text_encoder.tokenizer, b.text_encoder.model
    caps, lyrics, langs = ["calm piano ballad", "rock"], ["[verse]\nhello world", ""], ["en", "de"]
    instruction = AceStepPipeline._get_task_instruction(task, track_name=track)
    t, tm, ly, lm = pipe.encode_prompt(caps, lyrics, torch.device("cpu"), vocal_language=langs, audio_duration=47.0,
                                       instruction=instruction, bpm=92, keyscale="A minor", timesignature="4")
    prompts = [P.build_prompts(task, c, x, lang, bpm=92, keyscale="A minor", timesignature="4", duration=47.0,
                               track_name=track) for c, x, lang in zip(caps, lyrics, langs)]
    s = P.encode_texts(b, prompts)
    assert torch.equal(s.text_hidden_states, t) and torch.equal(s.lyric_hidden_states, ly)
    assert torch.equal(s.text_attention_mask, tm.long()) and torch.equal(s.lyric_attention_mask, lm.long())


def test_long_texts_are_truncated_at_the_official_limits():
    b = bundle()
    p = P.build_prompts("text2music", "x" * 2000, "y" * 5000, duration=10.0)
    s = P.encode_texts(b, [p])
    assert s.text_hidden_states.shape[1] == P.TEXT_MAX_TOKENS
    assert s.lyric_hidden_states.shape[1] == P.LYRIC_MAX_TOKENS


# ---------------------------------------------------------------------------------------------- end to end
def _check_result(r, batch, seconds):
    assert r.audio.shape == (batch, 2, int(round(seconds * SR)))
    assert r.audio.dtype == torch.float32 and torch.isfinite(r.audio).all()
    assert float(r.audio.abs().max()) <= 1.0
    assert r.latents.shape == (batch, max(P.MIN_FRAMES, int(seconds * SR) // P.HOP), 8)
    assert torch.isfinite(r.latents).all()


def test_text2music_end_to_end_seeds_batch_progress():
    b = bundle()
    seen = []
    r = P.text2music(b, "calm piano", "[verse]\nhello", duration=2.0, batch_size=2, seed=[7, 8],
                     progress=lambda stage, d, t: seen.append((stage, d, t)))
    _check_result(r, 2, 2.0)
    assert ("diffusion", 8, 8) in seen and any(s[0] == "vae_decode" for s in seen)
    again = P.text2music(b, "calm piano", "[verse]\nhello", duration=2.0, seed=8)
    # per-item seeds: item 1 alone gives the same song (to float rounding of the batched matmuls)
    assert rel(again.latents[0], r.latents[1]) <= 1e-5
    assert rel(again.audio[0], r.audio[1]) <= 1e-3  # the random VAE amplifies the rounding
    assert not torch.equal(r.latents[0], r.latents[1])
    single = P.text2music(b, "calm piano", "[verse]\nhello", duration=2.0, batch_size=2, seed=7)
    assert single.seeds == [7, 8] and torch.equal(single.latents, r.latents)
    other = P.text2music(b, "loud metal", "[verse]\nhello", duration=2.0, seed=8)
    assert not torch.equal(other.latents, again.latents)
    assert "Fill the audio semantic mask" in r.prompts[0].caption and "- duration: 2 seconds" in r.prompts[0].caption


def test_text2music_base_variant():
    b = bundle("base")
    r = P.text2music(b, "jazz", duration=1.0, seed=3, options=SamplerOptions(variant="base", steps=4))
    _check_result(r, 1, 1.0)
    with pytest.raises(ValueError, match="variant"):
        P.text2music(b, "jazz", duration=1.0, options=SamplerOptions(variant="turbo"))


def test_reference_audio_changes_the_timbre_condition():
    b = bundle()
    plain = P.text2music(b, "pop", duration=1.0, seed=1)
    ref = P.text2music(b, "pop", duration=1.0, seed=1, reference_audio=(tone(3.0, 44100, 1), 44100))
    _check_result(ref, 1, 1.0)
    assert not torch.equal(plain.latents, ref.latents)
    again = P.text2music(b, "pop", duration=1.0, seed=1, reference_audio=(tone(3.0, 44100, 1), 44100))
    assert torch.equal(again.latents, ref.latents)  # segment offsets and VAE samples come from the seed
    # a silent reference is no reference (handler `process_reference_audio` returns None for silence)
    silent = P.text2music(b, "pop", duration=1.0, seed=1, reference_audio=(torch.zeros(2, SR), SR))
    assert torch.equal(silent.latents, plain.latents)


def test_reference_segments_are_three_tens_of_seconds():
    g = torch.Generator().manual_seed(0)
    clip = torch.arange(45 * SR, dtype=torch.float32).repeat(2, 1)
    seg = P.reference_segments(clip, g)
    assert seg.shape == (2, 30 * SR)
    third = 15 * SR
    starts = [int(seg[0, k * 10 * SR]) for k in range(3)]
    for k, s in enumerate(starts):
        assert k * third <= s <= (k + 1) * third - 10 * SR
        assert torch.equal(seg[0, k * 10 * SR:(k + 1) * 10 * SR], clip[0, s:s + 10 * SR])
    short = P.reference_segments(torch.ones(2, SR), g)
    assert short.shape == (2, 30 * SR)


def test_cover_strength_and_codes():
    b = bundle()
    src = (tone(2.0), SR)
    full = P.cover(b, "jazz cover", source_audio=src[0], source_sample_rate=SR, seed=4)
    _check_result(full, 1, 2.0)
    half = P.cover(b, "jazz cover", source_audio=src[0], source_sample_rate=SR, seed=4, audio_cover_strength=0.5)
    assert not torch.equal(full.latents, half.latents)
    assert "Generate audio semantic tokens" in full.prompts[0].caption
    codes = "".join(f"<|audio_code_{c}|>" for c in [5, 63999, 12, 40000, 7])
    r = P.cover(b, "jazz cover", audio_codes=codes, seed=4)
    _check_result(r, 1, 1.0)  # 5 codes at 5 Hz = 1 s
    assert torch.equal(r.latents, P.cover(b, "jazz cover", audio_codes=[5, 63999, 12, 40000, 7], seed=4).latents)
    with pytest.raises(ValueError, match="audio_codes must lie"):
        P.cover(b, "x", audio_codes=[64000])
    with pytest.raises(ValueError, match="no <\\|audio_code"):
        P.cover(b, "x", audio_codes="nothing here")


def test_repaint_keeps_the_audio_outside_the_span():
    b = bundle()
    src = tone(6.0)
    r = P.repaint(b, "new bridge", source_audio=src, source_sample_rate=SR, start=2.0, end=4.0, seed=9)
    _check_result(r, 1, 6.0)
    g = torch.Generator("cpu").manual_seed(9)
    clean = P.encode_audio(b, P.prepare_audio(src, SR), g)  # the same posterior sample the run drew
    a, e = P.seconds_to_frames(2.0, 4.0, r.latents.shape[1])
    fade = 12  # handler crossfade frames
    outside = torch.ones(r.latents.shape[1], dtype=torch.bool)
    outside[max(0, a - fade):e + fade] = False
    outside[clean.shape[1]:] = False
    assert torch.allclose(r.latents[0, outside], clean[0, outside[:clean.shape[1]]], atol=1e-6)
    assert (r.latents[0, a:e] - clean[0, a:e]).abs().max() > 1e-2  # the span itself is new
    # and in audio: far from the span (beyond the VAE's reach) the decoded result equals the decoded source
    src_audio = P.decode_latents(b, clean.expand(1, -1, -1).contiguous(), src.shape[-1])
    far = slice(0, int(0.8 * SR))
    assert rel(r.audio[0, :, far], src_audio[0, :, far]) <= 1e-4


@pytest.mark.parametrize("track", ["vocals", "drums"])
def test_lego_and_extract_select_their_instruction(track):
    b = bundle()
    src = tone(2.0)
    lego = P.lego(b, "add it", source_audio=src, source_sample_rate=SR, track_name=track, seed=2)
    _check_result(lego, 1, 2.0)
    assert task_instruction("lego", track) in lego.prompts[0].caption
    assert f"Generate the {track.upper()} track based on the audio context:" in lego.prompts[0].caption
    ex = P.extract(b, source_audio=src, source_sample_rate=SR, track_name=track, seed=2)
    _check_result(ex, 1, 2.0)
    assert f"Extract the {track.upper()} track from the audio:" in ex.prompts[0].caption
    assert not torch.equal(lego.latents, ex.latents)
    part = P.lego(b, "add it", source_audio=src, source_sample_rate=SR, track_name=track, start=0.5, end=1.5,
                  seed=2)
    _check_result(part, 1, 2.0)


def test_complete_joins_track_classes():
    b = bundle()
    r = P.complete(b, "full band", source_audio=tone(2.0), source_sample_rate=SR,
                   track_classes=["drums", "bass"], seed=1, batch_size=2)
    _check_result(r, 2, 2.0)
    assert "Complete the input track with DRUMS | BASS:" in r.prompts[0].caption


def test_every_track_name_is_accepted_and_others_refused():
    b = bundle()
    for t in TRACK_NAMES:
        assert t.upper() in task_instruction("extract", t)
    with pytest.raises(ValueError, match="track_name must be one of"):
        P.extract(b, source_audio=tone(1.0), source_sample_rate=SR, track_name="kazoo")
    with pytest.raises(ValueError, match="complete_track_classes"):
        P.complete(b, "x", source_audio=tone(1.0), source_sample_rate=SR, track_classes=[])


def test_interrupt_stops_the_run():
    b = bundle()
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) > 4:
            raise P.Interrupted("stop")

    with pytest.raises(P.Interrupted):
        P.text2music(b, "x", duration=1.0, interrupt=interrupt)
    assert len(calls) == 5
    # during the VAE decode too (checked on every tile)
    seen = []

    def late():
        if seen and seen[-1][0] == "vae_decode":
            raise P.Interrupted("stop")

    with pytest.raises(P.Interrupted):
        P.text2music(b, "x", duration=1.0, interrupt=late, progress=lambda *a: seen.append(a))
    assert seen[-1][0] == "vae_decode"


def test_audio_input_preparation():
    mono = tone(1.0, 44100, 1)
    out = P.prepare_audio(mono, 44100)
    assert out.shape == (2, SR) and torch.equal(out[0], out[1])
    many = torch.stack([tone(1.0, SR, 1)[0] * k for k in (1.0, 0.5, 3.0, 0.1)])
    out = P.prepare_audio(many, SR)  # the first two channels, clamped
    assert out.shape == (2, SR) and torch.equal(out[1], many[1]) and float(out.abs().max()) <= 1.0
    d = P.prepare_audio({"waveform": mono.unsqueeze(0), "sample_rate": 44100}, None)
    assert d.shape == (2, SR)


@pytest.mark.parametrize("call, match", [
    (lambda b: P.text2music(b, "x", duration=0.0), "duration"),
    (lambda b: P.text2music(b, "x", duration=float("nan")), "duration"),
    (lambda b: P.text2music(b, "x", duration=601), "duration"),
    (lambda b: P.text2music(b, "x", duration=1.0, batch_size=17), "batch_size"),
    (lambda b: P.text2music(b, "x", duration=1.0, batch_size=2, seed=[1]), "one seed per batch item"),
    (lambda b: P.text2music(b, "x", duration=1.0, seed=-1), "seed"),
    (lambda b: P.text2music(b, "x", duration=1.0, language="xx"), "language"),
    (lambda b: P.text2music(b, "x", duration=1.0, bpm=10), "bpm"),
    (lambda b: P.text2music(b, "x", duration=1.0, source_audio=tone(1.0), source_sample_rate=SR), "no source_audio"),
    (lambda b: P.repaint(b, "x", source_audio=tone(2.0), source_sample_rate=SR, start=1.0, end=3.0), "span end"),
    (lambda b: P.repaint(b, "x", source_audio=tone(2.0), source_sample_rate=SR, start=1.5, end=1.0), "span end"),
    (lambda b: P.repaint(b, "x", source_audio=tone(2.0), source_sample_rate=SR, start=-1.0, end=1.0), "span start"),
    (lambda b: P.repaint(b, "x", source_audio=torch.zeros(2, 0), source_sample_rate=SR, start=0, end=1), "empty"),
    (lambda b: P.repaint(b, "x", source_audio=torch.full((2, SR), float("nan")), source_sample_rate=SR, start=0,
                         end=1), "NaN"),
    (lambda b: P.repaint(b, "x", source_audio=tone(1.0), source_sample_rate=0, start=0, end=1), "sample_rate"),
    (lambda b: P.repaint(b, "x", source_audio=tone(1.0).long(), source_sample_rate=SR, start=0, end=1), "float"),
    (lambda b: P.cover(b, "x"), "source_audio is required"),
    (lambda b: P.cover(b, "x", source_audio=tone(1.0), source_sample_rate=SR, audio_cover_strength=1.5),
     "audio_cover_strength"),
    (lambda b: P.extract(b, source_audio=tone(1.0), source_sample_rate=SR, track_name=None), "track_name"),
    (lambda b: P.text2music(b, "x", duration=1.0, options=SamplerOptions(audio_cover_strength=0.5)), "cover task"),
    (lambda b: P.text2music(b, "x", duration=1.0, reference_audio=torch.ones(2, 10)), "reference_audio"),
    (lambda b: P.text2music(b, "x", duration=1.0, reference_audio=(torch.zeros(2, 0), SR)), "empty"),
    (lambda b: P.text2music(b, "x", duration=1.0, chunk_mask_mode="auto2"), "chunk_mask_mode"),
])
def test_bad_inputs_raise_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(bundle())


def test_bundle_checks_its_parts():
    b = bundle()
    with pytest.raises(ValueError, match="silence_latent"):
        P.Bundle15(b.model, b.vae, b.text_encoder, torch.zeros(1, 10, 3))
    with pytest.raises(ValueError, match="text encoder"):
        P.Bundle15(b.model, b.vae, None, b.silence_latent)
    assert b.variant == "turbo" and bundle("base").variant == "base"


def test_model_weights_untouched_by_runs():
    b = bundle()
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(ValueError):
        P.text2music(b, "x", duration=1.0, bpm=5000)
    P.text2music(b, "x", duration=1.0, seed=0)
    assert all(torch.equal(before[k], v) for k, v in b.model.state_dict().items())

