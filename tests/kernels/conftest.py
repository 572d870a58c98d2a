"""Kernel tests run single-threaded (the parallel split is tested on its own in test_ops.py).

On a shared 2-core machine a 2-thread OpenMP region waits for a preempted thread for a whole
scheduler tick, which turns a millisecond test into seconds.
"""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every kernel test runs on one thread (the fixture is in tests/conftest.py)."""
