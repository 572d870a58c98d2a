"""Runtime tests prepare their checkpoints into a cache of their own, not the user's ~/.cache/compressor."""
import pytest


@pytest.fixture(autouse=True)
def _own_runtime_cache(tmp_path_factory, monkeypatch):
    from compressor.runtime import store
    path = tmp_path_factory.getbasetemp() / "runtime-cache"
    monkeypatch.setattr(store, "root", lambda: path)
