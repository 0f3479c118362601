"""Shared test set-up: fixed seeds (tests build float64 data explicitly)."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the test models are tiny, so threads only add overhead (and stall on a
    loaded 2-core machine). The setting is restored at the end of the session."""
    from curvops.testing import contract

    with contract.single_thread():
        yield
