r"""The quadratic toy model $f(w) = \tfrac12 w^\top A w + b^\top w + c$ as exact ground truth (``seeds/001``).

With the spectral decomposition $A = Q\,\mathrm{diag}(a)\,Q^\top$ ($Q$ orthogonal, $a_j$ real) and
the rotated coordinates $u = Q^\top w$, $\tilde b = Q^\top b$, the objective separates into
independent axes $f = \sum_j \tfrac12 a_j u_j^2 + \tilde b_j u_j + c$ and gradient descent
$w \leftarrow w - \alpha \nabla f(w)$ becomes, per axis,

$$u_j \leftarrow u_j - \alpha (a_j u_j + \tilde b_j).$$

* $a_j \ne 0$: with $u^*_j = -\tilde b_j / a_j$,
  $u_j(t) = u^*_j + (1 - \alpha a_j)^t\,(u_j(0) - u^*_j)$ — converges iff $0 < \alpha a_j < 2$,
  oscillates with constant amplitude at $\alpha a_j = 2$, diverges otherwise (including every
  $a_j < 0$: the escape direction of a saddle or maximum).
* $a_j = 0$, $\tilde b_j \ne 0$: $u_j(t) = u_j(0) - t\,\alpha\,\tilde b_j$ drifts forever (no
  stationary point exists).
* $a_j = 0$, $\tilde b_j = 0$: $u_j$ is never updated (a free, flat direction).

Everything is float64 and deterministic (no random state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operators.dense import Dense

DT = torch.float64

_KINDS = ("minimum", "maximum", "saddle", "degenerate", "none")
_AXIS_LABELS = ("converges", "oscillates", "diverges", "drifts", "frozen")


@dataclass
class QuadraticStationaryPoints:
    r"""The stationary set $\{w : Aw + b = 0\}$ of a quadratic.

    Attributes:
        exists: whether any stationary point exists, i.e. $\tilde b_j = 0$ on every axis with
            $a_j = 0$ ($b$ lies in the range of $A$).
        w_star: the particular solution $w^* = -A^+ b$ (pseudo-inverse), [n].  When
            ``exists`` is False it is only the minimiser of $\|\nabla f\|_2$, not stationary.
        null_space: orthonormal basis [n, k] of the free directions ($a_j = 0$, $\tilde b_j = 0$);
            when ``exists`` the stationary set is $w^* + \mathrm{span}(\text{null\_space})$.
        drift_directions: orthonormal basis [n, m] of the axes with $a_j = 0$, $\tilde b_j \ne 0$
            (empty iff ``exists``).
        kind: ``"minimum"`` (all $a_j > 0$), ``"maximum"`` (all $a_j < 0$), ``"saddle"`` (both
            signs), ``"degenerate"`` (some $a_j = 0$, the rest one sign — the same verdict as
            :func:`~curvops.analysis.classify_stationary_point`), or ``"none"`` (no stationary point).
        eigenvalues: the $a_j$, ascending, [n].
        zero_threshold: $|a_j| \le$ this counts as $a_j = 0$.
    """

    exists: bool
    w_star: Tensor
    null_space: Tensor
    drift_directions: Tensor
    kind: str
    eigenvalues: Tensor
    zero_threshold: float


@dataclass
class QuadraticStability:
    r"""Per-axis fate of gradient descent with step size $\alpha$ on a quadratic.

    Attributes:
        lr: the step size $\alpha$.
        eigenvalues: the $a_j$, ascending, [n].
        lr_times_eigenvalue: $\alpha a_j$, [n].
        labels: one of ``"converges"`` ($0 < \alpha a_j < 2$), ``"oscillates"``
            ($\alpha a_j = 2$), ``"diverges"`` ($\alpha a_j < 0$ or $> 2$), ``"drifts"``
            ($a_j = 0$, $\tilde b_j \ne 0$), ``"frozen"`` ($a_j = 0$, $\tilde b_j = 0$) per axis.
        converges: bool [n], ``labels == "converges"``.
        stable: True when every axis converges or is frozen (the iterates stay bounded and settle).
    """

    lr: float
    eigenvalues: Tensor
    lr_times_eigenvalue: Tensor
    labels: tuple[str, ...]
    converges: Tensor
    stable: bool


def _as_f64(x, api: str, what: str, device=None) -> Tensor:
    try:
        t = torch.as_tensor(x, dtype=DT, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{api}: expected {what} convertible to a float64 tensor, got {type(x).__name__}.") from e
    return t


class QuadraticModel:
    r"""$f(w) = \tfrac12 w^\top A w + b^\top w + c$ with symmetric $A$: exact derivatives and GD dynamics.

    Gradient $\nabla f(w) = Aw + b$, Hessian $A$; the eigendecomposition $A = Q\,\mathrm{diag}(a)\,Q^\top$
    (computed once, cached) gives the stationary points and the closed-form gradient-descent
    trajectory per eigen-axis (see the module docstring).

    Args:
        A: [n, n] symmetric matrix (symmetry checked to ``sym_tol`` relative to ``max |A|``,
            then symmetrised as $(A + A^\top)/2$).
        b: [n] linear term.
        c: scalar offset.
        tol: relative tolerance deciding zeros: $|a_j| \le \text{tol}\cdot\max_i |a_i|$ counts as
            $a_j = 0$, $|\tilde b_j| \le \text{tol}\cdot\|b\|_2$ as $\tilde b_j = 0$, and
            $|\alpha a_j - 2| \le 2\,\text{tol}$ as $\alpha a_j = 2$.
        sym_tol: relative symmetry tolerance.

    Raises:
        ValueError: non-square / non-2-D ``A``, an asymmetric or non-finite ``A``, a ``b`` of the
            wrong shape or non-finite, a non-finite ``c``, or tolerances outside (0, 1).

    Example:
        >>> m = QuadraticModel(torch.diag(torch.tensor([1.0, 0.0, -2.0])), torch.tensor([1.0, 0.0, 0.0]))
        >>> m.stationary_points().kind
        'saddle'
    """

    def __init__(self, A, b, c: float = 0.0, *, tol: float = 1e-8, sym_tol: float = 1e-10):
        api = "QuadraticModel"
        if not (0 < tol < 1):
            raise ValueError(f"{api}: expected 0 < tol < 1, got {tol!r}.")
        if not (0 < sym_tol < 1):
            raise ValueError(f"{api}: expected 0 < sym_tol < 1, got {sym_tol!r}.")
        A = _as_f64(A, api, "A")
        if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
            raise ValueError(f"{api}: expected a square, non-empty 2-D matrix A, got shape {tuple(A.shape)}.")
        if not bool(torch.isfinite(A).all()):
            raise ValueError(f"{api}: expected a finite A, got NaN/Inf entries.")
        scale = float(A.abs().max())
        asym = float((A - A.T).abs().max())
        if asym > sym_tol * max(scale, 1e-300):
            raise ValueError(f"{api}: expected a symmetric A (max |A - Aᵀ| ≤ {sym_tol:g}·max |A|), "
                             f"got max |A - Aᵀ| = {asym:.3g} with max |A| = {scale:.3g}.")
        n = A.shape[0]
        b = _as_f64(b, api, "b", device=A.device)
        if tuple(b.shape) != (n,):
            raise ValueError(f"{api}: expected b of shape ({n},), got shape {tuple(b.shape)}.")
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"{api}: expected a finite b, got NaN/Inf entries.")
        try:
            c = float(c)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{api}: expected a real scalar c, got {type(c).__name__}.") from e
        if not math.isfinite(c):
            raise ValueError(f"{api}: expected a finite c, got {c!r}.")
        self.A = 0.5 * (A + A.T)
        self.b = b
        self.c = c
        self.n = n
        self.tol = tol
        self._eig: tuple[Tensor, Tensor] | None = None

    # ---- evaluation ------------------------------------------------------------------

    def _point(self, w, api: str) -> Tensor:
        w = _as_f64(w, api, "w", device=self.A.device)
        if w.dim() == 0 or w.shape[-1] != self.n:
            raise ValueError(f"{api}: expected w of shape ({self.n},) or [..., {self.n}], got shape {tuple(w.shape)}.")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{api}: expected a finite w, got NaN/Inf entries.")
        return w

    def value(self, w) -> Tensor:
        r"""$f(w) = \tfrac12 w^\top A w + b^\top w + c$ for w [n] (or a batch [..., n] → [...])."""
        w = self._point(w, "QuadraticModel.value")
        return 0.5 * ((w @ self.A) * w).sum(-1) + w @ self.b + self.c

    def gradient(self, w) -> Tensor:
        r"""$\nabla f(w) = A w + b$ for w [n] (or a batch [..., n])."""
        w = self._point(w, "QuadraticModel.gradient")
        return w @ self.A + self.b  # A symmetric: wA = (Aw)ᵀ

    def hessian(self) -> Dense:
        r"""The exact Hessian $A$ as :class:`curvops.Dense`, tagged ``symmetric`` (and ``psd`` when
        every $a_j \ge -\text{zero\_threshold}$)."""
        a, _ = self.eig()
        tags = ("symmetric", "psd") if float(a.min()) >= -self.zero_threshold else ("symmetric",)
        return Dense(self.A, tags=tags)

    # ---- spectrum --------------------------------------------------------------------

    def eig(self) -> tuple[Tensor, Tensor]:
        r"""$(a, Q)$ with $A = Q\,\mathrm{diag}(a)\,Q^\top$, $a$ ascending [n], $Q$ orthogonal [n, n]; cached.

        Within the eigenspace of $a_j = 0$ (any basis of it is valid) $Q$ is chosen so that
        $\tilde b = Q^\top b$ is nonzero on at most its first column: the projection of $b$ onto
        the null space of $A$ is the single drift direction, the rest are free.
        """
        if self._eig is None:
            a, Q = torch.linalg.eigh(self.A)
            # A repeated zero eigenvalue leaves its eigenbasis arbitrary; rotate it (Householder) so
            # that b's component in the null space of A lies along its first column only: then at
            # most one flat axis drifts and the others have b̃_j = 0 exactly (frozen).
            zero = a.abs() <= self.tol * float(a.abs().max())
            if int(zero.sum()) > 1:
                Z = Q[:, zero]
                p = Z.T @ self.b
                norm = float(torch.linalg.vector_norm(p))
                if norm > self.tol * float(torch.linalg.vector_norm(self.b)):
                    e1 = torch.zeros_like(p)
                    e1[0] = 1.0
                    v = p + (1.0 if float(p[0]) >= 0 else -1.0) * norm * e1
                    Z = Z - 2.0 * torch.outer(Z @ v, v) / float(v @ v)  # Z H, H = I − 2vvᵀ/vᵀv
                    Q = Q.clone()
                    Q[:, zero] = Z
            self._eig = (a, Q)
        return self._eig

    @property
    def zero_threshold(self) -> float:
        r"""$\text{tol}\cdot\max_j |a_j|$: eigenvalues at most this in magnitude count as zero."""
        a, _ = self.eig()
        return self.tol * float(a.abs().max())

    def _axes(self):
        """Eigenvalues, eigenvectors, b̃ = Qᵀb, the zero-eigenvalue mask and the zero-b̃ mask."""
        a, Q = self.eig()
        bt = Q.T @ self.b
        zero_a = a.abs() <= self.zero_threshold
        zero_b = bt.abs() <= self.tol * float(torch.linalg.vector_norm(self.b))
        return a, Q, bt, zero_a, zero_b

    def stationary_points(self) -> QuadraticStationaryPoints:
        r"""Solve $Aw + b = 0$ per eigen-axis and classify.

        $w^* = -A^+ b = -\sum_{a_j \ne 0} Q_{:j}\,\tilde b_j / a_j$.  A stationary point exists iff
        $\tilde b_j = 0$ wherever $a_j = 0$; the free directions $Q_{:j}$ ($a_j = 0$, $\tilde b_j = 0$)
        span the null space.  The kind is read off the signs of the $a_j$ (zero within
        :attr:`zero_threshold`).

        Returns:
            :class:`QuadraticStationaryPoints`.
        """
        a, Q, bt, zero_a, zero_b = self._axes()
        inv = torch.where(zero_a, torch.zeros_like(a), 1.0 / torch.where(zero_a, torch.ones_like(a), a))
        w_star = -(Q @ (inv * bt))
        drift = zero_a & ~zero_b
        exists = not bool(drift.any())
        z = self.zero_threshold
        pos, neg = bool((a > z).any()), bool((a < -z).any())
        if not exists:
            kind = "none"
        elif pos and neg:
            kind = "saddle"
        elif bool(zero_a.any()):
            kind = "degenerate"
        else:
            kind = "minimum" if pos else "maximum"
        return QuadraticStationaryPoints(
            exists=exists, w_star=w_star, null_space=Q[:, zero_a & zero_b], drift_directions=Q[:, drift],
            kind=kind, eigenvalues=a, zero_threshold=z,
        )

    # ---- gradient descent --------------------------------------------------------------

    def _gd_args(self, w0, lr, steps, api: str):
        w0 = self._point(w0, api)
        if w0.dim() != 1:
            raise ValueError(f"{api}: expected w0 of shape ({self.n},), got shape {tuple(w0.shape)}.")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{api}: expected a finite step size lr > 0, got {lr!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{api}: expected an integer steps ≥ 0, got {steps!r}.")
        return w0, float(lr), steps

    def gd_closed_form(self, w0, lr: float, steps: int) -> Tensor:
        r"""Gradient-descent iterates $w(0), \dots, w(T)$ in closed form, per eigen-axis.

        With $u = Q^\top w$: for $a_j \ne 0$,
        $u_j(t) = u^*_j + (1 - \alpha a_j)^t (u_j(0) - u^*_j)$, $u^*_j = -\tilde b_j / a_j$;
        for $a_j = 0$, $u_j(t) = u_j(0) - t\,\alpha\,\tilde b_j$.  Then $w(t) = Q u(t)$.

        Args:
            w0: start [n].
            lr: step size $\alpha > 0$.
            steps: $T \ge 0$.

        Returns:
            [steps + 1, n] float64, row t is $w(t)$ (row 0 is ``w0``).
        """
        w0, lr, steps = self._gd_args(w0, lr, steps, "QuadraticModel.gd_closed_form")
        a, Q, bt, zero_a, _ = self._axes()
        u0 = Q.T @ w0
        safe_a = torch.where(zero_a, torch.ones_like(a), a)
        u_star = -bt / safe_a
        t = torch.arange(steps + 1, dtype=DT, device=self.A.device)[:, None]
        factor = torch.pow((1.0 - lr * a)[None, :], t)  # integer-valued exponents: negative bases are fine
        curved = u_star + factor * (u0 - u_star)
        flat = u0 - t * lr * bt
        U = torch.where(zero_a[None, :], flat, curved)
        U[0] = u0
        return U @ Q.T

    def gd_simulate(self, w0, lr: float, steps: int) -> Tensor:
        r"""Gradient descent by the plain loop $w \leftarrow w - \alpha (A w + b)$.

        Returns:
            [steps + 1, n] float64 iterates, row 0 is ``w0``.
        """
        w, lr, steps = self._gd_args(w0, lr, steps, "QuadraticModel.gd_simulate")
        out = [w]
        for _ in range(steps):
            w = w - lr * (self.A @ w + self.b)
            out.append(w)
        return torch.stack(out)

    def stability(self, lr: float) -> QuadraticStability:
        r"""Classify each eigen-axis under GD with step size $\alpha$ by the per-step factor $1 - \alpha a_j$.

        ``"converges"`` iff $0 < \alpha a_j < 2$ ($|1 - \alpha a_j| < 1$); ``"oscillates"`` at
        $\alpha a_j = 2$ (factor $-1$, within $2\,\text{tol}$); ``"diverges"`` for $\alpha a_j > 2$ or
        $a_j < 0$; for $a_j = 0$: ``"drifts"`` if $\tilde b_j \ne 0$, else ``"frozen"``.  GD on the
        whole model is stable iff $\alpha < 2 / a_{\max}$ and no axis diverges or drifts.

        Returns:
            :class:`QuadraticStability`.
        """
        api = "QuadraticModel.stability"
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{api}: expected a finite step size lr > 0, got {lr!r}.")
        lr = float(lr)
        a, _, _, zero_a, zero_b = self._axes()
        prod = lr * a
        labels = []
        for j in range(self.n):
            p = float(prod[j])
            if bool(zero_a[j]):
                labels.append("frozen" if bool(zero_b[j]) else "drifts")
            elif abs(p - 2.0) <= 2.0 * self.tol:
                labels.append("oscillates")
            elif 0.0 < p < 2.0:
                labels.append("converges")
            else:
                labels.append("diverges")
        conv = torch.tensor([lab == "converges" for lab in labels], dtype=torch.bool)
        stable = all(lab in ("converges", "frozen") for lab in labels)
        return QuadraticStability(lr=lr, eigenvalues=a, lr_times_eigenvalue=prod, labels=tuple(labels),
                                  converges=conv, stable=stable)

    def __repr__(self) -> str:
        return f"<QuadraticModel n={self.n} c={self.c:g} {self.A.dtype} on {self.A.device}>"


__all__ = ["QuadraticModel", "QuadraticStability", "QuadraticStationaryPoints"]
