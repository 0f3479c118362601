r"""Stochastic Lanczos quadrature (SLQ): spectral density, log-determinant, traces of matrix functions.

For a symmetric $A \in \mathbb{R}^{n \times n}$ with eigenpairs $(\lambda_i, u_i)$ and a unit
probe $v$, the spectral measure of $A$ seen from $v$ is
$\mu_v = \sum_i (u_i^\top v)^2 \delta_{\lambda_i}$.  m Lanczos steps from $v$ give its
m-node Gauss quadrature: with $T_m = S \Theta S^\top$,

.. math:: v^\top f(A) v = \int f\,d\mu_v \approx \sum_{j=1}^m \tau_j f(\theta_j),
          \qquad \tau_j = (e_1^\top s_j)^2,\quad \textstyle\sum_j \tau_j = 1,

exact for polynomials of degree ≤ 2m − 1.  Averaging over random probes
($\mathbb{E}[v v^\top] = I/n$ after normalization) estimates the spectral density
$\phi(t) = \frac1n \sum_i \delta(t - \lambda_i)$ and $\operatorname{tr} f(A) = n \int f\,d\phi$.

The probes run side by side: each Lanczos step is one product ``A @ V`` with one column per
probe (one data pass for all of them on a curvature operator), fully reorthogonalized so no
ghost nodes appear.

References:
    Golub, Meurant (2010). *Matrices, Moments and Quadrature with Applications.*
    Lin, Saad, Yang (2016). *Approximating Spectral Densities of Large Matrices.*
    Ubaru, Chen, Saad (2017). *Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature.*
    Ghorbani, Krishnan, Xiao (2019). *An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density.*
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._checks import check_choice, check_flag, check_generator, check_int, check_optional_int, check_real
from ._primitives import _work_dtype, as_square_operator, random_block
from .lanczos import lanczos, tridiagonal

#: entries of the (grid × nodes) kernel matrix evaluated at once
_CHUNK = 2**22
#: Gauss weights below this are treated as zero (rounding residue of unseen directions)
_NEGLIGIBLE = 1e-20


@dataclass
class DensityResult:
    """A smoothed spectral density and the raw quadrature it came from.

    Attributes:
        grid: ``[G]`` points t.
        density: ``[G]`` φ_σ(t), a probability density (∫ φ_σ = 1 up to the mass outside the grid).
        nodes: ``[num_probes, num_steps]`` Ritz values θ of each probe's Lanczos run.
        weights: ``[num_probes, num_steps]`` Gauss weights τ (each row sums to 1).
        num_matvecs: products with A (columns).
        sigma: the Gaussian broadening used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    num_matvecs: int
    sigma: float = float("nan")


@dataclass
class LogdetResult:
    """``log det(A + damping·I)`` by SLQ.

    Attributes:
        value: the estimate (mean over probes).
        stderr: standard error of the mean over probes (the probe noise; the quadrature error
            of ``num_steps`` nodes is not included — it falls geometrically with the steps).
        num_matvecs: products with A (columns).
        samples: ``[num_probes]`` the per-probe estimates ``n · Σ_j τ_j log(θ_j + damping)``.
    """

    value: float
    stderr: float
    num_matvecs: int
    samples: Tensor | None = None


# ---- the quadrature ----------------------------------------------------------------------------
def slq_quadrature(A, *, num_probes: int, num_steps: int, distribution: str = "rademacher",
                   generator: torch.Generator | int | None = None, probe_batch_size: int | None = None,
                   api: str = "slq") -> tuple[Tensor, Tensor, Tensor, int]:
    """Gauss quadrature nodes and weights of ``num_probes`` random probes.

    Returns:
        ``(nodes [num_probes, m], weights [num_probes, m], sq_norms [num_probes], num_matvecs)``
        with ``m = min(num_steps, n)``, in float64 (where the device has it); ``sq_norms`` are
        ‖v‖² of the un-normalized probes (n for Rademacher).
    """
    n = A.shape[0]
    num_probes, num_steps, probe_batch_size, generator = _check_slq_args(
        A, num_probes, num_steps, distribution, generator, probe_batch_size, api)
    batch = num_probes if probe_batch_size is None else probe_batch_size
    m = min(num_steps, n)
    sdtype = _work_dtype(A.device)
    nodes, weights, norms = [], [], []
    probes = random_block(n, num_probes, A.torch_dtype, A.device, generator, distribution)  # same for any batching
    for start in range(0, num_probes, batch):
        V = probes[:, start:start + batch]
        alphas, betas, _ = lanczos(A, V, m, generator=generator)
        theta, S = torch.linalg.eigh(tridiagonal(alphas.to(sdtype), betas.to(sdtype)))
        nodes.append(theta)
        weights.append(S[:, 0, :] ** 2)
        norms.append((V.to(sdtype) ** 2).sum(dim=0))
    return torch.cat(nodes), torch.cat(weights), torch.cat(norms), num_probes * m


