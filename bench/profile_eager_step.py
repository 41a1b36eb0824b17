"""Where an eager lowbit training step spends its time next to the fp32 step (issue 16's eager target).

MobileNet-v2 (lowbit.models, small-input stem, 32x32, 10 classes), one training step (forward + backward + SGD),
eager mode, in one process:
  fp32                       the float model
  lowbit W4A4                lowbit.quantize(w_bits=4, a_bits=4): the fused quantizers, each ReLU6 folded into the
                             activation quantizer that reads it (quantize's default), as bench_step.py times it
  lowbit W4A4, unfolded      the same with fold_clips=False: the ReLU6 modules run on their own
For each: the median step time (round-robin) and, from torch.profiler over a few steps, the self CPU time per
step of the convolutions, batch norms, ReLU6 (clamp / hardtanh and their backward), lowbit's quantizers (forward
and backward) and everything else (its largest events listed). Writes bench/results/eager_profile_cpu.{md,json}
(docs/compile.md cites it).
"""

from __future__ import annotations

import copy
import sys

import torch
from common import (
    command_line,
    made_by,
    number_table,
    results_folder,
    sgd_step,
    timing_arguments,
    write_results,
)
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.app.timing import interleaved_median_ms
from lowbit.backends import status
from lowbit.models import create_model

# torch.profiler event names (self CPU time) per part of the step; the rest is "other".
PARTS = {
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::thnn_conv2d"),
    "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward"),
    "ReLU6": ("aten::clamp", "aten::hardtanh", "aten::hardtanh_", "aten::hardtanh_backward"),
    "quantizers forward": ("_FakeQuant", "_FakeQuantClipped", "lowbit::fake_quant"),
    "quantizers backward": ("_FakeQuantBackward", "_FakeQuantClippedBackward", "lowbit::fake_quant_backward"),
}


def variants(batch: int) -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    fp32 = create_model("mobilenet_v2", num_classes=10, small_input=True)
    quantized = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, a_bits=4)
    unfolded = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, a_bits=4, fold_clips=False)
    with torch.no_grad():
        quantized(x), unfolded(x)  # LSQ step initialisation from the first batch
    return {"fp32": fp32, "lowbit W4A4": quantized, "lowbit W4A4, unfolded": unfolded}, x, y


def profile_parts(step, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each part of PARTS, "other", and "profiled" (their sum)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    parts = {part: sum(self_ms.get(name, 0.0) for name in names) for part, names in PARTS.items()}
    parts["other"] = sum(self_ms.values()) - sum(parts.values())
    parts["profiled"] = sum(self_ms.values())
    known = {name for names in PARTS.values() for name in names}
    parts["top other"] = sorted(((k, ms) for k, ms in self_ms.items() if k not in known), key=lambda kv: -kv[1])[:6]
    return parts


def markdown(rows: dict, meta: dict) -> str:
    cols = ["step ms", "x fp32", *PARTS, "other", "profiled"]
    lines = [
        f"# Where an eager training step spends its time (MobileNet-v2, 32x32, batch {meta['batch']}, cpu)",
        "",
        f"{made_by(meta)}, {meta['note']}. Step ms: median of {meta['repeats']} round-robin steps; the other "
        f"columns: torch.profiler self CPU milliseconds per step over {meta['profiled_steps']} steps (the profiler "
        "adds its own overhead, so they sum to more than the step). `lowbit W4A4` folds each ReLU6 that feeds a "
        "quantized layer into its activation quantizer (lowbit.quantize's default); `unfolded` keeps them.",
        "",
    ]
    fp32_ms = rows["fp32"]["step ms"]
    cells = {
        name: [f"{row['step ms']:.1f}", f"{row['step ms'] / fp32_ms:.2f}", *(f"{row[c]:.1f}" for c in cols[2:])]
        for name, row in rows.items()
    }
    lines += [*number_table("variant", cols, cells), ""]
    for name, row in rows.items():
        top = ", ".join(f"{event} {ms:.1f}" for event, ms in row["top other"])
        lines.append(f'- {name}, largest of "other" (self CPU ms per step): {top}')
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = timing_arguments(__doc__, "batch 4, 2 repeats, 1 profiled step", "timed steps per variant")
    args = parser.parse_args(argv)
    repeats, batch, profiled = (2, 4, 1) if args.quick else (args.repeats or 15, 32, 10)
    models, x, y = variants(batch)
    steps = {name: sgd_step(model, x, y) for name, model in models.items()}
    times = interleaved_median_ms(steps, "cpu", repeats, warmup=2)
    rows = {name: {"step ms": times[name], **profile_parts(step, profiled)} for name, step in steps.items()}
    meta = {
        "device_name": cpu_name(),
        "isa": f"lowbit {status('cpu').reason}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": batch,
        "repeats": repeats,
        "profiled_steps": profiled,
        "note": args.note,
        "command": command_line("profile_eager_step.py", argv),
    }
    text = markdown(rows, meta)
    print(text)
    out = results_folder(args)
    if out:
        write_results(out, "eager_profile_cpu", text, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
