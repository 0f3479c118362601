r"""Active subspaces: the parameter directions a scalar function of a network is most sensitive to.

The active-subspace matrix of a scalar ``g(θ; x)`` (by default the loss of one sample) is

.. math:: C = \mathbb{E}_{x \sim \rho}\big[\nabla_\theta g\, \nabla_\theta g^\top\big]
          \approx \frac{1}{W}\sum_i w_i\, \nabla g_i \nabla g_i^\top = \hat W \hat\Lambda \hat W^\top,

with x from the data (optionally a subset or some classes, weighted) or drawn from a sampler ρ,
optionally centred (Constantine 2015).  Its leading eigenvectors are the directions along which
g changes most on average; the eigenvalue decay says how many there are, and the bootstrap
says how well N samples determine them (``seeds/002``: for the 1-35-35-35-35-35-1 MLP about
as many samples as parameters are needed).

Every decomposition works on a *factor* F with FᵀF = C,

.. math:: F = D\,(G - \mathbf{1}\mu^\top),\qquad D = \operatorname{diag}\big(\sqrt{w_i / W}\big),

where the rows of G are the per-sample gradients ∇g_i: the singular values σ of F give the
eigenvalues σ² of C without squaring the condition number, so small eigenvalues keep their
relative accuracy (products with C lose everything below ε·λ₁).  Two ways to get at F:

* **snapshot**: G in memory (chunked ``vmap(grad)``, one pass), then a thin SVD of F (small
  problems, or all eigenpairs), an eigendecomposition of C accumulated chunk by chunk without
  keeping G (all eigenpairs of a large problem), or a block Krylov method on G (top-k: a few
  block products with G instead of a P×P eigendecomposition — block Lanczos on C = FᵀF with one
  read of G per product when N ≥ P and k is small, the block Krylov SVD of F otherwise);
* **operator**: the matrix-free :class:`~curvops.operators.covariance.GradientFactor` (a
  forward-mode pass for F V, a reverse-mode pass for Fᵀ U) with the same block Krylov SVD: memory
  O((N + P)·basis), no N×P matrix.

``method="auto"`` takes the snapshot path when its memory estimate fits ``memory_budget``.

References:
    Constantine (2015). *Active Subspaces: Emerging Ideas for Dimension Reduction in Parameter Studies*. SIAM.
    Constantine, Gleich (2014). *Computing Active Subspaces with Monte Carlo*. arXiv:1408.0545.
    Halko, Martinsson, Tropp (2011). *Finding Structure with Randomness*. SIAM Review 53(2).
    Golub, Kahan (1965). *Calculating the Singular Values and Pseudo-Inverse of a Matrix*.

Modules: :mod:`.estimate` (the entry points), :mod:`.plan` (path, algorithm, memory),
:mod:`.inputs` (data or sampler, argument checks), :mod:`.factors` (F in memory, streamed or
matrix-free), :mod:`.eigenpairs` and :mod:`.krylov` (the decompositions), :mod:`.bootstrap`,
:mod:`.convergence` (in the number of samples), :mod:`.distance` (subspace distances),
:mod:`.result` (the result types); :mod:`.prior` and :mod:`.prior_estimate` (the matrix over a
prior on the parameters, ``prior=``: ``seeds/002`` as written).
"""

from .convergence import active_subspace_convergence
from .distance import subspace_distance, subspace_distances
from .estimate import active_subspace, per_sample_gradients
from .plan import DEFAULT_MEMORY_BUDGET
from .prior import PriorGradientCovariance, prior_gradients
from .result import ActiveSubspaceConvergence, ActiveSubspaceResult

# the other names the single module ``active_subspace.py`` had, for callers and tests that import them from here
from .bootstrap import MAX_DISTANCE_DIMS, _bootstrap, _quantiles  # noqa: F401
from .eigenpairs import _complete, _decompose, _Decomp, _fix_signs, _pad  # noqa: F401
from .factors import _add_gram, _DenseRows, _factor_for, _finish_gram, _gram_edges, _Matfree, _Streamed  # noqa: F401
from .inputs import _check_common, _check_k, _covariance, _draw, _leading, _sampled_data  # noqa: F401
from .krylov import _SVD, _block_krylov_svd, _checked, _orthonormalize  # noqa: F401
from .plan import DENSE_SVD_MAX, DENSE_TOPK_MAX, METHODS, _candidates, _choose, _krylov_basis, _Plan  # noqa: F401
from .result import _gaps  # noqa: F401

__all__ = ["ActiveSubspaceResult", "ActiveSubspaceConvergence", "active_subspace", "active_subspace_convergence",
           "per_sample_gradients", "subspace_distance", "subspace_distances", "DEFAULT_MEMORY_BUDGET",
           "PriorGradientCovariance", "prior_gradients"]
