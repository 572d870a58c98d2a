"""compressor/worker.py: a handler loaded by path into a child process, driven by JSON lines.

The handler file prints to stdout at import, in its constructor and in a call (from Python and
straight to fd 1), so every answer read back here also proves the protocol survived the noise.
"""
import pytest

from compressor.worker import LocalWorker, ProcessWorker, WorkerError, run_once

HANDLER = '''
import os
import sys

print("noise at import")


class Echo:
    def __init__(self, base=0):
        print("noise in __init__")
        self.base = base
        self.hook = print                 # callable, but an attribute rather than a method

    def add(self, x):
        print("noise in a call", flush=True)
        os.write(1, b"raw bytes on fd 1\\n")
        return {"sum": self.base + x}

    def fail(self):
        raise KeyError("no such thing")

    def unjsonable(self):
        return {"x": object()}

    def die(self):
        sys.stderr.write("something earlier\\nthe last words\\n\\n")
        sys.stderr.flush()
        os._exit(3)
'''


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("worker") / "echo_handler.py"
    path.write_text(HANDLER)
    return f"{path}:Echo"


@pytest.fixture(scope="module")
def echo(target):
    w = ProcessWorker(target, init={"base": 2}, label="echo")
    yield w
    w.close()


def test_call_returns_the_value_and_keeps_state(echo):
    assert echo.call("add", x=3) == {"sum": 5}
    assert echo.call("add", x=-2) == {"sum": 0}            # the same handler, a second line


def test_exception_in_the_child_is_one_line_naming_it(echo):
    with pytest.raises(WorkerError, match=r"^echo: fail failed: KeyError: 'no such thing'$"):
        echo.call("fail")
    assert echo.call("add", x=0) == {"sum": 2}             # the worker survives an error


@pytest.mark.parametrize("cmd, msg", [("nope", "unknown worker command 'nope'; Echo has ['add', 'die', 'fail'"),
                                      ("_private", "unknown worker command '_private'"),
                                      ("hook", "unknown worker command 'hook'"),
                                      ("unjsonable", "TypeError: Object of type object is not JSON serializable")])
def test_bad_commands_and_answers(echo, cmd, msg):
    with pytest.raises(WorkerError, match=msg.replace("[", r"\[")):
        echo.call(cmd)


def test_a_child_that_dies_gives_its_last_stderr_line(target):
    w = ProcessWorker(target, label="doomed")
    try:
        with pytest.raises(WorkerError, match=r"^doomed: worker process died during 'die': the last words$"):
            w.call("die")
        with pytest.raises(WorkerError, match="died during 'add'"):   # writing to a dead child: BrokenPipe
            w.call("add", x=1)
    finally:
        w.close()
        w.close()                                                     # idempotent


def test_a_target_that_cannot_start(tmp_path):
    msg = r"cannot start X: FileNotFoundError: worker target '.*missing\.py:X': no such file$"
    with pytest.raises(WorkerError, match=msg):
        run_once(f"{tmp_path / 'missing.py'}:X", "anything")


def test_run_once_and_a_module_target(target):
    assert run_once(target, "add", init={"base": 1}, x=1) == {"sum": 2}
    assert run_once("collections:Counter", "total", init={"a": 2, "b": 3}) == 5


def test_local_worker_serves_the_same_handler(target, capsys):
    with LocalWorker(target, init={"base": 2}) as w:
        assert w.call("add", x=3) == {"sum": 5}
        with pytest.raises(KeyError, match="no such thing"):
            w.call("fail")
        with pytest.raises(ValueError, match="unknown worker command 'nope'"):
            w.call("nope")
