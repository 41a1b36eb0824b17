"""The ``lowbit`` command line: ``lowbit info`` (what is installed and which backends run) and ``lowbit bench``."""

from __future__ import annotations

import argparse
import json
import platform
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Fused low-bit quantization kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, CPU features and every backend with why it is (un)available")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"lowbit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
