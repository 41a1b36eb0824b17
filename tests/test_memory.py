"""The fused backward allocates its outputs and nothing element-sized besides (measured with the profiler's
allocator accounting; the per-task partial sums are a few doubles per 32K elements, off the torch allocator)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lowbit

CASES = {
    "per-tensor": ((64, 32, 28, 28), None),
    "per-channel rows": ((64, 32, 28, 28), 1),
    "per-channel interleaved": ((4096, 3, 8), 1),
}


def _allocated_bytes(fn, op_name: str) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key == op_name]
    assert events, f"{op_name} did not run"
    return events[0].cpu_memory_usage


@pytest.mark.parametrize("case", list(CASES))
def test_fake_quant_backward_allocates_only_its_outputs(case):
    shape, axis = CASES[case]
    x = torch.randn(shape)
    channels = 1 if axis is None else shape[axis]
    step = torch.full((channels,), 0.1)
    with lowbit.use_backend("cpu"):
        used = _allocated_bytes(
            lambda: torch.ops.lowbit.fake_quant_backward(x, x, step, None, 4, False, axis or 0, 0.1),
            "lowbit::fake_quant_backward",
        )
    outputs = x.numel() * x.element_size() + 2 * channels * 4  # dx, dstep, doffset
    assert outputs <= used <= 1.1 * outputs, (used, outputs)


def test_multi_branch_backward_allocates_only_its_outputs():
    x = torch.randn(64, 32, 28, 28)
    steps, probs = torch.tensor([0.5, 0.1, 0.01]), torch.full((3,), 1 / 3)
    with lowbit.use_backend("cpu"):
        used = _allocated_bytes(
            lambda: torch.ops.lowbit.multi_branch_fake_quant_backward(x, x, steps, probs, [2, 4, 8], False, [0.1] * 3),
            "lowbit::multi_branch_fake_quant_backward",
        )
    assert x.numel() * x.element_size() <= used <= 1.1 * x.numel() * x.element_size() + 64, used
