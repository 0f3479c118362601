r"""A real-architecture zoo for tests: tiny float64 configs of the models people bring.

HuggingFace models (GPT-2, BERT masked-LM and sequence classification, a Llama-style causal
LM, T5) are built from a config with random weights (no download, default attention
implementation), next to PyTorch's ``nn.TransformerEncoder`` (fused fast path in eval mode),
ResNet-style conv nets with BatchNorm (eval) and GroupNorm, LSTM and GRU classifiers, a model
with tied weights and a model with a legacy ``torch.autograd.Function`` (``forward(ctx, x)``
and ``backward`` only).  Each :class:`RealCase` gives

* ``build()``: a fresh model in eval mode (seeded; the global RNG is left untouched),
* ``batches()``: the data as a user passes it to curvops (dict batches carry ``labels``;
  batches differ in size and, for token losses, in their number of counted tokens),
* ``loss``: the curvops loss name meaning the model's own loss,
* ``terms(out, y) -> (sum, count)``: that loss written out by hand (the whole-data loss is
  ``sum / count`` on the concatenated data; a sample with ``count == 0`` has no loss),
* ``predict(out)``: the model output reduced to the prediction tensor (HF ``.logits``),
* ``layer``: a module with a tensor output for activation derivatives.

Nothing here uses curvops: the cases serve as independent ground truth.  Models are tiny
(P ≤ ~1000) so dense reverse-over-reverse oracles stay cheap.

Example:
    >>> case = CASES["gpt2"]                                   # doctest: +SKIP
    >>> H = curvops.Hessian(case.build(), case.loss, case.batches())   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPE = torch.float64
__all__ = ["RealCase", "CASES", "concat", "call", "predict", "token_terms", "class_terms", "mse_terms",
           "bce_terms", "LegacySoftplus"]


# ---- the losses, written out by hand ---------------------------------------------------------
def token_terms(shift: bool) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Token cross-entropy over [B, T, V] logits, -100 ignored (HF's causal-LM loss when shifted)."""
    def terms(logits: Tensor, labels: Tensor):
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != -100
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return -(picked * keep).sum(), keep.sum().to(logits.dtype)
    return terms


def class_terms(logits: Tensor, y: Tensor):
    """Cross-entropy over [B, C] logits and class indices."""
    picked = torch.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
    return -picked.sum(), torch.tensor(float(y.numel()), dtype=logits.dtype)


def mse_terms(out: Tensor, y: Tensor):
    return ((out - y) ** 2).sum(), torch.tensor(float(y.numel()), dtype=out.dtype)


def bce_terms(out: Tensor, y: Tensor):
    return (F.softplus(out) - y * out).sum(), torch.tensor(float(y.numel()), dtype=out.dtype)


# ---- calling a model as its user does --------------------------------------------------------
def predict(out) -> Tensor:
    """A model output reduced to its prediction: the tensor, or a HuggingFace output's logits."""
    return out if isinstance(out, Tensor) else out.logits


def inputs_of(batch, target_key: str = "labels"):
    """(inputs, targets) of a batch: a dict batch without its labels, or an (x, y) pair."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
    return batch[0], batch[1]


def call(model: nn.Module, inputs):
    """``model(**inputs)`` for dict inputs, ``model(x)`` otherwise."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def concat(batches: list):
    """The batches of a data set joined into one batch (same structure)."""
    first = batches[0]
    if isinstance(first, dict):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    return tuple(torch.cat([b[i] for b in batches]) for i in range(len(first)))


def _split(batch, bounds):
    if isinstance(batch, dict):
        return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:])]
    return [tuple(t[a:b] for t in batch) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class RealCase:
    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], object]          # the concatenated data (one batch)
    bounds: tuple[int, ...]             # how the data is split into the user's batches
    loss: str                           # the curvops loss name
    terms: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    layer: str                          # a module with a tensor output
    huggingface: bool = False

    def batches(self) -> list:
        return _split(self.data(), self.bounds)

    def __str__(self) -> str:
        return self.name


