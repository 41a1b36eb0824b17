"""MixQuant (arXiv 2309.17341): per-layer weight bit-widths from the quantization error of each width.

``qe_table`` measures ``QE(l, b) = mean((W_l - dequant(Q_b(W_l)))^2)`` for every conv/linear and candidate width
(one fused pass per layer per width); ``search`` turns the table into a plan ``{layer: bits}`` by the QEM rule
of SPEC section 7 or under a size budget. Any quantizer with ``apply(model, plan)`` then applies the plan:
``MinMaxPTQ``, ``LSQFineTune``, ``BRECQ`` or a user's own (see docs/mixquant.md).
"""

from lowbit.mixquant.brecq import BRECQ, reconstruction_units
from lowbit.mixquant.plan import AvgBits, ModelBytes, Plan, search, uniform_plan
from lowbit.mixquant.quantizers import (
    LSQFineTune,
    MinMaxPTQ,
    PlanQuantizer,
    apply_plan,
    asymmetric_minmax,
    check_plan,
)
from lowbit.mixquant.table import QETable, SymmetricPerChannel, qe_table

__all__ = [
    "BRECQ",
    "AvgBits",
    "LSQFineTune",
    "MinMaxPTQ",
    "ModelBytes",
    "Plan",
    "PlanQuantizer",
    "QETable",
    "SymmetricPerChannel",
    "apply_plan",
    "asymmetric_minmax",
    "check_plan",
    "qe_table",
    "reconstruction_units",
    "search",
    "uniform_plan",
]
