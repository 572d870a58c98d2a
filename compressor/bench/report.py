"""Renderings of a `compressor.bench.BenchResult`: a rich table, JSON, Markdown and a PNG.

Every rendering reads the same `Row` list, so the terminal, the files and the plot always agree.
Model-wide values (size, RSS after load, perplexity) are printed on a model's first row only; the
header lines above the table (machine, protocol, the kernels each checkpoint ran on) are shared by
the terminal and the Markdown.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .rows import Row
from .runner import BenchResult

__all__ = ["header_lines", "table_cells", "print_table", "write_json", "write_markdown", "plot"]

MIB = 2 ** 20


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


@dataclass(frozen=True)
class Column:
    title: str
    cell: Callable[[Row, bool], str]    # (row, first row of its model) -> text
    model_wide: bool = False


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}%"


def _cost(v: float | None) -> str:
    if v is None:
        return "—"
    return f"${v:.3g}" if v < 1 else f"${v:,.2f}"


COLUMNS = [
    Column("model", lambda r, first: r.label if first else ""),
    Column("engine", lambda r, first: r.engine if first else "", True),
    Column("batch", lambda r, first: str(r.batch)),
    Column("disk MiB", lambda r, first: f"{r.disk_bytes / MIB:,.1f}", True),
    Column("RSS load MiB", lambda r, first: f"{r.rss_load / MIB:,.0f}", True),
    Column("ppl", lambda r, first: _num(r.ppl, ".3f"), True),
    Column("Δppl", lambda r, first: "base" if r.is_base else _pct(r.ppl_increase_pct), True),
    Column("peak RSS MiB", lambda r, first: f"{r.peak_rss / MIB:,.0f}"),
    Column("TTFT ms", lambda r, first: f"{r.ttft_s * 1e3:,.1f}" if r.ttft_s < 0.1 else f"{r.ttft_s * 1e3:,.0f}"),
    Column("prefill tok/s", lambda r, first: f"{r.prefill_tok_s:,.1f} ±{r.prefill_spread_pct:.0f}%"),
    Column("prefill ×base", lambda r, first: "base" if r.is_base else f"{r.prefill_speedup:.2f}x"),
    Column("decode tok/s", lambda r, first: f"{r.decode_tok_s:,.1f} ±{r.decode_spread_pct:.0f}%"),
    Column("decode ×base", lambda r, first: "base" if r.is_base else f"{r.decode_speedup:.2f}x"),
    Column("$/1M gen", lambda r, first: _cost(r.cost_gen)),
    Column("$/1M prompt", lambda r, first: _cost(r.cost_prompt)),
    Column("gate", lambda r, first: "FAIL" if r.failures else ("—" if r.is_base else "ok")),
]


def _task(r: Row, t: str):
    return next((c for c in r.tasks if c.task == t), None)


def _task_columns(t: str) -> list[Column]:
    def acc(r, first):
        c = _task(r, t)
        return "—" if c is None else f"{c.acc_norm * 100:.1f}%"

    def diff(r, first):
        c = _task(r, t)
        if c is None or r.is_base:
            return "base" if r.is_base else "—"
        return f"{c.diff_pp:+.1f} [{c.ci_pp[0]:+.1f}, {c.ci_pp[1]:+.1f}]"
    return [Column(f"{t} acc_norm", acc, True), Column(f"Δ{t} pp [95% CI]", diff, True)]


def columns(result: BenchResult) -> list[Column]:
    """The table's columns: `COLUMNS`, with two per task (accuracy, paired difference) after Δppl."""
    at = next(i for i, c in enumerate(COLUMNS) if c.title == "Δppl") + 1
    extra = [c for t in result.config.tasks for c in _task_columns(t)]
    return COLUMNS[:at] + extra + COLUMNS[at:]


def task_lines(result: BenchResult) -> list[str]:
    """One line per candidate and task: both accuracies, the paired difference, McNemar p, the verdict."""
    out, seen = [], set()
    for r in result.rows:
        if r.is_base or r.label in seen:
            continue
        seen.add(r.label)
        for c in r.tasks:
            out.append(f"{r.label} {c.task}: acc {c.acc * 100:.1f}%, acc_norm {c.acc_norm * 100:.1f}% "
                       f"({c.diff_pp:+.1f} pp, 95% CI {c.ci_pp[0]:+.1f} to {c.ci_pp[1]:+.1f}, McNemar p={c.p_value:.3g}, "
                       f"n={c.n}): {c.verdict}")
    return out


def table_cells(result: BenchResult) -> list[list[str]]:
    out, prev = [], None
    cols = columns(result)
    for r in result.rows:
        first = r.label != prev
        out.append([c.cell(r, first) if (first or not c.model_wide) else "" for c in cols])
        prev = r.label
    return out


