"""Why the onnx export gathers act-order activations with GatherElements: ONNX Runtime's Gather on the last
axis against GatherElements on expanded indices (the form `to_onnx._Layers._gather` emits), and Relu as
the per-node floor, 90 nodes chained (an act-order SmolLM2 has 90), on 1 row (decode) and 128 (prefill).

    python benchmarks/ort_gather.py [--threads 2] [--width 576]

Prints microseconds per node, the median of 50 runs of the chain.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def chain(kind: str, width: int, n: int = 90):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Concat", ["shp2", "k"], ["shape"], axis=0), helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Slice", ["shp", "z", "two"], ["shp2"])]
    inits = [numpy_helper.from_array(np.array([width], np.int64), "k"),
             numpy_helper.from_array(np.array([0], np.int64), "z"), numpy_helper.from_array(np.array([2], np.int64), "two")]
    x = "x"
    for i in range(n):
        p = rng.permutation(width).astype(np.int64)
        if kind == "Gather":
            inits.append(numpy_helper.from_array(p, f"p{i}"))
            nodes.append(helper.make_node("Gather", [x, f"p{i}"], [f"y{i}"], axis=-1))
        elif kind == "Expand+GatherElements":
            inits.append(numpy_helper.from_array(p.reshape(1, 1, width), f"p{i}"))
            nodes.append(helper.make_node("Expand", [f"p{i}", "shape"], [f"e{i}"]))
            nodes.append(helper.make_node("GatherElements", [x, f"e{i}"], [f"y{i}"], axis=-1))
        else:
            nodes.append(helper.make_node("Relu", [x], [f"y{i}"]))
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), n


def main(argv=None) -> int:
    import onnxruntime as ort
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=576)
    args = p.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, width {args.width}; us per node (median of 50)")
    print(f"| op | 1 row | 128 rows |\n|---|---|---|")
    for kind in ("Relu", "Gather", "Expand+GatherElements"):
        model, n = chain(kind, args.width)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        cells = []
        for rows in (1, 128):
            a = np.random.default_rng(1).standard_normal((1, rows, args.width)).astype(np.float32)
            for _ in range(5):
                sess.run(None, {"x": a})
            ts = []
            for _ in range(50):
                t = time.perf_counter()
                sess.run(None, {"x": a})
                ts.append(time.perf_counter() - t)
            cells.append(f"{statistics.median(ts) * 1e6 / n:.2f}")
        print(f"| {kind} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