def _check_slq_args(A, num_probes, num_steps, distribution, generator, probe_batch_size, api: str):
    """The arguments every SLQ caller shares, checked before any product: ``(num_probes, num_steps,
    probe_batch_size, generator)`` normalized (ints, a generator or None)."""
    num_probes = check_int(num_probes, "num_probes", api, minimum=1)
    num_steps = check_int(num_steps, "num_steps", api, minimum=1)
    check_choice(distribution, "distribution", ("rademacher", "normal"), api)
    probe_batch_size = check_optional_int(probe_batch_size, "probe_batch_size", api, minimum=1)
    generator = check_generator(generator, api, A.device, operator=A)
    return num_probes, num_steps, probe_batch_size, generator


def slq_trace(A, f: Callable[[Tensor], Tensor], *, num_probes: int, num_steps: int,
              distribution: str = "rademacher", generator: torch.Generator | int | None = None,
              probe_batch_size: int | None = None, api: str = "slq_trace") -> tuple[float, float, Tensor, int]:
    r"""$\operatorname{tr} f(A) \approx \frac1{N_v}\sum_l \|v_l\|^2 \sum_j \tau_{lj} f(\theta_{lj})$.

    Returns ``(estimate, stderr, per-probe samples, num_matvecs)``; ``f`` maps a float64 tensor of
    nodes to values (nodes of negligible weight are masked out of the result).
    """
    nodes, weights, sq, mv = slq_quadrature(A, num_probes=num_probes, num_steps=num_steps,
                                            distribution=distribution, generator=generator,
                                            probe_batch_size=probe_batch_size, api=api)
    used = weights > _NEGLIGIBLE  # nodes a probe does not see (e.g. after a breakdown) carry no weight
    fill = nodes[used].max() if bool(used.any()) else nodes.new_ones(())
    vals = torch.where(used, f(torch.where(used, nodes, fill)), torch.zeros_like(nodes))
    samples = sq * (weights * vals).sum(dim=1)
    est = float(samples.mean())
    stderr = float(samples.std() / math.sqrt(num_probes)) if num_probes > 1 else float("nan")
    return est, stderr, samples, mv


