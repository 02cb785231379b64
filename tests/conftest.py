"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: tiny operators are much faster without thread hand-offs on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
