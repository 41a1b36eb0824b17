"""Learnable quantizers: the modules that hold LSQ steps and call the fused ops.

``LSQQuantizer`` quantizes one tensor with one bit-width (per-tensor or per-channel); ``MultiBranchQuantizer``
mixes several bit-widths of one activation with learnable branch logits ``alpha`` (MetaMix). Both initialise
their steps from the first batch they see, as LSQ does: ``2 * mean(|x|) / sqrt(Qp)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.core import checks
from lowbit.core.steps import positive_step as _positive  # the step the ops see: |step|
from lowbit.ops import fake_quant, multi_branch_fake_quant, quant_range


def lsq_initial_step(x: torch.Tensor, bits: int, signed: bool, axis: int | None = None) -> torch.Tensor:
    """LSQ's step initialisation ``2 * mean(|x|) / sqrt(Qp)``, per tensor or per channel along ``axis``."""
    qp = quant_range(bits, signed)[1]
    x = x.detach().float().abs()
    mean = x.mean() if axis is None else x.transpose(0, axis).reshape(x.shape[axis], -1).mean(dim=1)
    return (2 * mean / math.sqrt(qp)).clamp_min(1e-8)


class LSQQuantizer(nn.Module):
    """LSQ fake quantization of one tensor with a learnable step.

    Args:
        bits: bit-width, 2..8 (may be changed later through ``bits``).
        signed: signed range; ``None`` decides on the first batch (unsigned when it has no negative value,
            as after a ReLU).
        channels: ``None`` for a per-tensor step, else the number of channels along ``axis``.
        axis: channel axis of a per-channel step.
    """

    def __init__(self, bits: int, *, signed: bool | None = None, channels: int | None = None, axis: int = 0):
        super().__init__()
        self._bits = checks.bits("bits", bits)
        if signed is not None:
            checks.flag("signed", signed)
        self.signed = signed
        self.axis = axis if channels is not None else None
        self.step = nn.Parameter(torch.ones(channels if channels is not None else 1))
        self.initialized = False
        # (lo, hi) of a ReLU / ReLU6 folded into this quantizer (lowbit.fold_activation_clips), else None. Part of
        # the model's structure, like the FoldedClip left in the activation's place: not in the state dict.
        self.input_clip: tuple[float, float] | None = None

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = checks.bits("bits", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:  # from the values the quantizer sees: after the folded clip
            self.initialize(x if self.input_clip is None else nn.functional.hardtanh(x, *self.input_clip))
        # abs_step: the op uses |step| (lowbit.core.steps.positive_step), inside the op (see fake_quant's abs_step)
        return fake_quant(
            x, self.step, self._bits, signed=self.signed, axis=self.axis, clip=self.input_clip, abs_step=True
        )

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if self.signed is None:
            self.signed = bool((x.detach() < 0).any())
        self.step.copy_(lsq_initial_step(x, self._bits, self.signed, self.axis).reshape(self.step.shape))
        self.initialized = True

    def get_extra_state(self):
        return {"bits": self._bits, "signed": self.signed, "initialized": self.initialized}

    def set_extra_state(self, state) -> None:
        self._bits, self.signed, self.initialized = state["bits"], state["signed"], state["initialized"]

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        clip = "" if self.input_clip is None else f", input_clip={self.input_clip}"
        return f"bits={self._bits}, signed={self.signed}, {granularity}{clip}"


class FoldedClip(nn.Module):
    """A ReLU / ReLU6 folded into the activation quantizer that alone reads its output (``lowbit.fold_activation_clips``
    sets that quantizer's ``input_clip``): the identity, since the quantizer clips. ``kind``: "ReLU" or "ReLU6".

    It checks on every call that the reading layer is still in the model with the same quantizer and clip; if
    surgery replaced either, it clips itself, so the model keeps computing the ReLU / ReLU6."""

    def __init__(self, kind: str, clip: tuple[float, float]):
        super().__init__()
        self.kind, self.clip = kind, clip
        self.attach(None, "", None)

    def attach(
        self, parent: nn.Module | None, name: str, quantizer: LSQQuantizer | MultiBranchQuantizer | None
    ) -> None:
        """Records the quantizer that clips instead: ``getattr(parent, name).act_quant``. Plain references, not
        submodules (they are the model's own modules elsewhere in the tree)."""
        object.__setattr__(self, "reader", (parent, name, quantizer))

    def clipped_by_reader(self) -> bool:
        parent, name, quantizer = self.reader
        layer = getattr(parent, name, None) if parent is not None else None
        return (
            quantizer is not None
            and getattr(layer, "act_quant", None) is quantizer
            and quantizer.input_clip == self.clip
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clipped_by_reader() else nn.functional.hardtanh(x, *self.clip)

    def extra_repr(self) -> str:
        return self.kind


class MultiBranchQuantizer(nn.Module):
    """``y = sum_i softmax(alpha)_i * Q(x; s_i, b_i)``: one activation at several bit-widths (SPEC section 2).

    Args:
        bits: candidate bit-widths, distinct, 2..8.
        signed: as for ``LSQQuantizer`` (``None``: decided on the first batch).
    """

    def __init__(self, bits=(2, 4, 8), *, signed: bool | None = None):
        super().__init__()
        self.bits = checks.bit_list("bits", bits)
        if signed is not None:
            checks.flag("signed", signed)
        self.signed = signed
        self.steps = nn.Parameter(torch.ones(len(self.bits)))
        self.alpha = nn.Parameter(torch.zeros(len(self.bits)))
        self.initialized = False
        self.input_clip: tuple[float, float] | None = None  # a folded ReLU / ReLU6, as LSQQuantizer.input_clip

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=0)

    def expected_bits(self) -> torch.Tensor:
        """``sum_i p_i * b_i``, differentiable in alpha."""
        return (self.probs() * torch.tensor(self.bits, dtype=self.alpha.dtype, device=self.alpha.device)).sum()

    def selected_bits(self) -> int:
        return self.bits[int(torch.argmax(self.alpha))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:  # from the values the quantizer sees: after the folded clip
            self.initialize(x if self.input_clip is None else nn.functional.hardtanh(x, *self.input_clip))
        return multi_branch_fake_quant(
            x, _positive(self.steps), self.probs(), self.bits, signed=self.signed, clip=self.input_clip
        )

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if self.signed is None:
            self.signed = bool((x.detach() < 0).any())
        for i, b in enumerate(self.bits):
            self.steps[i] = lsq_initial_step(x, b, self.signed)
        self.initialized = True

    def branch_quantizer(self, bits: int) -> LSQQuantizer:
        """A single-branch LSQ quantizer at ``bits`` that keeps this branch's learned step."""
        if bits not in self.bits:
            raise ValueError(f"bits must be one of the branches {self.bits}, got {bits}")
        single = LSQQuantizer(bits, signed=self.signed)
        with torch.no_grad():
            single.step.copy_(self.steps[self.bits.index(bits)].reshape(1))
        single.initialized = self.initialized
        return single.to(self.steps.device)

    def get_extra_state(self):
        return {"bits": self.bits, "signed": self.signed, "initialized": self.initialized}

    def set_extra_state(self, state) -> None:
        self.bits, self.signed, self.initialized = list(state["bits"]), state["signed"], state["initialized"]

    def extra_repr(self) -> str:
        clip = "" if self.input_clip is None else f", input_clip={self.input_clip}"
        return f"bits={self.bits}, signed={self.signed}{clip}"