# ---- spectral density --------------------------------------------------------------------------
def spectral_density(A, *, num_probes: int = 10, num_steps: int = 80, grid: Tensor | None = None,
                     num_points: int = 1000, sigma: float | None = None, distribution: str = "rademacher",
                     generator: torch.Generator | int | None = None,
                     probe_batch_size: int | None = None) -> DensityResult:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Estimates the eigenvalue density $\phi(t) = \frac1n \sum_i \delta(t - \lambda_i)$ broadened
    by a Gaussian of width σ:

    .. math:: \phi_\sigma(t) = \frac{1}{N_v} \sum_{l=1}^{N_v} \sum_{j=1}^{m} \tau_{lj}\,
              \frac{1}{\sqrt{2\pi}\sigma} e^{-(t - \theta_{lj})^2 / 2\sigma^2},

    an unbiased estimate (over the probes, up to the quadrature error) of the exact broadened
    density $\frac1n \sum_i g_\sigma(t - \lambda_i)$.  It integrates to 1; multiply by n for an
    eigenvalue count per unit.  The quadrature error falls quickly once m exceeds about
    (λ_max − λ_min)/σ; the probe noise falls like 1/√(n·N_v) for Rademacher probes.

    **Cost**: ``num_steps`` products with ``num_probes`` columns each (``num_matvecs =
    num_probes × num_steps``; one data pass per step when all probes run together); memory
    ``probe_batch_size × n × num_steps`` entries for the Lanczos bases.

    Args:
        A: symmetric operator (assumed symmetric, as for :func:`eigsh`), n × n.
        num_probes: random probes N_v.
        num_steps: Lanczos steps m per probe (capped at n; m = n is exact for each probe).
        grid: points where φ_σ is evaluated; default ``num_points`` evenly spaced points over
            [min θ − 5σ, max θ + 5σ] (so the density integrates to 1 on the grid).
        num_points: size of the default grid.
        sigma: Gaussian broadening; default 1 % of the spread of the nodes (max θ − min θ).
        distribution: probe entries, ``"rademacher"`` (±1, lower variance) or ``"normal"``.
        generator: random source for the probes (reproducibility): ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        probe_batch_size: probes run together (default all); lower it to bound memory.

    Returns:
        :class:`DensityResult` (grid, density, nodes, weights, num_matvecs, sigma).

    Raises:
        ValueError: non-square operator, bad counts or sigma, or a product returned NaN/Inf.
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    Example:
        >>> res = spectral_density(H, num_probes=10, num_steps=80)   # doctest: +SKIP
        >>> plt.semilogy(res.grid, res.density)                       # doctest: +SKIP

    References:
        Lin, Saad, Yang (2016). *Approximating Spectral Densities of Large Matrices.*
        Ubaru, Chen, Saad (2017). *Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature.*
        Ghorbani, Krishnan, Xiao (2019). *An Investigation into Neural Net Optimization via
        Hessian Eigenvalue Density.*
    """
    api = "spectral_density"
    A = as_square_operator(A, api)
    if sigma is not None:
        sigma = check_real(sigma, "sigma", api, minimum=0.0, strict=True, expected="sigma > 0",
                           fix="Pass a positive width, or sigma=None for 1 % of the spread of the spectrum.")
    if grid is None:
        num_points = check_int(num_points, "num_points", api, minimum=2)
    else:
        try:
            grid = torch.as_tensor(grid)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{api}: expected grid as a 1-D tensor or array of points, got "
                            f"{type(grid).__name__}.") from err
        if grid.dim() != 1 or grid.numel() == 0:
            raise ValueError(f"{api}: expected a 1-D grid, got shape {tuple(grid.shape)}.")
        if grid.is_complex() or grid.dtype == torch.bool:
            raise TypeError(f"{api}: expected a grid of real points, got dtype {grid.dtype}.")
        if grid.is_floating_point() and not bool(torch.isfinite(grid).all()):
            raise ValueError(f"{api}: expected a grid of finite points, got NaN or Inf entries.")
    num_probes, num_steps, probe_batch_size, generator = _check_slq_args(
        A, num_probes, num_steps, distribution, generator, probe_batch_size, api)
    nodes, weights, _, mv = slq_quadrature(A, num_probes=num_probes, num_steps=num_steps,
                                           distribution=distribution, generator=generator,
                                           probe_batch_size=probe_batch_size, api=api)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * spread if spread > 0 else 0.01 * max(abs(hi), 1.0)
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=nodes.dtype, device=nodes.device)
    else:
        grid = torch.as_tensor(grid).to(dtype=nodes.dtype, device=nodes.device)
        if grid.dim() != 1 or grid.numel() == 0:
            raise ValueError(f"{api}: expected a 1-D grid, got shape {tuple(grid.shape)}.")
    density = gaussian_density(grid, nodes.flatten(), weights.flatten() / num_probes, sigma)
    return DensityResult(grid=grid, density=density, nodes=nodes, weights=weights, num_matvecs=mv, sigma=sigma)


def gaussian_density(grid: Tensor, points: Tensor, masses: Tensor, sigma: float) -> Tensor:
    r"""$\sum_j w_j\, g_\sigma(t - x_j)$ on ``grid`` (a mixture of Gaussians), in chunks of the grid."""
    points, masses = points[masses > 0], masses[masses > 0]
    out = torch.empty_like(grid)
    step = max(1, _CHUNK // max(points.numel(), 1))
    norm = 1.0 / (math.sqrt(2 * math.pi) * sigma)
    for s in range(0, grid.numel(), step):
        z = (grid[s:s + step, None] - points[None, :]) / sigma
        out[s:s + step] = torch.exp(-0.5 * z * z) @ masses * norm
    return out


# ---- log-determinant ---------------------------------------------------------------------------
def logdet(A, *, damping: float = 0.0, num_probes: int = 30, num_steps: int = 30,
           distribution: str = "rademacher", generator: torch.Generator | int | None = None,
           assume_psd: bool = False, probe_batch_size: int | None = None) -> LogdetResult:
    r"""Log-determinant of a damped PSD operator by stochastic Lanczos quadrature.

    .. math:: \log\det(A + \delta I) = \operatorname{tr}\log(A + \delta I)
              \approx \frac{1}{N_v} \sum_{l} \|v_l\|^2 \sum_j \tau_{lj} \log(\theta_{lj} + \delta).

    The standard error is the spread of the per-probe estimates over √N_v; for
    Rademacher probes the per-probe variance is at most 2‖log(A+δI)‖_F² (less for
    Rademacher than Gaussian).  The quadrature error falls like
    $((\sqrt\kappa - 1)/(\sqrt\kappa + 1))^{2m}$ with κ the condition number of A + δI
    (Ubaru, Chen, Saad 2017), so ill-conditioned operators need damping or more steps.

    **Cost**: ``num_probes × num_steps`` products (one data pass per step when the probes run
    together).

    Args:
        A: operator tagged PSD (``A.is_psd``), n × n.
        damping: δ ≥ 0 added to the diagonal.
        num_probes: random probes N_v (≥ 2 for an error estimate).
        num_steps: Lanczos steps m per probe (capped at n; m = n is exact per probe).
        distribution: ``"rademacher"`` or ``"normal"`` probes.
        generator: random source (reproducibility): ``None``,
            a ``torch.Generator``, or an int seed (a new generator on the operator's device,
            seeded with it).
        assume_psd: accept an operator without the PSD tag (the caller vouches for it).
        probe_batch_size: probes run together (default all).

    Returns:
        :class:`LogdetResult` (value, stderr, num_matvecs, samples).

    Raises:
        ValueError: operator not tagged PSD (without ``assume_psd``), negative damping, or
            A + δI numerically singular or indefinite (a Ritz value ≤ 10 ε ‖A‖).
        TypeError: an argument of the wrong kind: a count that is not an int (e.g. a float),
            a ``generator`` that is not None, a ``torch.Generator`` or an int seed, a flag that
            is not a bool, a tolerance that is not a real number.

    References:
        Ubaru, Chen, Saad (2017). *Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature.*
        Golub, Meurant (2010). *Matrices, Moments and Quadrature with Applications.*
    """
    api = "logdet"
    A = as_square_operator(A, api)
    assume_psd = check_flag(assume_psd, "assume_psd", api)
    if not (A.is_psd or assume_psd):
        raise ValueError(
            f"{api}: expected an operator tagged 'psd', got tags {sorted(A.tags) or 'none'}. The log-determinant "
            f"needs a positive (semi)definite operator: tag it with curvops.tag(A, 'psd') or pass assume_psd=True "
            f"if you know it is; for an indefinite operator log|det| is not estimated here."
        )
    damping = check_real(damping, "damping", api, minimum=0.0, expected="damping ≥ 0")
    num_probes, num_steps, probe_batch_size, generator = _check_slq_args(
        A, num_probes, num_steps, distribution, generator, probe_batch_size, api)
    eps = torch.finfo(A.torch_dtype).eps

    def f(theta: Tensor) -> Tensor:
        shifted = theta + damping
        smallest = float(shifted.min())
        if smallest <= 10 * eps * max(float(theta.abs().max()), damping):
            raise ValueError(
                f"{api}: A + {damping:g}·I has a Ritz value {smallest:.3g} ≤ 0 up to rounding: it is "
                f"numerically singular or not PSD, and log det is -inf or undefined. Pass damping > 0."
            )
        return torch.log(shifted)

    value, stderr, samples, mv = slq_trace(A, f, num_probes=num_probes, num_steps=num_steps,
                                           distribution=distribution, generator=generator,
                                           probe_batch_size=probe_batch_size, api=api)
    return LogdetResult(value=value, stderr=stderr, num_matvecs=mv, samples=samples)
