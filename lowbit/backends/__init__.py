"""Backend registry: which implementations exist, which can run here, and which one an op call uses.

Each backend module (``reference``, ``cpu``, ``triton``, ``cuda``) defines one record, ``BACKEND``: a ``Backend``
with its name, the device types it serves, an availability probe that says why not, and ``kernels``, the object
whose attributes are the kernel functions. Every backend's kernels have the same names (``KERNELS``) and arguments.
They take contiguous tensors whose arguments (types, shapes, bits, devices) the public op already checked, and check
the values themselves (step > 0 and finite, offset / probs finite; SPEC section 6) before their kernel runs.

The choice is made per op call from the tensor's device: inside ``use_backend(name)`` that backend is used (an
error if it cannot serve the device), otherwise the fastest available one in ``PREFERENCE``. When the preferred
backend for a device is missing, the fallback is announced once with a ``LowbitFallbackWarning`` that says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

NAMES = ("reference", "cpu", "triton", "cuda")

# The kernel functions every backend's ``kernels`` has; the op files in lowbit/ops call them by these names.
KERNELS = (
    "fake_quant_forward",
    "fake_quant_backward",
    "multi_branch_fake_quant_forward",
    "multi_branch_fake_quant_backward",
    "packed_linear",
    "packed_gemm",
    "packed_depthwise",
    "quantize_codes",
    "im2col_codes",
    "packed_patches_gemm",
)

# Fastest first. Triton on CPU tensors only exists in interpreter mode (a test tool, slower than the
# reference), so it is never picked for CPU by default; ask for it with use_backend("triton").
PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


class LowbitFallbackWarning(UserWarning):
    """The preferred backend for a device is unavailable and a slower one is used instead."""


@dataclass(frozen=True)
class Backend:
    """One backend: what it is called, which device types it serves, whether it can run here (and why not), and
    its kernel functions (``kernels.fake_quant_forward(...)``; None when it cannot run)."""

    name: str
    devices: tuple[str, ...]
    availability: Callable[[], tuple[bool, str]]
    kernels: object


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str
    devices: tuple[str, ...]


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("lowbit_backend", default=None)


@functools.cache
def backend(name: str) -> Backend:
    """The record of backend ``name`` (its module is imported on first use)."""
    if name not in NAMES:
        raise ValueError(f"backend name must be one of {', '.join(NAMES)}; got {name!r}")
    return importlib.import_module(f"lowbit.backends.{name}").BACKEND


@functools.cache
def status(name: str) -> BackendStatus:
    record = backend(name)
    try:
        available, reason = record.availability()
    except Exception as exc:  # an availability probe must never take the package down
        available, reason = False, f"availability check failed: {type(exc).__name__}: {exc}"
    return BackendStatus(name, available, reason, record.devices)


def backends() -> list[str]:
    """Names of the backends that can run in this process now."""
    return [name for name in NAMES if status(name).available]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the lowbit ops inside the ``with`` block on backend ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a backend name (str), got {type(name).__name__}")
    st = status(name)
    if not st.available:
        raise RuntimeError(f"backend {name!r} is not available: {st.reason}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def current() -> str | None:
    """The backend forced by an enclosing ``use_backend``, or None."""
    return _forced.get()


def select(device: torch.device) -> Backend:
    """The backend that runs an op on tensors of ``device``; the op calls ``select(x.device).kernels.<kernel>``."""
    forced = _forced.get()
    if forced is not None:
        if device.type not in status(forced).devices:
            raise ValueError(
                f"backend {forced!r} cannot run tensors on {device.type}; it serves {', '.join(status(forced).devices)}"
            )
        return backend(forced)
    return backend(_default_for(device.type))


@functools.cache
def _default_for(device_type: str) -> str:
    preference = PREFERENCE.get(device_type, ("reference",))
    for name in preference:
        if status(name).available and device_type in status(name).devices:
            if name != preference[0]:
                why = status(preference[0]).reason
                warnings.warn(
                    f"lowbit: backend {preference[0]!r} is unavailable ({why}); "
                    f"using {name!r} for {device_type} tensors",
                    LowbitFallbackWarning,
                    stacklevel=3,
                )
            return name
    raise RuntimeError(f"no lowbit backend can run tensors on {device_type}")
