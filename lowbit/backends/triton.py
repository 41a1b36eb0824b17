"""The Triton backend: kernels in ``lowbit.kernels`` (the repository's ``kernels/`` folder).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first imported
(the Triton interpreter; how CI tests these kernels without a GPU). The launchers below check the values (with the
reference's checks: a device synchronisation on a GPU, once per forward) and call the kernels' own launchers; the
packed data path (packed_gemm, packed_depthwise, quantize_codes, im2col_codes) has no Triton kernels: the
reference's run.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import torch

from lowbit.backends import Backend, reference

DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def availability() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if "cpu" in DEVICES:
        return True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the interpreter on CPU)"
    return True, f"Triton kernels on {torch.cuda.get_device_name()}"


def fake_quant_forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    from lowbit.kernels import fake_quant

    reference.check_fake_quant_values(step, offset)
    return fake_quant.forward(x, step, offset, qmin, qmax, inner)


def fake_quant_backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    from lowbit.kernels import fake_quant

    return fake_quant.backward(grad, x, step, offset, qmin, qmax, inner, grad_scale)


def multi_branch_fake_quant_forward(x, steps, probs, qmin: list[int], qmax: list[int]) -> torch.Tensor:
    from lowbit.kernels import multi_branch_fake_quant

    reference.check_multi_branch_values(steps, probs)
    return multi_branch_fake_quant.forward(x, steps, probs, qmin, qmax)


def multi_branch_fake_quant_backward(grad, x, steps, probs, qmin: list[int], qmax: list[int], grad_scale: list[float]):
    from lowbit.kernels import multi_branch_fake_quant

    return multi_branch_fake_quant.backward(grad, x, steps, probs, qmin, qmax, grad_scale)


def packed_linear(x, packed_w, w_scale, w_bits: int, x_step, qmin: int, qmax: int, bias) -> torch.Tensor:
    from lowbit.kernels import packed_linear

    reference.check_packed_linear_values(x_step, w_scale)
    return packed_linear.forward(x, packed_w, w_scale, w_bits, x_step, qmin, qmax, bias)


BACKEND = Backend(
    name="triton",
    devices=DEVICES,
    availability=availability,
    kernels=SimpleNamespace(
        fake_quant_forward=fake_quant_forward,
        fake_quant_backward=fake_quant_backward,
        multi_branch_fake_quant_forward=multi_branch_fake_quant_forward,
        multi_branch_fake_quant_backward=multi_branch_fake_quant_backward,
        packed_linear=packed_linear,
        **vars(reference.PACKED_DATA_PATH),
    ),
)
