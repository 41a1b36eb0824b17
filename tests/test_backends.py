"""The backend registry: what is available, how use_backend nests, and that fallback is visible."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import lowbit
from lowbit.backends import KERNELS, NAMES, LowbitFallbackWarning, _default_for, backend, status

BACKENDS_MODULE = sys.modules["lowbit.backends"]


def test_required_backends_are_available():
    """CI names the backends it must test (LOWBIT_REQUIRE_BACKENDS); a missing one fails, never skips."""
    required = [n for n in os.environ.get("LOWBIT_REQUIRE_BACKENDS", "reference").split(",") if n]
    missing = {n: status(n).reason for n in required if n not in lowbit.backends()}
    assert not missing, f"required backends unavailable: {missing}"


def test_every_backend_reports_a_reason():
    for name in ("reference", "cpu", "triton", "cuda"):
        st = status(name)
        assert isinstance(st.available, bool) and st.reason, name


def test_use_backend_nests_and_restores():
    from lowbit.backends import current

    assert current() is None
    with lowbit.use_backend("reference"):
        assert current() == "reference"
        with lowbit.use_backend("cpu"):
            assert current() == "cpu"
        assert current() == "reference"
    assert current() is None


def test_every_available_backend_has_every_kernel():
    """One record per backend, and the kernel names the op files call exist on each available one."""
    for name in NAMES:
        record = backend(name)
        assert record.name == name and record.devices == status(name).devices
        if status(name).available:
            missing = [k for k in KERNELS if not callable(getattr(record.kernels, k, None))]
            assert not missing, f"backend {name!r} lacks kernels {missing}"


def test_select_returns_the_record_of_the_forced_backend():
    from lowbit.backends import select

    with lowbit.use_backend("reference"):
        assert select(torch.device("cpu")) is backend("reference")
    assert select(torch.device("cpu")) is backend("cpu")  # the default for CPU tensors


def test_each_backend_really_runs_its_own_kernel(monkeypatch):
    calls = []
    for name in ("reference", "cpu"):
        kernels = backend(name).kernels
        original = kernels.fake_quant_forward
        monkeypatch.setattr(kernels, "fake_quant_forward", lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    x, step = torch.randn(10), torch.tensor(0.1)
    for name in ("reference", "cpu"):
        with lowbit.use_backend(name):
            lowbit.fake_quant(x, step, 4)
    lowbit.fake_quant(x, step, 4)  # default for CPU tensors: the C++ backend
    assert calls == ["reference", "cpu", "cpu"]


def test_forced_backend_that_cannot_serve_the_device_raises():
    from lowbit.backends import select

    with lowbit.use_backend("cpu"), pytest.raises(ValueError, match="cannot run tensors on cuda"):
        select(torch.device("cuda"))


def test_unavailable_backend_raises_with_its_reason(monkeypatch):
    fake = type(status("cuda"))("cuda", False, "no GPU in this test", ("cuda",))
    monkeypatch.setattr(BACKENDS_MODULE, "status", lambda name: fake if name == "cuda" else status(name))
    with pytest.raises(RuntimeError, match="no GPU in this test"):
        with lowbit.use_backend("cuda"):
            pass


def test_missing_preferred_backend_falls_back_visibly_and_correctly(monkeypatch):
    x, step = torch.randn(100), torch.tensor(0.07)
    want = lowbit.fake_quant(x, step, 3, signed=True)
    broken = type(status("cpu"))("cpu", False, "extension not built (test)", ("cpu",))
    monkeypatch.setattr(BACKENDS_MODULE, "status", lambda name: broken if name == "cpu" else status(name))
    _default_for.cache_clear()
    try:
        with pytest.warns(LowbitFallbackWarning, match=r"extension not built \(test\).*'reference'"):
            got = lowbit.fake_quant(x, step, 3, signed=True)
    finally:
        _default_for.cache_clear()
    assert torch.equal(got, want)


def test_lowbit_info_lists_every_backend():
    from importlib.metadata import entry_points

    assert any(ep.value == "lowbit.app.cli:main" for ep in entry_points(group="console_scripts", name="lowbit"))
    out = subprocess.run([sys.executable, "-m", "lowbit.app.cli", "info"], capture_output=True, text=True, check=True)
    out = out.stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert ("unavailable" in line) != (name in lowbit.backends()), line
    assert "lowbit kernels use:" in out


def test_lowbit_info_json_agrees_with_backends():
    from lowbit.app.cli import info_dict

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = info_dict()
    assert [b["name"] for b in info["backends"] if b["available"]] == lowbit.backends()
