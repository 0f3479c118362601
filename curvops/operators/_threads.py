"""numpy/scipy BLAS threads while a scipy eigensolver drives a curvops operator (private).

``scipy.sparse.linalg.eigsh`` (ARPACK, also behind ``svds``) alternates its own BLAS work with our
products.  After each multi-threaded OpenBLAS call, OpenBLAS keeps its worker threads spinning for a
while; they then compete with torch's threads for the cores during the product (on a 2-core machine
a product ran ≈4× slower).  Lowering the BLAS thread count only *inside* the product does not help:
the workers woken by ARPACK's previous call keep spinning (measured: the spin's CPU time is the same
with and without a limit taken after the BLAS call).  What helps is ARPACK's own BLAS calls running
on one thread, so no worker is woken at all.

So when a numpy product is called from inside an ARPACK iteration, numpy/scipy's BLAS libraries are
limited to :attr:`BLAS_THREADS` threads (``threadpoolctl``) until that ARPACK call ends: the limit is
released by a finalizer on ARPACK's iteration state, which scipy drops when ``eigsh``/``svds``
returns (or when an exception raised from it is released).  One ``threadpool_limits`` per solve, not
per product.  Torch's own threads are not touched; other callers (plain ``A.matvec``, scipy's
``cg``/``gmres``/``lsqr``) are left alone.  Set ``curvops.operators._threads.BLAS_THREADS = None`` to
turn this off.
"""

from __future__ import annotations

import sys
import threading
import weakref

#: BLAS threads for numpy/scipy during an ARPACK solve on a curvops operator (None: leave as is)
BLAS_THREADS: int | None = 1

_lock = threading.RLock()  # a finalizer may run inside the locked region (garbage collection)
_active: dict[int, weakref.finalize] = {}  # id(ARPACK state) -> its finalizer
_limiter = None  # the threadpoolctl limiter while any solve is active


def _arpack_state(max_depth: int = 24):
    """The ``_ArpackParams`` instance whose ``iterate`` is on the call stack, or None."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "iterate" and "arpack" in frame.f_code.co_filename:
            state = frame.f_locals.get("self")
            if state is not None and type(state).__name__.endswith("ArpackParams"):
                return state
        frame = frame.f_back
    return None


def limit_for_scipy_solver() -> None:
    """Called by every numpy product: inside an ARPACK solve, limit BLAS threads until it ends."""
    if BLAS_THREADS is None:
        return
    state = _arpack_state()
    if state is None or id(state) in _active:
        return
    global _limiter
    with _lock:
        if _limiter is None:
            try:
                import threadpoolctl

                _limiter = threadpoolctl.threadpool_limits(BLAS_THREADS, user_api="blas")
            except Exception:  # noqa: BLE001 - no threadpoolctl or an unknown library: run as is
                return
        try:
            _active[id(state)] = weakref.finalize(state, _release, id(state))
        except TypeError:  # not weak-referenceable: give the limit back at once
            _release(None)


def _release(key) -> None:
    global _limiter
    with _lock:
        _active.pop(key, None)
        if not _active and _limiter is not None:
            limiter, _limiter = _limiter, None
            limiter.restore_original_limits()


def active() -> bool:
    """Whether a BLAS limit is held now (for tests)."""
    return _limiter is not None
