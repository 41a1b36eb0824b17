"""MetaMix (arXiv 2311.06798): per-layer activation bit-widths by a meta-state search (SPEC section 8).

Bit selection alternates, per mini-batch, a bit-meta step (weights and LSQ steps learn through the mixture of
branches, alpha frozen) and a bit-search step on a separate batch (alpha learns task loss + BOPs penalty on
the frozen meta-state). Selection takes each layer's argmax and repairs the budget; the weight-training phase
fine-tunes the single-branch model from the meta-state weights and the selected branches' steps. ``joint``
(EdMIPS-style) and ``uniform`` (plain LSQ) run on the same loop and cost model for comparison.

    model, report = lowbit.metamix.run(float_model, train_loader, test_loader, MetaMixConfig(target_bits=3.0))
"""

from lowbit.metamix.config import MetaMixConfig
from lowbit.metamix.cost import CostModel, alpha_parameters, penalty, weight_parameters
from lowbit.metamix.report import MetaMixReport
from lowbit.metamix.select import LayerChoice, Selection, select, select_from_model
from lowbit.metamix.steps import bit_meta, bit_search, frozen_bn_stats
from lowbit.metamix.trainer import MetaMix, run

__all__ = [
    "CostModel",
    "LayerChoice",
    "MetaMix",
    "MetaMixConfig",
    "MetaMixReport",
    "Selection",
    "alpha_parameters",
    "bit_meta",
    "bit_search",
    "frozen_bn_stats",
    "penalty",
    "run",
    "select",
    "select_from_model",
    "weight_parameters",
]
