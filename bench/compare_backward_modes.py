"""Compile time and compiled step with lowbit's backward ops fused or decomposed under Inductor.

MobileNet-v2 (32x32, batch 32), W4A4 and 3-branch MetaMix, one training step (forward + backward + SGD) compiled
with Inductor; ``lowbit.ops.decompositions.use_inductor_decompositions(True, backward=...)`` picks whether the
backward ops stay the fused kernels ("fused") or are decomposed as well ("decomposed"); the forward ops are
decomposed in both. lowbit's default, chosen from this table: decomposed for the single-branch op, fused for
the multi-branch one. The fp32 model is the yardstick.

Compile times: each case in its own process with its own fresh Inductor cache (Inductor's caches do not key on
the decomposition table, and kernels compiled for one case would otherwise be reused by the next), after a small
warm-up compile; compile time = first compiled step minus a median eager step. Compiled steps: every case
compiled again in one more process (Inductor's graph caches off, each case traced from a forward function of its
own so that Dynamo does not hand one case's graph to another) and timed round-robin, one step of each case per
round; the step ratio to fp32 is the median over the rounds of that round's ratio, with its quartiles.
Writes bench/results/backward_modes_cpu.{md,json} (docs/decisions.md cites it).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import torch
from common import (
    compiled_cpu_meta,
    made_by,
    quartiles,
    results_folder,
    round_ratio,
    sgd_step,
    timing_arguments,
    warm_up_inductor,
    write_results,
)

import lowbit
from lowbit.app.timing import interleaved_times_ms, median_ms
from lowbit.models import create_model
from lowbit.ops.decompositions import use_inductor_decompositions

CASES = [  # (model, backward decomposed?); None: the fp32 model
    ("fp32", None),
    ("W4A4", False),
    ("W4A4", True),
    ("MetaMix 3-branch", False),
    ("MetaMix 3-branch", True),
]


def case_model(model_name: str, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, small_input=True)
    if model_name != "fp32":
        quantized = {"multi_branch": (2, 4, 8)} if model_name.startswith("MetaMix") else {"a_bits": 4}
        model = lowbit.quantize(model, w_bits=4, **quantized)
        with torch.no_grad():
            model(x)  # LSQ step initialisation from the first batch
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


def measure(model_name: str, backward: bool | None) -> dict:
    """One case, in this process: compile time (s), eager step median (ms)."""
    x, y = batch()
    model = case_model(model_name, x)
    if model_name != "fp32":
        use_inductor_decompositions(True, backward=backward)
    eager = median_ms(sgd_step(model, x, y), "cpu", 3, warmup=1)
    warm_up_inductor()
    compiled = sgd_step(torch.compile(copy.deepcopy(model), fullgraph=True), x, y)
    start = time.perf_counter()
    compiled()
    return {"compile s": time.perf_counter() - start - eager / 1e3, "eager ms": eager}


def _forward(model, x):
    return model(x)


def own_forward(index: int):
    """``_forward`` with a code object of its own: Dynamo keeps compiled graphs per code object, and two cases
    whose models have the same structure would pass each other's guards."""
    code = _forward.__code__.replace(co_name=f"forward_case_{index}")
    return types.FunctionType(code, globals(), code.co_name)


def round_robin_steps(cases: list[tuple[str, bool | None]], repeats: int) -> dict[str, list[float]]:
    """Every case compiled in this process (graph caches off) and its compiled steps timed round-robin."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    x, y = batch()
    steps = {}
    for index, (model_name, backward) in enumerate(cases):
        if model_name != "fp32":
            use_inductor_decompositions(True, backward=backward)
        forward = torch.compile(own_forward(index), fullgraph=True)
        step = sgd_step(case_model(model_name, x), x, y, forward=forward)
        step()  # compiles forward and backward now, under this case's decomposition table
        steps[json.dumps([model_name, backward])] = step
    return interleaved_times_ms(steps, "cpu", repeats, warmup=1)


def in_subprocess(args: list[str], what: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="lowbit_backward_modes_"))
    print(f"  {what} ...", file=sys.stderr)
    command = [sys.executable, os.path.abspath(__file__), *args]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_case(model_name: str, backward: bool | None) -> dict:
    return in_subprocess(["--case", model_name, json.dumps(backward)], f"{model_name}, backward {label(backward)}")


def run_round_robin(cases: list[tuple[str, bool | None]], repeats: int) -> dict[str, list[float]]:
    return in_subprocess(["--round-robin", json.dumps(cases), str(repeats)], "compiled steps, round-robin")


def label(backward: bool | None) -> str:
    return {None: "-", False: "fused", True: "decomposed"}[backward]


def markdown(rows: list[dict], meta: dict) -> str:
    fp32 = rows[0]
    lines = [
        "# Backward ops fused or decomposed under Inductor (MobileNet-v2 32x32, batch 32, cpu)",
        "",
        f"{made_by(meta)}, {meta['note']}. Compile time: each case in its own process with a fresh Inductor cache, "
        "after a small warm-up compile (bench/common.warm_up_inductor): first compiled step minus a median eager "
        f"step. Compiled step: all cases in one more process, {meta['repeats']} round-robin rounds, the median "
        "(quartiles) of the rounds; x fp32 = the median over the rounds of that round's ratio to the fp32 step.",
        "",
        "| model | backward ops | compile s | x fp32 | compiled step ms | quartiles ms | x fp32 | quartiles |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        low, ms, high = quartiles(row["compiled times ms"])
        ratio = round_ratio({"case": row["compiled times ms"], "fp32": fp32["compiled times ms"]}, "case", "fp32")
        lines.append(
            f"| {row['model']} | {label(row['backward'])} | {row['compile s']:.1f} | "
            f"{row['compile s'] / fp32['compile s']:.2f} | {ms:.1f} | {low:.0f}-{high:.0f} | {ratio[1]:.2f} | "
            f"{ratio[0]:.2f}-{ratio[2]:.2f} |"
        )
    return "\n".join([*lines, ""])


def main(argv=None) -> int:
    parser = timing_arguments(__doc__, "1 case pair only (W4A4), 3 rounds", "round-robin rounds of compiled steps")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    cases = CASES[:3] if args.quick else CASES
    meta = compiled_cpu_meta("compare_backward_modes.py", argv, repeats, args.note)
    rows = [{"model": m, "backward": b, **run_case(m, b)} for m, b in cases]
    times = run_round_robin(cases, repeats)
    for row in rows:
        row["compiled times ms"] = times[json.dumps([row["model"], row["backward"]])]
    text = markdown(rows, meta)
    print(text)
    out = results_folder(args)
    if out:
        write_results(out, "backward_modes_cpu", text, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--case"]:
        print(json.dumps(measure(sys.argv[2], json.loads(sys.argv[3]))))
        sys.exit(0)
    if sys.argv[1:2] == ["--round-robin"]:
        cases = [tuple(case) for case in json.loads(sys.argv[2])]
        print(json.dumps(round_robin_steps(cases, int(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