def header_lines(result: BenchResult) -> list[str]:
    m, c = result.machine, result.config
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    base_rss = {mr.label: mr.rss_base for mr in result.models}
    lines = [
        f"cpu: {m['cpu']} | L3 {m['l3']} | {m['physical_cores']} cores, {m['logical_cpus']} logical | "
        f"threads: {m['threads']} | torch cpu capability {m['torch_cpu_capability']}",
        f"{v} | {m['date']}",
        f"greedy, prompt {c.prompt_len} random tokens (seed {c.seed}), {c.gen_len} generated tokens; "
        f"median of {c.runs} runs after {c.warmup} warm-up (each run's prefill the median of {c.prefill_reps} "
        f"prompt forwards), models alternating run by run; ratios are medians "
        f"of per-run ratios to {result.models[0].label}",
        ("one process per model" if result.isolated else "all models in one process (memory columns not per model)")
        + "; runtime RSS before load: "
        + ", ".join(f"{k} {b / MIB:,.0f} MiB" for k, b in base_rss.items()),
    ]
    kernels = _kernels_line(result)
    if kernels:
        lines.append(kernels)
    others = [f"{m.label} on {m.kernels}" for m in result.models if m.engine != "torch"]
    if others:
        llama = any(m.engine == "llama.cpp" for m in result.models)
        lines.append("other engines: " + "; ".join(others)
                     + (" (llama.cpp rows batch 1 only: llama-cpp-python decodes one sequence)" if llama else ""))
    if result.eval_data:
        w = result.models[0].ppl_windows
        lines.append(f"perplexity: {result.eval_data}, {w} window{'s' if w != 1 else ''} of {c.seqlen} tokens")
    if c.tasks:
        m0 = result.models[0]
        sizes = ", ".join(f"{t} {m0.tasks[t]['n']} items" for t in c.tasks if t in m0.tasks)
        prec = next((r["precision"] for r in m0.tasks.values()), c.task_precision)
        lines.append(f"tasks: {sizes}, 0-shot, scored as lm-evaluation-harness (acc_norm shown), {prec} matmuls; "
                     "Δ: paired difference to the base, 95% paired-bootstrap interval")
    if c.price_per_hour is not None:
        lines.append(f"cost at ${c.price_per_hour:g}/hour at the measured prefill / decode throughput")
    gates = [f"--max-ppl-increase {c.max_ppl_increase:g}%" if c.max_ppl_increase is not None else "",
             f"--min-speedup {c.min_speedup:g}x (decode)" if c.min_speedup is not None else "",
             f"--max-acc-drop {c.max_acc_drop:g} pp (significant drops only)" if c.max_acc_drop is not None else ""]
    if any(gates):
        lines.append("gate: " + ", ".join(g for g in gates if g))
    return lines


def _kernels_line(result: BenchResult) -> str:
    """The kernel backend each worker reported, for the models with compressed layers only (an HF
    model runs on torch's own Linear), e.g. ``compressor kernels: w4, w8 on avx512 (compiled)``;
    "" when no model has any."""
    by_backend: dict[str, list[str]] = {}
    for mr in result.models:
        if mr.engine != "torch":
            continue
        if mr.kernels:
            by_backend.setdefault(mr.kernels, []).append(mr.label)
    return ("compressor kernels: " + "; ".join(f"{', '.join(labels)} on {k}" for k, labels in by_backend.items())
            if by_backend else "")


def print_table(result: BenchResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape
    console = console or Console()
    for line in header_lines(result):            # labels such as "gptq [ort:4]" are text, not rich markup
        console.print(escape(f"# {line}"), style="dim", highlight=False)
    t = Table(show_lines=False, header_style="bold")
    for i, c in enumerate(columns(result)):
        t.add_column(c.title, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r, cells in zip(result.rows, table_cells(result)):
        t.add_row(*map(escape, cells), style="red" if r.failures else None)
    console.print(t)
    for line in task_lines(result):
        console.print(escape(line), highlight=False)
    for f in result.failures:
        console.print(f"[red]gate failed[/red]: {escape(f)}", highlight=False)


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Everything: machine, config, rows, and per model every raw warm-up and timed run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1))
    return path


def write_markdown(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# compress-bench", ""] + [f"- {h}" for h in header_lines(result)] + [""]
    cols = columns(result)
    lines.append("| " + " | ".join(c.title for c in cols) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
    for cells in table_cells(result):
        lines.append("| " + " | ".join(x or " " for x in cells) + " |")
    tl = task_lines(result)
    if tl:
        lines += [""] + [f"- {x}" for x in tl]
    if result.failures:
        lines += ["", "**Gate failed:**", ""] + [f"- {f}" for f in result.failures]
    lines += ["", "TTFT: the prompt's forward plus the first token. Decode tok/s: batch × (gen-len − 1) / time of "
              "the decode steps. ± is half the range of the runs over their median. $/1M: hourly price / "
              "(3600 × tokens/s) × 1e6."]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(result: BenchResult, path: str | Path) -> Path:
    """Quality against cost: one labelled point per model, at the largest batch size.

    x is $/1M generated tokens when a price was given, else decode tokens/s; y is perplexity when
    it was measured, else size on disk.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = max(result.config.batches)
    rows = [r for r in result.rows if r.batch == b]
    priced = result.config.price_per_hour is not None
    xs = [r.cost_gen if priced else r.decode_tok_s for r in rows]
    has_ppl = all(r.ppl is not None for r in rows)
    ys = [r.ppl if has_ppl else r.disk_bytes / MIB for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for r, x, y in zip(rows, xs, ys):
        ax.scatter([x], [y], s=60, color="tab:red" if r.failures else ("tab:gray" if r.is_base else "tab:blue"),
                   zorder=3)
        note = f"{r.label}\n{r.disk_bytes / MIB:,.1f} MiB, {r.decode_tok_s:,.1f} tok/s"
        ax.annotate(note, (x, y), textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xlabel(f"\\$ per 1M generated tokens at \\${result.config.price_per_hour:g}/h (batch {b})" if priced
                  else f"decode tokens/s (batch {b})")
    ax.set_ylabel("perplexity" + (f" ({Path(result.eval_data).name})" if result.eval_data else "")
                  if has_ppl else "size on disk (MiB)")
    ax.set_title("quality vs cost: lower left is better" if priced else "quality vs speed")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.35, y=0.25)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
