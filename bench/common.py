"""What every benchmark script shares: where results go, how they are written, and the machine's name."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_name() -> str:
    from lowbit.app.cli import _cpu_description

    return _cpu_description()["model"] or platform.processor()


def write_results(folder: str, stem: str, markdown: str, data: dict) -> None:
    """``folder/stem.md`` (the table a human reads, linked from the README) and ``folder/stem.json`` (the data)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, stem)
    with open(path + ".md", "w") as f:
        f.write(markdown)
    with open(path + ".json", "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}.md and .json", file=sys.stderr)


def write_study(folder: str, stem: str, result: dict, plot, markdown) -> None:
    """A method study's ``stem.json`` (every run), and once it has seeds ``stem_frontier.png`` and ``stem.md``."""
    result["figure"] = f"{stem}_frontier.png"
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    if result["seeds"]:
        plot(result, os.path.join(folder, result["figure"]))
        with open(os.path.join(folder, f"{stem}.md"), "w") as f:
            f.write(markdown(result))


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
