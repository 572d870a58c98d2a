"""Task scoring speed and accuracy: a plain scorer against ours, fp32 and bf16, side by side.

    python benchmarks/tasks.py [MODEL_OR_CKPT] [--tasks hellaswag,piqa] [--limit 300] [--plain 40]

For each task, in one run on the same items:
  * `plain`: what a straightforward lm-eval-style scorer does: one forward per (context, choice),
    batch 1, the full-vocabulary head at every position (timed on the first `--plain` items only);
  * `ours fp32` and `ours bf16`: `compressor.tasks.loglikelihoods` (one packed row per item with the
    context once, rows batched to 1024 tokens, the head only on scored positions), with the model's
    matmuls in fp32, or under bf16 autocast (native on AVX512-BF16/AMX CPUs, emulated elsewhere).
The table gives seconds per item (median of `--reps` runs), the speed-up over plain, acc/acc_norm,
and how often bf16 picks the same answer as fp32. Tokens: real (packed) vs unshared vs padded.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import header, load_spec, machine_info, write_json  # noqa: E402

from compressor.tasks import load_task, loglikelihoods  # noqa: E402
from compressor.tasks.scoring import ScoreStats, encode_item, native_bf16  # noqa: E402
from compressor.tasks.stats import TaskResult, predictions  # noqa: E402


@torch.inference_mode()
def plain_loglikelihoods(model, tokenizer, items) -> list[tuple[float, ...]]:
    """The reference: each (context, choice) as its own sequence, full logits, log_softmax."""
    out = []
    for it in items:
        e = encode_item(tokenizer, it)
        lls = []
        for cont in e.continuations:
            ids = torch.tensor([list(e.context) + list(cont)])
            logp = torch.log_softmax(model(ids[:, :-1]).logits[0].float(), -1)
            tgt = torch.tensor(cont)
            lls.append(float(logp[-len(cont):].gather(1, tgt[:, None]).sum()))
        out.append(tuple(lls))
    return out


def acc_pair(lls, items) -> tuple[float, float, list[int]]:
    """acc %, acc_norm % (as compress-bench computes them) and each item's acc_norm answer."""
    r = TaskResult.from_scores("", lls, items)
    return 100 * r.acc, 100 * r.acc_norm, predictions(lls, [it.choices for it in items])[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--tasks", default="hellaswag,piqa")
    ap.add_argument("--limit", type=int, default=300, help="items per task for ours (first N)")
    ap.add_argument("--plain", type=int, default=40, help="items per task for the plain scorer")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_spec(args.model)
    info = machine_info()
    print(header("task scoring: plain vs packed, fp32 vs bf16", info))
    print(f"# model: {args.model} | bf16: {'native' if native_bf16() else 'emulated (no AVX512-BF16/AMX)'} | median of {args.reps} | "
          f"plain on the first {args.plain} items, ours on the first {args.limit}")
    rows, record = [], {}
    for task in args.tasks.split(","):
        items = load_task(task, args.data, args.limit)
        t0 = time.perf_counter()
        plain = plain_loglikelihoods(model, tok, items[:args.plain])
        plain_s = (time.perf_counter() - t0) / args.plain
        res = {}
        for prec in ("fp32", "bf16"):
            times, st = [], None
            for _ in range(args.reps):
                st = ScoreStats()
                lls = loglikelihoods(model, tok, items, precision=prec, progress=False, stats=st)
                times.append(st.seconds / len(items))
            res[prec] = (statistics.median(times), st, lls)
        # parity: ours fp32 against the plain scorer on the items both ran
        ours = res["fp32"][2][:args.plain]
        maxdiff = max(abs(a - b) for p, o in zip(plain, ours) for a, b in zip(p, o))
        pa, pn, _ = acc_pair(plain, items[:args.plain])
        oa, on, _ = acc_pair(ours, items[:args.plain])
        assert (pa, pn) == (oa, on), f"{task}: plain {pa}/{pn} vs ours {oa}/{on} on the same items"
        fa, fn, fnorm = acc_pair(res["fp32"][2], items)
        ba, bn, bnorm = acc_pair(res["bf16"][2], items)
        agree = 100 * sum(a == b for a, b in zip(fnorm, bnorm)) / len(items)
        st = res["fp32"][1]
        rows.append((task, "plain fp32", plain_s, 1.0, None, None, ""))
        for prec, a, n in (("fp32", fa, fn), ("bf16", ba, bn)):
            s = res[prec][0]
            rows.append((task, f"ours {prec}", s, plain_s / s, a, n, f"{agree:.1f}%" if prec == "bf16" else ""))
        print(f"# {task}: max |ll ours fp32 - plain| = {maxdiff:.2e} nats on {args.plain} items; tokens packed "
              f"{st.tokens} vs unshared {st.unshared} ({100 * st.tokens / st.unshared:.0f}%), padding "
              f"{st.padding_pct:.1f}%", flush=True)
        record[task] = {"plain_s_per_item": plain_s, "max_ll_diff": maxdiff,
                                 **{f"{p}_s_per_item": res[p][0] for p in res},
                                 "fp32": {"acc": fa, "acc_norm": fn}, "bf16": {"acc": ba, "acc_norm": bn},
                                 "bf16_agree_pct": agree, "tokens": st.tokens, "unshared": st.unshared}
    print(f"\n| task | scorer | s/item | × plain | acc % | acc_norm % | bf16 = fp32 answer |")
    print("|---|---|---|---|---|---|---|")
    for task, name, s, x, a, n, ag in rows:
        f = (lambda v: "" if v is None else f"{v:.1f}")
        print(f"| {task} | {name} | {s:.3f} | {x:.2f} | {f(a)} | {f(n)} | {ag} |")
    if args.json:
        write_json(args.json, info, [dict(zip(("task", "scorer", "s_per_item", "x_plain", "acc", "acc_norm", "agree"), r)) for r in rows],
                   args=vars(args), tasks=record)


if __name__ == "__main__":
    main()