# ---- building with a private RNG ---------------------------------------------------------------
def _seeded(make: Callable[[], nn.Module], seed: int, jitter: float = 0.0) -> nn.Module:
    """Build in float64 and eval mode under a forked RNG (the global state is left as found); every
    parameter gets ``jitter``·N(0,1) added so no weight sits at an exceptional value (LN at 1/0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make().to(DTYPE).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(jitter * torch.randn_like(p))
            for n, b in model.named_buffers():
                if n.endswith("running_mean"):
                    b.copy_(0.3 * torch.randn_like(b))
                elif n.endswith("running_var"):
                    b.copy_(0.5 + torch.rand_like(b))
    return model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return transformers


# ---- HuggingFace models ------------------------------------------------------------------------
VOCAB = 23


def _padded_tokens(lengths, T: int, seed: int):
    g = _gen(seed)
    N = len(lengths)
    ids = torch.randint(2, VOCAB, (N, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def gpt2() -> nn.Module:
    tf = _quiet_transformers()
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=5, n_embd=8, n_layer=1, n_head=2, n_inner=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
    return _seeded(lambda: tf.GPT2LMHeadModel(cfg), 1, jitter=0.1)


def _causal_data(seed: int):
    ids, mask = _padded_tokens([5, 3, 5, 1, 4, 5], 5, seed)  # sequence 3: no counted target after the shift
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def bert_mlm() -> nn.Module:
    tf = _quiet_transformers()
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=6, type_vocab_size=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)
    return _seeded(lambda: tf.BertForMaskedLM(cfg), 2, jitter=0.1)


def _mlm_data():
    ids, mask = _padded_tokens([6, 4, 6, 3, 5, 6], 6, 12)
    picks = [(0, 1), (0, 4), (1, 2), (2, 0), (2, 3), (2, 5), (3, 1), (4, 2), (4, 4), (5, 3)]
    labels = torch.full_like(ids, -100)
    for i, t in picks:  # masked positions (all inside the real tokens): predict the original token
        labels[i, t] = ids[i, t]
        ids[i, t] = 1  # the [MASK] id of this vocabulary
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bert_cls() -> nn.Module:
    tf = _quiet_transformers()
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=6, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=6, type_vocab_size=1, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)
    return _seeded(lambda: tf.BertForSequenceClassification(cfg), 3, jitter=0.1)


def _cls_data():
    ids, mask = _padded_tokens([6, 2, 5, 6, 4, 3], 6, 13)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 1, 0, 2])}


def _rms_norm_in_model_dtype(model: nn.Module, cls: type) -> nn.Module:
    """Give every ``cls`` module (HF's RMSNorm) a forward that computes in the model's dtype.

    LlamaRMSNorm and T5LayerNorm upcast to float32 by hard-coded casts (for half-precision
    inputs), also for a float64 model: its function then carries float32 rounding, so no
    derivative of it (curvops' or an oracle's) agrees beyond ~1e-7 (the dense Hessian itself is
    asymmetric at ~5e-7).  Same formula, same weights; only this instance's class changes."""
    exact = type(f"{cls.__name__}InModelDtype", (cls,), {"forward": _rms_forward})
    for m in model.modules():
        if type(m) is cls:
            m.__class__ = exact
    return model


def _rms_forward(self, x: Tensor) -> Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def llama_stock() -> nn.Module:
    """LlamaForCausalLM as transformers builds it (RMSNorm in float32 even for a float64 model)."""
    tf = _quiet_transformers()
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=8,
                         tie_word_embeddings=True, initializer_range=0.3, attention_dropout=0.0)
    return _seeded(lambda: tf.LlamaForCausalLM(cfg), 4, jitter=0.1)


