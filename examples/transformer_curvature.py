"""The Hessian of a small GPT-2 on a few sentences: top eigenvalues, spectral density, and the
trace of each transformer block's own Hessian.

The model is HuggingFace's ``GPT2LMHeadModel`` built from a config (random initialization,
nothing downloaded), with its default attention, fitted for a few Adam steps to a handful of
sentences under a word-level vocabulary built here.  The batch is what a HuggingFace training
loop feeds it: ``{"input_ids", "attention_mask", "labels"}`` with -100 on padding, and the loss
is ``"causal_lm"`` (the shifted token cross-entropy, the mean over counted tokens: the model's
own loss).

* ``curvops.eigsh`` gives the top of the spectrum (Lanczos, one data pass per product);
* ``curvops.spectral_density`` (stochastic Lanczos quadrature) the shape of the whole spectrum;
* ``curvops.restrict(H, names)`` is the diagonal block of one group of parameters (the
  embeddings, each block ``transformer.h.<i>``, the final LayerNorm) and ``curvops.trace`` with
  Hutch++ its trace: where the curvature lives, layer by layer.  The block traces add up to the
  trace of H (the diagonal blocks hold its whole diagonal).

Run:  python examples/transformer_curvature.py [--quick] [--out FILE]   (writes transformer_curvature.png)
"""


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import curvops  # noqa: E402
from curvops.plotting import plot_density, plot_eigenvalues  # noqa: E402

SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat saw a dog on the mat",
    "the dog ran after the cat",
    "a bird sang on the log",
    "the cat ran to the mat and sat",
]


def tokenize(sentences):
    """Word-level ids (0 = padding, 1 = end of sentence) and a HuggingFace-style batch."""
    vocab = {"<pad>": 0, "<eos>": 1}
    for s in sentences:
        for word in s.split():
            vocab.setdefault(word, len(vocab))
    seqs = [[vocab[w] for w in s.split()] + [1] for s in sentences]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # padding counts nowhere in the loss
    return vocab, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def layer_groups(model) -> dict[str, list[str]]:
    """Parameter names per group: embeddings, each transformer block, the final LayerNorm."""
    names = [n for n, _ in model.named_parameters()]  # lm_head.weight is tied to wte: listed once
    groups = {"embeddings": [n for n in names if n.startswith(("transformer.wte", "transformer.wpe"))]}
    for i in range(model.config.n_layer):
        groups[f"block {i}"] = [n for n in names if n.startswith(f"transformer.h.{i}.")]
    groups["ln_f"] = [n for n in names if n.startswith("transformer.ln_f")]
    assert sum(map(len, groups.values())) == len(names)
    return groups


def main(path: str = "transformer_curvature.png", *, n_layer: int = 3, n_embd: int = 32, n_head: int = 2,
         train_steps: int = 150, top: int = 6, num_probes: int = 4, num_steps: int = 40,
         trace_matvecs: int = 60, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    vocab, batch = tokenize(SENTENCES)
    config = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).double()  # small: float64 costs nothing and keeps 1e-12 accuracy
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(train_steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()

    H = curvops.Hessian(model, "causal_lm", [batch])
    P = H.shape[0]
    eig = curvops.eigsh(H, k=top, which="LA", generator=seed)
    lowest = curvops.eigsh(H, k=1, which="SA", generator=seed)
    density = curvops.spectral_density(H, num_probes=num_probes, num_steps=num_steps, generator=seed)
    traces = {}
    for i, (group, names) in enumerate(layer_groups(model).items()):
        block = curvops.restrict(H, names)
        traces[group] = curvops.trace(block, method="hutch++", num_matvecs=trace_matvecs, generator=seed + i)

    loss = H.objective.loss_value()
    top_vals = eig.eigenvalues.flip(0)
    print(f"GPT-2: {n_layer} blocks, n_embd {n_embd}, vocabulary {len(vocab)}, {P} parameters; "
          f"{int((batch['labels'][:, 1:] != -100).sum())} counted tokens; loss {loss:.4f}")
    print(f"top-{top} Hessian eigenvalues: {[round(float(x), 5) for x in top_vals]} "
          f"({eig.num_matvecs} products, converged: {eig.converged})")
    print(f"lowest Hessian eigenvalue: {float(lowest.eigenvalues[0]):.5f}")
    print(f"spectral density: {density.num_matvecs} products, nodes in "
          f"[{float(density.nodes.min()):.4f}, {float(density.nodes.max()):.4f}]")
    total = sum(t.value for t in traces.values())
    groups = layer_groups(model)
    for group, t in traces.items():
        size = H.domain.subset(groups[group]).size
        print(f"trace of the {group} block ({size} parameters): {t.value:.4f} ± {t.stderr:.4f} ({t.method}), "
              f"{t.value / total:.1%} of the sum")

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    plot_eigenvalues(eig.eigenvalues, ax=a, title=f"top-{top} Hessian eigenvalues")
    plot_density(density, ax=b, log=True, title="spectral density (SLQ)")
    c.bar(list(traces), [t.value for t in traces.values()], yerr=[t.stderr for t in traces.values()], capsize=3,
          color="#4477aa")
    c.set_ylabel("trace of the block's Hessian (Hutch++)")
    c.set_title("curvature per layer")
    c.tick_params(axis="x", rotation=30)
    fig.suptitle(f"GPT-2 ({P} parameters) on {len(SENTENCES)} sentences, loss {loss:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"model": model, "batch": batch, "H": H, "eig": eig, "lowest": lowest, "density": density,
            "traces": traces, "groups": groups, "loss": loss, "P": P}


QUICK = dict(n_layer=2, n_embd=16, train_steps=30, top=3, num_probes=2, num_steps=15, trace_matvecs=33)


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the figure's path."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="transformer_curvature.png", help="the figure's path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    args = parser.parse_args(argv)
    return main(args.out, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
