"""Top Hessian eigenvalues, trace and condition number of a small built-in model.

Run:  python examples/hessian_summary.py
"""

import numpy as np
import scipy.sparse.linalg as spla
import torch

import curvops
from curvops.demo import demo_problem

model, X, y = demo_problem()
H = curvops.Hessian(model, "cross_entropy", (X, y), batch_size=128)
G = curvops.GGN(model, "cross_entropy", (X, y), batch_size=128)
print(f"model: 2-16-16-3 tanh MLP, {H.shape[0]} parameters, {len(X)} samples, "
      f"loss {curvops.Objective(model, 'cross_entropy', (X, y)).loss_value():.4f}")

# Our operators are scipy LinearOperators: ARPACK runs on them as they are.
top = np.sort(spla.eigsh(H, k=5, which="LA", return_eigenvectors=False))[::-1]
print("top-5 Hessian eigenvalues:", np.array2string(top, precision=5))

# The model is small (371 parameters), so the exact answers are affordable: densify with
# P products in blocks of 64 and compare.  (Matrix-free estimators come with curvops.linalg.)
Hd, Gd = H.to_dense(), G.to_dense()
evals = torch.linalg.eigvalsh(Hd)
print("exact top-5 (dense check):", np.array2string(evals.flip(0)[:5].numpy(), precision=5))

gen = torch.Generator().manual_seed(0)
Z = torch.randint(0, 2, (H.shape[0], 100), generator=gen).to(torch.float64) * 2 - 1
hutch = float((Z * (H @ Z)).sum(0).mean())
print(f"trace: exact {float(Hd.trace()):.5f}, Hutchinson estimate (100 Rademacher probes) {hutch:.5f}")

# Condition numbers: the Hessian is indefinite here (|λ|max / |λ|min over nonzero |λ| is huge),
# so we report the damped GGN's, (λmax + δ)/(λmin + δ), the quantity that governs CG on G + δI.
gev = torch.linalg.eigvalsh(Gd).clamp_min(0)
for damping in (1e-2, 1e-4):
    print(f"condition number of GGN + {damping:g}·I: {float((gev[-1] + damping) / (gev[0] + damping)):.4g}")
print(f"Hessian: {int((evals < -1e-8).sum())} negative and {int((evals > 1e-8).sum())} positive eigenvalues")
