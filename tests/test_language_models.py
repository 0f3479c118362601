"""Language-model conventions (rule 11): token-level cross-entropy over [B, T, V] logits with -100
ignored, the causal shift, ModelOutput logits, labels inside dict batches — the whole-data mean over
counted tokens, against reverse-over-reverse oracles on the concatenated data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import curvops
from curvops import GGN, EmpiricalFisher, Fisher, Hessian
from curvops.testing.contract import assert_matches

D = torch.float64
V, E, T, B = 7, 4, 5, 6


@dataclass
class Output:  # what a HuggingFace model returns: an object with .logits (and .loss when labels are given)
    logits: torch.Tensor


class TinyLM(nn.Module):
    """Embedding → tanh mixing over positions (causal: position t sees ≤ t) → vocabulary head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.mix = nn.Linear(E, E)
        self.head = nn.Linear(E, V)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        h = torch.tanh(self.mix(torch.cumsum(h, dim=1)))
        return Output(self.head(h))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[4, 1:] = 0  # sequence 4: one real token, so no counted target after the shift
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_hessian(L, theta):
    theta = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(L(theta), theta, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(theta.numel())])


def whole_data_loss(model, ids, mask, labels, shift):
    """torch's cross-entropy over every counted token of the data at once (written out by hand)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def L(theta):
        parts = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
        logits = torch.func.functional_call(model, parts, (ids,), {"attention_mask": mask}).logits
        if shift:
            logits, tgt = logits[:, :-1], labels[:, 1:]
        else:
            tgt = labels
        logp = torch.log_softmax(logits, dim=-1)
        keep = tgt != -100
        picked = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        return -(picked * keep).sum() / keep.sum()

    return L


@pytest.mark.parametrize("loss, shift", [("causal_lm", True), ("token_cross_entropy", False)])
def test_token_losses_are_the_mean_over_counted_tokens_of_all_data(loss, shift):
    torch.manual_seed(0)
    model = TinyLM().to(D)
    ids, mask, labels = data()
    L = whole_data_loss(model, ids, mask, labels, shift)
    H_dense = dense_hessian(L, flat(model))
    Vs = torch.randn(H_dense.shape[0], 2, dtype=D, generator=torch.Generator().manual_seed(1))
    for split in ((0, 2, 6), (0, 3, 4, 6), (0, 6)):  # batches with different numbers of counted tokens
        batches = [{"input_ids": ids[a:b], "attention_mask": mask[a:b], "labels": labels[a:b]}
                   for a, b in zip(split[:-1], split[1:])]
        H = Hessian(model, loss, batches)
        assert_matches(H @ Vs, H_dense @ Vs, rtol=1e-10, what=f"Hessian {loss} {split}")
        assert abs(H.objective.loss_value() - float(L(flat(model)))) < 1e-12
        # the GGN and the type-2 Fisher agree for cross-entropy, over the same tokens
        G, F = GGN(model, loss, batches), Fisher(model, loss, batches)
        assert_matches(F @ Vs, G @ Vs, rtol=1e-10, what=f"Fisher vs GGN {split}")
        E = EmpiricalFisher(model, loss, batches)
        assert float(Vs[:, 0] @ (E @ Vs[:, 0])) >= 0


def test_ggn_of_a_token_loss_against_a_dense_oracle():
    torch.manual_seed(1)
    model = TinyLM().to(D)
    ids, mask, labels = data(1)
    theta = flat(model).requires_grad_()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    parts = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
    logits = torch.func.functional_call(model, parts, (ids,), {"attention_mask": mask}).logits[:, :-1]
    out = logits.reshape(-1)
    J = torch.stack([torch.autograd.grad(out[i], theta, retain_graph=True)[0] for i in range(out.numel())])
    tgt = labels[:, 1:]

    def Lf(f):
        return nn.functional.cross_entropy(f.reshape(B, T - 1, V).transpose(1, 2), tgt)

    Hf = dense_hessian(Lf, out.detach())
    G_dense = J.T @ Hf @ J
    batches = [{"input_ids": ids[:4], "attention_mask": mask[:4], "labels": labels[:4]},
               {"input_ids": ids[4:], "attention_mask": mask[4:], "labels": labels[4:]}]
    Vs = torch.randn(G_dense.shape[0], 3, dtype=D, generator=torch.Generator().manual_seed(2))
    assert_matches(GGN(model, "causal_lm", batches) @ Vs, G_dense @ Vs, rtol=1e-10)


def test_model_outputs_are_reduced_to_their_logits():
    torch.manual_seed(0)
    model = TinyLM().to(D)
    ids, mask, labels = data()
    # per-position classification with the plain torch loss: logits picked from the ModelOutput,
    # and the class dimension moved by output=
    H1 = Hessian(model, nn.CrossEntropyLoss(), [{"input_ids": ids, "attention_mask": mask, "labels": labels}],
                 output=lambda o: o.logits.transpose(1, 2))
    H2 = Hessian(model, "token_cross_entropy", [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    v = torch.randn(H1.shape[0], dtype=D)
    assert_matches(H1 @ v, H2 @ v, rtol=1e-12)
    J = curvops.Jacobian(model, [{"input_ids": ids, "attention_mask": mask}])
    assert J.shape == (B * T * V, H1.shape[0])


def test_token_loss_errors_say_what_is_expected():
    torch.manual_seed(0)
    model = TinyLM().to(D)
    ids, mask, labels = data()
    with pytest.raises(ValueError, match=r"integer labels \[batch, tokens\]"):
        Hessian(model, "causal_lm", [{"input_ids": ids, "labels": labels[:, 0]}]) @ torch.zeros(83, dtype=D)
    with pytest.raises(ValueError, match="unknown loss name 'causal'.*causal_lm"):
        Hessian(model, "causal", [{"input_ids": ids, "labels": labels}])


def test_per_sequence_gradients_of_a_huggingface_model_fall_back_to_autograd():
    """vmap cannot batch GPT-2 (data-dependent control flow); per-sample gradients then run one
    sequence at a time by plain autograd — against the hand-written shifted loss per sequence."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(D).eval()
    ids, mask, labels = data(2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    C = curvops.GradientCovariance(model, "causal_lm", [batch])
    G, w = C.sample_gradients()
    assert "one sample at a time" in C.last_path
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    rows = []
    for i in range(B):
        if not bool((labels[i, 1:] != -100).any()):
            continue  # no counted token: no loss (left out, as in the empirical Fisher)
        theta = [p.detach().clone().requires_grad_() for p in params]
        logits = torch.func.functional_call(model, dict(zip(names, theta)), (),
                                            {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]}).logits
        loss = nn.functional.cross_entropy(logits[0, :-1], labels[i, 1:], ignore_index=-100)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta)]))
    assert_matches(G, torch.stack(rows), rtol=1e-10)
    r = curvops.active_subspace(model, "causal_lm", [batch], k=2)
    top = torch.linalg.eigvalsh(torch.stack(rows).T @ torch.stack(rows) / len(rows))[-2:].flip(0)
    assert_matches(r.eigenvalues[:2], top, rtol=1e-8)


def test_report_of_a_causal_lm_shifts_the_targets_once(tmp_path):
    """The report hands raw batches to its analyses: an active subspace of a "causal_lm" model in the
    report equals the library call on the same data (the shift applied once, not twice)."""
    from curvops.report import build_report

    torch.manual_seed(0)
    model = TinyLM().to(D)
    ids, mask, labels = data(3)
    batches = [{"input_ids": ids[:3], "attention_mask": mask[:3], "labels": labels[:3]},
               {"input_ids": ids[3:], "attention_mask": mask[3:], "labels": labels[3:]}]
    summary = build_report(model, "causal_lm", batches, tmp_path / "r", quick=True, progress=False,
                           sections=["overview", "active_subspace"])
    assert not summary["failed_sections"], summary["failed_sections"]
    got = torch.tensor(summary["sections"]["active_subspace"]["eigenvalues"], dtype=D)
    want = curvops.active_subspace(model, "causal_lm", batches, k=None).eigenvalues[:got.numel()]
    assert_matches(got, want, rtol=1e-8)
