"""Seed 003 made visible: the NTK against the last hidden layer's Gram matrix, and the Hessian
against the GGN, on a small trained classifier.

Run:  python examples/ntk_vs_gram.py [--quick] [--out out/ntk_vs_gram.png]

For a last layer f = W h + b the NTK restricted to (W, b) is exactly (H Hᵀ + 𝟙𝟙ᵀ) ⊗ I_C, so
the Gram matrix of the last hidden activations is the part of the kernel the last layer
contributes; the rest comes from the earlier layers. The Hessian is the GGN plus a residual
that vanishes where the residuals ∂ℓ/∂f vanish, so near a good fit their top eigenvalues agree.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
import torch  # noqa: E402

import curvops  # noqa: E402
from curvops.demo import demo_problem  # noqa: E402


#: the sizes ``--quick`` runs (seconds; CI runs the example this way)
QUICK = dict(num_kernel=40)


def main(out: str, num_kernel: int = 150) -> dict:
    model, X, y = demo_problem()
    Xk = X[:num_kernel]
    C = 3
    # NTK of the per-sample summed output (N×N) and of all outputs ((N·C)×(N·C)).
    K = curvops.NTK(model, Xk, batch_size=64).to_dense()
    K_last = curvops.NTK(model, Xk, params=["4.weight", "4.bias"], batch_size=64).to_dense()
    with torch.no_grad():
        H = model[:4](Xk)  # last hidden layer's activations
    gram = H @ H.T + 1.0
    closed = torch.kron(gram, torch.eye(C, dtype=gram.dtype))
    exact_err = float((K_last - closed).abs().max())

    ev_ntk = torch.linalg.eigvalsh(K).flip(0)
    ev_gram = torch.linalg.eigvalsh(closed).flip(0)
    share = float(K_last.trace() / K.trace())
    alignment = float((K * closed).sum() / (K.norm() * closed.norm()))

    Hs = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=128)
    G = curvops.GGN(model, "cross_entropy", (X, y), batch_size=128)
    top_h = np.sort(spla.eigsh(Hs, k=6, which="LA", return_eigenvectors=False))[::-1]
    top_g = np.sort(spla.eigsh(G, k=6, which="LA", return_eigenvectors=False))[::-1]

    print(f"NTK on {num_kernel} inputs: {K.shape[0]}×{K.shape[1]}; last layer's kernel equals "
          f"(H Hᵀ + 11ᵀ) ⊗ I_C to {exact_err:.1e}")
    print(f"share of the NTK's trace from the last layer: {share:.3f}; kernel alignment NTK vs Gram: {alignment:.3f}")
    print("top-6 NTK eigenvalues:        ", np.array2string(ev_ntk[:6].numpy(), precision=3))
    print("top-6 (Gram ⊗ I) eigenvalues: ", np.array2string(ev_gram[:6].numpy(), precision=3))
    print("top-6 Hessian eigenvalues:", np.array2string(top_h, precision=5))
    print("top-6 GGN eigenvalues:    ", np.array2string(top_g, precision=5))

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    idx = np.arange(1, 41)
    a.semilogy(idx, ev_ntk[:40].clamp_min(1e-12).numpy(), "o-", ms=3, label="NTK (all layers)")
    a.semilogy(idx, ev_gram[:40].clamp_min(1e-12).numpy(), "s-", ms=3, label="(H Hᵀ + 11ᵀ) ⊗ I, last layer")
    a.set(xlabel="index", ylabel="eigenvalue", title="NTK vs last-hidden-layer Gram")
    a.legend()
    b.plot(np.arange(1, 7), top_h, "o-", label="Hessian")
    b.plot(np.arange(1, 7), top_g, "s--", label="GGN")
    b.set(xlabel="index", ylabel="eigenvalue", title="top eigenvalues: Hessian vs GGN")
    b.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"figure: {out}")
    return {"exact_err": exact_err, "share": share, "alignment": alignment, "top_h": top_h, "top_g": top_g}


def cli(argv=None) -> dict:
    """The command line: ``--help`` prints this and exits, ``--quick`` runs small, ``--out`` the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/ntk_vs_gram.png", help="the figure's path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (as CI runs it)")
    args = parser.parse_args(argv)
    return main(args.out, **(QUICK if args.quick else {}))


if __name__ == "__main__":
    cli()
