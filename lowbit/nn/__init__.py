"""Quantized layers and quantizers (``lowbit.nn``)."""

from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear
from lowbit.nn.quantizers import LSQQuantizer, MultiBranchQuantizer, lsq_initial_step
from lowbit.nn.reference_lsq import ReferenceLSQ

__all__ = [
    "LSQQuantizer",
    "MultiBranchQConv2d",
    "MultiBranchQLinear",
    "MultiBranchQuantizer",
    "QConv2d",
    "QLinear",
    "ReferenceLSQ",
    "lsq_initial_step",
]
