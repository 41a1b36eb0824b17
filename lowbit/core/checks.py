"""Argument checks shared by every public op (SPEC section 6).

Each check raises ``TypeError`` or ``ValueError`` naming the argument and what was expected. They run in the
public Python wrappers, before any backend is chosen, and only read tensor metadata, so ``torch.compile`` traces
them without graph breaks. Checks that must read tensor *values* (a step must be positive and finite) live in
``step_values`` and run inside the op implementation, where no tracer sees them.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BITS, MAX_BITS = 2, 8


def float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {value.dtype}")


def bits(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in {MIN_BITS}..{MAX_BITS}, got {type(value).__name__}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, got {value}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def same_device(name: str, value: torch.Tensor, x: torch.Tensor) -> None:
    if value.device != x.device:
        raise ValueError(f"{name} must be on the same device as x ({x.device}), got {value.device}")


def axis(value, ndim: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"axis must be an int or None, got {type(value).__name__}")
    if not -ndim <= value < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim}) for x with {ndim} dims, got {value}")
    return value % ndim


def grad_scale(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"grad_scale must be a float or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"grad_scale must be positive and finite, got {value}")
    return float(value)


def clip(value) -> tuple[float, float] | None:
    """A hardtanh range ``(lo, hi)`` folded in front of a quantizer, or None; lo < hi, no NaN (inf allowed)."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"clip must be a (lo, hi) pair or None, got {type(value).__name__}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise TypeError(f"clip must hold two floats, got {tuple(type(v).__name__ for v in value)}")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise ValueError(f"clip must have lo < hi (and no NaN), got {value}")
    return lo, hi


def step_values(name: str, step: torch.Tensor) -> None:
    """Values check; reads the (small) step tensor, which costs a device sync on GPU."""
    if step.numel() and not bool(torch.all(torch.isfinite(step) & (step > 0))):
        flat = step.detach().flatten()
        bad = torch.nonzero(~(torch.isfinite(flat) & (flat > 0))).flatten()[:8].tolist()
        raise ValueError(f"{name} must be positive and finite, got {[flat[i].item() for i in bad]} at {bad}")


def finite_values(name: str, value: torch.Tensor) -> None:
    if value.numel() and not bool(torch.all(torch.isfinite(value))):
        raise ValueError(f"{name} must be finite, got {value.detach().flatten()[:8].tolist()}")


MAX_BRANCHES = MAX_BITS - MIN_BITS + 1


def bit_list(name: str, value) -> list[int]:
    """A non-empty sequence of distinct bit-widths (one per branch)."""
    if isinstance(value, torch.Tensor) or not hasattr(value, "__iter__") or isinstance(value, str):
        raise TypeError(f"{name} must be a sequence of ints in {MIN_BITS}..{MAX_BITS}, got {type(value).__name__}")
    values = [bits(f"{name}[{i}]", b) for i, b in enumerate(value)]
    if not values:
        raise ValueError(f"{name} must name at least one bit-width, got an empty sequence")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a bit-width, got {values}")
    return values


def branch_vector(name: str, value, x: torch.Tensor, branches: int) -> torch.Tensor:
    """A float tensor with one entry per branch on x's device, returned as float32 of shape (branches,)."""
    float_tensor(name, value)
    same_device(name, value, x)
    if value.numel() != branches:
        raise ValueError(f"{name} must have one entry per branch ({branches}), got shape {tuple(value.shape)}")
    return value.reshape(-1).float()
