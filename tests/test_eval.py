"""`compressor.eval.PerplexityReport`: the recovered-% arithmetic of the stage table."""
import pytest

from compressor.eval import PerplexityReport


def test_stage_rows_recovered_share():
    rep = PerplexityReport(8, 2048, 20.0, stages=[("nf4", 24.0), ("nf4 + lora", 21.0), ("+ gptq", 22.0),
                                                  ("+ peqa (reloaded)", 21.5)])
    rows = rep.stage_rows()
    assert [r.name for r in rows] == ["original (fp32)", "nf4", "nf4 + lora", "+ gptq", "+ peqa (reloaded)"]
    assert rows[1].recovered_pct is None and rows[1].ratio == pytest.approx(1.2)
    assert rows[2].recovered_pct == pytest.approx(75.0)        # (24 - 21) / (24 - 20)
    assert rows[3].recovered_pct is None                       # got worse
    assert rows[4].recovered_pct == pytest.approx(25.0)        # (22 - 21.5) / (22 - 20)
    assert rep.final == 21.5


def test_reload_gap():
    rep = PerplexityReport(None, 64, 10.0, compressed=12.0, reloaded=12.06)
    assert rep.reload_gap_pct == pytest.approx(0.5) and rep.final == 12.06
    assert PerplexityReport(None, 64, 10.0).reload_gap_pct is None
