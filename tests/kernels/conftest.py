"""Kernel tests run single-threaded (the parallel split is tested on its own in test_ops.py).

On a shared 2-core machine a 2-thread OpenMP region waits for a preempted thread for a whole
scheduler tick, which turns a millisecond test into seconds.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
