"""How far lowbit's gradient sums and packed_linear are from the exact values: the figures behind the tolerance
readings in docs/decisions.md (SPEC sections 1, 2 and 4).

Gradient sums: every case of tests/test_fake_quant.py and tests/test_multi_branch_fake_quant.py (and their large-sum
tests) on the chosen backends, against the float64 sums of tests/reference.py. Reported per backend: the worst error
relative to |sum| and relative to sum|terms| (in float32 unit roundoffs u = 2^-24), and the worst relative error of the
large tests. packed_linear: 17 x 33 outputs, K in 1, 64, 4097, 8192, against F.linear(fake_quant(x), dequant(W)) + bias
evaluated exactly, per element and norm-wise per output row, with power-of-two and with arbitrary steps.

Writes bench/results/accuracy_cpu.{md,json}. Usage: python bench/accuracy_study.py [--backends cpu-avx2,reference]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from common import RESULTS, command_line, write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import reference as ref  # noqa: E402
import test_fake_quant as tfq  # noqa: E402
import test_multi_branch_fake_quant as tmb  # noqa: E402

import lowbit  # noqa: E402
from lowbit.app.machine import cpu_name  # noqa: E402
from lowbit.backends import cpu as cpu_backend

U = 2.0**-24


class Recorder:
    """Stands in for close_sum: records the errors instead of asserting them."""

    def __init__(self):
        self.case = ""
        self.rows: list[dict] = []

    def __call__(self, actual, want, scale, what, cancel_allowance=True):
        got = ref.as_np(actual).reshape(-1)
        ok = np.isfinite(want) & (np.abs(want) > 0)
        if not ok.any():
            return
        err = np.abs(got[ok] - want[ok])
        self.rows.append(
            {
                "case": self.case,
                "what": what,
                "rel": float((err / np.abs(want[ok])).max()),
                "u_of_terms": float((err / scale[ok]).max() / U),
            }
        )


def gradient_errors(variant: str, rec: Recorder) -> None:
    name, _, isa = variant.partition("-")
    if isa:
        cpu_backend.set_isa(isa)
    with lowbit.use_backend(name):
        for (shape, axis), dtype, signed, off in itertools.product(tfq.CASES, tfq.DTYPES, [False, True], [False, True]):
            rec.case = "fake_quant"
            bits = 2 + (len(shape) + (axis or 0) + 2 * signed + off) % 7
            x, step, offset, grad = tfq._inputs(shape, axis, dtype, bits, signed, off, seed=hash((shape, axis)) % 2**31)
            tfq.check_fake_quant(x, step, bits, signed, offset=offset, axis=axis, grad=grad)
        for shape, bits, dtype in itertools.product(tmb.SHAPES, tmb.BRANCHES, tfq.DTYPES):
            rec.case = "multi_branch"
            index = tmb.SHAPES.index(shape) + tmb.BRANCHES.index(bits) + tfq.DTYPES.index(dtype)
            signed, kind = bool(index % 2), list(tmb.PROBS)[index % len(tmb.PROBS)]
            x, steps, probs, grad = tmb._inputs(shape, bits, signed, dtype, kind, hash((shape, bits, signed)) % 2**31)
            tmb.check_multi_branch(x, steps, probs, list(bits), signed, grad)
        if name != "reference":
            rec.case = "large"
            x, step, offset, grad = tfq._inputs((8, 32, 56, 56), None, torch.float32, 4, False, True, seed=5)
            tfq.check_fake_quant(x, step, 4, False, offset=offset, grad=grad)
            x, steps, probs, grad = tmb._inputs((8, 32, 56, 56), (2, 4, 8), False, torch.float32, "softmax", seed=2)
            tmb.check_multi_branch(x, steps, probs, [2, 4, 8], False, grad)


def packed_errors() -> list[dict]:
    rows = []
    for k, power_of_two, with_bias, w_bits in itertools.product(
        [1, 64, 4097, 8192], [True, False], [False, True], [2, 4, 8]
    ):
        gen = torch.Generator().manual_seed(k + w_bits)
        lo, hi = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
        qw = torch.randint(lo, hi + 1, (33, k), generator=gen, dtype=torch.int8)
        if power_of_two:
            w_scale, x_step = 2.0 ** -torch.randint(4, 9, (33,), generator=gen).float(), torch.tensor([2.0**-5])
        else:
            w_scale = 0.01 + torch.rand(33, generator=gen) * 0.05
            x_step = torch.tensor([2.0 / 2**8 * (0.7 + 0.6 * torch.rand(1, generator=gen).item())])
        x = ((torch.rand(17, k, generator=gen) * 1.2 - 0.1) * 255 - 128) * x_step
        bias = torch.randn(33, generator=gen) if with_bias else None
        y = lowbit.packed_linear(
            x, lowbit.pack(qw, w_bits), w_scale, w_bits, x_step, 8, x_signed=True, bias=bias
        ).double()
        fq = lowbit.fake_quant(x, x_step, 8, signed=True)
        want = F.linear(fq.double(), (qw.float() * w_scale[:, None]).double(), None if bias is None else bias.double())
        err = (y - want).abs()
        rows.append(
            {
                "K": k,
                "steps": "power of two" if power_of_two else "any",
                "bias": with_bias,
                "w_bits": w_bits,
                "element_rel": float((err / want.abs()).nan_to_num(0.0).max()),
                "share_above_1e-5": float((err > 1e-5 * want.abs()).double().mean()),
                "row_norm_rel": float((err.norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)).max()),
            }
        )
    return rows


def markdown(grad: dict, packed: list[dict], meta: dict) -> str:
    lines = [
        "# Accuracy of the gradient sums and of packed_linear (cpu)",
        "",
        f"`{meta['command']}` on {meta['cpu']}, torch {torch.__version__}. Errors against float64 evaluations of "
        "SPEC's formulas (tests/reference.py). u = 2^-24, the float32 unit roundoff.",
        "",
        "## Gradient sums (dstep, doffset, dsteps, dprobs)",
        "",
        "| backend | cases | worst error / sum of abs(terms), in u | worst relative error "
        "| worst relative error, large tests |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, rows in grad.items():
        large = [r["rel"] for r in rows if r["case"] == "large"]
        lines.append(
            f"| {variant} | {len(rows)} | {max(r['u_of_terms'] for r in rows):.2f} "
            f"| {max(r['rel'] for r in rows):.2e} | " + (f"{max(large):.2e} |" if large else "not run |")
        )
    lines += [
        "",
        "## packed_linear against F.linear(fake_quant(x), dequant(W)) + bias (17 x 33 outputs, worst over 2/4/8-bit)",
        "",
        "| K | steps | bias | worst relative error per element | share of elements above 1e-5 "
        "| worst row-wise norm relative error |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for (k, steps, bias), group in itertools.groupby(packed, key=lambda r: (r["K"], r["steps"], r["bias"])):
        group = list(group)
        lines.append(
            f"| {k} | {steps} | {'yes' if bias else 'no'} | {max(r['element_rel'] for r in group):.2e} | "
            f"{max(r['share_above_1e-5'] for r in group):.4f} | {max(r['row_norm_rel'] for r in group):.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cpu-avx2,reference", help="backend variants, comma-separated")
    args = parser.parse_args(argv)
    lowbit.backends()
    rec = Recorder()
    tfq.close_sum = rec
    tmb.close_sum = rec
    grad = {}
    for variant in args.backends.split(","):
        rec.rows = []
        gradient_errors(variant, rec)
        grad[variant] = rec.rows
    packed = packed_errors()
    meta = {"command": command_line("accuracy_study.py", argv), "cpu": cpu_name()}
    write_results(
        RESULTS, "accuracy_cpu", markdown(grad, packed, meta), {"meta": meta, "gradients": grad, "packed": packed}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
