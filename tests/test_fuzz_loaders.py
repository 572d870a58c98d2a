"""benchmarks/fuzz_loaders.py, the CI version: 500 mutated inputs per parser, every failure a typed
`compressor.errors.InputError`, no hang over 5 s, no RSS growth over 1 GiB."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_loaders.py"
PARSERS = ("safetensors", "config", "compression", "checkpoint", "recipe", "text", "gguf")


def test_500_inputs_per_parser_raise_only_typed_errors():
    r = subprocess.run([sys.executable, str(SCRIPT), "-n", "500", "--seed", "7"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.startswith("  ")}
    for p in PARSERS:
        inputs, loaded, typed, untyped, hang = map(int, rows[p][:5])
        assert inputs == 500 and loaded + typed == 500 and untyped == hang == 0, (p, rows[p])
        if p != "text":                          # any bytes are text (decoded with replacement); only length fails
            assert typed > 0, f"{p}: no mutated input was refused, so the fuzzer reached nothing"
