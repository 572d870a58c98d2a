"""benchmarks/soak_kill.py, the CI version: 10 runs of `compress` sent SIGKILL at random moments (half of
them inside a write); no output may be corrupt or false-complete, and every resume must be bit-identical."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_kill.py"


def test_ten_kills_leave_no_third_state(tmp_path):
    counts = tmp_path / "counts.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--kills", "10", "--seed", "1", "--min-mid-write", "0.1",
                        "--json", str(counts)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    c = json.loads(counts.read_text())
    assert c["runs"] == 10 and c["kills"] >= 5, c
    assert c["corrupt"] == 0 and c["false-complete"] == 0, c
    assert c["absent"] + c["complete"] == 10, c
    assert c["kills mid-write"] >= 1 and c["resumes bit-identical"] == c["resumed"], c
