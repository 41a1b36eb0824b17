"""Packed inference GEMM (lowbit.packed_linear) against the matmuls people use today. Side by side, one run.

Implementations timed on the same shapes, round-robin (one call of each per round), median of the rounds:
  fp32 F.linear        float32 activations and weights
  torch._int_mm int8   int8 x int8 -> int32 on already-quantized operands (no quantization, no epilogue);
                       it needs M > 16, so smaller M is padded to 17 rows
  unpack + F.linear    lowbit.unpack of the 4-bit packed weights, dequantize, fake-quantize x, F.linear: what
                       running a packed model costs without a packed kernel
  lowbit W8A8/W4A8/W2A8  lowbit.packed_linear with 8/4/2-bit weights and signed 8-bit activations (quantizes
                       x on the fly, int32 accumulation, scale + bias epilogue), default backend for the device
CPU peers (the weight-only low-bit matmuls people use today):
  aten int4pack (bf16)  torch.ops.aten._weight_int4pack_mm_for_cpu: 4-bit weights, groups of 32, bf16 x
  aten int8pack         torch._weight_int8pack_mm: int8 weights, per-channel scales, float32 x
  ORT MatMulNBits W4    ONNX Runtime com.microsoft MatMulNBits, 4-bit, block 32, accuracy_level 4 (x quantized
                        to int8 inside), CPUExecutionProvider, intra-op spinning off; needs the [peers] extra

Writes bench/results/packed_<device>.{md,json} (README links them); ``--peer-shapes`` (M = 1 and 1024 at
K = N = 4096, issue 17's comparison with ONNX Runtime MatMulNBits) writes packed_peers_<device>.{md,json}.
`--quick` runs two small shapes, few repeats, and writes nothing unless --out is given: a smoke run.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import command_line, cpu_clock_median_ms, made_by, results_folder, speedup, timing_arguments, write_results

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.app.timing import interleaved_median_ms
from lowbit.backends import cpu as cpu_backend

FULL_SHAPES = [(m, k) for k in (1024, 4096) for m in (1, 16, 256, 1024)]  # (M, K = N)
PEER_SHAPES = [(1, 4096), (1024, 4096)]  # --peer-shapes: the issue-17 comparison only
QUICK_SHAPES = [(1, 512), (64, 512)]
W_BITS = (8, 4, 2)


def candidates(m: int, k: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    n = k
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    x_step = torch.tensor([0.05], device=device)
    fns = {"fp32 F.linear": lambda: F.linear(x, w, bias)}

    xi = torch.randint(-128, 128, (max(m, 17), k), generator=gen, dtype=torch.int8).to(device)
    wi_t = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(device).t()
    fns["torch._int_mm int8"] = lambda: torch._int_mm(xi, wi_t)

    packed, scales = {}, {}
    for bits in W_BITS:
        lo, hi = lowbit.quant_range(bits, True)
        codes = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
        packed[bits] = lowbit.pack(codes, bits).to(device)
        scales[bits] = (0.01 + 0.01 * torch.rand(n, generator=gen)).to(device)

    def unpack_then_matmul():
        weight = lowbit.unpack(packed[4], 4, k).float() * scales[4][:, None]
        return F.linear(lowbit.fake_quant(x, x_step, 8, signed=True), weight, bias)

    fns["unpack + F.linear (W4)"] = unpack_then_matmul
    if device.type == "cpu":
        fns.update(cpu_peers(x, n, k, gen))
    for bits in W_BITS:
        fns[f"lowbit W{bits}A8"] = lambda bits=bits: lowbit.packed_linear(
            x, packed[bits], scales[bits], bits, x_step, 8, x_signed=True, bias=bias
        )
    return fns


def cpu_peers(x: torch.Tensor, n: int, k: int, gen: torch.Generator) -> dict:
    """aten's int4 / int8 weight-packed matmuls and ONNX Runtime's MatMulNBits (when onnxruntime is installed)."""
    w4 = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w4, 2)
    scales_zeros = torch.zeros(k // 32, n, 2, dtype=torch.bfloat16)
    scales_zeros[..., 0] = 0.01
    x_bf16 = x.bfloat16()
    w8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    s8 = 0.01 + 0.01 * torch.rand(n, generator=gen)
    fns = {
        "aten int4pack (bf16)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, int4, 32, scales_zeros),
        "aten int8pack": lambda: torch._weight_int8pack_mm(x, w8, s8),
    }
    session = matmul_nbits_session(n, k, gen)
    if session is not None:
        feed = {"A": x.numpy()}
        fns["ORT MatMulNBits W4"] = lambda: session.run(None, feed)
    return fns


def matmul_nbits_session(n: int, k: int, gen: torch.Generator):
    """An ONNX Runtime session of one MatMulNBits node (4-bit, block 32, accuracy_level 4), or None without ORT."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    blocks = k // 32
    q = torch.randint(0, 16, (n, blocks, 32), generator=gen, dtype=torch.uint8).numpy()
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # (N, blocks, 16): low nibble first
    scales = (0.01 + 0.01 * torch.rand(n * blocks, generator=gen)).numpy()
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
        accuracy_level=4,
    )  # fmt: skip
    initializers = [
        helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
        helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True),
    ]
    graph = helper.make_graph(
        [node], "matmul_nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializer=initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# Packed linear (lowbit.packed_linear), K = N ({meta['device']})",
        "",
        f"{made_by(meta)}, "
        f"lowbit {meta['lowbit']} (cpu kernels: {meta['cpu_isa']}). Median of {meta['repeats']} repeats, "
        "milliseconds; every row of a table was measured in the same run, round-robin. Speed-up columns: "
        "the baseline's time over the row's time (above 1 = faster than the baseline). torch._int_mm pads M to 17 "
        f"rows when M <= 16. {meta['note']}",
        "",
    ]
    for shape, row in results.items():
        fp32, int_mm = row.get("fp32 F.linear"), row.get("torch._int_mm int8")
        lines += [
            f"## {shape}",
            "",
            "| implementation | ms | speed-up vs fp32 F.linear | speed-up vs torch._int_mm "
            "| speed-up vs ORT MatMulNBits |",
            "|---|---:|---:|---:|---:|",
        ]
        nbits = row.get("ORT MatMulNBits W4")
        for name, ms in row.items():
            lines.append(
                f"| {name} | {ms:.3f} | {speedup(fp32, ms, 2)} | {speedup(int_mm, ms, 2)} | {speedup(nbits, ms, 2)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = timing_arguments(
        __doc__, "small shapes, 3 repeats, no files unless --out", note="", device=True, threads=True
    )
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall clock or process CPU time")
    parser.add_argument("--peer-shapes", action="store_true", help="only M = 1 and 1024 at K = N = 4096")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else PEER_SHAPES if args.peer_shapes else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 15)
    out = results_folder(args)
    lowbit.packed_linear  # noqa: B018  (loads the extension lowbit._C)
    from lowbit.backends import extension

    extension.load()
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "cpu_isa": cpu_backend.isa(),
        "repeats": repeats,
        "note": args.note + (" Clock: process CPU time." if args.clock == "cpu" else ""),
        "command": command_line("bench_packed_linear.py", argv),
    }
    results = {}
    for m, k in shapes:
        name = f"M={m}, K=N={k}"
        print(f"{name} ...", file=sys.stderr)
        if args.clock == "cpu":  # a shared machine: see bench_models.py --clock
            results[name] = cpu_clock_median_ms(candidates(m, k, device), repeats, warmup=3)
        else:
            results[name] = interleaved_median_ms(candidates(m, k, device), device, repeats)
    text = markdown(results, meta)
    print(text)
    if out:
        stem = f"packed_peers_{device.type}" if args.peer_shapes else f"packed_{device.type}"
        write_results(out, stem, text, {"meta": meta, "results_ms": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
