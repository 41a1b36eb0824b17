"""Benchmarks fail loudly when lowbit's own implementation raises; only PyTorch's ops and peers may read "n/a"."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_fake_quant as bfq  # noqa: E402
from common import is_lowbit  # noqa: E402

CASE = bfq.Case("tiny", (4, 8), torch.float32, False)


def _raises(x, step, case):
    raise RuntimeError("kernel exploded")


def _works(x, step, case):
    return bfq.composition_lsq(x, step, case)


def test_lowbit_rows_are_recognised():
    assert is_lowbit("lowbit cpu (avx2)") and is_lowbit("lowbit compiled") and is_lowbit("lowbit triton")
    assert not is_lowbit("torch learnable") and not is_lowbit("Brevitas QuantIdentity")


def test_a_failing_peer_reads_n_a_with_the_reason(capsys):
    bfq.time_case(CASE, {"composition LSQ": _works, "Brevitas QuantIdentity": _raises}, {}, "cpu", 1)
    assert "Brevitas QuantIdentity: n/a (kernel exploded)" in capsys.readouterr().err


def test_a_failing_lowbit_implementation_fails_the_benchmark():
    with pytest.raises(RuntimeError, match="kernel exploded"):
        bfq.time_case(CASE, {"composition LSQ": _works, "lowbit cpu (avx2)": _raises}, {}, "cpu", 1)
