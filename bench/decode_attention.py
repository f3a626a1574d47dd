"""Batched decode attention on ONNX Runtime's CPU kernels: the cost of the cache layouts a serving
step could use, one step of ``layers`` layers over ``batch`` rows (one new token each).

    python -m bench.decode_attention                       # the 31.8M tiny-Llama shape, 32 rows
    python -m bench.decode_attention --heads 8 --kv-heads 4 --head-dim 32 --layers 4 --past 196 --max-len 256

Variants, each in its own session, weights absent (attention alone):

- ``Attention`` (opset 23) with past/present: what graphopt's kv-cache graphs lower to today; the
  present cache is a new tensor every step (past concatenated with the new keys/values);
- the same attention decomposed (Concat, FusedMatMul with transB, Add mask, Softmax, MatMul);
- ``TensorScatter`` (opset 24) writing the new keys/values into a preallocated ``[B, H, max_len, D]``
  buffer bound as both input and output (in place), then ``Attention`` (opset 24) with
  ``nonpad_kv_seqlen``; and then the decomposed attention over that buffer.

Every past tensor is its own buffer (as in a model), so the caches do not all stay in the CPU's
caches. Prints one row per variant: milliseconds per step (median of ``--iters``)."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _session(nodes, inputs, outputs, opset: int, threads: int, initializers=()):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10 if opset <= 23 else 11
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(run, iters: int) -> float:
    for _ in range(3):
        run()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    ap = argparse.ArgumentParser(prog="python -m bench.decode_attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--past", type=int, default=200, help="cached tokens per row (the dynamic cache's length)")
    ap.add_argument("--max-len", type=int, default=384, help="the static buffer's length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args(argv)
    B, Hq, Hk, D, L, P, N = a.batch, a.heads, a.kv_heads, a.head_dim, a.layers, a.past, a.max_len
    if Hq % Hk or N <= P:
        ap.error("heads must be a multiple of kv-heads, and max-len larger than past")
    G, rng = Hq // Hk, np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    node = helper.make_node

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    q3, k3, v3 = rand(B, 1, Hq * D), rand(B, 1, Hk * D), rand(B, 1, Hk * D)
    past = {f"p{kv}{i}": rand(B, Hk, P, D) for i in range(L) for kv in "kv"}
    mask = np.ones((B, 1, 1, P + 1), bool)
    rows = []

    # 1. Attention (opset 23) with past/present
    ins = [vi("q", T.FLOAT, [B, 1, Hq * D]), vi("k", T.FLOAT, [B, 1, Hk * D]), vi("v", T.FLOAT, [B, 1, Hk * D]),
           vi("m", T.BOOL, [B, 1, 1, P + 1])] + [vi(n, T.FLOAT, [B, Hk, P, D]) for n in past]
    nodes, outs = [], []
    for i in range(L):
        nodes.append(node("Attention", ["q", "k", "v", "m", f"pk{i}", f"pv{i}"], [f"y{i}", f"ok{i}", f"ov{i}"],
                          q_num_heads=Hq, kv_num_heads=Hk, scale=D ** -0.5))
        outs += [vi(f"y{i}", T.FLOAT, None), vi(f"ok{i}", T.FLOAT, None), vi(f"ov{i}", T.FLOAT, None)]
    s = _session(nodes, ins, outs, 23, a.threads)
    feed = {"q": q3, "k": k3, "v": v3, "m": mask, **past}
    reference = s.run(None, feed)[0]
    rows.append(("Attention (opset 23), past + present (concatenated)", _time(lambda: s.run(None, feed), a.iters), 0.0))

    # 2. decomposed, with the concatenation
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("shk", [B, 1, Hk, D]), ("shq", [B, Hk, G, D]), ("shy", [B, 1, Hq * D]))]
    consts += [numpy_helper.from_array(np.array(0, np.float32), "zero"),
               numpy_helper.from_array(np.array(-1e30, np.float32), "ninf")]
    nodes = [node("Reshape", ["k", "shk"], ["k4"]), node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]),
             node("Reshape", ["v", "shk"], ["v4"]), node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
             node("Reshape", ["q", "shq"], ["qg"]), node("Where", ["m", "zero", "ninf"], ["bias"])]
    outs = []
    for i in range(L):
        nodes += [node("Concat", [f"pk{i}", "kt"], [f"ok{i}"], axis=2), node("Concat", [f"pv{i}", "vt"], [f"ov{i}"], axis=2),
                  node("FusedMatMul", ["qg", f"ok{i}"], [f"s{i}"], domain="com.microsoft", transB=1, alpha=D ** -0.5),
                  node("Add", [f"s{i}", "bias"], [f"sb{i}"]), node("Softmax", [f"sb{i}"], [f"pr{i}"], axis=-1),
                  node("MatMul", [f"pr{i}", f"ov{i}"], [f"o{i}"]), node("Reshape", [f"o{i}", "shy"], [f"y{i}"])]
        outs += [vi(f"y{i}", T.FLOAT, None), vi(f"ok{i}", T.FLOAT, None), vi(f"ov{i}", T.FLOAT, None)]
    s = _session(nodes, ins, outs, 23, a.threads, consts)
    err = float(np.abs(s.run(None, feed)[0] - reference).max())
    rows.append(("decomposed (Concat, FusedMatMul, Softmax, MatMul), concatenated", _time(lambda: s.run(None, feed), a.iters), err))

    # 3./4. in place: TensorScatter into [B, Hk, N, D] buffers bound as input and output
    q4, k4, v4 = (x.reshape(B, 1, h, D).transpose(0, 2, 1, 3).copy() for x, h in ((q3, Hq), (k3, Hk), (v3, Hk)))
    idx = np.full(B, P, np.int64)
    for decomposed in (False, True):
        ins = [vi("q", T.FLOAT, [B, Hk, G, D] if decomposed else [B, Hq, 1, D]), vi("k", T.FLOAT, [B, Hk, 1, D]),
               vi("v", T.FLOAT, [B, Hk, 1, D]), vi("idx", T.INT64, [B]),
               vi("bias" if decomposed else "nonpad", T.FLOAT if decomposed else T.INT64, [B, 1, 1, N] if decomposed else [B])]
        nodes, outs = [], []
        for i in range(L):
            ins += [vi(f"pk{i}", T.FLOAT, [B, Hk, N, D]), vi(f"pv{i}", T.FLOAT, [B, Hk, N, D])]
            nodes += [node("TensorScatter", [f"pk{i}", "k", "idx"], [f"ok{i}"], axis=2),
                      node("TensorScatter", [f"pv{i}", "v", "idx"], [f"ov{i}"], axis=2)]
            if decomposed:
                nodes += [node("FusedMatMul", ["q", f"ok{i}"], [f"s{i}"], domain="com.microsoft", transB=1, alpha=D ** -0.5),
                          node("Add", [f"s{i}", "bias"], [f"sb{i}"]), node("Softmax", [f"sb{i}"], [f"pr{i}"], axis=-1),
                          node("MatMul", [f"pr{i}", f"ov{i}"], [f"y{i}"])]
            else:
                nodes.append(node("Attention", ["q", f"ok{i}", f"ov{i}", "", "", "", "nonpad"], [f"y{i}"], scale=D ** -0.5))
            outs += [vi(f"y{i}", T.FLOAT, None), vi(f"ok{i}", T.FLOAT, [B, Hk, N, D]), vi(f"ov{i}", T.FLOAT, [B, Hk, N, D])]
        s = _session(nodes, ins, outs, 24, a.threads)
        binding = s.io_binding()
        bias = np.where(np.arange(N) <= P, 0.0, -1e30).astype(np.float32)[None, None, None].repeat(B, 0)
        extra = bias if decomposed else np.full(B, P + 1, np.int64)
        for name, value in (("q", q4.reshape(B, Hk, G, D) if decomposed else q4), ("k", k4), ("v", v4), ("idx", idx),
                            ("bias" if decomposed else "nonpad", extra)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for i in range(L):
            for kv in "kv":
                buf = np.zeros((B, Hk, N, D), np.float32)
                buf[:, :, :P] = past[f"p{kv}{i}"]
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                binding.bind_ortvalue_input(f"p{kv}{i}", value)
                binding.bind_ortvalue_output(f"o{kv}{i}", value)
            binding.bind_output(f"y{i}", "cpu")
        s.run_with_iobinding(binding)
        out = binding.get_outputs()[2].numpy().reshape(B, Hq, D) if decomposed else \
            binding.get_outputs()[2].numpy().transpose(0, 2, 1, 3).reshape(B, Hq, D)
        err = float(np.abs(out.reshape(B, 1, Hq * D) - reference).max())
        label = ("decomposed" if decomposed else "Attention (opset 24, nonpad_kv_seqlen)") + \
            f" over a {N}-slot buffer, TensorScatter in place"
        rows.append((label, _time(lambda s=s, b=binding: s.run_with_iobinding(b), a.iters), err))

    print(f"batch {B}, {Hq} heads over {Hk} KV heads of {D}, {L} layers, {P} cached tokens per row, "
          f"static buffer {N}; {a.threads} threads, onnxruntime {ort.__version__}\n")
    print("| variant | ms per step | max abs diff vs the first |\n|---|---|---|")
    for label, ms, err in rows:
        print(f"| {label} | {ms:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
