"""Quantized layers and whole training steps: fused lowbit against the PyTorch ways. Side by side, one run.

1. Multi-branch layer, forward + backward: 1x1 conv 8x32x56x56 -> 192 channels with 3 and 6 activation branches:
   naive per-branch (one conv per branch), aggregated PyTorch reference (branches mixed, one conv), lowbit fused,
   and the plain fp32 conv; the aggregated reference and lowbit also under torch.compile (Inductor).
2. Training step (forward + backward + SGD) of MobileNet-v2 (width 1.0, 32x32 input, batch 32): fp32,
   W4A4 with the plain-PyTorch LSQ modules (ReferenceLSQ), the same after ``swap_fused``, and with 3-branch
   activation quantizers (aggregated PyTorch reference vs fused).

Every table is timed round-robin (one call of each implementation per round), median of the rounds.
Writes bench/results/layers_<device>.{md,json}. ``--quick`` shrinks everything and writes nothing unless --out.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from common import command_line, made_by, replace_modules, results_folder, sgd_step, timing_arguments, write_results
from torch import nn

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.app.timing import interleaved_median_ms
from lowbit.models import create_model
from lowbit.nn import LSQQuantizer, MultiBranchQConv2d, MultiBranchQuantizer, ReferenceLSQ

# ---- 1. the multi-branch layer -----------------------------------------------------------------------------


class ReferenceMultiBranch(nn.Module):
    """MetaMix's multi-branch activation quantizer in plain PyTorch: one ReferenceLSQ per branch."""

    def __init__(self, fused: MultiBranchQuantizer):
        super().__init__()
        self.alpha = fused.alpha
        self.branches = nn.ModuleList()
        for i, b in enumerate(fused.bits):
            branch = ReferenceLSQ(b, signed=fused.signed)
            branch.step = nn.Parameter(fused.steps.detach()[i : i + 1].clone())
            self.branches.append(branch)

    def mixed(self, x):
        probs = torch.softmax(self.alpha, 0)
        return sum(p * branch(x) for p, branch in zip(probs, self.branches, strict=True))

    def per_branch(self, x, conv):
        probs = torch.softmax(self.alpha, 0)
        return sum(p * conv(branch(x)) for p, branch in zip(probs, self.branches, strict=True))


def layer_rows(batch: int, branches: list[int], repeats: int) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 192, 1, bias=False)
    fused = MultiBranchQConv2d.from_float(conv, w_bits=4, a_bits_choices=branches)
    x = torch.relu(torch.randn(batch, 32, 56, 56)).requires_grad_(True)
    fused(x)  # initialise steps
    ref = ReferenceMultiBranch(fused.act_quant)
    w_ref = ReferenceLSQ(4, signed=True, channels=192)
    w_ref.step = fused.weight_quant.step
    weight = fused.weight

    def qconv(t):
        return F.conv2d(t, w_ref(weight))

    g = torch.randn(batch, 192, 56, 56)
    compiled_ref = torch.compile(lambda t: qconv(ref.mixed(t)), fullgraph=True)
    compiled_fused = torch.compile(fused, fullgraph=True)
    impls = {
        "plain fp32 conv": lambda: F.conv2d(x, weight),
        "naive per-branch (PyTorch)": lambda: ref.per_branch(x, qconv),
        "aggregated reference (PyTorch)": lambda: qconv(ref.mixed(x)),
        "aggregated reference compiled": lambda: compiled_ref(x),
        "lowbit fused": lambda: fused(x),
        "lowbit fused compiled": lambda: compiled_fused(x),
    }
    runs = {name: _fwd_bwd(fn, g, [x, weight]) for name, fn in impls.items()}
    return interleaved_median_ms(runs, torch.device("cpu"), repeats)


def _fwd_bwd(fn, g, leaves):
    def run():
        for t in leaves:
            t.grad = None
        fn().backward(g)

    return run


# ---- 2. whole training steps ------------------------------------------------------------------------------


def with_reference_quantizers(model: nn.Module) -> nn.Module:
    """``model`` with every lowbit quantizer replaced by its plain-PyTorch reference, in place."""
    return replace_modules(model, (LSQQuantizer, MultiBranchQuantizer), _to_reference)


def _to_reference(q: nn.Module) -> nn.Module:
    if isinstance(q, MultiBranchQuantizer):
        return _MixedReference(q)
    return ReferenceLSQ.from_lsq(q)


class _MixedReference(ReferenceMultiBranch):
    def forward(self, x):
        return self.mixed(x)


def training_step_rows(batch: int, width: float, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    fp32 = create_model("mobilenet_v2", num_classes=10, small_input=True, width_mult=width)
    w4a4 = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, a_bits=4)
    w4a4(x)  # initialise steps
    reference_w4a4 = with_reference_quantizers(copy.deepcopy(w4a4))
    swapped = copy.deepcopy(reference_w4a4)
    lowbit.swap_fused(swapped)
    mb = lowbit.quantize(copy.deepcopy(fp32), w_bits=4, multi_branch=(2, 4, 8))
    mb(x)
    reference_mb = with_reference_quantizers(copy.deepcopy(mb))
    models = {
        "fp32 (no quantization)": fp32,
        "W4A4 reference LSQ (PyTorch)": reference_w4a4,
        "W4A4 after swap_fused": swapped,
        "W4 + 3-branch act, aggregated reference (PyTorch)": reference_mb,
        "W4 + 3-branch act, lowbit fused": mb,
    }
    steps = {name: sgd_step(model, x, y) for name, model in models.items()}
    return interleaved_median_ms(steps, torch.device("cpu"), repeats)


# ---- report ------------------------------------------------------------------------------------------------


def markdown(tables: dict, meta: dict) -> str:
    lines = [
        "# Quantized layers and training steps (cpu)",
        "",
        f"{made_by(meta)}. Median of {meta['repeats']} repeats, milliseconds; each table measured in one run.",
        "",
    ]
    for title, (rows, baseline) in tables.items():
        lines += [f"## {title}", "", f"| implementation | ms | x {baseline} |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.2f} | {ms / rows[baseline]:.2f} |" for name, ms in rows.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = timing_arguments(__doc__, "small shapes, 3 repeats, no files unless --out", note=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    batch, width, step_batch = (2, 0.5, 8) if args.quick else (8, 1.0, 32)
    tables = {}
    for branches in ([2, 4, 8], [2, 3, 4, 5, 6, 8]):
        print(f"layer, {len(branches)} branches ...", file=sys.stderr)
        title = f"1x1 conv {batch}x32x56x56 -> 192, W4, {len(branches)}-branch activations, forward + backward"
        tables[title] = (layer_rows(batch, branches, repeats), "plain fp32 conv")
    print("training steps ...", file=sys.stderr)
    title = f"MobileNet-v2 (width {width}, 32x32, batch {step_batch}) training step: forward + backward + SGD"
    tables[title] = (training_step_rows(step_batch, width, repeats), "fp32 (no quantization)")
    meta = {
        "device_name": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "command": command_line("bench_layers.py", argv),
    }
    text = markdown(tables, meta)
    print(text)
    out = results_folder(args)
    if out:
        write_results(
            out, "layers_cpu", text, {"meta": meta, "results_ms": {t: rows for t, (rows, _) in tables.items()}}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
