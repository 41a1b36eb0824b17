"""lowbit: fused low-bit quantization kernels for PyTorch, and the methods built on them.

Public ops (SPEC section 5): ``fake_quant``, ``multi_branch_fake_quant``; backend control: ``backends``, ``use_backend``.
"""

from lowbit.backends import LowbitFallbackWarning, backends, use_backend
from lowbit.ops import fake_quant, multi_branch_fake_quant, quant_range

__version__ = "0.1.0"

__all__ = [
    "LowbitFallbackWarning",
    "backends",
    "fake_quant",
    "multi_branch_fake_quant",
    "quant_range",
    "use_backend",
    "__version__",
]
