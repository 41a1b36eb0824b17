"""Quantized layers and quantizers (``lowbit.nn``)."""

from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear
from lowbit.nn.packed import DequantConv2d, DequantLinear, PackedConv2d, PackedLinear
from lowbit.nn.quantizers import FoldedClip, LSQQuantizer, MultiBranchQuantizer, lsq_initial_step
from lowbit.nn.reference_lsq import ReferenceLSQ

__all__ = [
    "DequantConv2d",
    "DequantLinear",
    "FoldedClip",
    "LSQQuantizer",
    "MultiBranchQConv2d",
    "MultiBranchQLinear",
    "MultiBranchQuantizer",
    "PackedConv2d",
    "PackedLinear",
    "QConv2d",
    "QLinear",
    "ReferenceLSQ",
    "lsq_initial_step",
]
