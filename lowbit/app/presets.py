"""Paper-scale presets: the ImageNet settings of MetaMix (arXiv 2311.06798) and MixQuant (arXiv 2309.17341) as named
sets of ``lowbit metamix`` / ``lowbit mixquant`` options.

A preset is data: ``options`` maps each command-line option (its argparse ``dest``) to a value; the CLI installs them
as the defaults of the command, so every option the user writes still wins. ``lowbit presets`` lists them.

What the papers fix and what this module chose. The full text of neither paper was available while these were
written (the search found abstracts and a summary only), so only these values come from the papers:
  - MetaMix: ImageNet, MobileNet-v2, MobileNet-v3 and ResNet-18; 4-bit weights; per-layer activation bits from
    power-of-two candidates {2, 4, 8}; a BOPs target; MobileNet-v2 reaches 72.60% top-1 at W4 and 3.98-bit
    average activations (the project's summary of arXiv 2311.06798; the table number was not checked).
  - MixQuant: per-layer weight bits from the quantization error, applied with BRECQ or asymmetric min-max PTQ on
    ImageNet (arXiv 2309.17341, abstract).
Everything else (epochs, batch sizes, learning rates, weight decay, the BOPs target of MobileNet-v3 and ResNet-18,
MobileNet-v3 Small for "MobileNet-v3") is this project's choice, and each choice says why next to its value.
None of these presets has been run at ImageNet scale by this project.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The standard ImageNet input: 224x224 crops (RandomResizedCrop for training, resize 256 + center crop for testing:
# lowbit.app.data.imagenet_folder) through the models' standard stride-32 stem, not the small-image one.
IMAGENET_INPUT = {"image_size": 224, "stem": "standard", "transforms": "imagenet", "workers": 8}

# Weight training starts from a trained float model (--checkpoint), as in both papers; none is trained here by
# default (--epochs 0). Without a checkpoint, --fp-epochs N trains one inside the DDP trainer first.
FLOAT_FROM_CHECKPOINT = {"epochs": 0}

METAMIX_COMMON = {
    **IMAGENET_INPUT,
    **FLOAT_FROM_CHECKPOINT,
    "mode": "metamix",
    "w_bits": 4,  # the paper's W4 (first and last layer 8-bit: MetaMixConfig.first_last_bits)
    "a_bits_choices": [2, 4, 8],  # the paper's power-of-two candidates
    "fp_epochs": 0,
    # Chosen: 10 epochs of bit selection and 30 of weight training. The paper's epochs were not available; the
    # weight-training phase starts from the meta-state's weights and steps, so it is set well under the 90 epochs
    # of an LSQ run from a float model.
    "search_epochs": 10,
    "finetune_epochs": 30,
    # Chosen: per process; 4 processes make the global batch of 256 that the learning rates below assume (scale the
    # learning rates linearly with a different global batch).
    "batch_size": 64,
    "qat_lr": 0.01,  # SGD with a cosine schedule for weights and LSQ steps: the usual LSQ fine-tuning rate
    # Chosen: Adam on alpha at 1e-3 (the library default 0.05 suits digits, ~20 bit-search steps an epoch;
    # ImageNet at batch 256 makes ~5,000).
    "alpha_lr": 1e-3,
    "lam": 10.0,  # the library default (the digits study's)
}

MIXQUANT_COMMON = {
    **IMAGENET_INPUT,
    **FLOAT_FROM_CHECKPOINT,
    "avg_bits": 4.0,  # W4 on average: the budget mode (the project's extension) at the papers' 4-bit setting
    "quantizer": "brecq",  # the paper's main combination (MixQuant + BRECQ)
    # Chosen: BRECQ's own ImageNet setting as this project recalls it (1024 calibration images, 20,000 Adam steps
    # per block, batch 32); not checked against arXiv 2102.05426 in this session.
    "brecq_samples": 1024,
    "brecq_iters": 20000,
    "brecq_batch_size": 32,
    "batch_size": 64,  # the loaders' batch (evaluation, calibration reads; LSQ fine-tuning if --quantizer lsq)
}


@dataclass(frozen=True)
class Preset:
    """One named paper setting: the ``lowbit <command>`` it runs and the option values it sets."""

    name: str
    command: str  # "metamix" or "mixquant"
    options: dict = field(default_factory=dict)
    reproduces: str = ""  # the paper's setting and reported number, or that the value was chosen here

    def __post_init__(self):
        if self.command not in ("metamix", "mixquant"):
            raise ValueError(f"preset {self.name!r}: command must be 'metamix' or 'mixquant', got {self.command!r}")

    def summary(self) -> str:
        shown = ("model", "width", "image_size", "w_bits", "target_bits", "avg_bits", "quantizer")
        values = ", ".join(f"{k}={self.options[k]}" for k in shown if k in self.options)
        return f"{self.name:<34} lowbit {self.command:<9} {values}"


def _metamix(model: str, target_bits: float, weight_decay: float, fp_lr: float, reproduces: str) -> Preset:
    options = {**METAMIX_COMMON, "model": model, "width": 1.0, "target_bits": target_bits}
    options.update(weight_decay=weight_decay, fp_lr=fp_lr)
    return Preset(f"imagenet-{model.replace('_small', '')}-metamix", "metamix", options, reproduces)


def _mixquant(model: str, reproduces: str) -> Preset:
    return Preset(
        f"imagenet-{model}-mixquant", "mixquant", {**MIXQUANT_COMMON, "model": model, "width": 1.0}, reproduces
    )


# Weight decay: 4e-5 for the MobileNets and 1e-4 for ResNet-18, their usual ImageNet values (chosen). fp_lr is used
# only with --fp-epochs (a float model trained here): 0.05 / 0.1 at batch 256, the usual ImageNet rates (chosen).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _metamix(
            "mobilenet_v2",
            4.0,
            4e-5,
            0.05,
            "arXiv 2311.06798: MobileNet-v2, W4, mixed activations averaging 3.98 bits, 72.60% top-1 (as summarised; "
            "table not checked). target_bits=4.0 is the BOPs of W4A4 on the searched layers",
        ),
        _metamix(
            "mobilenet_v3_small",
            4.0,
            4e-5,
            0.05,
            "arXiv 2311.06798 evaluates MobileNet-v3 (variant and BOPs target not available here): lowbit packages "
            "MobileNet-v3 Small; target_bits=4.0 (the BOPs of W4A4) is chosen, the budget of the uniform W4A4 "
            "baseline",
        ),
        _metamix(
            "resnet18",
            4.0,
            1e-4,
            0.1,
            "arXiv 2311.06798 evaluates ResNet-18 (BOPs target not available here): target_bits=4.0 (the BOPs of "
            "W4A4) is chosen, the budget of the uniform W4A4 baseline",
        ),
        _mixquant(
            "resnet18",
            "arXiv 2309.17341: MixQuant + BRECQ on ImageNet (its QEM and top-1 not available here); "
            "4.0 average weight bits chosen for the W4 setting",
        ),
        _mixquant(
            "mobilenet_v2",
            "arXiv 2309.17341: MixQuant + BRECQ on ImageNet (its QEM and top-1 not available here); "
            "4.0 average weight bits chosen for the W4 setting",
        ),
    )
}


def get(name: str, command: str | None = None) -> Preset:
    """The preset called ``name``; ValueError naming the known ones (those of ``command`` if given)."""
    known = [p.name for p in PRESETS.values() if command is None or p.command == command]
    preset = PRESETS.get(name)
    if preset is None or (command is not None and preset.command != command):
        where = f" for lowbit {command}" if command else ""
        raise ValueError(f"unknown preset {name!r}{where}; known: {', '.join(known)}")
    return preset


def listing() -> str:
    """One line per preset, then how to run one."""
    lines = [p.summary() for p in PRESETS.values()]
    lines.append(
        "metamix: torchrun --nproc_per_node=N -m lowbit.app.cli metamix --preset NAME --data IMAGENET_DIR "
        "--checkpoint FLOAT_MODEL --device cuda"
    )
    lines.append("mixquant (one process): lowbit mixquant --preset NAME --data IMAGENET_DIR --checkpoint FLOAT_MODEL")
    lines.append("any option given overrides the preset's value")
    return "\n".join(lines)
