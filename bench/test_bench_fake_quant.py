"""pytest-benchmark twin of bench_fake_quant.py: `pytest bench --benchmark-only` (or `make bench`).

Forward + backward of every implementation on the fp32 activation case, grouped so pytest-benchmark prints
them side by side.
"""

from __future__ import annotations

import pytest
import torch
from bench_fake_quant import FULL_CASES, PEERS, implementations

CASE = FULL_CASES[0]
IMPLS = implementations(torch.device("cpu"))


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(CASE.shape, generator=gen).requires_grad_(True)
    step = torch.full((1,), 0.1, requires_grad=True)
    return x, step, torch.randn(CASE.shape, generator=gen)


@pytest.mark.benchmark(group=CASE.name)
@pytest.mark.parametrize("name", list(IMPLS))
def test_forward_backward(benchmark, tensors, name):
    x, step, g = tensors

    def run():
        x.grad = step.grad = None
        IMPLS[name](x, step, CASE).backward(g)

    if name in PEERS:  # as bench_fake_quant.time_case: a peer that cannot run the case reads n/a, with the reason
        try:
            run()
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            pytest.skip(f"{name}: {str(exc).splitlines()[0]}")
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    assert torch.isfinite(x.grad).all()
    if name not in PEERS:  # a peer learns its own step (a module parameter), not this tensor
        assert torch.isfinite(step.grad).all()


@pytest.mark.benchmark(group=CASE.name)
def test_memory_floor_clone(benchmark, tensors):
    x, _, _ = tensors
    benchmark.pedantic(lambda: x.detach().clone(), rounds=10, warmup_rounds=2)
