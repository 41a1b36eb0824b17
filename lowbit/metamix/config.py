"""What one MetaMix run is asked to do: a frozen dataclass checked once, so a bad argument fails before any epoch.

There is no global configuration: every trainer gets its own ``MetaMixConfig`` (``dataclasses.replace`` makes a
variant). Targets are per-sample BOPs (SPEC section 3); ``target_bits`` states the same budget as the average
activation bits of the searched layers at their weight bits (first and last layer keep their fixed bits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lowbit.core import checks

MODES = ("metamix", "joint", "uniform")
SEARCH_WEIGHTS = ("quantized", "float")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class MetaMixConfig:
    """Settings of a MetaMix (or joint / uniform baseline) run.

    Modes:
        ``"metamix"``: per mini-batch a bit-meta step (W and steps, alpha frozen; task loss) on one batch, then a
        bit-search step (alpha only, W/steps/BN statistics frozen; task loss + penalty) on a separate batch.
        ``"joint"``: W, steps and alpha updated together in one step with the penalty (EdMIPS style).
        ``"uniform"``: plain LSQ QAT at one activation width, no search (the same phases and schedules).

    Paper-faithful switches (SPEC section 8; the studies pick the defaults, docs/metamix.md gives the numbers):
        ``search_weights``: ``"quantized"`` trains W4 LSQ weights during the search; ``"float"`` keeps every weight
        full precision in the search (the paper's meta-state) and applies the weight quantizers, their steps
        initialised from the trained weights, from the weight-training phase on.
        ``search_split``: the share of the training set held out for the bit-search step of ``"metamix"`` (the
        bit-meta step trains on the rest during the search; weight training uses all of it). ``0`` draws the
        search batches from a second shuffled pass over the whole training set.
        ``repair`` / ``fill``: the paper's rule is the argmax of each layer's alpha (``repair=False,
        fill="none"``); lowering the argmax to the budget (``repair``) and raising layers up to it (``fill``)
        are the project's extensions (lowbit.metamix.select).

    Epochs: ``fp_epochs`` of float warm-up (optional), ``search_epochs`` of bit selection, ``finetune_epochs``
    of weight training on the single-branch model. The uniform mode trains for ``search_epochs +
    finetune_epochs`` in the same two phases, so every mode sees the same number of epochs.
    """

    mode: str = "metamix"
    a_bits: tuple[int, ...] = (2, 4, 8)
    w_bits: int | dict[str, int] = 4
    first_last_bits: int | None = 8
    target_bits: float | None = None
    target_bops: float | None = None
    uniform_bits: int | None = None
    fp_epochs: int = 0
    search_epochs: int = 5
    finetune_epochs: int = 5
    fp_lr: float = 0.05
    lr: float = 0.01
    finetune_lr: float | None = None
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    alpha_lr: float = 0.05
    alpha_optimizer: str = "adam"
    lam: float = 10.0  # digits study: 2 left E[BOPs] ~7% over the target after 6 epochs, 10 within ~2%
    fill: str = "both"  # see lowbit.metamix.select: "both", "repair" or "none" (an extension)
    repair: bool = True  # lower an argmax over the budget until it fits (an extension; the paper keeps the argmax)
    search_weights: str = "quantized"
    search_split: float = 0.25
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    log_path: str | None = None
    resume: bool = False
    progress: bool = True
    eval_each_epoch: bool = True
    extra: dict = field(default_factory=dict)  # free-form tags copied into the report (e.g. the study's labels)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "a_bits", tuple(checks.bit_list("a_bits", self.a_bits)))
        _check_w_bits(self.w_bits)
        if self.first_last_bits is not None:
            checks.bits("first_last_bits", self.first_last_bits)
        if self.uniform_bits is not None:
            checks.bits("uniform_bits", self.uniform_bits)
        self._check_target()
        for name in ("fp_epochs", "search_epochs", "finetune_epochs", "seed"):
            _check_count(name, getattr(self, name))
        for name in ("fp_lr", "lr", "alpha_lr"):
            _check_positive(name, getattr(self, name))
        if self.finetune_lr is not None:
            _check_positive("finetune_lr", self.finetune_lr)
        _check_non_negative("weight_decay", self.weight_decay)
        _check_non_negative("lam", self.lam)
        for name in ("optimizer", "alpha_optimizer"):
            if getattr(self, name) not in OPTIMIZERS:
                raise ValueError(f"{name} must be one of {OPTIMIZERS}, got {getattr(self, name)!r}")
        if self.fill not in ("both", "repair", "none"):
            raise ValueError(f"fill must be 'both', 'repair' or 'none', got {self.fill!r}")
        if not isinstance(self.repair, bool):
            raise TypeError(f"repair must be a bool, got {type(self.repair).__name__}")
        if self.search_weights not in SEARCH_WEIGHTS:
            raise ValueError(f"search_weights must be one of {SEARCH_WEIGHTS}, got {self.search_weights!r}")
        _check_non_negative("search_split", self.search_split)
        if self.search_split >= 1:
            raise ValueError(f"search_split must be in [0, 1) (a share of the training set), got {self.search_split}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where the checkpoint is read from)")

    def _check_target(self) -> None:
        given = [n for n in ("target_bits", "target_bops") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError("give one of target_bits and target_bops, not both")
        for name in given:
            _check_positive(name, getattr(self, name))
        if self.target_bits is not None and self.target_bits < min(self.a_bits):
            raise ValueError(
                f"target_bits={self.target_bits} is unreachable: below the smallest candidate in a_bits "
                f"{list(self.a_bits)}"
            )
        needs_target = self.mode != "uniform" or self.uniform_bits is None
        if needs_target and not given:
            raise ValueError(f"mode {self.mode!r} needs a budget: target_bits or target_bops")
        if self.mode == "uniform" and self.uniform_bits is not None and self.uniform_bits not in self.a_bits:
            raise ValueError(f"uniform_bits must be one of a_bits {list(self.a_bits)}, got {self.uniform_bits}")

    @property
    def epochs(self) -> dict[str, int]:
        """Epochs per phase, in the order they run."""
        return {"fp": self.fp_epochs, "search": self.search_epochs, "finetune": self.finetune_epochs}

    def to_dict(self) -> dict:
        return asdict(self)


def _check_w_bits(value) -> None:
    if isinstance(value, dict):
        if not value:
            raise ValueError("w_bits must be an int or a non-empty {layer_name: bits} map, got an empty dict")
        for name, b in value.items():
            if not isinstance(name, str):
                raise TypeError(f"w_bits keys must be layer names (str), got {type(name).__name__}")
            checks.bits(f"w_bits[{name!r}]", b)
    else:
        checks.bits("w_bits", value)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")


def _check_non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
