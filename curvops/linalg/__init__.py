"""Matrix-free linear algebra on the operator protocol, torch-native (runs where the operator runs).

Every algorithm sees only the protocol (``A.shape``, ``A.torch_dtype``, ``A.device``, ``A.tags``,
``A @ V``, ``A.T @ W``), so it works on any operator: curvature operators, helpers, composites,
a user's own.  Results are small dataclasses with diagnostics.
"""
