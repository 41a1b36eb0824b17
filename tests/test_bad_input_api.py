"""SPEC section 6 beyond the quantizer ops: every public entry point (packed ops, layers, quantize, convert, save and
load, MixQuant, MetaMix, data, the demo) rejects bad input with ValueError/TypeError naming the argument.

The ids of this table and of ``test_bad_input.py``'s are listed in docs/reliability.md (checked below)."""

from __future__ import annotations

import math
import os
import pathlib
import re
import tempfile

import pytest
import torch
from torch import nn

import lowbit
from lowbit import metamix, mixquant
from lowbit.app import data, demo
from lowbit.metamix import checkpoint
from lowbit.models import create_model
from lowbit.nn import LSQQuantizer, MultiBranchQConv2d, MultiBranchQuantizer, PackedLinear, QConv2d, QLinear
from lowbit.tools import serialization

X = torch.randn(3, 16)
CODES = torch.randint(-8, 8, (5, 16), dtype=torch.int8)
PACKED = lowbit.pack(CODES, 4)
SCALE = torch.full((5,), 0.1)
XSTEP = torch.tensor([0.05])


def pl(x=X, packed=PACKED, scale=SCALE, w_bits=4, x_step=XSTEP, x_bits=8, **kwargs):
    return lambda: lowbit.packed_linear(x, packed, scale, w_bits, x_step, x_bits, **kwargs)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def calibrated_qat() -> nn.Module:
    model = lowbit.quantize(tiny_cnn(), w_bits=4, a_bits=4)
    model(torch.randn(2, 1, 8, 8))
    return model


def save_to(path):
    return lambda: lowbit.save(lowbit.convert(calibrated_qat()), path)


_FILES = tempfile.TemporaryDirectory(prefix="lowbit-bad-input-")  # removed when the test process ends


def small_cnn_file() -> str:
    path = os.path.join(_FILES.name, "small_cnn.safetensors")
    lowbit.save_model(create_model("small_cnn", num_classes=10, in_channels=1), path)
    return path


def pickled_model() -> str:
    path = os.path.join(_FILES.name, "model.pt")
    torch.save(tiny_cnn(), path)
    return path


def pickled_checkpoint_dir() -> str:
    folder = tempfile.mkdtemp(dir=_FILES.name)
    with open(os.path.join(folder, checkpoint.LEGACY_CHECKPOINT), "wb") as f:
        f.write(b"\x80\x04 a pickled checkpoint")
    return folder


def reshaped_model() -> nn.Module:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    model.classifier = nn.Sequential(nn.Linear(model.classifier.in_features, 10))  # not what the arch builds
    return model


def mm_config(**kwargs):
    return lambda: metamix.MetaMixConfig(**{"target_bits": 3.0, **kwargs})


