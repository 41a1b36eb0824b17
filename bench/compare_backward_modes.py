"""Compile time and compiled step with lowbit's backward ops fused or decomposed under Inductor.

MobileNet-v2 (32x32, batch 32), W4A4 and 3-branch MetaMix, one training step (forward + backward + SGD) compiled
with Inductor; ``lowbit.ops.decompositions.use_inductor_decompositions(True, backward=...)`` picks whether the
backward ops stay the fused kernels ("fused") or are decomposed as well ("decomposed"); the forward ops are
decomposed in both. lowbit's default, chosen from this table: decomposed for the single-branch op, fused for
the multi-branch one. The fp32 model is the yardstick.

Each case runs in its own process with its own fresh Inductor cache: Inductor's caches do not key on the
decomposition table, and kernels compiled for one case would otherwise be reused by the next. So the compile
times are cold and independent; the compiled step times come from different processes (medians, not
round-robin), which makes them noisier than bench_step.py's. Compile time = first compiled step minus a
median eager step. Writes bench/results/backward_modes_cpu.{md,json} (docs/decisions.md cites it).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import (
    compiled_cpu_meta,
    made_by,
    results_folder,
    sgd_step,
    timing_arguments,
    warm_up_inductor,
    write_results,
)

import lowbit
from lowbit.app.timing import median_ms
from lowbit.models import create_model
from lowbit.ops.decompositions import use_inductor_decompositions

CASES = [  # (model, backward decomposed?); None: the fp32 model
    ("fp32", None),
    ("W4A4", False),
    ("W4A4", True),
    ("MetaMix 3-branch", False),
    ("MetaMix 3-branch", True),
]


def measure(model_name: str, backward: bool | None, repeats: int) -> dict:
    """One case, in this process: compile time (s), eager and compiled step medians (ms)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    model = create_model("mobilenet_v2", num_classes=10, small_input=True)
    if model_name != "fp32":
        quantized = {"multi_branch": (2, 4, 8)} if model_name.startswith("MetaMix") else {"a_bits": 4}
        model = lowbit.quantize(model, w_bits=4, **quantized)
        with torch.no_grad():
            model(x)  # LSQ step initialisation from the first batch
        use_inductor_decompositions(True, backward=backward)
    eager = median_ms(sgd_step(model, x, y), "cpu", 3, warmup=1)
    warm_up_inductor()
    compiled = sgd_step(torch.compile(copy.deepcopy(model), fullgraph=True), x, y)
    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start - eager / 1e3
    return {"compile s": compile_s, "eager ms": eager, "compiled ms": median_ms(compiled, "cpu", repeats, warmup=1)}


def run_case(model_name: str, backward: bool | None, repeats: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="lowbit_backward_modes_"))
    args = [sys.executable, os.path.abspath(__file__), "--case", model_name, json.dumps(backward), str(repeats)]
    print(f"  {model_name}, backward {label(backward)} ...", file=sys.stderr)
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def label(backward: bool | None) -> str:
    return {None: "-", False: "fused", True: "decomposed"}[backward]


def markdown(rows: list[dict], meta: dict) -> str:
    fp32 = rows[0]
    lines = [
        "# Backward ops fused or decomposed under Inductor (MobileNet-v2 32x32, batch 32, cpu)",
        "",
        f"{made_by(meta)}, {meta['note']}. Each case in its own process with a fresh Inductor cache; compile "
        "time (after a small warm-up compile, bench/common.warm_up_inductor) = first compiled step minus a median "
        "eager step; compiled step: median of "
        f"{meta['repeats']} steps in that process (not round-robin).",
        "",
        "| model | backward ops | compile s | x fp32 | compiled step ms | x fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {label(row['backward'])} | {row['compile s']:.1f} | "
            f"{row['compile s'] / fp32['compile s']:.2f} | {row['compiled ms']:.1f} | "
            f"{row['compiled ms'] / fp32['compiled ms']:.2f} |"
        )
    return "\n".join([*lines, ""])


def main(argv=None) -> int:
    parser = timing_arguments(__doc__, "1 case pair only (W4A4), 3 steps", "compiled steps timed per case")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    cases = CASES[:3] if args.quick else CASES
    meta = compiled_cpu_meta("compare_backward_modes.py", argv, repeats, args.note)
    rows = [{"model": m, "backward": b, **run_case(m, b, repeats)} for m, b in cases]
    text = markdown(rows, meta)
    print(text)
    out = results_folder(args)
    if out:
        write_results(out, "backward_modes_cpu", text, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--case"]:
        name, backward, repeats = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(measure(name, backward, repeats)))
        sys.exit(0)
    sys.exit(main())
