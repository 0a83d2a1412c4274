"""One decode step's attention over every layer's KV buffers, through the CPU kernels a deployment can use:
ONNX Runtime's GroupQueryAttention (as our fused step graph calls it, with an additive bias over the buffer,
less the RoPE of one new q and k it also applies), ONNX Runtime MatMul + Softmax + MatMul on
the same buffers, and PyTorch's scaled_dot_product_attention. All of them read the same bytes; the streaming rate
each reaches is what separates a decode step from its bandwidth bound once the weights stream at full speed.

Where a C compiler is found (`cc`, or $CC), a fourth contender is a plain two-pass C kernel
(`benchmarks/decode_attention.c`, OpenMP over heads, compiled here with -O3 -march=native): what a native
decode-attention op for ONNX Runtime's CPU provider could reach, which no runtime here uses.

    python -m benchmarks.decode_attention_kernels [--preset small] [--context 1040] [--threads 2] [--iters 200]
                                                  [--stream-mb 1024]

The outputs are compared before anything is timed (they compute the same attention).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reference_model.config import preset_config

MAX_COPIES = 256
NATIVE = "C streaming kernel (native-op ceiling)"
_NATIVE_SOURCE = Path(__file__).with_name("decode_attention.c")


def native_kernel(threads: int):
    """The C kernel compiled into a temporary folder and loaded, or None where no C compiler (with OpenMP) is
    found. Its OpenMP threads sleep as soon as a call ends (OMP_WAIT_POLICY=passive, read when the runtime
    loads): spinning, they would take a core from the contender timed next."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / "decode_attention.so"
        build = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(library),
                 str(_NATIVE_SOURCE)]  # fmt: skip
        if subprocess.run(build, capture_output=True).returncode != 0:
            return None
        settings = {"OMP_WAIT_POLICY": "passive", "OMP_NUM_THREADS": str(threads)}
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)  # read once, as the OpenMP runtime loads with the kernel
        try:
            kernel = ctypes.CDLL(str(library)).decode_attention  # mapped: the file may go
        finally:  # this process's other libraries and its subprocesses keep their own settings
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value
    pointer, i32 = ctypes.c_void_p, ctypes.c_int
    kernel.argtypes = [pointer] * 4 + [i32] * 5 + [pointer] * 2
    kernel.restype = None
    return kernel


