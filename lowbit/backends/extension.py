"""Loads the compiled extension ``lowbit._C`` once and remembers why it could not be loaded."""

from __future__ import annotations

import functools


@functools.cache
def load() -> tuple[object | None, str]:
    """Returns (module, "") on success or (None, reason)."""
    try:
        from lowbit import _C  # noqa: F401  (importing registers the lowbit_C ops)
    except ImportError as exc:
        return (
            None,
            f"compiled extension lowbit._C did not import ({exc}); reinstall with pip install --no-build-isolation .",
        )
    return _C, ""


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``lowbit_C::<op>`` has a kernel for ``dispatch_key`` (e.g. "CPU", "CUDA")."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lowbit_C::{op}", dispatch_key)
