"""Where a compiled lowbit training step spends its time: opaque custom ops vs Inductor decompositions.

One small model (lowbit.models small_cnn, 3 conv-BN-ReLU blocks, W4A4), one training step (forward + backward
+ SGD) compiled with Inductor in two ways, in one process:
  opaque        lowbit.ops.decompositions.use_inductor_decompositions(False): Inductor calls lowbit's fused
                kernels as custom ops (what lowbit 0.1 did)
  decomposed    the default: Inductor inlines the ops' aten decompositions and fuses them with BN/ReLU
and eager mode for reference. For each: the median step time, and from torch.profiler over a few steps the
time in the lowbit custom ops, in layout copies (aten::copy_ / clone / contiguous), in Inductor's generated
kernels, and the number of generated kernels. Writes bench/results/compile_profile_cpu.{md,json}
(docs/compile.md cites it).
"""

from __future__ import annotations

import os
import tempfile

# A fresh Inductor cache: its keys do not include the decomposition table, so a warm cache would serve the
# decomposed graph to the opaque mode too.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lowbit_profile_inductor_"))

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from common import RESULTS, command_line, made_by, number_table, sgd_step, write_results  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import lowbit  # noqa: E402
from lowbit.app.machine import cpu_name  # noqa: E402
from lowbit.app.timing import interleaved_median_ms  # noqa: E402
from lowbit.models import create_model  # noqa: E402
from lowbit.ops.decompositions import use_inductor_decompositions  # noqa: E402

COPIES = ("aten::copy_", "aten::clone", "aten::contiguous")


def run_opaque(model, x):
    return model(x)


def run_decomposed(model, x):
    return model(x)


# Dynamo keeps compiled graphs per code object and, with nn modules inlined, two copies of one model pass each
# other's guards: the modes get a function each, or the last graph compiled would serve both.
RUNNERS = {"opaque": run_opaque, "decomposed": run_decomposed}


def profile_step(step, steps: int) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
    total = sum(self_ms.values())
    return {
        "profiled ms per step": total,
        "lowbit custom ops ms": sum(ms for k, ms in self_ms.items() if k.startswith("lowbit::")),
        "layout copies ms": sum(ms for k, ms in self_ms.items() if k in COPIES),
        "Inductor kernels ms": sum(ms for k, ms in self_ms.items() if "cpp_fused" in k),
        "generated kernels": sum(1 for k in self_ms if "cpp_fused" in k),
        "top": sorted(self_ms.items(), key=lambda kv: -kv[1])[:8],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--note", default="shared machine, other jobs running")
    args = parser.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = True  # each generated kernel shows in the profile
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    model = lowbit.quantize(create_model("small_cnn", num_classes=10, in_channels=3), w_bits=4, a_bits=4)
    with torch.no_grad():
        model(x)
    steps = {"eager": sgd_step(model, x, y)}
    for mode in ("opaque", "decomposed"):
        use_inductor_decompositions(mode == "decomposed")
        # no torch._dynamo.reset() (nor run_and_get_code, which calls it): it would drop the opaque graph, which
        # would then be recompiled with the decompositions on
        steps[mode] = sgd_step(copy.deepcopy(model), x, y, torch.compile(RUNNERS[mode], fullgraph=True))
        steps[mode]()
    use_inductor_decompositions(True)
    times = interleaved_median_ms(steps, "cpu", args.repeats, warmup=1)
    rows = {mode: {"step ms": times[mode], **profile_step(step, 3)} for mode, step in steps.items()}
    meta = {
        "device_name": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "note": args.note,
        "command": command_line("profile_compile.py", argv),
    }
    text = markdown(rows, meta, args.batch)
    print(text)
    write_results(args.out, "compile_profile_cpu", text, {"meta": meta, "rows": rows})
    return 0


def markdown(rows: dict, meta: dict, batch: int) -> str:
    cols = ["step ms", "lowbit custom ops ms", "layout copies ms", "Inductor kernels ms", "generated kernels"]
    lines = [
        f"# Where a compiled lowbit step spends its time (small_cnn W4A4, 32x32, batch {batch}, cpu)",
        "",
        f"{made_by(meta)}, "
        f"{meta['note']}. Step ms: median round-robin; the other columns: torch.profiler self CPU time per step, "
        "and the number of distinct generated kernels that ran.",
        "",
    ]
    cells = {
        mode: [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols]
        for mode, row in rows.items()
    }
    lines += [*number_table("mode", cols, cells), ""]
    for mode, row in rows.items():
        top = ", ".join(f"{name} {ms:.2f}" for name, ms in row["top"])
        lines.append(f"- {mode}, top self CPU ms per step: {top}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
