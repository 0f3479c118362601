"""How much work each report section does (:class:`Budgets`; ``--quick`` lowers them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Budgets:
    """How much work each section does (recorded in the summary; ``--quick`` lowers them).

    Attributes:
        top_k: eigenpairs from the top of the Hessian and GGN spectra (and of the NTK when it is
            too large to decompose densely).
        k_negative: eigenpairs from the bottom of the Hessian spectrum.
        eig_tol: eigensolver tolerance (relative to each eigenvalue at the top; relative to ‖H‖
            at the bottom, where eigenvalues near zero have no relative accuracy).
        density_probes, density_steps, density_points: SLQ probes, Lanczos steps, grid points.
        trace_matvecs: products per trace estimate (XTrace).
        cond_max_iters: Lanczos steps cap of each condition-number eigensolve (None: default).
        rank_k_max: largest rank that can be certified (the whole size: exact dense path).
        heatmap_max_params: draw the dense Hessian only up to this many parameters.
        ntk_samples: inputs of the NTK subset (the first ones of the data).
        ntk_dense_max: NTK sizes up to this are decomposed densely (all eigenvalues).
        subspace_samples: samples of the active-subspace estimate (the first ones of the data).
        subspace_k: leading active directions analysed (layer sensitivity, gaps, bootstrap distances).
        subspace_all_max: all min(N, P) active-subspace eigenpairs when that is at most this,
            else the top ``subspace_k``.
        subspace_bootstrap: bootstrap replicates of the active subspace.
        subspace_heatmap_columns: eigenvectors drawn in the eigenvector heat map.
        landscape_directions: top Hessian eigenvectors the loss is traced along.
        landscape_points: points per 1-D curve.
        landscape_grid: points per side of the 2-D plane.
        landscape_radius: the curves and plane span [-r, r] in units of the (unit) eigenvectors;
            ``None``: r = sqrt(8·max(L, 0.01)/λ₁) (the quadratic model's loss rises by 4·max(L, 0.01)
            at the edge along the top eigenvector), capped at ‖θ‖.
    """

    top_k: int = 10
    k_negative: int = 5
    eig_tol: float = 1e-6
    density_probes: int = 10
    density_steps: int = 80
    density_points: int = 400
    trace_matvecs: int = 100
    cond_max_iters: int | None = None
    rank_k_max: int = 100
    heatmap_max_params: int = 1000
    ntk_samples: int = 64
    ntk_dense_max: int = 1500
    subspace_samples: int = 512
    subspace_k: int = 20
    subspace_all_max: int = 512
    subspace_bootstrap: int = 50
    subspace_heatmap_columns: int = 200
    landscape_directions: int = 3
    landscape_points: int = 41
    landscape_grid: int = 21
    landscape_radius: float | None = None

    @classmethod
    def make(cls, num_params: int, *, quick: bool = False, top_k: int | None = None) -> "Budgets":
        """Budgets for a model with ``num_params`` parameters (every k capped below the size)."""
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"build_report: expected top_k ≥ 1, got {top_k!r}.")
        if quick:
            b = cls(top_k=5, k_negative=3, density_probes=4, density_steps=30, density_points=200,
                    trace_matvecs=40, cond_max_iters=150, rank_k_max=num_params if num_params <= 128 else 40,
                    heatmap_max_params=400, ntk_samples=32, subspace_samples=128, subspace_k=10,
                    subspace_bootstrap=20, landscape_directions=2, landscape_points=21, landscape_grid=11)
        else:
            b = cls(rank_k_max=num_params if num_params <= 512 else 100)
        if top_k is not None:
            b.top_k = top_k
        cap = max(1, num_params - 1)
        b.top_k = min(b.top_k, cap)
        b.k_negative = min(b.k_negative, b.top_k, cap)
        b.rank_k_max = min(b.rank_k_max, num_params)
        b.subspace_k = min(b.subspace_k, cap)
        b.landscape_directions = min(b.landscape_directions, b.top_k)
        return b
