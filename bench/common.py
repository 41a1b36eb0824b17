"""What every benchmark script shares: where results go, how they are written and the command they came from."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHARED_MACHINE = "shared machine, other jobs running"


def timing_arguments(
    doc: str,
    quick: str,
    repeats: str = "timed repeats per implementation",
    note: str | None = SHARED_MACHINE,
    device: bool = False,
    threads: bool = False,
) -> argparse.ArgumentParser:
    """A timing benchmark's parser with the options they share: --quick (doing what ``quick`` says), --repeats,
    --out, --note (its default ``note``; none when None), and when asked --device and --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if device:
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--repeats", type=int, default=None, help=repeats)
    parser.add_argument("--out", default=None, help="folder for the .md and .json results")
    if note is not None:
        parser.add_argument("--note", default=note, help="load state for the report (free text)")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    return parser


def results_folder(args: argparse.Namespace) -> str | None:
    """Where a run writes its tables: --out, else bench/results; a --quick run (a smoke run) writes nothing."""
    return args.out or (None if args.quick else RESULTS)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command a report says it came from: ``python bench/<script> ARGS``. ``argv`` None means this process's
    own arguments (the script was run directly); a list, even an empty one, is what ``lowbit bench`` passed."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{script}", *map(shlex.quote, args)])


def sgd_step(model, x, y, forward=None):
    """One training step of ``model`` on the fixed batch ``(x, y)`` as a callable: forward (``forward(model, x)``
    when given, e.g. a compiled function), cross-entropy, backward and an SGD update with momentum 0.9 (the step
    every training benchmark times)."""
    import torch
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(model, x) if forward else model(x), y).backward()
        opt.step()

    return step


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); all three the value itself for a single value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, mid, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, mid, high


def round_ratio(times: dict, a: str, b: str) -> tuple[float, float, float]:
    """Quartiles over the round-robin rounds of (time ``a`` / time ``b`` of the same round)."""
    return quartiles([ta / tb for ta, tb in zip(times[a], times[b], strict=True)])


def warm_up_inductor() -> None:
    """Compiles and runs a small conv / batch-norm / ReLU training step once, so that a compile timed after it
    does not also pay what Inductor does once per process and cache folder (starting the compile workers,
    building the precompiled header of its C++ kernels; bench_step.py reports how long it took). Otherwise the
    first model compiled, the fp32 one, carries that time and every compile-time ratio to it comes out too low."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    sgd_step(torch.compile(model), torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))()


def replace_modules(model, kinds: tuple[type, ...], make):
    """``model`` with every submodule that is an instance of ``kinds`` replaced by ``make(submodule)``, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kinds):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(module))
    return model


def number_table(first: str, cols: list[str], rows: dict[str, list[str]]) -> list[str]:
    """The lines of a markdown table: a ``first`` column of row names, then right-aligned ``cols``."""
    lines = [f"| {first} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    return lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


def compiled_cpu_meta(script: str, argv: list[str] | None, repeats: int, note: str) -> dict:
    """What a report of compiled CPU runs says about how it was made: the CPU, lowbit's and Inductor's ISA paths,
    threads, torch, repeats, the note and the command."""
    import torch

    from lowbit.app.machine import cpu_name
    from lowbit.backends import status

    return {
        "device_name": cpu_name(),
        "isa": f"lowbit {status('cpu').reason}; Inductor C++ {torch.backends.cpu.get_cpu_capability()}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "note": note,
        "command": command_line(script, argv),
    }


def made_by(meta: dict) -> str:
    """How a table was made, as its report says first: "`command` on <machine> (<isa>), N threads, torch X"."""
    isa = f" ({meta['isa']})" if "isa" in meta else ""
    return f"`{meta['command']}` on {meta['device_name']}{isa}, {meta['threads']} threads, torch {meta['torch']}"


def write_results(folder: str, stem: str, markdown: str, data: dict) -> None:
    """``folder/stem.md`` (the table a human reads, linked from the README) and ``folder/stem.json`` (the data)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, stem)
    with open(path + ".md", "w") as f:
        f.write(markdown)
    with open(path + ".json", "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}.md and .json", file=sys.stderr)


def write_study(args, prefix: str, result: dict, plot, markdown) -> None:
    """A method study's ``stem.json`` (every run), and once it has seeds ``stem_frontier.png`` and ``stem.md``, in
    ``args.out``; the stem is ``<prefix>_<data><tag>``, with ``_quick`` for a smoke run."""
    folder, stem = args.out, f"{prefix}_{args.data}{args.tag}" + ("_quick" if args.quick else "")
    result["figure"] = f"{stem}_frontier.png"
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    if result["seeds"]:
        plot(result, os.path.join(folder, result["figure"]))
        with open(os.path.join(folder, f"{stem}.md"), "w") as f:
            f.write(markdown(result))


def run_seeds(result: dict, seeds: list[int], one_seed, write) -> None:
    """A study's runs: ``one_seed(seed)`` appended to ``result["seeds"]`` for each seed, and ``write(result)`` after
    every one, so that a long run cut short keeps the seeds it finished."""
    start = time.perf_counter()
    for seed in seeds:
        result["seeds"].append(one_seed(seed))
        result["seconds"] = time.perf_counter() - start
        write(result)
    print(f"done in {result['seconds'] / 60:.1f} min", flush=True)


def figure(figsize: tuple[float, float]):
    """A matplotlib figure drawn off-screen (the Agg canvas: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_mean(ax, costs: list[float], top1s: list[float], **style) -> None:
    """One method of a study on ``ax``: its mean cost against its mean top-1, the std over seeds as error bar."""
    from lowbit.app.frontier import mean_std

    top1, std = mean_std(top1s)
    ax.errorbar(mean_std(costs)[0], top1, yerr=std, capsize=2, **style)


def finish_axes(ax, xlabel: str, title: str) -> None:
    """The look every study plot shares: a log cost axis, a light grid and a small legend."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def plot_uniform(ax, names: list[str], xs: list[float], ys: list[tuple[float, float]], label: str) -> None:
    """A study's uniform frontier on ``ax``: mean top-1 with its std as error bars at each cost, each point named."""
    ax.errorbar(xs, [m for m, _ in ys], yerr=[e for _, e in ys], fmt="s-", color="grey", capsize=3, label=label)
    for name, x, (y, _) in zip(names, xs, ys, strict=True):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)


def is_lowbit(name: str) -> bool:
    """A row timing lowbit's own implementation. Its failure is a bug: it propagates and the benchmark exits
    non-zero. Only PyTorch's ops and the peers (absent or unable to run a case) may read "n/a" with the reason."""
    return name.startswith("lowbit")


def speedup(baseline: float | None, ms: float, digits: int = 1) -> str:
    """``baseline / ms`` as "3.2x" (above 1: faster than the baseline), or "n/a" when the baseline did not run."""
    return f"{baseline / ms:.{digits}f}x" if baseline else "n/a"


def cpu_clock_median_ms(fns: dict, repeats: int, warmup: int = 0) -> dict[str, float]:
    """Median process CPU time (all threads) per call in ms, round-robin over ``fns`` after ``warmup`` rounds: on a
    machine shared with other jobs it counts the work done rather than the share of the cores this process got."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append((time.process_time() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
