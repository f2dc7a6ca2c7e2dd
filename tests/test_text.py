"""UMT5 text conditioning (design §4, §7.6): official parity, tokenizer from SentencePiece bytes, truncation, real key set."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from acestep_core.loading import load_acestep
from acestep_core.text import (
    ERG_TAG_LAYERS,
    EOS_ID,
    MAX_TEXT_TOKENS,
    scaled_queries,
    tokenizer_from_file,
    tokenizer_from_spiece,
    umt5_config_from_checkpoint,
)
from conftest import REAL_KEYS, TINY_COMFY, TINY_FOLDER, Case, case_params

UMT5_DIR = TINY_FOLDER / "umt5-base"

# Real umt5-base values (design §4).
REAL_UMT5 = dict(
    vocab_size=256384,
    d_model=768,
    d_kv=64,
    num_heads=12,
    num_layers=12,
    d_ff=2048,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    layer_norm_epsilon=1e-6,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)

SAMPLE_TEXTS = [
    "pop, electronic, upbeat, female vocal, synthesizer, 120 bpm",
    "sad piano ballad",
    "",
    "   leading and trailing spaces   ",
    "double  spaces,\ttabs\nand newlines",
    "UPPER case Rock, Hip-Hop & R&B!!!",
    "lo-fi 🎹 chill, ヒップホップ, 中文说唱, 한국어 발라드, café, naïve",
    "a literal </s> and <pad> and <unk> in the text",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﬁ ligature",
]


@pytest.fixture(scope="module")
def text_encoder():
    return load_acestep(TINY_FOLDER, components=("text",)).text_encoder


@pytest.fixture(scope="module")
def folder_tokenizer():
    return tokenizer_from_file(UMT5_DIR / "tokenizer.json")


def _comfy_spiece_bytes() -> bytes:
    with safe_open(str(TINY_COMFY), "pt") as f:
        return f.get_tensor("text_encoders.spiece_model").numpy().tobytes()


@pytest.mark.parametrize("case_dir", case_params("text_encoder"))
def test_text_encoder_parity(case_dir, text_encoder):
    case = Case(case_dir)
    texts = case.args["texts"]
    ids, mask = text_encoder.tokenize(texts)
    assert torch.equal(ids, case.intermediates["input_ids"])
    assert torch.equal(mask, case.intermediates["attention_mask"])

    states, mask = text_encoder.encode(texts)
    assert torch.equal(mask, case.outputs["attention_mask"])
    ref = case.outputs["last_hidden_state"]
    torch.testing.assert_close(states, ref, atol=case.atol("last_hidden_state", 1e-4), rtol=1e-4)

    erg = case.args["erg_tag"]
    assert (erg["l_min"], erg["l_max"]) == (ERG_TAG_LAYERS[0], ERG_TAG_LAYERS[-1] + 1)
    states_erg, _ = text_encoder.encode(texts, erg_tag_tau=erg["tau"])
    ref_erg = case.outputs["last_hidden_state_erg_tag"]
    torch.testing.assert_close(states_erg, ref_erg, atol=case.atol("last_hidden_state_erg_tag", 1e-4), rtol=1e-4)
    assert not torch.allclose(ref, ref_erg, atol=1e-3), "the fixture's ERG-tag output must differ from the plain one"


def test_erg_tag_leaves_no_hooks(text_encoder):
    texts = ["sad piano ballad"]
    plain, _ = text_encoder.encode(texts)
    text_encoder.encode(texts, erg_tag_tau=0.01)
    q_modules = [text_encoder.model.encoder.block[i].layer[0].SelfAttention.q for i in ERG_TAG_LAYERS]
    assert all(not q._forward_hooks for q in q_modules)
    with pytest.raises(RuntimeError, match="boom"):
        with scaled_queries(text_encoder.model, ERG_TAG_LAYERS, 0.01):
            raise RuntimeError("boom")
    assert all(not q._forward_hooks for q in q_modules)
    again, _ = text_encoder.encode(texts)
    assert torch.equal(plain, again)


def test_erg_tag_layers_must_exist(text_encoder):
    with pytest.raises(ValueError, match="ERG-tag layers"):
        with scaled_queries(text_encoder.model, (99,), 0.01):
            pass


@pytest.mark.parametrize("source", ["spiece.model", "comfy spiece_model tensor"])
def test_spiece_tokenizer_matches_tokenizer_json(source, folder_tokenizer):
    data = (UMT5_DIR / "spiece.model").read_bytes() if source == "spiece.model" else _comfy_spiece_bytes()
    rebuilt = tokenizer_from_spiece(data)
    for text in SAMPLE_TEXTS:
        assert rebuilt.encode(text).ids == folder_tokenizer.encode(text).ids, text
    assert rebuilt.encode("rock").ids[-1] == EOS_ID


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_spiece_tokenizer_matches_on_any_text(text):
    folder, rebuilt = _tokenizer_pair()
    assert rebuilt.encode(text).ids == folder.encode(text).ids


@functools.cache
def _tokenizer_pair():
    return tokenizer_from_file(UMT5_DIR / "tokenizer.json"), tokenizer_from_spiece((UMT5_DIR / "spiece.model").read_bytes())



def test_tokenize_matches_transformers_call_and_warns_on_truncation(text_encoder):
    from transformers import AutoTokenizer

    long_text = ", ".join(["heavy metal", "female vocal", "synthesizer", "120 bpm"] * 60)
    texts = [long_text, "sad piano ballad"]
    n_tokens = len(text_encoder.tokenizer.encode(long_text).ids)
    assert n_tokens > MAX_TEXT_TOKENS
    with pytest.warns(UserWarning, match=f"{n_tokens - MAX_TEXT_TOKENS} tokens at the end are dropped"):
        ids, mask = text_encoder.tokenize(texts)
    official = AutoTokenizer.from_pretrained(str(UMT5_DIR))(
        texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
    )
    assert ids.shape == (2, MAX_TEXT_TOKENS)
    assert torch.equal(ids, official["input_ids"])
    assert torch.equal(mask, official["attention_mask"])
    assert ids[0, -1].item() == EOS_ID


def test_no_warning_at_exactly_the_limit(text_encoder, recwarn):
    words = text_encoder.tokenizer.encode("rock " * 400).ids[: MAX_TEXT_TOKENS - 1]
    text = text_encoder.tokenizer.decode(words)
    assert len(text_encoder.tokenizer.encode(text).ids) <= MAX_TEXT_TOKENS
    text_encoder.tokenize([text])
    assert not [w for w in recwarn if "dropped" in str(w.message)]


@pytest.mark.parametrize("bad", ["a plain string", [], [1, 2], ["ok", None]])
def test_encode_rejects_bad_texts(text_encoder, bad):
    with pytest.raises(ValueError, match="texts must be a non-empty list of strings"):
        text_encoder.encode(bad)


def test_real_umt5_config_has_exactly_the_real_keys():
    real = {k: tuple(v) for k, v in json.loads((REAL_KEYS / "umt5_base_encoder.json").read_text())["keys"].items()}
    from transformers import UMT5Config, UMT5EncoderModel

    for config in (UMT5Config(**REAL_UMT5), umt5_config_from_checkpoint(None, real)):
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == real
    derived = umt5_config_from_checkpoint(None, real)
    for name, value in REAL_UMT5.items():
        assert getattr(derived, name) == value, name


def test_config_json_must_match_weights():
    shapes = {k: tuple(v) for k, v in json.loads((REAL_KEYS / "umt5_base_encoder.json").read_text())["keys"].items()}
    config = json.loads((UMT5_DIR / "config.json").read_text())
    with pytest.raises(ValueError, match="does not match its weights.*d_model: config 32 vs weights 768"):
        umt5_config_from_checkpoint(config, shapes)


def test_not_a_umt5_state_dict():
    with pytest.raises(ValueError, match="not a UMT5 encoder"):
        umt5_config_from_checkpoint(None, {"foo.weight": (3, 3)})
