"""Training steps, eager and ``torch.compile``d: fp32 vs composition LSQ vs lowbit, side by side in one run.

A step is forward + backward + SGD (momentum 0.9) on one fixed batch. Models: MobileNet-v2 and ResNet-18
(lowbit.models, 32x32 input, 10 classes), W4A4 (first and last layer 8-bit, as lowbit.quantize does):
  fp32               the float model
  composition LSQ    the same quantized model with ReferenceLSQ modules (round-pass / grad-scale, plain PyTorch)
  lowbit             lowbit.quantize's modules (fused ops in eager mode, their decompositions under Inductor)
  MetaMix 3-branch   W4 + 3-branch (2/4/8-bit) activations, lowbit fused (MobileNet-v2 only)
Each in eager mode and under ``torch.compile`` (Inductor, default mode; the model is compiled, the optimizer step
runs eagerly). Compile time = the first compiled step's wall time minus a median eager step, with Inductor's
caches in a fresh folder so nothing is reused between models, after a small warm-up compile that pays
Inductor's once-per-process costs (bench/common.warm_up_inductor); where that time went: the C++ kernels Inductor
generated for the model (number and lines, from the cache folder) and Dynamo's compile-phase timers (tracing,
Inductor's code generation, waiting on the C++ compiler; torch._dynamo.utils.compilation_time_metrics).
Steps are timed round-robin (one step of every variant per round): each row is the median of the rounds, with
its quartiles, and each step ratio of a target is the median over the rounds of that round's ratio, so that a
slow spell of the machine, which slows every variant of its round, cancels out of the ratio.

Writes bench/results/step_cpu.{md,json} (step_<model>_cpu with --models naming some); ``--quick`` runs batch 4
at 2 repeats and writes nothing unless --out.
"""

from __future__ import annotations

import os
import tempfile

# A fresh Inductor cache for this process: compile times are cold, and no earlier run's kernels are reused.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lowbit_bench_inductor_"))

import copy  # noqa: E402
import glob  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from common import (  # noqa: E402
    compiled_cpu_meta,
    made_by,
    quartiles,
    replace_modules,
    results_folder,
    round_ratio,
    sgd_step,
    timing_arguments,
    warm_up_inductor,
    write_results,
)
from torch import nn  # noqa: E402
from torch._dynamo.utils import compilation_time_metrics  # noqa: E402

import lowbit  # noqa: E402
from lowbit.app.timing import interleaved_times_ms  # noqa: E402
from lowbit.models import create_model  # noqa: E402
from lowbit.nn import LSQQuantizer, ReferenceLSQ  # noqa: E402

MODELS = {"MobileNet-v2": "mobilenet_v2", "ResNet-18": "resnet18"}


def to_composition(model: nn.Module) -> nn.Module:
    """A deep copy of a lowbit.quantize'd model with its ReLU6 modules back (unfolded) and every LSQQuantizer
    replaced by its ReferenceLSQ twin."""
    composition = copy.deepcopy(model)
    lowbit.unfold_activation_clips(composition)
    return replace_modules(composition, (LSQQuantizer,), ReferenceLSQ.from_lsq)


def variants(arch: str, x: torch.Tensor, metamix: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    fp32 = create_model(arch, num_classes=10, small_input=True)
    lowbit_model = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, a_bits=4)
    with torch.no_grad():
        lowbit_model(x)  # LSQ step initialisation from the first batch (eager; it reads the data)
    models = {"fp32": fp32, "composition LSQ": to_composition(lowbit_model), "lowbit": lowbit_model}
    if metamix:
        mb = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, multi_branch=(2, 4, 8))
        with torch.no_grad():
            mb(x)
        models["MetaMix 3-branch"] = mb
    return models


# Dynamo's compile-phase timers (seconds summed over the forward and backward graphs) reported per model
PHASES = {
    "tracing": ("bytecode_tracing", "aot_trace_joint_graph"),
    "Inductor codegen": ("Scheduler.codegen",),
    "waiting on C++": ("async_compile.wait",),
}


def generated_kernels() -> set[str]:
    """The C++ kernel sources in this process's Inductor cache folder."""
    return set(glob.glob(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "**", "*.cpp"), recursive=True))


def compile_breakdown(known_kernels: set[str]) -> dict:
    """The kernels generated since ``known_kernels`` was taken and the phase timers since they were cleared."""
    new = generated_kernels() - known_kernels
    lines = 0
    for path in new:
        with open(path) as source:
            lines += sum(1 for _ in source)
    phases = {name: sum(sum(compilation_time_metrics.get(key, [])) for key in keys) for name, keys in PHASES.items()}
    return {"kernels": len(new), "kernel lines": lines, **phases}


