"""The ``torch.library`` namespace ``lowbit`` and what every op file shares: declaring an op with its per-device
kernel and fake kernel, and running kernels on permuted dense tensors (channels-last, transposes) without copies.

The ops are declared with ``torch.library.Library`` (schema string + per-device Python kernels) rather than the
``torch.library.custom_op`` decorator: same registrations (fake, autograd), about half the per-call overhead,
which matters for the many small tensors of a real network.
"""

from __future__ import annotations

import math

import torch

from lowbit.backends import select
from lowbit.ops.decompositions import register_inductor_decompositions

Tensor = torch.Tensor

LIB = torch.library.Library("lowbit", "DEF")  # noqa: TOR901  (kept alive for the life of the process)


def define(schema: str, impl, fake):
    """Declares ``lowbit::<schema>`` with ``impl`` for CPU and CUDA tensors and ``fake`` for tracing."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    for key in ("CPU", "CUDA"):
        LIB.impl(name, impl, key)
    torch.library.register_fake(f"lowbit::{name}", _tracing(fake), lib=LIB)
    return name


def _tracing(fake):
    """The fake kernel, which runs whenever a graph holding the op is traced: it also hands Inductor the op's
    aten decomposition (lowbit.decompositions), so a compiled graph fuses the op with its neighbours."""

    def run(*args):
        register_inductor_decompositions()
        return fake(*args)

    return run


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)  # Parameter: a weight quantizer's input; no dispatch of its own


def plain_eager(x: Tensor) -> bool:
    """Whether an op call on x may run its kernel directly instead of through the dispatcher.

    The dispatcher round trip (the custom op's autograd and Python kernels) costs about 40 us a call, which is
    most of a quantizer's time on the small tensors of a network. It is needed only when something watches the
    call: torch.compile tracing, a dispatch mode (FakeTensorMode, FlopCounterMode), a tensor subclass or a device
    without a kernel (meta). Then, and in every other case, the op goes through ``torch.ops.lowbit``.
    """
    return (
        type(x) in _PLAIN_TYPES
        and x.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


def memory_order(x: Tensor) -> list[int] | None:
    """The dims of x from outermost to innermost in memory when x is a permuted dense tensor (channels-last, a
    transpose), so the kernels can run on ``x.permute(order)`` without a copy; None when x is contiguous."""
    if x.is_contiguous():
        return None
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return order if x.permute(order).is_contiguous() else None


def in_memory_order(t: Tensor, order: list[int] | None) -> Tensor:
    return t.contiguous() if order is None else t.permute(order).contiguous()  # no copy when t is laid out so


def in_logical_order(t: Tensor, order: list[int] | None) -> Tensor:
    return t if order is None else t.permute(sorted(range(len(order)), key=order.__getitem__))


def takes_fused_clip(x: Tensor) -> bool:
    """Whether a quantizer call on x can run its clip inside the kernel: plain eager mode (``plain_eager``) on the
    C++ CPU backend, the only one whose kernels take the clip (the others apply hardtanh first)."""
    return plain_eager(x) and select(x.device).name == "cpu"


def clip_arguments(lo: float, hi: float) -> dict:
    """The C++ kernels' clip keywords (a hardtanh folded in front of the quantizer); none at all for the default,
    which every backend takes."""
    return {} if (lo, hi) == (-math.inf, math.inf) else {"clip_lo": lo, "clip_hi": hi}


def inner_size(x: Tensor, channels: int, axis: int) -> int:
    """Elements after ``axis`` in x: the stride of the channel index when x is viewed as (outer, C, inner)."""
    return math.prod(x.shape[axis + 1 :]) if channels > 1 else 1
