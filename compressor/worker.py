"""A Python object in a child process of its own, driven one JSON line at a time.

    w = ProcessWorker("compressor.bench.measure:Measurer", init={"threads": 2}, label="w4")
    w.call("load", path="out/w4")     # Measurer(threads=2).load(path="out/w4"), run in the child
    w.close()
    run_once("benchmarks/bench_decode.py:Runtime", "decode", init={"threads": 2}, kind="fp32", ...)

Benchmarks measure in a child because resident memory, its peak and the allocator's leftovers
belong to a process, not to a model: two models in one interpreter would blur each other's numbers.

The target is ``"package.module:Factory"`` or ``"/path/to/file.py:Factory"``; a file is loaded by
path, so scripts outside a package (``benchmarks/``) can serve too. The child runs
``python -m compressor.worker TARGET INIT_JSON``: it calls ``Factory(**init)`` once, then answers
every request line ``{"cmd": name, "kw": {...}}`` with ``{"ok": handler.name(**kw)}`` (JSON-able)
or ``{"error": "ValueError: the first line of its message"}``. The answers go to a private copy of
the child's stdout and fd 1 is pointed at stderr, so nothing a library prints, from Python or C++,
can corrupt the protocol; stderr goes to a log the parent reads back when the child dies.
`LocalWorker` serves the same handler in the calling process, for tests and debugging.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["WorkerError", "ProcessWorker", "LocalWorker", "run_once", "load_factory"]


class WorkerError(RuntimeError):
    """A worker process died or answered with an error; the message is one line."""


def load_factory(target: str):
    """The callable that ``"package.module:Factory"`` or ``"/path/to/file.py:Factory"`` names."""
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise ValueError(f"worker target {target!r}: expected 'package.module:Factory' or '/path/to/file.py:Factory'")
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"worker target {target!r}: no such file")
        # Not "__main__": the file's own command line must not run when it is a worker.
        spec = importlib.util.spec_from_file_location(f"_worker_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module      # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not callable(getattr(module, name, None)):
        raise AttributeError(f"worker target {target!r}: {where} has no callable {name!r}")
    return getattr(module, name)


def _dispatch(handler, cmd: str, kw: dict):
    # Methods of the handler's class only: not private ones, nor a callable attribute (a model).
    cls = type(handler)
    if cmd.startswith("_") or not callable(getattr(cls, cmd, None)):
        known = sorted(n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n)))
        raise ValueError(f"unknown worker command {cmd!r}; {cls.__name__} has {known}")
    return getattr(handler, cmd)(**kw)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__)[:300]


class LocalWorker:
    """The handler in this process, behind `ProcessWorker`'s interface; exceptions propagate as raised."""

    def __init__(self, target: str, *, init: dict | None = None, label: str | None = None):
        self.label = label or target.rpartition(":")[2]
        self._handler = load_factory(target)(**(init or {}))

    def call(self, cmd: str, **kw):
        return _dispatch(self._handler, cmd, kw)

    def close(self) -> None:
        self._handler = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class ProcessWorker:
    """``Factory(**init)`` in a child process; `call` runs one of its methods there and returns the answer.

    env: variables set in the child on top of this process's environment. label: names the worker
    in every `WorkerError` (default: the factory's name). python: the interpreter of the child
    (default this one's), e.g. a venv that holds an engine this one must not (it must import compressor).
    """

    def __init__(self, target: str, *, init: dict | None = None, env: dict[str, str] | None = None,
                 label: str | None = None, python: str | None = None):
        self.label = label or target.rpartition(":")[2]
        self._log = tempfile.TemporaryFile(mode="w+")
        self._p = subprocess.Popen([python or sys.executable, "-m", "compressor.worker", target, json.dumps(init or {})],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                   env=None if env is None else {**os.environ, **env})

    def call(self, cmd: str, **kw):
        try:
            self._p.stdin.write(json.dumps({"cmd": cmd, "kw": kw}) + "\n")
            self._p.stdin.flush()
        except BrokenPipeError:
            pass                             # the child is gone; the empty read below says why
        line = self._p.stdout.readline()
        if not line:
            raise WorkerError(f"{self.label}: worker process died during {cmd!r}: {self._last_words()}")
        ans = json.loads(line)
        if "error" in ans:
            raise WorkerError(f"{self.label}: {cmd} failed: {ans['error']}")
        return ans["ok"]

    def _last_words(self) -> str:
        """The child's last non-blank stderr line, or its exit status."""
        try:
            self._p.wait(timeout=10)
        except subprocess.TimeoutExpired:    # stdout closed but still running: do not hang on it
            self._p.kill()
            self._p.wait()
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().splitlines() if ln.strip()]
        return (lines[-1] if lines else f"exit status {self._p.returncode}, nothing on stderr")[:300]

    def close(self, timeout: float = 30) -> None:
        """End of input lets the child's loop end; one that is still busy after `timeout` s is killed."""
        if self._log.closed:
            return
        try:
            self._p.stdin.close()
        except OSError:                      # BrokenPipe: the child is gone already
            pass
        try:
            self._p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._p.kill()
            self._p.wait()
        self._p.stdout.close()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_once(target: str, cmd: str, init: dict | None = None, **kw):
    """Start a `ProcessWorker`, make one call, close it: ``Factory(**init).cmd(**kw)`` in a fresh process."""
    with ProcessWorker(target, init=init) as w:
        return w.call(cmd, **kw)


def _serve(target: str, init_json: str) -> None:
    # `python -m` has imported the compressor package before this runs, with fd 1 still the
    # protocol pipe; that import prints nothing, and everything after it is redirected here.
    proto = os.fdopen(os.dup(1), "w")        # the answers' private copy of stdout
    os.dup2(2, 1)                            # fd 1 -> stderr, for C++ as well as Python prints
    sys.stdout = sys.stderr
    try:
        handler = load_factory(target)(**json.loads(init_json))
    except Exception as e:                   # the parent reports this last stderr line
        sys.exit(f"compressor.worker: cannot start {target.rpartition(':')[2]}: {_one_line(e)}")
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            ans = json.dumps({"ok": _dispatch(handler, msg["cmd"], msg["kw"])})
        except Exception as e:               # the parent raises it as a one-line WorkerError
            ans = json.dumps({"error": _one_line(e)})
        proto.write(ans + "\n")
        proto.flush()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m compressor.worker package.module:Factory|/path/file.py:Factory INIT_JSON")
    _serve(sys.argv[1], sys.argv[2])
