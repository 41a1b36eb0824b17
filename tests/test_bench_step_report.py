"""bench/bench_step.py's report: each step ratio is the median over the rounds of that round's ratio (not the ratio
of the medians), with its quartiles; compile-time ratios are single values; verdicts against issue 16's limits."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

# bench_step points Inductor at a fresh cache folder when imported (for its own timed compiles); keep this test
# process's setting as it was.
_cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
import bench_step  # noqa: E402
import common  # noqa: E402

if _cache_dir is None:
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)

VARIANTS = ["fp32", "composition LSQ", "lowbit"]
BREAKDOWN = {"kernels": 3, "kernel lines": 300, "tracing": 1.0, "Inductor codegen": 2.0, "waiting on C++": 3.0}
META = {
    "note": "test",
    "repeats": 3,
    "command": "python bench/bench_step.py",
    "device_name": "cpu",
    "isa": "test",
    "threads": 2,
    "torch": "test",
    "warm-up compile s": 1.0,
}


def _times(lowbit_compiled: list[float]) -> dict[str, list[float]]:
    times = {f"{name} {mode}": [100.0, 100.0, 100.0] for name in VARIANTS for mode in ("eager", "compiled")}
    times["lowbit compiled"] = lowbit_compiled
    times["fp32 compiled"] = [10.0, 40.0, 30.0]
    return times


def test_step_ratio_is_the_median_of_the_rounds_ratios():
    times = _times([10.0, 20.0, 90.0])  # per round: 1, 0.5, 3 -> median 1.0; ratio of medians 20/30 would be 0.67
    low, mid, high = common.round_ratio(times, "lowbit compiled", "fp32 compiled")
    assert mid == pytest.approx(1.0)
    assert (low, high) == pytest.approx((0.75, 2.0))


COMPILE_S = {"fp32": 10.0, "composition LSQ": 15.0, "lowbit": 12.0}


def test_checks_cover_the_measured_variants_only():
    checks = bench_step.ratio_checks(_times([10.0, 20.0, 90.0]), COMPILE_S)
    targets = [check["target"] for check in checks]
    assert targets == [
        "lowbit compiled / composition LSQ compiled",
        "lowbit compiled / fp32 compiled",
        "lowbit eager / fp32 eager",
        "compile time lowbit / fp32",
    ]
    compile_check = checks[-1]
    assert compile_check["quartiles"] == pytest.approx([1.2, 1.2, 1.2]) and compile_check["limit"] == 1.2


@pytest.mark.parametrize(("lowbit_compiled", "verdict"), [([10.5, 42.0, 31.5], "met"), ([10.6, 42.4, 31.8], "missed")])
def test_verdict_against_the_limit(lowbit_compiled, verdict):
    times = _times(lowbit_compiled)  # ratio 1.05 in every round (the limit) or 1.06
    compile_s = COMPILE_S
    table = {
        "step_ms": {name: sorted(t)[1] for name, t in times.items()},
        "step_times_ms": times,
        "compile_s": compile_s,
        "compile_breakdown": dict.fromkeys(compile_s, BREAKDOWN),
        "targets": bench_step.ratio_checks(times, compile_s),
    }
    text = bench_step.markdown({"model": table}, META)
    row = next(line for line in text.splitlines() if line.startswith("| lowbit compiled / fp32 compiled |"))
    assert row.endswith(f"| <= 1.05 | {verdict} |")
    assert "| compile time lowbit / fp32 | 1.20 | one value | <= 1.2 | met |" in text
