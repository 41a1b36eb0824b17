"""Fused LSQ fake-quant, forward + backward, against the PyTorch ops people use today. Side by side, one run.

Implementations timed on the same tensors, round-robin (one call of each per round), median of the rounds:
  composition LSQ          the round-pass / grad-scale form most LSQ repositories use (about 10 elementwise ops),
                           eager and under torch.compile (Inductor)
  torch learnable          torch._fake_quantize_learnable_per_{tensor,channel}_affine (torch.ao's LSQ op)
  torchao LearnableFakeQuantize / IntxFakeQuantizer, Brevitas QuantIdentity (learned scale): peers, when the
                           [peers] extra is installed ("n/a" with the reason otherwise)
  lowbit <backend>         every available lowbit backend; the C++ CPU backend once per instruction set
  lowbit compiled          lowbit.fake_quant under torch.compile (Inductor inlines its decomposition)
  memory floor             the bytes forward + backward must move (read x, write y; read x and g, write dx:
                           5 x N elements) divided by the copy bandwidth measured in the same run (a copy of
                           x into a preallocated buffer: no allocation or page faults in the timed call)

Writes bench/results/fake_quant_<device>.{md,json} (README links them). `--quick` runs small shapes, few
repeats, and writes nothing unless --out is given: a smoke run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from common import command_line, is_lowbit, made_by, results_folder, speedup, timing_arguments, write_results

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.app.timing import interleaved_median_ms
from lowbit.backends import cpu as cpu_backend


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


def compiled(fn):
    """``fn`` under torch.compile (Inductor), one compiled graph per case (shapes and bits are constants)."""
    graphs = {}

    def run(x, step, case: Case):
        if case.name not in graphs:
            graphs[case.name] = torch.compile(lambda x, step: fn(x, step, case), fullgraph=True)
        return graphs[case.name](x, step)

    return run


def lowbit_compiled(x, step, case: Case):
    return lowbit.fake_quant(x, step, case.bits, signed=case.signed)


def stateful(make):
    """A peer module built (and its scale initialised) on the first call of each case, then reused."""
    modules = {}

    def run(x, step, case: Case):
        if case.name not in modules:
            modules[case.name] = make(x.detach(), step.detach(), case)
        return modules[case.name](x)

    return run


def torchao_learnable(x, step, case: Case):
    from torchao.quantization.pt2e import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    qn, qp = lowbit.quant_range(case.bits, case.signed)
    if case.per_channel:
        observer, kwargs = MovingAveragePerChannelMinMaxObserver, dict(qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        observer, kwargs = MovingAverageMinMaxObserver, dict(qscheme=torch.per_tensor_symmetric)
    dtype = torch.qint8 if case.signed else torch.quint8
    fq = LearnableFakeQuantize(observer, quant_min=qn, quant_max=qp, use_grad_scaling=True, dtype=dtype, **kwargs)
    fq.to(x.device)(x.float())
    fq.enable_range_learning()
    return fq


def torchao_intx(x, step, case: Case):
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer, initialize_fake_quantizers

    if not case.per_channel or case.bits != 4 or not case.signed:
        raise NotImplementedError("IntxFakeQuantizer learns per-channel/per-group scales only (no per-tensor)")
    config = IntxFakeQuantizeConfig(
        torch.int4, granularity="per_channel", is_symmetric=True, is_dynamic=False, range_learning=True
    )
    fq = IntxFakeQuantizer(config)
    initialize_fake_quantizers(fq, (x,))
    return fq


def brevitas_identity(x, step, case: Case):
    from brevitas.nn import QuantIdentity
    from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

    if case.per_channel:
        raise NotImplementedError("benchmarked for per-tensor activations only")
    quant = Int8ActPerTensorFloat if case.signed else Uint8ActPerTensorFloat
    threshold = float(step.max()) * lowbit.quant_range(case.bits, case.signed)[1]  # Brevitas learns scale * Qp
    q = QuantIdentity(
        act_quant=quant,
        bit_width=case.bits,
        scaling_impl_type="parameter",
        scaling_init=threshold,
        return_quant_tensor=False,
    )
    return q.to(x.device).train()


PEERS = {
    "torchao LearnableFakeQuantize": ("torchao", torchao_learnable),
    "torchao IntxFakeQuantizer": ("torchao", torchao_intx),
    "Brevitas QuantIdentity": ("brevitas", brevitas_identity),
}


def peer_implementations() -> tuple[dict, dict]:
    """(name -> impl) of the installed peers, and (name -> why not) of the others."""
    import importlib.util

    impls, missing = {}, {}
    for name, (package, make) in PEERS.items():
        if importlib.util.find_spec(package) is None:
            missing[name] = f"{package} not installed (pip install -e .[peers])"
        else:
            impls[name] = stateful(make)
    return impls, missing


def lowbit_op(backend: str):
    def run(x, step, case: Case):
        with lowbit.use_backend(backend):
            return lowbit.fake_quant(x, step, case.bits, signed=case.signed)

    return run


def implementations(device: torch.device) -> dict:
    impls = {
        "composition LSQ": composition_lsq,
        "composition LSQ compiled": compiled(composition_lsq),
        "torch learnable": torch_learnable,
    }
    impls.update(peer_implementations()[0])
    for name in lowbit.backends():
        if name == "reference" or device.type not in _devices(name):
            continue
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is a test tool, not a contender
        if name == "cpu":
            for isa in cpu_backend.supported_isas():
                impls[f"lowbit cpu ({isa})"] = _with_isa(isa, lowbit_op("cpu"))
        else:
            impls[f"lowbit {name}"] = lowbit_op(name)
    impls["lowbit compiled"] = compiled(lowbit_compiled)
    return impls


def _devices(name: str):
    from lowbit.backends import status

    return status(name).devices


def _with_isa(isa: str, fn):
    def run(x, step, case):
        before = cpu_backend.isa()
        cpu_backend.set_isa(isa)
        try:
            return fn(x, step, case)
        finally:
            cpu_backend.set_isa(before)

    return run


# ---- timing ------------------------------------------------------------------------------------------------


def time_case(case: Case, impls: dict, missing: dict, device, repeats: int) -> dict:
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

    copy_dst = torch.empty_like(x)
    runnable = {"copy x (bandwidth)": lambda: copy_dst.copy_(x.detach())}
    why_not = dict(missing)
    for name, impl in impls.items():
        try:
            fwd_bwd(impl)()
            runnable[name] = fwd_bwd(impl)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:  # e.g. no bf16 kernel
            if is_lowbit(name):
                raise
            why_not[name] = str(exc).splitlines()[0][:100]
            print(f"  {name}: n/a ({why_not[name]})", file=sys.stderr)
    row = interleaved_median_ms(runnable, device, repeats)
    element_bytes = x.element_size() * x.numel()
    bandwidth = 2 * element_bytes / (row.pop("copy x (bandwidth)") / 1e3)  # bytes per second: read + write
    row["memory floor"] = 5 * element_bytes / bandwidth * 1e3
    times = {name: row.get(name) for name in ["memory floor", *impls, *missing]}
    return {"ms": times, "n/a": why_not, "copy_GBps": bandwidth / 1e9}


# ---- report ------------------------------------------------------------------------------------------------


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# Fused LSQ fake-quant, forward + backward ({meta['device']})",
        "",
        f"{made_by(meta)}, lowbit {meta['lowbit']}, {meta['note']}. Median of {meta['repeats']} round-robin repeats, "
        "milliseconds; every row of a table was measured in the same run on the same tensors. Memory floor: "
        "5 x N elements moved / measured copy bandwidth.",
        "",
    ]
    for case, result in results.items():
        row, why_not = result["ms"], result["n/a"]
        baselines = {k: row.get(k) for k in ("torch learnable", "composition LSQ", "composition LSQ compiled")}
        lines += [
            f"## {case}",
            "",
            f"Copy bandwidth {result['copy_GBps']:.1f} GB/s.",
            "",
            "| implementation | ms | vs torch learnable | vs composition LSQ | vs composition LSQ compiled "
            "| x memory floor |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, ms in row.items():
            if ms is None:
                lines.append(f"| {name} | n/a ({why_not.get(name, 'did not run')}) | | | | |")
                continue
            ratios = " | ".join(speedup(b, ms, 2) for b in baselines.values())
            lines.append(f"| {name} | {ms:.2f} | {ratios} | {ms / row['memory floor']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = timing_arguments(__doc__, "small shapes, 3 repeats, no files unless --out", device=True)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (3 if args.quick else 15)
    out = results_folder(args)
    impls = implementations(device)
    missing = peer_implementations()[1]
    isa = cpu_backend.isa() if "cpu" in lowbit.backends() else "no C++ backend"
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "isa": f"lowbit C++ default {isa}, Inductor C++ {torch.backends.cpu.get_cpu_capability()}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "repeats": repeats,
        "note": args.note,
        "command": command_line("bench_fake_quant.py", argv),
    }
    results = {}
    for case in cases:
        print(f"{case.name} ...", file=sys.stderr)
        results[case.name] = time_case(case, impls, missing, device, repeats)
    text = markdown(results, meta)
    print(text)
    if out:
        write_results(out, f"fake_quant_{device.type}", text, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
