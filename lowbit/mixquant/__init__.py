"""MixQuant (arXiv 2309.17341): per-layer weight bit-widths from the quantization error of each width.

``qe_table`` measures ``QE(l, b) = mean((W_l - dequant(Q_b(W_l)))^2)`` for every conv/linear and candidate width
(one fused pass per layer per width); ``search`` turns the table into a plan ``{layer: bits}`` by the QEM rule
of SPEC section 7 or under a size budget. Any quantizer then applies the plan.
"""

from lowbit.mixquant.plan import AvgBits, ModelBytes, Plan, search
from lowbit.mixquant.quantizers import MinMaxPTQ, PlanQuantizer, asymmetric_minmax
from lowbit.mixquant.table import QETable, SymmetricPerChannel, qe_table

__all__ = [
    "AvgBits",
    "MinMaxPTQ",
    "ModelBytes",
    "Plan",
    "PlanQuantizer",
    "QETable",
    "SymmetricPerChannel",
    "asymmetric_minmax",
    "qe_table",
    "search",
]