# (id, call, exception, argument named in the message)
CASES = [
    # packed storage and GEMM (SPEC sections 4, 5)
    ("pack-codes-float", lambda: lowbit.pack(torch.ones(4), 4), TypeError, "codes"),
    ("pack-codes-out-of-range", lambda: lowbit.pack(torch.full((4,), 9, dtype=torch.int8), 4), ValueError, "codes"),
    ("pack-bits-high", lambda: lowbit.pack(CODES, 9), ValueError, "bits"),
    ("unpack-packed-int8", lambda: lowbit.unpack(CODES, 4, 16), TypeError, "packed"),
    ("unpack-k-mismatch", lambda: lowbit.unpack(PACKED, 4, 40), ValueError, "k"),
    ("unpack-k-float", lambda: lowbit.unpack(PACKED, 4, 16.0), TypeError, "k"),
    ("pl-x-int", pl(x=torch.ones(3, 16, dtype=torch.int32)), TypeError, "x"),
    ("pl-packed-float", pl(packed=PACKED.float()), TypeError, "packed_w"),
    ("pl-packed-k-mismatch", pl(x=torch.randn(3, 20)), ValueError, "packed_w"),
    ("pl-scale-length", pl(scale=torch.ones(4)), ValueError, "w_scale"),
    ("pl-w-bits-low", pl(w_bits=1), ValueError, "w_bits"),
    ("pl-x-bits-float", pl(x_bits=8.0), TypeError, "x_bits"),
    ("pl-x-step-per-channel", pl(x_step=torch.ones(16)), ValueError, "x_step"),
    ("pl-x-step-zero", pl(x_step=torch.tensor([0.0])), ValueError, "x_step"),
    ("pl-bias-length", pl(bias=torch.ones(3)), ValueError, "bias"),
    ("pl-x-signed-int", pl(x_signed=1), TypeError, "x_signed"),
    # layers and quantizers
    ("lsq-bits-high", lambda: LSQQuantizer(9), ValueError, "bits"),
    ("qconv-w-bits-low", lambda: QConv2d(3, 4, 3, w_bits=1), ValueError, "bits"),
    ("qlinear-a-bits-float", lambda: QLinear(3, 4, a_bits=4.5), TypeError, "bits"),
    ("mb-quantizer-empty", lambda: MultiBranchQuantizer(()), ValueError, "bits"),
    ("mb-conv-duplicate-bits", lambda: MultiBranchQConv2d(3, 4, 1, a_bits_choices=(4, 4)), ValueError, "bits"),
    ("packed-linear-w-bits", lambda: PackedLinear(4, 4, w_bits=9, a_bits=8), ValueError, "w_bits"),
    # model surgery
    ("quantize-model-not-module", lambda: lowbit.quantize("resnet"), TypeError, "model"),
    ("quantize-w-bits-high", lambda: lowbit.quantize(tiny_cnn(), w_bits=9), ValueError, "w_bits"),
    ("quantize-plan-unknown-layer", lambda: lowbit.quantize(tiny_cnn(), bits={"nope": 4}), ValueError, "bits"),
    ("swap-fused-not-module", lambda: lowbit.swap_fused(3), TypeError, "model"),
    ("bops-input-not-tensor", lambda: lowbit.bops(tiny_cnn(), [1.0]), TypeError, "example_input"),
    # conversion and files
    ("convert-not-module", lambda: lowbit.convert("model"), TypeError, "model"),
    ("convert-nothing-quantized", lambda: lowbit.convert(tiny_cnn()), ValueError, "model"),
    (
        "convert-multi-branch-option",
        lambda: lowbit.convert(calibrated_qat(), multi_branch="x"),
        ValueError,
        "multi_branch",
    ),
    ("save-model-not-module", lambda: lowbit.save("model", "/tmp/x.safetensors"), TypeError, "model"),
    ("save-path-is-folder", save_to("/tmp"), ValueError, "path"),
    ("load-path-is-folder", lambda: lowbit.load("/tmp"), ValueError, "path"),
    ("load-path-int", lambda: lowbit.load(3), TypeError, "path"),
    ("save-model-file-not-module", lambda: lowbit.save_model("model", "/tmp/x.safetensors"), TypeError, "model"),
    (
        "save-model-packed",
        lambda: lowbit.save_model(lowbit.convert(calibrated_qat()), "/tmp/x.safetensors"),
        ValueError,
        "model",
    ),
    ("save-model-not-rebuildable", lambda: lowbit.save_model(reshaped_model(), "/tmp/x.sft"), ValueError, "model"),
    ("save-model-path-is-folder", lambda: lowbit.save_model(tiny_cnn(), "/tmp"), ValueError, "path"),
    ("load-model-path-int", lambda: lowbit.load_model(3), TypeError, "path"),
    ("load-model-path-missing", lambda: lowbit.load_model("/no/such.safetensors"), FileNotFoundError, "path"),
    (
        "load-model-other-architecture",
        lambda: lowbit.load_model(small_cnn_file(), model=create_model("resnet18")),
        ValueError,
        "model",
    ),
    ("torch-load-pickle-refused", lambda: serialization.torch_load(pickled_model()), ValueError, "allow_pickle"),
    (
        "torch-load-allow-pickle-str",
        lambda: serialization.torch_load(pickled_model(), allow_pickle="yes"),
        TypeError,
        "allow_pickle",
    ),
    ("state-not-a-dict", lambda: serialization.state_bytes([1]), TypeError, "state"),
    ("state-value-not-storable", lambda: serialization.state_bytes({"f": print}), TypeError, "state"),
    ("checkpoint-pickled-load", lambda: checkpoint.load(pickled_checkpoint_dir()), ValueError, "allow_pickle"),
    ("checkpoint-pickled-migrate", lambda: checkpoint.migrate(pickled_checkpoint_dir()), ValueError, "allow_pickle"),
    # MixQuant
    ("mq-qem-below-one", lambda: mixquant.search(tiny_cnn(), qem=0.5), ValueError, "qem"),
    ("mq-bits-empty", lambda: mixquant.search(tiny_cnn(), qem=4, bits=[]), ValueError, "bits"),
    ("mq-budget-below-2-bit", lambda: mixquant.search(tiny_cnn(), budget=mixquant.AvgBits(1.5)), ValueError, "budget"),
    ("mq-qem-and-budget", lambda: mixquant.search(tiny_cnn(), qem=4, budget=mixquant.AvgBits(3)), ValueError, "budget"),
    ("mq-plan-bits-high", lambda: mixquant.MinMaxPTQ().apply(tiny_cnn(), {"0": 9}), ValueError, "plan"),
    ("mq-table-model", lambda: mixquant.qe_table("model"), TypeError, "model"),
    # MetaMix
    ("mm-mode-unknown", mm_config(mode="random"), ValueError, "mode"),
    ("mm-a-bits-high", mm_config(a_bits=(2, 9)), ValueError, "a_bits"),
    ("mm-a-bits-empty", mm_config(a_bits=()), ValueError, "a_bits"),
    ("mm-target-negative", mm_config(target_bits=-1.0), ValueError, "target_bits"),
    ("mm-target-unreachable", mm_config(target_bits=1.5), ValueError, "target_bits"),
    ("mm-epochs-negative", mm_config(search_epochs=-1), ValueError, "search_epochs"),
    ("mm-lam-nan", mm_config(lam=math.nan), ValueError, "lam"),
    ("mm-no-target", lambda: metamix.MetaMixConfig(), ValueError, "target_bits"),
    # data and the demo
    ("data-folder-missing", lambda: data.image_folder("/nonexistent"), ValueError, "data"),
    ("demo-target-bits", lambda: demo.DemoConfig(target_bits=1.0), ValueError, "target_bits"),
    ("demo-epochs-zero", lambda: demo.DemoConfig(epochs=0), ValueError, "epochs"),
    ("create-model-unknown", lambda: create_model("vgg"), ValueError, "model"),
]


@pytest.mark.parametrize("call, exc, argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_naming_the_argument(call, exc, argument):
    with pytest.raises(exc, match=rf"(?<!\w){argument}(?!\w)"):
        call()


def test_docs_list_every_case():
    """docs/reliability.md documents the bad-input tables: every case id of the op, API and CLI tables is listed."""
    from test_bad_input import CASES as OP_CASES
    from test_bad_input import VALUE_CASES
    from test_cli import CLI_CASES

    docs = (pathlib.Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    listed = set(re.findall(r"`([a-z0-9-]+)`", docs))
    missing = [c[0] for c in [*OP_CASES, *VALUE_CASES, *CASES, *CLI_CASES] if c[0] not in listed]
    assert not missing, f"docs/reliability.md does not list: {missing}"
