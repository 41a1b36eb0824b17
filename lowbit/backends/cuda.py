"""The CUDA backend: ``lowbit._C.cuda``, the kernels in ``csrc/cuda`` (built only with a CUDA toolkit and a CUDA
torch). Its launchers check the values in C++ (a host copy of step/offset/probs, once per forward). The packed data
path (packed_gemm, packed_depthwise, quantize_codes, im2col_codes) has no CUDA kernels: the reference's run on CUDA
tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lowbit.backends import Backend, extension, reference

_EXT, _LOAD_ERROR = extension.load()
_CUDA = None if _EXT is None else _EXT.cuda  # None when lowbit._C was built without CUDA


def availability() -> tuple[bool, str]:
    if _EXT is None:
        return False, _LOAD_ERROR
    if _CUDA is None:
        return False, "lowbit._C was built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, f"CUDA kernels on {torch.cuda.get_device_name()}"


def _kernels(cuda) -> SimpleNamespace | None:
    if cuda is None:
        return None
    return SimpleNamespace(
        fake_quant_forward=cuda.fake_quant_forward,
        fake_quant_backward=cuda.fake_quant_backward,
        multi_branch_fake_quant_forward=cuda.multi_branch_fake_quant_forward,
        multi_branch_fake_quant_backward=cuda.multi_branch_fake_quant_backward,
        packed_linear=cuda.packed_linear,
        **vars(reference.PACKED_DATA_PATH),
    )


BACKEND = Backend(name="cuda", devices=("cuda",), availability=availability, kernels=_kernels(_CUDA))
