"""UMT5-base text conditioning: tokenizer, encoder and the ERG-tag tempered variant (design §4, §7.6)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import UMT5Config, UMT5EncoderModel

MAX_TEXT_TOKENS = 256
PAD_ID = 0
EOS_ID = 1
ERG_TAG_LAYERS = (8, 9)

# The umt5-base values that the weights do not reveal (design §4).
_UMT5_FIXED = {
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "relative_attention_max_distance": 128,
    "pad_token_id": PAD_ID,
    "eos_token_id": EOS_ID,
    "decoder_start_token_id": PAD_ID,
    "tie_word_embeddings": False,
    "dropout_rate": 0.0,
}

_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 2, 3, 4


def umt5_config_from_checkpoint(config: Mapping | None, shapes: Mapping[str, Sequence[int]]) -> UMT5Config:
    """UMT5 encoder config from config.json (checked against the tensor shapes) or from the shapes alone (design §4, §10)."""
    if "shared.weight" not in shapes or "encoder.block.0.layer.0.SelfAttention.q.weight" not in shapes:
        raise ValueError(
            "the text-encoder weights have no 'shared.weight' / 'encoder.block.0.layer.0.SelfAttention.q.weight'; "
            "they are not a UMT5 encoder (expected HF UMT5EncoderModel names)"
        )
    vocab, d_model = shapes["shared.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    derived = {
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "num_heads": int(heads),
        "d_kv": int(inner) // int(heads),
        "d_ff": int(shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]),
        "num_layers": _count_blocks(shapes),
        "relative_attention_num_buckets": int(buckets),
    }
    if inner % heads:
        raise ValueError(f"UMT5 query width {inner} is not a multiple of the {heads} attention heads in the weights")
    values = dict(_UMT5_FIXED)
    if config is not None:
        values.update({k: v for k, v in config.items() if not k.startswith("_")})
        clashes = {k: (values.get(k), v) for k, v in derived.items() if values.get(k) != v}
        if clashes:
            detail = ", ".join(f"{k}: config {a} vs weights {b}" for k, (a, b) in clashes.items())
            raise ValueError(f"umt5-base config.json does not match its weights ({detail})")
    values.update(derived)
    values["num_decoder_layers"] = values["num_layers"]
    return UMT5Config(**values)


def _count_blocks(shapes: Mapping[str, Sequence[int]]) -> int:
    """Number of encoder.block.N entries in a UMT5 state dict."""
    return len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})


def tokenizer_from_file(path: str | Path) -> Tokenizer:
    """The umt5-base fast tokenizer from its tokenizer.json (design §4)."""
    return Tokenizer.from_file(str(path))


def tokenizer_from_spiece(data: bytes) -> Tokenizer:
    """The same fast tokenizer rebuilt from serialised SentencePiece model bytes (ComfyUI's text_encoders.spiece_model, design §10.2)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise ImportError(
            "reading the embedded SentencePiece model needs the 'sentencepiece' and 'protobuf' packages "
            "(pip install sentencepiece protobuf)"
        ) from exc
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(bytes(data))
    except Exception as exc:
        raise ValueError(f"the embedded SentencePiece model ({len(data)} bytes) cannot be parsed: {exc}") from exc
    if proto.trainer_spec.model_type != 1 or not proto.pieces:
        raise ValueError(
            "the embedded SentencePiece model is not a unigram model with pieces; UMT5 needs its unigram spiece model"
        )
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id, proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "\u2581")]
    tok.normalizer = normalizers.Sequence(steps)
    prepend = "always" if spec.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend)
    specials = [p.piece for p in proto.pieces if p.type in (_SPM_CONTROL, _SPM_UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    user = [p.piece for p in proto.pieces if p.type == _SPM_USER_DEFINED]
    tok.add_tokens([AddedToken(s, normalized=False) for s in user])
    eos = proto.pieces[EOS_ID].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:0 {eos}:0", special_tokens=[(eos, EOS_ID)]
    )
    return tok


@contextmanager
def scaled_queries(model: UMT5EncoderModel, layers: Sequence[int], tau: float) -> Iterator[None]:
    """Multiply the SelfAttention.q outputs of the given encoder blocks by tau while inside (ERG-tag, design §7.6)."""
    blocks = model.encoder.block
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"ERG-tag layers {bad} do not exist: the text encoder has {len(blocks)} blocks")
    handles = []
    try:
        for i in layers:
            q = blocks[i].layer[0].SelfAttention.q
            handles.append(q.register_forward_hook(lambda _m, _inp, out: out * tau))
        yield
    finally:
        for h in handles:
            h.remove()


class TextEncoder(torch.nn.Module):
    """Tags -> UMT5 last_hidden_state and attention mask, the official tokenizer call (design §4)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: Tokenizer, max_length: int = MAX_TEXT_TOKENS):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for a token before the end-of-text token")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Official call: EOS appended, truncation at max_length, right padding with id 0 (design §4)."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.80}")
        rows = []
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = enc.ids
            if len(ids) > self.max_length:
                warnings.warn(
                    f"tags text {i} has {len(ids)} tokens; the text encoder keeps {self.max_length}, "
                    f"so {len(ids) - self.max_length} tokens at the end are dropped",
                    stacklevel=3,
                )
                ids = ids[: self.max_length - 1] + ids[-1:]
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ids in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[b, : len(ids)] = 1
        return input_ids, mask

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, erg_tag_tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, D] in the model dtype, mask [B, L] int64); erg_tag_tau tempers the queries of blocks 8, 9 (design §4, §7.6)."""
        input_ids, mask = self.tokenize(texts)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        layers = ERG_TAG_LAYERS if erg_tag_tau is not None else ()
        with scaled_queries(self.model, layers, erg_tag_tau if erg_tag_tau is not None else 1.0):
            states = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return states, mask
