"""Kernel tests run single-threaded (the parallel split is tested on its own in test_ops.py).

On a shared 2-core machine a 2-thread OpenMP region waits for a preempted thread for a whole
scheduler tick, which turns a millisecond test into seconds.
"""
import pytest

from compressor.kernels import extension


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every kernel test runs on one thread (the fixture is in tests/conftest.py)."""


def _isas() -> list[str]:
    """The kernel sets this CPU runs ("reference" alone without the C++ extension)."""
    if extension is None:
        return ["reference"]
    out = []
    for name in ("avx512", "avx2", "scalar"):
        try:
            extension._set_isa(name)
            out.append(name)
        except RuntimeError:
            pass
    extension._set_isa("auto")
    return out


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Each kernel set this CPU runs, forced for the test."""
    if extension is not None:
        extension._set_isa(request.param)
    yield request.param
    if extension is not None:
        extension._set_isa("auto")
