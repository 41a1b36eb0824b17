"""The public ops of SPEC section 5, one file each (schema, fake kernel, autograd, argument checks):

* ``fake_quant.py``              ``lowbit::fake_quant`` (and its backward op)
* ``multi_branch_fake_quant.py`` ``lowbit::multi_branch_fake_quant`` (and its backward op)
* ``packed_linear.py``           ``lowbit::pack``, ``lowbit::unpack``, ``lowbit::packed_linear`` and the integer data
  path of packed models (``packed_gemm``, ``packed_patches_gemm``, ``packed_depthwise``, ``quantize_codes``,
  ``im2col_codes``)

``library.py`` holds the namespace and the helpers every op file shares; ``decompositions.py`` the aten
decompositions Inductor compiles in place of the training ops. The kernels behind each op live in
``lowbit.backends`` (which backend runs), ``lowbit/kernels/<op>.py`` (Triton) and ``csrc/{cpu,cuda}/<op>*`` (C++/CUDA).
"""

from lowbit.core.ranges import quant_range
from lowbit.ops.fake_quant import fake_quant
from lowbit.ops.multi_branch_fake_quant import multi_branch_fake_quant
from lowbit.ops.packed_linear import pack, packed_linear, unpack

__all__ = ["fake_quant", "multi_branch_fake_quant", "pack", "packed_linear", "quant_range", "unpack"]
