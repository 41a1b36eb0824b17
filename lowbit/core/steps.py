"""The step a quantizer hands the ops (shared by the training quantizers and ``lowbit.convert``)."""

from __future__ import annotations

import torch


def positive_step(step: torch.Tensor) -> torch.Tensor:
    """The step the ops see: |step|. An optimizer step can push a learned step below zero; its magnitude keeps
    the quantizer working with the same gradient magnitude. (A step of exactly 0.0 still raises ValueError.)"""
    return step.abs()