def _float(name: str, shape: list | None):
    """A float32 graph input or output."""
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _gqa_model(layers: int, heads: int, kv_heads: int, head_dim: int):
    from onnx import TensorProto, helper

    nodes, inputs, outputs = [], [_float("q", ["b", 1, heads * head_dim])], []
    for i in range(layers):
        inputs += [_float(f"k{i}", ["b", kv_heads, "c", head_dim]), _float(f"v{i}", ["b", kv_heads, "c", head_dim])]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                ["q", "k_new", "v_new", f"k{i}", f"v{i}", "seqlens_k", "total", "", "", "", "bias"],
                [f"o{i}", f"k{i}.present", f"v{i}.present"],
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                scale=1 / math.sqrt(head_dim),
            )
        )
        outputs += [_float(f"o{i}", None), _float(f"k{i}.present", None), _float(f"v{i}.present", None)]
    inputs += [_float("k_new", ["b", 1, kv_heads * head_dim]), _float("v_new", ["b", 1, kv_heads * head_dim])]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"])]
    inputs += [helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    inputs += [_float("bias", ["b", 1, 1, "c"])]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def _matmul_model(layers: int, heads: int, head_dim: int):
    """q (1, heads, 1, d) against K (1, heads, c, d) as K @ q^T: the cache as the untransposed operand."""
    from onnx import TensorProto, helper

    nodes, outputs = [], []
    inputs = [
        _float("q_t", [1, heads, head_dim, 1]),
        helper.make_tensor_value_info("scores_shape", TensorProto.INT64, [4]),
    ]
    for i in range(layers):
        inputs += [_float(f"k{i}", [1, heads, "c", head_dim]), _float(f"v{i}", [1, heads, "c", head_dim])]
        nodes += [
            helper.make_node("MatMul", [f"k{i}", "q_t"], [f"s{i}"]),
            helper.make_node("Reshape", [f"s{i}", "scores_shape"], [f"r{i}"]),
            helper.make_node("Softmax", [f"r{i}"], [f"p{i}"], axis=-1),
            helper.make_node("MatMul", [f"p{i}", f"v{i}"], [f"o{i}"]),
        ]
        outputs.append(_float(f"o{i}", None))
    graph = helper.make_graph(nodes, "matmul", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def measure(
    preset: str, context: int, threads: int, iters: int, stream_bytes: int = 1 << 30
) -> dict[str, dict[str, float]]:
    """Median time and streaming rate of each kernel. Each call reads the next of as many copies of the buffers
    as fill `stream_bytes` (1 GiB, like the bench's bandwidth probe), so the KV comes from memory as in a real
    step, where 175 MB of weights stream between two layers' attention; a cache-resident copy (stream_bytes=0)
    ran 1.6-2x faster on a host with a 260 MB L3."""
    import onnxruntime as ort

    d = preset_config(preset).decoder
    layers, heads, kv_heads, hd = d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim
    if heads != kv_heads:
        raise ValueError(f"--preset {preset}: the MatMul form here needs as many KV heads as query heads")
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((1, kv_heads, context, hd), dtype=np.float32) for _ in range(2 * layers)]
    q = rng.standard_normal((1, 1, heads * hd), dtype=np.float32)
    new = [rng.standard_normal((1, 1, kv_heads * hd), dtype=np.float32) for _ in range(2)]
    # the step writes column context - 1 and attends to all `context` columns: give every path those keys/values
    for i in range(layers):
        for j in range(2):
            base[2 * i + j][0, :, -1] = new[j].reshape(kv_heads, hd)
    kv_bytes = sum(c.nbytes for c in base)
    extra = min(MAX_COPIES, -(-stream_bytes // kv_bytes)) - 1  # tiny shapes would need thousands
    copies = [base] + [[c.copy() for c in base] for _ in range(max(0, extra))]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # timed in turn: a pool spinning after its run would take a core from the next contender
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    gqa = ort.InferenceSession(_gqa_model(layers, heads, kv_heads, hd).SerializeToString(), options)
    matmul = ort.InferenceSession(_matmul_model(layers, heads, hd).SerializeToString(), options)
    q_heads = np.ascontiguousarray(q.reshape(1, heads, hd, 1) / np.float32(math.sqrt(hd)))
    tq = torch.from_numpy(q).view(1, 1, heads, hd).transpose(1, 2).contiguous()
    torch.set_num_threads(threads)
    native = native_kernel(threads)
    q_scaled = np.ascontiguousarray(q.reshape(heads, hd) / np.float32(math.sqrt(hd)))
    no_bias = np.zeros(context, np.float32)  # every column valid
    scores = np.empty((heads, context), np.float32)

    def bind(cache: list[np.ndarray]):
        values = [ort.OrtValue.ortvalue_from_numpy(c) for c in cache]
        g, m = gqa.io_binding(), matmul.io_binding()
        g.bind_cpu_input("q", q)
        g.bind_cpu_input("k_new", new[0])
        g.bind_cpu_input("v_new", new[1])
        g.bind_cpu_input("seqlens_k", np.array([context - 1], np.int32))
        g.bind_cpu_input("total", np.array(context, np.int32))
        g.bind_cpu_input("bias", np.zeros((1, 1, 1, context), np.float32))  # every column valid
        m.bind_cpu_input("q_t", q_heads)
        m.bind_cpu_input("scores_shape", np.array([1, heads, 1, context], np.int64))
        for i in range(layers):
            g.bind_output(f"o{i}")  # bound first: get_outputs() keeps the binding order
            m.bind_output(f"o{i}")
            for j, kind in enumerate("kv"):
                g.bind_ortvalue_input(f"{kind}{i}", values[2 * i + j])
                g.bind_ortvalue_output(f"{kind}{i}.present", values[2 * i + j])  # in place, as our step binds
                m.bind_ortvalue_input(f"{kind}{i}", values[2 * i + j])
        tcache = [torch.from_numpy(c) for c in cache]
        kernels = {
            "onnxruntime GroupQueryAttention": (lambda: gqa.run_with_iobinding(g), lambda: g.get_outputs()[::3]),
            "onnxruntime MatMul form": (lambda: matmul.run_with_iobinding(m), m.get_outputs),
            "torch scaled_dot_product_attention": (
                lambda: [
                    torch.nn.functional.scaled_dot_product_attention(tq, tcache[2 * i], tcache[2 * i + 1])
                    for i in range(layers)
                ],
                None,
            ),
        }
        if native is not None:
            out = np.empty((layers, heads, hd), np.float32)
            calls = [
                (q_scaled.ctypes.data, cache[2 * i].ctypes.data, cache[2 * i + 1].ctypes.data, no_bias.ctypes.data,
                 heads, kv_heads, context, context, hd, scores.ctypes.data, out[i].ctypes.data)
                for i in range(layers)
            ]  # fmt: skip
            kernels[NATIVE] = (lambda: [native(*call) for call in calls], lambda: list(out))
        return kernels

    runs = [bind(cache) for cache in copies]
    for kernels in (runs[0], runs[-1]):  # every form computes the same attention, on any copy
        expected = torch.stack(kernels["torch scaled_dot_product_attention"][0]()).reshape(layers, -1).numpy()
        for name, (run, outputs) in kernels.items():
            if outputs is None:
                continue
            run()
            host = [o if isinstance(o, np.ndarray) else o.numpy() for o in outputs()]  # OrtValues, or the C kernel's
            got = np.stack([o.reshape(heads * hd) for o in host])
            if not np.allclose(got, expected, atol=1e-5):
                raise AssertionError(f"{name} differs from PyTorch's attention by {np.abs(got - expected).max():.2e}")

    times = {name: [] for name in runs[0]}
    for i in range(iters):  # interleaved: a noisy machine slows them all alike
        for name, (run, _) in runs[i % len(runs)].items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "ms": statistics.median(t) * 1e3,
            "gb_per_s": kv_bytes / statistics.median(t) / 1e9,
            "kv_mb": kv_bytes / 1e6,
            "copies": len(copies),
        }
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_attention_kernels", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=1040)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument(
        "--stream-mb", type=int, default=1024, help="copies of the buffers to cycle through (0: one, cached)"
    )
    args = p.parse_args(argv)
    for name, r in measure(args.preset, args.context, args.threads, args.iters, args.stream_mb << 20).items():
        print(f"{name:36s} {r['ms']:7.3f} ms  {r['gb_per_s']:5.1f} GB/s over {r['kv_mb']:.0f} MB of KV x{r['copies']}")


if __name__ == "__main__":
    main()
