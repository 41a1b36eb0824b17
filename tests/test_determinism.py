"""Determinism: every backend gives bit-identical results run to run under
``torch.use_deterministic_algorithms(True)``, and the C++ CPU kernels also across thread counts (their work split
depends on the shape only; partial sums are folded in a fixed order)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import lowbit
from lowbit.core.packing import gemm_panel


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(8, 16, 13, 11, generator=gen) * 3).to(DEVICE)
    grad = torch.randn(x.shape, generator=gen).to(DEVICE)
    return x, grad


def _fake_quant_run(per_channel: bool):
    x, grad = _inputs()
    x.requires_grad_(True)
    step = torch.full((16,) if per_channel else (1,), 0.37, device=DEVICE, requires_grad=True)
    y = lowbit.fake_quant(x, step, 4, signed=True, axis=1 if per_channel else None)
    y.backward(grad)
    return [y.detach(), x.grad, step.grad]


def _multi_branch_run():
    x, grad = _inputs(1)
    x.requires_grad_(True)
    steps = torch.tensor([0.9, 0.2, 0.013], device=DEVICE, requires_grad=True)
    probs = torch.tensor([0.2, 0.5, 0.3], device=DEVICE, requires_grad=True)
    y = lowbit.multi_branch_fake_quant(x, steps, probs, [2, 4, 8], signed=True)
    y.backward(grad)
    return [y.detach(), x.grad, steps.grad, probs.grad]


def _packed_linear_run():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(19, 301, generator=gen).to(DEVICE)
    codes = torch.randint(-8, 8, (37, 301), generator=gen, dtype=torch.int8)
    packed = lowbit.pack(codes, 4).to(DEVICE)
    scale = (torch.rand(37, generator=gen) + 0.1).to(DEVICE)
    bias = torch.randn(37, generator=gen).to(DEVICE)
    return [lowbit.packed_linear(x, packed, scale, 4, torch.tensor([0.05], device=DEVICE), 8, x_signed=True, bias=bias)]


def _packed_data_path_run():
    """The integer data path's CPU kernels at sizes that split into parallel tasks (panel GEMM, patch GEMM,
    depthwise); other devices run the reference."""
    if DEVICE.type != "cpu":
        return []
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (70, 577), generator=gen, dtype=torch.int8)
    scale, bias = torch.rand(70, generator=gen) * 0.01, torch.randn(70, generator=gen)
    epi = (0.0, 6.0, 0.05, 0, 255)
    x = torch.randint(0, 256, (300, 577), generator=gen, dtype=torch.uint8)
    gemm = torch.ops.lowbit.packed_gemm(x, lowbit.pack(codes, 4), scale, bias, 4, 1.0, 0, 255, *epi,
                                        panel=gemm_panel(codes))  # fmt: skip
    pixels = torch.randint(-128, 128, (2, 20, 20, 64), generator=gen, dtype=torch.int8)
    conv_codes = codes[:, : 9 * 64].contiguous()
    conv = torch.ops.lowbit.packed_patches_gemm(
        pixels, lowbit.pack(conv_codes, 4), scale, bias, 4, [3, 3], [1, 1], [1, 1], [1, 1], *epi,
        panel=gemm_panel(conv_codes),
    )  # fmt: skip
    taps = torch.randint(-8, 8, (9, 64), generator=gen, dtype=torch.int8)
    dw = torch.ops.lowbit.packed_depthwise(pixels, taps, scale[:64], bias[:64], [3, 3], [1, 1], [1, 1], [1, 1], *epi)
    return [gemm, conv, dw]


RUNS = {
    "packed_data_path": _packed_data_path_run,
    "fake_quant_per_tensor": lambda: _fake_quant_run(False),
    "fake_quant_per_channel": lambda: _fake_quant_run(True),
    "multi_branch": _multi_branch_run,
    "packed_linear": _packed_linear_run,
}


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (so -0.0 and +0.0 differ and NaN equals the same NaN)."""
    return t.contiguous().view(_SAME_WIDTH_INT[t.dtype]) if t.dtype in _SAME_WIDTH_INT else t


def _assert_bitwise_equal(first, second):
    for a, b in zip(first, second, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("op", sorted(RUNS))
def test_run_to_run_bit_identical(backend, deterministic, op):
    first = RUNS[op]()
    for _ in range(2):
        _assert_bitwise_equal(first, RUNS[op]())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="thread counts apply to the C++ CPU backend")
@pytest.mark.parametrize("op", sorted(RUNS))
def test_cpu_results_do_not_depend_on_thread_count(op):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = RUNS[op]()
        torch.set_num_threads(max(threads, 2))
        _assert_bitwise_equal(single, RUNS[op]())
    finally:
        torch.set_num_threads(threads)
