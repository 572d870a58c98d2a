"""compressor/bench/report.py: the header names the kernels each checkpoint ran on, in the terminal
table and the Markdown alike, and says nothing of kernels for models without compressed layers."""
from compressor.bench import report
from compressor.bench.config import BenchConfig
from compressor.bench.measure import RunSample
from compressor.bench.rows import ModelResult, build_rows
from compressor.bench.runner import BenchResult
from compressor.machine import machine_info


def _result(kernels: dict[str, str]) -> BenchResult:
    cfg = BenchConfig(batches=(1,), prompt_len=4, gen_len=3, runs=1)
    models = [ModelResult(label=label, spec=label, path=label, kind="checkpoint" if k else "hf", kernels=k,
                          runs=[RunSample(batch=1, prefill_s=0.1, decode_s=0.2, peak_rss=1)])
              for label, k in kernels.items()]
    return BenchResult(config=cfg, machine=machine_info(1), models=models, rows=build_rows(models, cfg))


def test_kernels_line_lists_checkpoints_only(tmp_path):
    res = _result({"base": "", "w4": "avx512 (compiled)", "w8": "avx512 (compiled)", "ref": "pytorch reference"})
    line = "compressor kernels: w4, w8 on avx512 (compiled); ref on pytorch reference"
    assert line in report.header_lines(res)
    assert f"- {line}" in report.write_markdown(res, tmp_path / "b.md").read_text()
    from rich.console import Console
    console = Console(record=True, width=200)
    report.print_table(res, console)
    assert f"# {line}" in console.export_text()


def test_no_kernels_line_without_compressed_layers():
    lines = report.header_lines(_result({"base": "", "other": ""}))
    assert not any("kernels" in ln for ln in lines)
    assert lines[0].startswith("cpu: ") and "threads: 1" in lines[0]
