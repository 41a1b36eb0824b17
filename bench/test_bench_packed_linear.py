"""pytest-benchmark twin of bench_packed_linear.py: `pytest bench --benchmark-only` (or `make bench`).

Every implementation on the W4A8 GEMV shape (M=1, K=N=4096) and one GEMM shape (M=256, K=N=1024), grouped so
pytest-benchmark prints them side by side.
"""

from __future__ import annotations

import pytest
import torch
from bench_packed_linear import candidates

SHAPES = [(1, 4096), (256, 1024)]
CANDIDATES = {shape: candidates(*shape, torch.device("cpu")) for shape in SHAPES}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}")
@pytest.mark.parametrize("name", list(CANDIDATES[SHAPES[0]]))
def test_packed_linear(benchmark, shape, name):
    benchmark.group = f"packed linear M={shape[0]} K=N={shape[1]}"
    out = benchmark.pedantic(CANDIDATES[shape][name], rounds=10, warmup_rounds=2)
    out = out[0] if isinstance(out, list) else out  # ONNX Runtime returns its list of outputs
    assert out.shape[-1] == shape[1]
