"""The ``lowbit`` command line.

``info`` (what is installed, which backends run and why not), ``demo`` (the main job, end to end on real data),
``bench`` (every microbenchmark), ``mixquant`` / ``metamix`` (the methods on a packaged model and your data),
``convert`` (a trained fake-quant model to a packed file) and ``eval`` (accuracy of a saved model).
User mistakes print one line that says what to do; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx2", "fma", "f16c")


def _cpu_description() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if flags and model:
                    break
    except OSError:
        pass
    return {"model": model, "features": [f for f in CPU_FLAGS if f in flags]}


def info_dict() -> dict:
    import torch

    import lowbit
    from lowbit.backends import NAMES, PREFERENCE, status

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    kernels_isa = torch.ops.lowbit_C.cpu_isa() if status("cpu").available else None
    rows = [status(name) for name in NAMES]
    default = {}
    for device, order in PREFERENCE.items():
        usable = [n for n in order if status(n).available and device in status(n).devices]
        default[device] = usable[0] if usable else None
    return {
        "lowbit": lowbit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu": {**_cpu_description(), "threads": torch.get_num_threads(), "kernels_isa": kernels_isa},
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "backends": [{"name": r.name, "available": r.available, "why": r.reason, "devices": r.devices} for r in rows],
        "default_backend": default,
    }


def _print_info(info: dict) -> None:
    cpu = info["cpu"]
    print(f"lowbit {info['lowbit']}")
    print(
        f"python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  "
        f"triton {info['triton'] or 'not installed'}"
    )
    print(f"cpu    {cpu['model']}, {cpu['threads']} threads")
    print(
        f"       features: {' '.join(cpu['features']) or 'none of interest'}; lowbit kernels use: {cpu['kernels_isa']}"
    )
    print(f"gpu    {', '.join(info['cuda_devices']) or 'none'}")
    print("backends:")
    for b in info["backends"]:
        state = "available" if b["available"] else "unavailable"
        print(f"  {b['name']:<10} {state:<12} {b['why']}")
    chosen = ", ".join(f"{dev} tensors -> {name or 'none'}" for dev, name in info["default_backend"].items())
    print(f"default: {chosen}")


def cmd_info(args) -> int:
    info = info_dict()
    if args.json:
        print(json.dumps(info, indent=2, default=list))
    else:
        _print_info(info)
    return 0


from lowbit.demo import DemoConfig  # noqa: E402  (light: no torch work at import)

DEMO_DEFAULTS = DemoConfig()

# ---- demo -------------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from lowbit import demo, demo_report

    config = demo.DemoConfig(
        model=args.model,
        width=args.width,
        data=args.data,
        image_size=args.image_size,
        device=args.device,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        target_bits=args.target_bits,
        weight_bits=args.weight_bits,
        seed=args.seed,
        out=args.out,
        quick=args.quick,
        progress=not args.no_progress,
    )
    metrics = demo.run(config)
    print(demo_report.summary(metrics))
    return 0


def _add_demo(sub) -> None:
    d = DEMO_DEFAULTS
    p = sub.add_parser(
        "demo",
        help="train, MixQuant, MetaMix, baselines, convert, save and time a model on real data (the main job)",
        description="End to end on scikit-learn's bundled digits (or --data DIR): fp32 training, a MixQuant weight "
        "plan, MetaMix activation search + weight training, uniform W4A4/W4A2 LSQ baselines, conversion to packed "
        "integer layers, save, reload and timing. Writes report.md, metrics.json, pareto.png, bits.png and "
        "model.safetensors to --out.",
    )
    _add_model_args(p, d.model, d.width)
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"fp32 training epochs (default {d.epochs})")
    p.add_argument(
        "--qat-epochs", type=int, default=d.qat_epochs, help=f"epochs per quantized method (default {d.qat_epochs})"
    )
    p.add_argument(
        "--target-bits", type=float, default=d.target_bits, help="MetaMix average activation bits (default 3.0)"
    )
    p.add_argument("--weight-bits", type=float, default=d.weight_bits, help="MixQuant average weight bits (default 4)")
    p.add_argument("--out", default=d.out, help=f"results folder (default {d.out})")
    p.add_argument("--quick", action="store_true", help="a sub-minute smoke run (tiny model, one epoch per phase)")
    p.set_defaults(run=cmd_demo)


# ---- bench ------------------------------------------------------------------------------------------------------

BENCHMARKS = ("bench_fake_quant.py", "bench_layers.py", "bench_packed.py", "bench_convert.py")


def _bench_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.getcwd(), "bench"), os.path.join(os.path.dirname(here), "bench")):
        if os.path.isfile(os.path.join(candidate, BENCHMARKS[0])):
            return candidate
    raise ValueError("the benchmark scripts live in the source checkout's bench/ folder: run from the checkout")


def cmd_bench(args) -> int:
    folder = _bench_dir()
    failed = []
    for script in BENCHMARKS:
        path = os.path.join(folder, script)
        if not os.path.isfile(path):
            continue
        command = [sys.executable, path] + (["--quick"] if args.quick else []) + (["--device", args.device])
        print(f"$ {' '.join(command)}", flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(script)
    if failed:
        raise RuntimeError(f"benchmarks failed: {', '.join(failed)} (see their output above)")
    print(f"tables written to {os.path.join(folder, 'results')}/")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="run every microbenchmark against the reference PyTorch ops and write the result tables"
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(run=cmd_bench)


# ---- convert and eval -------------------------------------------------------------------------------------------


def _load_module(path: str):
    import torch

    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        import lowbit

        return lowbit.load(path)
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a model saved by lowbit mixquant/metamix")
    return model


def cmd_convert(args) -> int:
    import lowbit

    model = _load_module(args.input)
    packed = lowbit.convert(model.eval())
    lowbit.save(packed, args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes)")
    return 0


def cmd_eval(args) -> int:
    from lowbit import data, train

    model = _load_module(args.model_file).to(args.device)
    dataset = data.load(args.data, image_size=args.image_size)
    _, test = dataset.loaders(256)
    result = train.evaluate(model, test, args.device)
    print(f"{args.model_file}: top-1 {result['acc']:.2f}%  loss {result['loss']:.4f}  on {dataset.name} test split")
    return 0


def _add_convert_eval(sub) -> None:
    p = sub.add_parser("convert", help="turn a trained fake-quant model (.pt) into packed integer layers, saved")
    p.add_argument("input", help="a model saved by `lowbit mixquant` or `lowbit metamix` (qat.pt)")
    p.add_argument("output", help="the packed model file to write (.safetensors)")
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser("eval", help="top-1 accuracy of a saved model (packed .safetensors or fake-quant .pt)")
    p.add_argument("model_file", help="model.safetensors (lowbit.save) or qat.pt")
    _add_data_args(p)
    p.set_defaults(run=cmd_eval)


# ---- shared arguments -------------------------------------------------------------------------------------------


def _add_model_args(p, model: str, width: float) -> None:
    from lowbit.models import MODELS

    p.add_argument("--model", default=model, choices=sorted(MODELS), help=f"packaged model (default {model})")
    p.add_argument("--width", type=float, default=width, help=f"width multiplier (default {width})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_data_args(p) -> None:
    p.add_argument("--data", default=None, help="image folder, one sub-folder per class (default: bundled digits)")
    p.add_argument("--image-size", type=int, default=32, help="resize --data images to this square (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Fused low-bit quantization kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, CPU features and every backend with why it is (un)available")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(run=cmd_info)
    _add_demo(sub)
    _add_bench(sub)
    _add_convert_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"lowbit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
