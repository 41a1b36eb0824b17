"""Packed inference GEMM (lowbit.packed_linear) against the matmuls people use today. Side by side, one run.

Implementations timed on the same shapes, round-robin (one call of each per round), median of the rounds:
  fp32 F.linear        float32 activations and weights
  torch._int_mm int8   int8 x int8 -> int32 on already-quantized operands (no quantization, no epilogue);
                       it needs M > 16, so smaller M is padded to 17 rows
  unpack + F.linear    lowbit.unpack of the 4-bit packed weights, dequantize, fake-quantize x, F.linear: what
                       running a packed model costs without a packed kernel
  lowbit W8A8/W4A8/W2A8  lowbit.packed_linear with 8/4/2-bit weights and signed 8-bit activations (quantizes
                       x on the fly, int32 accumulation, scale + bias epilogue), default backend for the device

Writes bench/results/packed_<device>.{md,json} (README links them). `--quick` runs two small shapes, few repeats,
and writes nothing unless --out is given: a smoke run.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from common import RESULTS, cpu_name, speedup, write_results

import lowbit
from lowbit.timing import interleaved_median_ms

FULL_SHAPES = [(m, k) for k in (1024, 4096) for m in (1, 16, 256, 1024)]  # (M, K = N)
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
    for bits in W_BITS:
        fns[f"lowbit W{bits}A8"] = lambda bits=bits: lowbit.packed_linear(
            x, packed[bits], scales[bits], bits, x_step, 8, x_signed=True, bias=bias
        )
    return fns


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# Packed linear (lowbit.packed_linear), K = N ({meta['device']})",
        "",
        f"`{meta['command']}` on {meta['device_name']}, {meta['threads']} threads, torch {meta['torch']}, "
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
            "| implementation | ms | speed-up vs fp32 F.linear | speed-up vs torch._int_mm |",
            "|---|---:|---:|---:|",
        ]
        for name, ms in row.items():
            lines.append(f"| {name} | {ms:.3f} | {speedup(fp32, ms, 2)} | {speedup(int_mm, ms, 2)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats, no files unless --out")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    parser.add_argument("--note", default="", help="free text for the report (e.g. machine load)")
    parser.add_argument("--out", default=None, help="folder for the .md and .json results")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 15)
    out = args.out or (None if args.quick else RESULTS)
    lowbit.packed_linear  # noqa: B018  (loads the extension, so that torch.ops.lowbit_C exists)
    from lowbit.backends import _extension

    _extension.load()
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "cpu_isa": torch.ops.lowbit_C.cpu_isa(),
        "repeats": repeats,
        "note": args.note,
        "command": "python bench/bench_packed.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
    }
    results = {}
    for m, k in shapes:
        name = f"M={m}, K=N={k}"
        print(f"{name} ...", file=sys.stderr)
        results[name] = interleaved_median_ms(candidates(m, k, device), device, repeats)
    text = markdown(results, meta)
    print(text)
    if out:
        write_results(out, f"packed_{device.type}", text, {"meta": meta, "results_ms": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
