"""Peak memory of one MetaMix bit-meta training step (forward + backward + SGD), fused against the PyTorch forms.

MobileNet-v2 (small-input stem, 32x32, batch 32), W4 weights, 3-branch activations {2, 4, 8}:
  * lowbit fused: one multi-branch op per activation (its backward keeps only x), one conv per layer;
  * aggregated PyTorch reference: every branch quantized with plain ops, mixed, one conv per layer;
  * per-branch PyTorch form: every branch quantized and convolved separately, outputs mixed (the textbook form);
and the fp32 and single-branch W4A4 steps for scale. Peak = the highest "Total Allocated" the torch profiler's
allocator trace reaches during the step, above what was allocated before it (weights, inputs, optimizer state).
Writes bench/results/memory_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from bench_layers import ReferenceMultiBranch, with_reference_quantizers
from common import RESULTS, replace_modules, sgd_step, write_results
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.models import create_model
from lowbit.nn import MultiBranchQConv2d, MultiBranchQLinear, ReferenceLSQ


class PerBranchLayer(nn.Module):
    """A multi-branch layer in the per-branch form: ``sum_i p_i * layer(Q_i(x))``, one conv/linear per branch."""

    def __init__(self, layer: MultiBranchQConv2d | MultiBranchQLinear):
        super().__init__()
        self.layer = layer
        self.reference = ReferenceMultiBranch(layer.act_quant)
        self.weight_quant = ReferenceLSQ.from_lsq(layer.weight_quant)

    def forward(self, x):
        weight = self.weight_quant(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return self.reference.per_branch(x, lambda t: self.layer._conv_forward(t, weight, self.layer.bias))
        return self.reference.per_branch(x, lambda t: F.linear(t, weight, self.layer.bias))


def _per_branch(model: nn.Module) -> nn.Module:
    return replace_modules(model, (MultiBranchQConv2d, MultiBranchQLinear), PerBranchLayer)


def models(batch: int, width: float, x: torch.Tensor) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    fp32 = create_model("mobilenet_v2", num_classes=10, small_input=True, width_mult=width)
    w4a4 = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, a_bits=4)
    w4a4(x)
    mb = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, multi_branch=(2, 4, 8))
    mb(x)
    return {
        "fp32 (no quantization)": fp32,
        "W4A4 single branch, lowbit fused": w4a4,
        "W4A4 single branch, PyTorch LSQ": with_reference_quantizers(copy.deepcopy(w4a4)),
        "3-branch, lowbit fused": mb,
        "3-branch, aggregated PyTorch reference": with_reference_quantizers(copy.deepcopy(mb)),
        "3-branch, per-branch PyTorch form": _per_branch(copy.deepcopy(mb)),
    }


def peak_step_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Highest bytes allocated above the starting level during one training step (after a warm-up step)."""
    step = sgd_step(model, x, y)
    step()  # momentum buffers exist before the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    levels = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(levels, default=0)


def markdown(rows: dict[str, int], meta: dict) -> str:
    fused = rows["3-branch, lowbit fused"]
    lines = [
        "# Peak memory of one training step (cpu)",
        "",
        f"Command: `{meta['command']}`; MobileNet-v2 small-input, width {meta['width']}, 32x32, batch "
        f"{meta['batch']}, W4 weights; torch {meta['torch']}, {meta['device_name']}.",
        "",
        "| training step | peak extra MiB | vs 3-branch fused |",
        "|---|---:|---:|",
    ]
    for name, peak in rows.items():
        lines.append(f"| {name} | {peak / 2**20:.1f} | {peak / fused:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="batch 4, width 0.25; writes nothing")
    parser.add_argument("--device", default="cpu", help="cpu only (the profiler's CPU allocator trace)")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        print("bench_memory measures the CPU allocator; run it with --device cpu", file=sys.stderr)
        return 0
    batch, width = (4, 0.25) if args.quick else (args.batch, args.width)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    rows = {name: peak_step_bytes(model, x, y) for name, model in models(batch, width, x).items()}
    meta = {
        "command": "python bench/bench_memory.py"
        + ("" if (batch, width) == (32, 1.0) else f" --batch {batch} --width {width}"),
        "batch": batch,
        "width": width,
        "torch": torch.__version__,
        "device_name": cpu_name(),
    }
    text = markdown(rows, meta)
    print(text)
    if not args.quick:
        write_results(RESULTS, "memory_cpu", text, {"meta": meta, "peak_bytes": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
