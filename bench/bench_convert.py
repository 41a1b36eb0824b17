"""End-to-end inference latency of converted (packed) models against the fp32 eager model. Side by side, one run.

ResNet-18 and MobileNet-v2 (``small_input=True``, width 1.0, 10 classes, 32x32 RGB input), W4A8 with the first
and last layer at 8 bits (``lowbit.quantize(model, 4, 8)``), steps initialised on one random batch, then
``lowbit.convert``. Timed round-robin (one forward of each model per round, ``torch.inference_mode``), median of
the rounds, at batch 1 and 32:

  fp32 eager     the float model
  fake-quant     the quantized model before conversion (QConv2d/QLinear on the fused fake-quant op)
  lowbit packed  the converted model (``lowbit.convert``, fused: batch-norm and ReLU folded into the packed layers,
                 uint8/int8 codes between them, integer depthwise kernel; see lowbit.nn.packed). bench_models.py
                 adds the 224x224 models, torch.compile and ONNX Runtime.

Writes bench/results/convert_<device>.{md,json}. ``--quick`` runs batch 1 only with 3 repeats and writes nothing
unless --out is given.
"""

from __future__ import annotations

import copy
import sys

import torch
from common import command_line, made_by, results_folder, timing_arguments, write_results

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.app.timing import interleaved_median_ms
from lowbit.backends import cpu as cpu_backend
from lowbit.backends import select
from lowbit.models import create_model
from lowbit.tools.convert import convert

MODELS = ("resnet18", "mobilenet_v2")


def build(name: str) -> dict[str, torch.nn.Module]:
    """The fp32, fake-quant and packed versions of one model, in eval mode."""
    torch.manual_seed(0)
    fp32 = create_model(name, num_classes=10, in_channels=3, small_input=True, width_mult=1.0).eval()
    fake = lowbit.quantize(copy.deepcopy(fp32), 4, 8)  # same float weights; steps from one calibration batch
    with torch.no_grad():
        fake.eval()(torch.randn(8, 3, 32, 32))
    return {"fp32 eager": fp32, "fake-quant": fake, "lowbit packed": convert(fake)}


def time_model(name: str, batch: int, repeats: int) -> dict[str, float]:
    models = build(name)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        ref, out = models["fake-quant"](x), models["lowbit packed"](x)
    agree = bool(torch.equal(ref.argmax(1), out.argmax(1)))

    def forward(model):
        def run():
            with torch.inference_mode():
                model(x)

        return run

    times = interleaved_median_ms({k: forward(m) for k, m in models.items()}, torch.device("cpu"), repeats)
    return {**times, "top1_agrees": agree}


def markdown(results: dict, meta: dict) -> str:
    lines = [
        "# Converted models, end-to-end latency (cpu)",
        "",
        f"{made_by(meta)}, "
        f"packed_linear backend `{meta['backend']}`. Median of {meta['repeats']} round-robin repeats, milliseconds "
        "per forward; W4A8, first and last layer 8-bit, 32x32 input, width 1.0.",
        "",
        "| model | batch | fp32 eager | fake-quant | lowbit packed | packed vs fp32 | top-1 packed = fake-quant |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, row in results.items():
        model, batch = key.rsplit(" b", 1)
        fp32, packed = row["fp32 eager"], row["lowbit packed"]
        lines.append(
            f"| {model} | {batch} | {fp32:.2f} | {row['fake-quant']:.2f} | {packed:.2f} | {fp32 / packed:.2f}x "
            f"| {'yes' if row['top1_agrees'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _backend_name() -> str:
    backend = select(torch.device("cpu")).name
    return f"cpu ({cpu_backend.isa()})" if backend == "cpu" else backend


def main(argv=None) -> int:
    parser = timing_arguments(
        __doc__, "batch 1 only, 3 repeats, no files unless --out", "timed repeats per model", None
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    out = results_folder(args)
    meta = {
        "device": "cpu",
        "device_name": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "backend": _backend_name(),
        "repeats": repeats,
        "command": command_line("bench_convert.py", argv),
    }
    results = {}
    for name in MODELS:
        for batch in (1,) if args.quick else (1, 32):
            print(f"{name} batch {batch} ...", file=sys.stderr)
            results[f"{name} b{batch}"] = time_model(name, batch, repeats)
    text = markdown(results, meta)
    print(text)
    if out:
        write_results(out, "convert_cpu", text, {"meta": meta, "results_ms": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