def llama() -> nn.Module:
    """The Llama-style causal LM (RMSNorm, rotary, grouped-query attention) with RMSNorm in float64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _rms_norm_in_model_dtype(llama_stock(), LlamaRMSNorm)


def t5() -> nn.Module:
    tf = _quiet_transformers()
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=6, d_kv=3, d_ff=8, num_layers=1, num_decoder_layers=1,
                      num_heads=2, relative_attention_num_buckets=4, relative_attention_max_distance=8,
                      dropout_rate=0.0, initializer_factor=1.0, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return _rms_norm_in_model_dtype(_seeded(lambda: tf.T5ForConditionalGeneration(cfg), 5, jitter=0.1),
                                    T5LayerNorm)


def _seq2seq_data():
    """Encoder ids with padding; decoder targets as labels (-100 on padding) and the decoder inputs
    the model would make from them (labels shifted right behind the start token, pads as pad id)."""
    ids, mask = _padded_tokens([5, 3, 5, 4, 2, 5], 5, 14)
    tgt, tmask = _padded_tokens([4, 4, 2, 3, 4, 1], 4, 15)
    labels = tgt.masked_fill(tmask == 0, -100)
    dec = torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], dim=1)
    dec = dec.masked_fill(torch.cat([torch.ones_like(tmask[:, :1]), tmask[:, :-1]], dim=1) == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": torch.cat([torch.ones_like(tmask[:, :1]), tmask[:, :-1]], dim=1),
            "labels": labels}


# ---- PyTorch models ----------------------------------------------------------------------------
class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (batch_first, dropout 0; eval mode takes the fused fast path),
    masked mean pooling over real positions, a linear head."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x, padding_mask):
        h = self.encoder(x, src_key_padding_mask=padding_mask)
        keep = (~padding_mask).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def _encoder_data():
    g = _gen(16)
    x = torch.randn(6, 4, 6, generator=g, dtype=DTYPE)
    lengths = torch.tensor([4, 2, 4, 3, 1, 4])
    return {"x": x, "padding_mask": torch.arange(4)[None] >= lengths[:, None],
            "labels": torch.tensor([0, 1, 2, 2, 1, 0])}


class Block(nn.Module):
    def __init__(self, c_in, c_out, norm, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.n1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.n2 = norm(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))
                      if (stride != 1 or c_in != c_out) else nn.Identity())

    def forward(self, x):
        h = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(h)) + self.short(x))


class TinyResNet(nn.Module):
    """Stem conv + norm, two residual blocks (the second strided with a 1×1 shortcut), pooling, head."""

    def __init__(self, norm, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.n0 = norm(4)
        self.block1 = Block(4, 4, norm)
        self.block2 = Block(4, 4, norm, stride=2)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        h = torch.relu(self.n0(self.stem(x)))
        h = self.block2(self.block1(h))
        return self.head(h.mean((2, 3)))


def resnet_bn() -> nn.Module:
    return _seeded(lambda: TinyResNet(nn.BatchNorm2d), 6, jitter=0.1)


def resnet_gn() -> nn.Module:
    return _seeded(lambda: TinyResNet(lambda c: nn.GroupNorm(2, c)), 7, jitter=0.1)


def _image_data(seed):
    g = _gen(seed)
    return torch.randn(6, 2, 4, 4, generator=g, dtype=DTYPE), torch.tensor([0, 1, 2, 0, 2, 1])


class RNNClassifier(nn.Module):
    """Linear input map → LSTM/GRU (batch_first) → last hidden state → head."""

    def __init__(self, kind, d_in=3, d=4, classes=3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(d, d, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h, _ = self.rnn(self.inp(x))
        return self.head(h[:, -1])


def lstm() -> nn.Module:
    return _seeded(lambda: RNNClassifier("lstm"), 8, jitter=0.1)


def gru() -> nn.Module:
    return _seeded(lambda: RNNClassifier("gru"), 9, jitter=0.1)


def _sequence_data(seed):
    g = _gen(seed)
    return torch.randn(6, 4, 3, generator=g, dtype=DTYPE), torch.tensor([2, 0, 1, 1, 0, 2])


class TiedMLP(nn.Module):
    """Weights tied two ways (each counted once, as ``named_parameters()`` lists it):
    ``shared``: one ``nn.Parameter`` held by two modules (``mid2.weight is mid.weight``), each with its
    own bias; ``transpose``: the input layer's weight reused, transposed, by the output map
    (``F.linear(h, enc.weight.t())``, a tied autoencoder), a use no module owns."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.enc = nn.Linear(3, 4)
        self.mid = nn.Linear(4, 4)
        if kind == "shared":
            self.mid2 = nn.Linear(4, 4)
            self.mid2.weight = self.mid.weight
            self.out = nn.Linear(4, 3)
        else:
            self.out_bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.enc(x))))
        if self.kind == "shared":
            return self.out(torch.tanh(self.mid2(h)))
        return F.linear(h, self.enc.weight.t(), self.out_bias)


