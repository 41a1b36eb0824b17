"""swap_fused on a model quantized the lsq-net way: training-step time before and after, eager and compiled.

MobileNet-v2 (lowbit.models, width 1.0, 32x32 inputs, batch 32, 10 classes) with every conv/linear wrapped as lsq-net
does (``QuanConv2d``/``QuanLinear`` + ``LsqQuan``: W4 per-channel, A4 per-tensor; the classes are in
tests/lsq_idioms.py). Timed side by side in one run, round-robin (one step of each per round, median):

- lsq-net-style, eager (the user's model as is);
- the same after ``lowbit.swap_fused`` (FusedLSQ on lowbit.fake_quant), eager;
- both under ``torch.compile`` (Inductor fuses the plain-PyTorch quantizer's elementwise ops itself);
- the fp32 model, eager, for scale.

A step is forward + cross-entropy + backward + SGD (momentum 0.9). Targets (issue 20): eager swapped at least
1.5x faster than eager unswapped; compiled swapped no slower than compiled unswapped.
Writes bench/results/swap_cpu.{md,json} (``--stem`` to name another file).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from common import RESULTS, command_line, cpu_clock_median_ms, sgd_step, speedup, write_results

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.app.timing import interleaved_median_ms
from lowbit.models import create_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from lsq_idioms import lsq_net_quantize  # noqa: E402  (the lsq-net-style wrapper shared with the tests)

from lowbit.backends import cpu as cpu_backend


def run(batch: int, width: float, repeats: int, compiled: bool) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    fp32 = create_model("mobilenet_v2", num_classes=10, small_input=True, width_mult=width).train()
    user = lsq_net_quantize(copy.deepcopy(fp32), bits=4)
    swapped = copy.deepcopy(user)
    start = time.perf_counter()
    report = lowbit.swap_fused(swapped, example_input=x)
    swap_s = time.perf_counter() - start
    models = {"fp32, eager": fp32, "lsq-net W4A4, eager": user, "lsq-net W4A4 after swap_fused, eager": swapped}
    compile_s = {}
    if compiled:
        for name, model in (("lsq-net W4A4, compiled", user), ("lsq-net W4A4 after swap_fused, compiled", swapped)):
            twin = copy.deepcopy(model)
            models[name] = torch.compile(twin)
            start = time.perf_counter()
            sgd_step(models[name], x, y)()  # compile forward and backward
            compile_s[name] = time.perf_counter() - start
    steps = {name: sgd_step(model, x, y) for name, model in models.items()}
    ms = interleaved_median_ms(steps, torch.device("cpu"), repeats)
    return {
        "ms": ms,
        "cpu_ms": cpu_clock_median_ms(steps, repeats),
        "swapped": len(report.swapped),
        "kept": len(report.kept),
        "report": str(report),
        "swap_seconds": swap_s,
        "compile_seconds": compile_s,
    }


def markdown(result: dict, meta: dict) -> str:
    ms, cpu_ms = result["ms"], result["cpu_ms"]
    eager_base = ms["lsq-net W4A4, eager"]
    compiled_base = ms.get("lsq-net W4A4, compiled")
    cpu_base = cpu_ms["lsq-net W4A4, eager"]
    lines = [
        "# swap_fused on an lsq-net-style MobileNet-v2 (cpu)",
        "",
        f"CPU: {meta['cpu']} ({meta['threads']} threads, ISA path of lowbit's CPU kernels: {meta['isa']}); "
        f"torch {meta['torch']}; {meta['machine_note']}.",
        f"Command: `{meta['command']}`. MobileNet-v2 width {meta['width']}, 32x32 inputs, batch {meta['batch']}, "
        f"training step = forward + backward + SGD, median of {meta['repeats']} round-robin rounds.",
        "",
        f"swap_fused: {result['swapped']} quantizers swapped, {result['kept']} kept, in {result['swap_seconds']:.1f} s "
        "(probe checks included).",
        "",
        "Wall ms: median wall-clock time of a step; CPU ms: median process CPU time of a step (second round-robin"
        " pass, all threads), the work done whatever share of the cores the process got.",
        "",
        "| model | step wall ms | vs lsq-net eager | vs lsq-net compiled | step CPU ms | CPU vs lsq-net eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in ms.items():
        c = cpu_ms[name]
        lines.append(
            f"| {name} | {t:.1f} | {speedup(eager_base, t, 2)} | {speedup(compiled_base, t, 2)} | {c:.1f} "
            f"| {speedup(cpu_base, c, 2)} |"
        )
    lines += ["", "Targets (issue 20):", ""]
    eager_ratio = eager_base / ms["lsq-net W4A4 after swap_fused, eager"]
    cpu_ratio = cpu_base / cpu_ms["lsq-net W4A4 after swap_fused, eager"]
    lines.append(
        f"- eager, swapped vs unswapped >= 1.5x: wall {eager_ratio:.2f}x ({'met' if eager_ratio >= 1.5 else 'MISSED'}),"
        f" CPU time {cpu_ratio:.2f}x ({'met' if cpu_ratio >= 1.5 else 'MISSED'})"
    )
    if compiled_base:
        c_ratio = compiled_base / ms["lsq-net W4A4 after swap_fused, compiled"]
        lines.append(
            f"- compiled, swapped vs unswapped >= 1.0x: {c_ratio:.2f}x, {'met' if c_ratio >= 1.0 else 'MISSED'}"
        )
        lines.append(
            "- compile time of the first step (s): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in result["compile_seconds"].items())
        )
    lines += ["", "swap_fused report (first lines):", "", "```", *result["report"].splitlines()[:8], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--note", default="shared machine, other jobs running")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--stem", default="swap_cpu", help="results file name in bench/results")
    parser.add_argument("--quick", action="store_true", help="tiny run, writes nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.width, args.repeats = 4, 0.25, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.batch, args.width, args.repeats, compiled=not args.no_compile)
    isa = cpu_backend.isa() if "cpu" in lowbit.backends() else "no C++ backend"
    meta = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "isa": f"lowbit C++ {isa}, Inductor C++ {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__,
        "machine_note": args.note,
        "command": command_line("bench_swap.py", argv),
        "batch": args.batch,
        "width": args.width,
        "repeats": args.repeats,
    }
    text = markdown(result, meta)
    print(text)
    if not args.quick:
        write_results(RESULTS, args.stem, text, {"meta": meta, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
