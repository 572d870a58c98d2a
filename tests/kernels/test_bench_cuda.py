"""benchmarks/bench_cuda.py without a GPU: it refuses in one line, its correctness loop passes on the CPU
kernels (``--device cpu --quick``), and it catches a kernel that is off by 1%, raises, or returns NaN."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_cuda.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cuda", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture
def broken_auto(monkeypatch):
    """``broken_auto(f)``: every ``backend="auto"`` call returns ``f(y)`` of the real kernel's ``y``."""
    from compressor.kernels import dispatch
    real = dispatch.run

    def install(f):
        def run(packed, x, bias, backend):
            y = real(packed, x, bias, backend)
            return f(y) if (backend or dispatch.current_backend()) == "auto" else y
        monkeypatch.setattr(dispatch, "run", run)
    return install


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_it_refuses_in_one_line_on_stderr_and_exits_2():
    r = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, r.stderr
    assert "needs a CUDA GPU" in r.stderr and torch.__version__ in r.stderr and "torch.version.cuda=" in r.stderr


def test_cpu_quick_run_checks_the_cpu_kernels_with_no_mismatch(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--parts", "correctness", "speed", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\n0 mismatches\n" in printed and "all correct (exit 0)" in printed
    report = json.loads(out.read_text())
    c = report["correctness"]
    assert c["mismatches"] == 0 and c["failures"] == []
    backends = {(s["backend"], s["dtype"], s["bits"]) for s in c["summary"]}
    assert backends == {(b, d, bits) for b in ("reference", "auto") for d in ("float32", "bfloat16") for bits in (4, 8)}
    # every quant x N x M x dtype, plus the bias case, on the reference and on auto
    assert c["cases"] == 2 * 2 * (len(bench.QUANTS) * len(bench.QUICK_N) * len(bench.QUICK_M) + 1)
    rows = report["speed"]["rows"]
    assert len(rows) == len(bench.QUICK_SPEED_M) * (1 + len(bench.SPEED_QUANTS))
    assert all(r["us"] > 0 and r["GBps"] > 0 and r["x_base"] > 0 and r["error"] is None for r in rows)
    assert report["exit_code"] == 0


def test_a_kernel_off_by_one_percent_is_a_mismatch_and_the_run_exits_1(bench, broken_auto, tmp_path, capsys):
    broken_auto(lambda y: y * 1.01)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--parts", "correctness", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "MISMATCH auto float32" in printed and "exit 1" in printed
    c = json.loads(out.read_text())["correctness"]
    assert c["mismatches"] > 0
    fp32 = [s for s in c["summary"] if s["backend"] == "auto" and s["dtype"] == "float32"]
    assert all(s["mismatches"] == s["cases"] for s in fp32)     # 1e-2 of max|y| against 1e-5 of it
    assert all(s["mismatches"] == 0 for s in c["summary"] if s["backend"] == "reference")


def test_a_kernel_that_raises_fails_every_case_of_its_quant_and_dtype(bench, monkeypatch):
    from compressor.kernels import dispatch
    real = dispatch.run

    def run(packed, x, bias, backend):
        if backend == "auto" and packed.bits == 8:
            raise RuntimeError("no 8-bit kernel")
        return real(packed, x, bias, backend)
    monkeypatch.setattr(dispatch, "run", run)
    q8 = bench.Quant(8, -1, False, False)
    results = bench.check(torch.device("cpu"), ["auto"], [torch.float32], ms=(1, 3), ns=(99, 192),
                          quants=[bench.Quant(4, 64, False, True), q8], bias_case=(q8, 1, 99))
    auto8 = [r for r in results if r["backend"] == "auto" and r["bits"] == 8]
    assert len(auto8) == 5 and not any(r["ok"] for r in auto8)
    assert "no 8-bit kernel" in auto8[0]["error"] and all(r["error"].startswith("skipped") for r in auto8[1:])
    assert all(r["ok"] for r in results if r["bits"] == 4 or r["backend"] == "reference")


def test_compare_bounds_errors_relative_to_max_y_and_rejects_nan_shape_and_dtype(bench):
    y64 = torch.tensor([[1.0, -4.0, 2.0]], dtype=torch.float64)
    tol = bench.TOLERANCE[torch.float16] * 4.0                 # in output units: relative to max|y| = 4
    ok = bench.compare((y64 + 0.9 * tol).half(), None, y64, torch.float16)
    assert ok["ok"] and ok["err_ref"] is None and ok["err_f64"] == pytest.approx(0.9 * tol / 4, rel=0.1)
    assert not bench.compare((y64 + 1.5 * tol).half(), None, y64, torch.float16)["ok"]
    far_ref = y64 + 10 * tol
    assert not bench.compare(y64.half(), far_ref, y64, torch.float16)["ok"]    # right vs f64, wrong vs the oracle
    nan = y64.clone()
    nan[0, 1] = float("nan")
    assert bench.compare(nan.half(), None, y64, torch.float16)["problem"] == "non-finite output"
    assert not bench.compare(y64.float(), None, y64, torch.float16)["ok"]        # wrong dtype
    assert not bench.compare(y64.half().t(), None, y64, torch.float16)["ok"]     # wrong shape
    assert not bench.compare(None, None, y64, torch.float16)["ok"]


def test_acceptance_says_pass_miss_or_not_measured(bench):
    q = bench.GOAL_QUANT
    rows = [{"out": 4096, "in": 4096, "M": 1, "quant": q, "backend": "cuda", "x_base": 3.2},
            {"out": 11008, "in": 4096, "M": 1, "quant": q, "backend": "cuda", "x_base": 2.9},
            {"out": 4096, "in": 4096, "M": 1, "quant": "w8-per-ch-sym", "backend": "cuda", "x_base": 9.0}]
    goals = {(g["goal"], g["backend"]): g["status"] for g in bench.acceptance(rows, ["cuda"], "fp16 F.linear")}
    assert goals[(f"{q} M=1 (4096,4096) >= 3.0x fp16 F.linear", "cuda")] == "PASS"
    assert goals[(f"{q} M=1 (11008,4096) >= 3.0x fp16 F.linear", "cuda")] == "MISS"
    assert goals[(f"{q} M=256 (4096,4096) >= 1.0x fp16 F.linear", "cuda")] == "n/a"
    assert len(goals) == len(bench.GOALS) * len(bench.GOAL_SHAPES)


def test_decode_times_a_checkpoint_against_its_float_model(bench, tiny_llama, tmp_path):
    from compressor import compress
    ckpt = tmp_path / "ckpt"
    compress(str(tiny_llama), "rtn-w4g64", ckpt, progress=False)
    rows = bench.decode(ckpt, tiny_llama, torch.device("cpu"), ["auto"], prompt=8, tokens=4, runs=1)
    assert [r["model"] for r in rows] == ["HF float32", "ckpt"]
    assert all("error" not in r and r["tok_s"] > 0 and 0 <= r["same_tokens"] <= 4 for r in rows)
    assert rows[0]["same_tokens"] == 4 and rows[0]["x_hf"] == 1.0
    assert rows[1]["layers"] == "14/14 in kernel layout"


def test_a_missing_checkpoint_skips_decode_with_the_command_that_builds_it(bench, tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--parts", "decode", "--checkpoint", str(tmp_path / "none-here")]) == 0
    printed = capsys.readouterr().out
    assert "decode skipped: no checkpoint" in printed and bench.BUILD_CHECKPOINT in printed


def test_the_json_is_replaced_whole_or_not_at_all(bench, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    bench.write_json_atomic(out, {"a": 1})
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        bench.write_json_atomic(out, {"a": 2})
    assert json.loads(out.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]
