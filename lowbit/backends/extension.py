"""Loads the compiled extension ``lowbit._C`` once and remembers why it could not be loaded."""

from __future__ import annotations

import functools


@functools.cache
def load() -> tuple[object | None, str]:
    """Returns (module, "") on success or (None, reason). The module holds two submodules of plain functions,
    ``cpu`` and ``cuda`` (None when built without CUDA kernels)."""
    try:
        from lowbit import _C
    except ImportError as exc:
        return (
            None,
            f"compiled extension lowbit._C did not import ({exc}); reinstall with pip install --no-build-isolation .",
        )
    return _C, ""
