"""lowbit: fused low-bit quantization kernels for PyTorch, and the methods built on them.

Public ops (SPEC section 5): ``fake_quant``, ``multi_branch_fake_quant``, ``pack``, ``unpack``,
``packed_linear``; backend control: ``backends``, ``use_backend``. Model tools: ``quantize``, ``swap_fused``,
``bops``, ``convert``, ``save``, ``load`` (converted models), ``save_model``, ``load_model`` (float and
fake-quant models); layers in ``lowbit.nn``, models in ``lowbit.models``; the methods
in ``lowbit.mixquant`` and ``lowbit.metamix``.
"""

from lowbit import metamix, mixquant
from lowbit.backends import LowbitFallbackWarning, backends, use_backend
from lowbit.core.moved import install as install_moved_paths
from lowbit.ops import fake_quant, multi_branch_fake_quant, quant_range
from lowbit.ops.packed_linear import pack, packed_linear, unpack
from lowbit.tools.bops import bops  # noqa: I001  (after the ops: the layers need them)
from lowbit.tools.convert import convert
from lowbit.tools.fold import fold_activation_clips, unfold_activation_clips
from lowbit.tools.quantize import quantize, register_fake_quant, swap_fused
from lowbit.tools.serialization import load, load_model, save, save_model

__version__ = "0.1.0"

# old module paths (lowbit.cli, lowbit.packed, ...) keep importing, with a DeprecationWarning naming the new one
install_moved_paths(__name__)
del install_moved_paths

__all__ = [
    "LowbitFallbackWarning",
    "backends",
    "bops",
    "convert",
    "fake_quant",
    "fold_activation_clips",
    "load",
    "load_model",
    "metamix",
    "mixquant",
    "multi_branch_fake_quant",
    "pack",
    "packed_linear",
    "unpack",
    "quant_range",
    "quantize",
    "register_fake_quant",
    "save",
    "save_model",
    "swap_fused",
    "unfold_activation_clips",
    "use_backend",
    "__version__",
]
