"""Fused LSQ fake-quant, forward + backward, against the PyTorch ops people use today. Side by side, one run.

Implementations timed on the same tensors, round-robin (one call of each per round), median of the rounds:
  composition LSQ   the round-pass / grad-scale form most LSQ repositories use (about 10 elementwise ops)
  torch learnable   torch._fake_quantize_learnable_per_{tensor,channel}_affine (torch.ao's LSQ op)
  lowbit <backend>  every available lowbit backend; the C++ CPU backend once per instruction set
  memory floor      2.5 x the time of x.clone(): forward + backward must make five passes over N elements
                    (read x, write y; read x and g, write dx), a clone makes two

Writes bench/results/fake_quant_<device>.{md,json} (README links them). `--quick` runs small shapes, few
repeats, and writes nothing unless --out is given: a smoke run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from common import RESULTS, cpu_name, speedup, write_results

import lowbit
from lowbit.timing import interleaved_median_ms


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    per_channel: bool
    bits: int = 4
    signed: bool = False


FULL_CASES = [
    Case("activation 64x32x56x56 fp32 per-tensor", (64, 32, 56, 56), torch.float32, False),
    Case("weight 4096x4096 fp32 per-channel", (4096, 4096), torch.float32, True, signed=True),
    Case("activation 64x32x56x56 bf16 per-tensor", (64, 32, 56, 56), torch.bfloat16, False),
]
QUICK_CASES = [
    Case("activation 8x32x56x56 fp32 per-tensor", (8, 32, 56, 56), torch.float32, False),
    Case("weight 1024x1024 fp32 per-channel", (1024, 1024), torch.float32, True, signed=True),
]


# ---- the implementations: each returns y for (x, step) with autograd ------------------------------------------


def composition_lsq(x, step, case: Case):
    qn, qp = lowbit.quant_range(case.bits, case.signed)
    n = x.numel() // step.numel()
    g = 1.0 / (n * qp) ** 0.5
    s = (step - step * g).detach() + step * g  # grad-scale trick
    s = s.view(-1, *([1] * (x.dim() - 1))) if case.per_channel else s
    v = torch.clamp(x / s, qn, qp)
    q = (v.round() - v).detach() + v  # round with a straight-through estimator
    return q * s


def torch_learnable(x, step, case: Case):
    qn, qp = lowbit.quant_range(case.bits, case.signed)
    g = 1.0 / (x.numel() // step.numel() * qp) ** 0.5
    if case.per_channel:
        zero = torch.zeros(step.numel(), device=x.device)
        return torch._fake_quantize_learnable_per_channel_affine(x, step, zero, 0, qn, qp, g)
    zero = torch.zeros(1, device=x.device)
    return torch._fake_quantize_learnable_per_tensor_affine(x, step, zero, qn, qp, g)


def lowbit_op(backend: str):
    def run(x, step, case: Case):
        with lowbit.use_backend(backend):
            return lowbit.fake_quant(x, step, case.bits, signed=case.signed)

    return run


def implementations(device: torch.device) -> dict:
    impls = {"composition LSQ": composition_lsq, "torch learnable": torch_learnable}
    for name in lowbit.backends():
        if name == "reference" or device.type not in _devices(name):
            continue
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is a test tool, not a contender
        if name == "cpu":
            for isa in torch.ops.lowbit_C.cpu_isa_supported():
                impls[f"lowbit cpu ({isa})"] = _with_isa(isa, lowbit_op("cpu"))
        else:
            impls[f"lowbit {name}"] = lowbit_op(name)
    return impls


def _devices(name: str):
    from lowbit.backends import status

    return status(name).devices


def _with_isa(isa: str, fn):
    def run(x, step, case):
        before = torch.ops.lowbit_C.cpu_isa()
        torch.ops.lowbit_C.set_cpu_isa(isa)
        try:
            return fn(x, step, case)
        finally:
            torch.ops.lowbit_C.set_cpu_isa(before)

    return run


# ---- timing ------------------------------------------------------------------------------------------------


def time_case(case: Case, impls: dict, device, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen).to(device, case.dtype).requires_grad_(True)
    channels = case.shape[0] if case.per_channel else 1
    step = torch.full((channels,), 0.1, device=device, requires_grad=True)
    g = torch.randn(case.shape, generator=gen).to(device, case.dtype)

    def fwd_bwd(impl):
        def run():
            x.grad = step.grad = None
            impl(x, step, case).backward(g)

        return run

    runnable = {"memory floor": lambda: x.detach().clone()}
    for name, impl in impls.items():
        try:
            fwd_bwd(impl)()
            runnable[name] = fwd_bwd(impl)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. torch's learnable op has no bf16 kernel
            print(f"  {name}: n/a ({str(exc).splitlines()[0][:100]})", file=sys.stderr)
    row = interleaved_median_ms(runnable, device, repeats)
    row["memory floor"] *= 2.5
    return {name: row.get(name) for name in ["memory floor", *impls]}


# ---- report ------------------------------------------------------------------------------------------------


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# Fused LSQ fake-quant, forward + backward ({meta['device']})",
        "",
        f"`{meta['command']}` on {meta['device_name']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"lowbit {meta['lowbit']}. Median of {meta['repeats']} repeats, milliseconds; every row of a table "
        "was measured in the same run on the same tensors.",
        "",
    ]
    for case, row in results.items():
        learnable, composition, floor = row.get("torch learnable"), row.get("composition LSQ"), row["memory floor"]
        lines += [
            f"## {case}",
            "",
            "| implementation | ms | speed-up vs torch learnable | speed-up vs composition LSQ | x memory floor |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, ms in row.items():
            if ms is None:
                lines.append(f"| {name} | n/a | | | |")
                continue
            lines.append(
                f"| {name} | {ms:.2f} | {speedup(learnable, ms)} | {speedup(composition, ms)} | {ms / floor:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats, no files unless --out")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    parser.add_argument("--out", default=None, help="folder for the .md and .json results")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (3 if args.quick else 15)
    out = args.out or (None if args.quick else RESULTS)
    impls = implementations(device)
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "repeats": repeats,
        "command": "python bench/bench_fake_quant.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
    }
    results = {}
    for case in cases:
        print(f"{case.name} ...", file=sys.stderr)
        results[case.name] = time_case(case, impls, device, repeats)
    text = markdown(results, meta)
    print(text)
    if out:
        write_results(out, f"fake_quant_{device.type}", text, {"meta": meta, "results_ms": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