def tied() -> nn.Module:
    return _seeded(lambda: TiedMLP("shared"), 10, jitter=0.1)


def tied_transpose() -> nn.Module:
    return _seeded(lambda: TiedMLP("transpose"), 13, jitter=0.1)


def _regression_data(seed):
    g = _gen(seed)
    return torch.randn(7, 3, generator=g, dtype=DTYPE), torch.randn(7, 3, generator=g, dtype=DTYPE)


class LegacySoftplus(torch.autograd.Function):
    """softplus written the old way: ``forward(ctx, x)`` and ``backward`` only (no ``setup_context``,
    no ``jvp``; torch.func transforms refuse it).  Its backward is differentiable (double backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class LegacyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(LegacySoftplus.apply(self.fc1(x)) - 0.7)


def legacy() -> nn.Module:
    return _seeded(LegacyMLP, 11, jitter=0.1)


def _binary_data(seed):
    g = _gen(seed)
    x = torch.randn(7, 3, generator=g, dtype=DTYPE)
    return x, torch.randint(0, 2, (7, 2), generator=g).to(DTYPE)


CASES: dict[str, RealCase] = {c.name: c for c in [
    RealCase("gpt2", gpt2, lambda: _causal_data(11), (0, 2, 6), "causal_lm", token_terms(True),
             "transformer.h.0.mlp", huggingface=True),
    RealCase("bert_mlm", bert_mlm, _mlm_data, (0, 2, 6), "token_cross_entropy", token_terms(False),
             "cls.predictions.transform", huggingface=True),
    RealCase("bert_cls", bert_cls, _cls_data, (0, 4, 6), "cross_entropy", class_terms, "bert.pooler",
             huggingface=True),
    RealCase("llama", llama, lambda: _causal_data(17), (0, 3, 6), "causal_lm", token_terms(True),
             "model.layers.0.mlp", huggingface=True),
    RealCase("t5", t5, _seq2seq_data, (0, 2, 6), "token_cross_entropy", token_terms(False),
             "decoder.final_layer_norm", huggingface=True),
    RealCase("transformer_encoder", lambda: _seeded(EncoderClassifier, 12, jitter=0.1), _encoder_data,
             (0, 4, 6), "cross_entropy", class_terms, "encoder.layers.0"),
    RealCase("resnet_bn", resnet_bn, lambda: _image_data(18), (0, 2, 6), "cross_entropy", class_terms,
             "block1"),
    RealCase("resnet_gn", resnet_gn, lambda: _image_data(19), (0, 4, 6), "cross_entropy", class_terms,
             "block1.conv2"),
    RealCase("lstm", lstm, lambda: _sequence_data(20), (0, 2, 6), "cross_entropy", class_terms, "inp"),
    RealCase("gru", gru, lambda: _sequence_data(21), (0, 4, 6), "cross_entropy", class_terms, "inp"),
    RealCase("tied", tied, lambda: _regression_data(22), (0, 3, 7), "mse", mse_terms, "mid"),
    RealCase("tied_transpose", tied_transpose, lambda: _regression_data(24), (0, 5, 7), "mse", mse_terms, "mid"),
    RealCase("legacy_function", legacy, lambda: _binary_data(23), (0, 4, 7), "bce_with_logits", bce_terms,
             "fc1"),
]}
