"""How tests/data/packed_v1_small_cnn.safetensors and .json were made (run once, with lowbit at commit 11c5a04,
whose ``lowbit.save`` wrote format ``lowbit.packed`` version 1; the current ``lowbit.save`` writes a later
version, so running this again no longer reproduces the v1 file).

The model: ``small_cnn`` (width 8, 1 input channel, 10 classes), W4A4 with per-layer weight bits
{features.1.0: 3, features.3.0: 2} (3-bit: a 4-bit container), first/last layer at 8 bits, calibrated on a
signed input (so the first layer has a signed activation quantizer), the classifier replaced by a
``QLinear(a_bits=None)`` (a ``DequantLinear`` after convert), converted and saved. The .json holds the input
seed and shape and the logits the v1 model gave for it (``lowbit.load`` + forward, fused as load fuses).

    .venv/bin/python tests/data/make_packed_v1.py
"""

import json
import pathlib

import torch

import lowbit
from lowbit.models import create_model
from lowbit.nn.layers import QLinear

HERE = pathlib.Path(__file__).parent
SEED, SHAPE = 0, (4, 1, 8, 8)


def main() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    model = lowbit.quantize(model, w_bits=4, a_bits=4, bits={"features.1.0": 3, "features.3.0": 2})
    head = model.classifier
    float_head = QLinear(head.in_features, head.out_features, w_bits=head.w_bits, a_bits=None)
    float_head.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("act_quant")},
                               strict=False)  # fmt: skip
    model.classifier = float_head
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    packed = lowbit.convert(model)
    path = HERE / "packed_v1_small_cnn.safetensors"
    lowbit.save(packed, path)
    loaded = lowbit.load(path)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        logits = loaded(x)
    expected = {"input": {"generator_seed": SEED, "shape": list(SHAPE), "dist": "randn"}, "logits": logits.tolist()}
    (HERE / "packed_v1_small_cnn.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