def model_rows(title: str, arch: str, batch: int, repeats: int, metamix: bool) -> tuple[dict, dict, dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    steps, compile_s, breakdown = {}, {}, {}
    for name, model in variants(arch, x, metamix).items():
        steps[f"{name} eager"] = sgd_step(model, x, y)
        compiled = sgd_step(torch.compile(copy.deepcopy(model)), x, y)
        print(f"  {title}: compiling {name} ...", file=sys.stderr)
        known = generated_kernels()
        compilation_time_metrics.clear()
        start = time.perf_counter()
        compiled()
        compile_s[name] = time.perf_counter() - start
        breakdown[name] = compile_breakdown(known)
        steps[f"{name} compiled"] = compiled
    times = interleaved_times_ms(steps, "cpu", repeats, warmup=1)  # every step already ran once
    for name in compile_s:  # the first call ran the step too: take one eager step's time off
        compile_s[name] -= statistics.median(times[f"{name} eager"]) / 1e3
    return times, compile_s, breakdown


# ---- report ------------------------------------------------------------------------------------------------


# (step, baseline step, limit) and (compiled variant, limit for its compile time / fp32's): issue 16's targets
STEP_TARGETS = [
    ("lowbit compiled", "composition LSQ compiled", 0.9),
    ("lowbit compiled", "fp32 compiled", 1.05),
    ("lowbit eager", "fp32 eager", 1.1),
    ("MetaMix 3-branch eager", "fp32 eager", 1.25),
    ("MetaMix 3-branch compiled", "fp32 compiled", 1.25),
]
COMPILE_TARGETS = [("lowbit", 1.2), ("MetaMix 3-branch", 1.2)]


def ratio_checks(times: dict, compile_s: dict) -> list[dict]:
    """Each target of issue 16 this table can answer: its ratio (quartiles over the rounds for a step ratio, one
    value for a compile-time ratio) and its limit."""
    checks = [
        (f"{step} / {baseline}", round_ratio(times, step, baseline), limit)
        for step, baseline, limit in STEP_TARGETS
        if step in times
    ]
    checks += [
        (f"compile time {name} / fp32", quartiles([compile_s[name] / compile_s["fp32"]]), limit)
        for name, limit in COMPILE_TARGETS
        if name in compile_s
    ]
    return [{"target": target, "quartiles": list(q), "ratio": q[1], "limit": limit} for target, q, limit in checks]


def markdown(tables: dict, meta: dict) -> str:
    lines = [
        "# Training steps, eager and torch.compile (cpu)",
        "",
        f"{made_by(meta)}, {meta['note']}. {meta['repeats']} round-robin rounds (one step of every variant per "
        "round), milliseconds per step (forward + backward + SGD): the median of the rounds and its quartiles; "
        "every row of a table measured in the same run. A step ratio is the median over the rounds of that round's "
        "ratio (quartiles after it). Compile time: first compiled step minus one eager step, cold Inductor cache; the "
        "kernels Inductor generated for it and Dynamo's phase timers (forward and backward graphs together). The "
        f"warm-up compile before them (Inductor's once-per-process costs) took {meta['warm-up compile s']:.1f} s.",
        "",
    ]
    for title, table in tables.items():
        rows, compile_s = table["step_ms"], table["compile_s"]
        lines += [
            f"## {title}",
            "",
            "| step | ms | quartiles ms | x fp32 eager | x fp32 compiled |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, ms in rows.items():
            low, _, high = quartiles(table["step_times_ms"][name])
            lines.append(
                f"| {name} | {ms:.1f} | {low:.0f}-{high:.0f} | {ms / rows['fp32 eager']:.2f} "
                f"| {ms / rows['fp32 compiled']:.2f} |"
            )
        lines += [
            "",
            "| compile time | s | x fp32 | C++ kernels | kernel lines | tracing s | Inductor codegen s "
            "| waiting on C++ s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, seconds in compile_s.items():
            b = table["compile_breakdown"][name]
            lines.append(
                f"| {name} | {seconds:.1f} | {seconds / compile_s['fp32']:.2f} | {b['kernels']} | {b['kernel lines']} "
                f"| {b['tracing']:.1f} | {b['Inductor codegen']:.1f} | {b['waiting on C++']:.1f} |"
            )
        lines += ["", "| target (issue 16) | ratio | quartiles | limit | |", "|---|---:|---:|---:|---|"]
        for check in table["targets"]:
            low, ratio, high = check["quartiles"]
            spread = f"{low:.2f}-{high:.2f}" if high > low else "one value"
            verdict = "met" if ratio <= check["limit"] else "missed"
            lines.append(f"| {check['target']} | {ratio:.2f} | {spread} | <= {check['limit']} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = timing_arguments(__doc__, "batch 4, 2 repeats, MobileNet-v2 only", "timed steps per variant")
    parser.add_argument("--models", nargs="+", choices=list(MODELS.values()), default=list(MODELS.values()))
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 15)
    batch = 4 if args.quick else 32
    models = {label: arch for label, arch in MODELS.items() if arch in args.models}
    models = {"MobileNet-v2": "mobilenet_v2"} if args.quick else models
    stem = "step_cpu" if len(models) == len(MODELS) else "step_" + "_".join(models.values()) + "_cpu"
    out = results_folder(args)
    meta = compiled_cpu_meta("bench_step.py", argv, repeats, args.note)
    start = time.perf_counter()
    warm_up_inductor()
    meta["warm-up compile s"] = time.perf_counter() - start
    tables = {}
    for label, arch in models.items():
        title = f"{label} (32x32, batch {batch}), W4A4"
        print(f"{title} ...", file=sys.stderr)
        times, compile_s, breakdown = model_rows(title, arch, batch, repeats, metamix=label == "MobileNet-v2")
        tables[title] = {
            "step_ms": {name: statistics.median(t) for name, t in times.items()},
            "step_times_ms": times,
            "compile_s": compile_s,
            "compile_breakdown": breakdown,
            "targets": ratio_checks(times, compile_s),
        }
        text = markdown(tables, meta)
        print(text)
        if out:  # after every model: a long run that is cut short keeps what it measured
            write_results(out, stem, text, {"meta": meta, "tables": tables})
    return 0


if __name__ == "__main__":
    sys.exit(main())
