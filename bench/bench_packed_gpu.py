"""Packed GEMMs on a CUDA GPU (issue 10): lowbit W8A8 / W4A8 / W2A8 against bf16 and int8 PyTorch matmuls.

For M in {1, 16, 64, 256, 4096} and K = N in {4096, 8192}, in one run on one device:

  bf16 F.linear     x (M, K) bf16 @ W (N, K) bf16
  torch._int_mm     int8 (M, K) @ int8 (K, N) -> int32, the matmul alone (no quantization, no scale); it needs
                    M > 16, so smaller M read "n/a"
  lowbit <backend>  lowbit.packed_linear on bf16 x: activation quantization (8-bit signed) + packed GEMM + scale +
                    bias, for every lowbit GPU backend (triton, cuda) and weight width 8, 4, 2
  gemlite           the same widths through gemlite's GemLiteLinear, when the package imports (else a note why)

Each call is timed alone with CUDA events after a 256 MB write that flushes L2 (weights come from HBM, as in a
model whose layers do not all fit in L2), implementations round-robin, median of the rounds: once eagerly (what a
Python caller sees, launch overhead included) and once replaying a CUDA graph of the call (the GPU time). Before
timing, each lowbit output is compared bit for bit with the reference backend's (the contract is bit-exact across
backends): the "exact" column.

Targets (issue 10): at M <= 16, W4 at least 2.5x and W2 at least 3.5x faster than bf16; at M = 4096 no slower than
bf16. Writes bench/results/packed_gpu.{md,json} with the device, driver and versions. Needs a CUDA device; without
one it exits with status 2 and says so. `--quick` runs K = N = 4096 only with fewer rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch
from common import RESULTS, command_line

MS = (1, 16, 64, 256, 4096)
SIZES = (4096, 8192)
WIDTHS = (8, 4, 2)
X_BITS = 8  # signed 8-bit activations: the "A8" of W4A8


def _flush_buffer(device) -> torch.Tensor:
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)


def time_round_robin(fns: dict, device, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each function, each call timed alone after an L2 flush."""
    flush = _flush_buffer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize(device)
    events = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize(device)
    return {name: statistics.median(s.elapsed_time(e) for s, e in ev) for name, ev in events.items()}


def graphed(fn):
    """fn captured in a CUDA graph (replay: the GPU time without Python's launch overhead), or None if it cannot be
    captured (a host sync inside, for example)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception:  # noqa: BLE001  (then only the eager time is reported)
        return None


def lowbit_backends() -> list[str]:
    import lowbit
    from lowbit.backends import status

    return [name for name in lowbit.backends() if name != "reference" and "cuda" in status(name).devices]


def gemlite_linear(w_codes: torch.Tensor, w_scale: torch.Tensor, bits: int, bias: torch.Tensor):
    """A GemLiteLinear holding the same weights (asymmetric form: codes + 2^(b-1) with zero point 2^(b-1)), or the
    reason it cannot be built. gemlite's API moves between releases; any failure is reported, not raised."""
    try:
        from gemlite.core import DType, GemLiteLinear  # type: ignore[import-not-found]

        n, k = w_codes.shape
        layer = GemLiteLinear(
            bits, group_size=k, in_features=k, out_features=n, input_dtype=DType.BF16, output_dtype=DType.BF16
        )
        offset = 1 << (bits - 1)
        w_unsigned = (w_codes.to(torch.int32) + offset).to(torch.uint8)
        scales = w_scale.view(n, 1).to(torch.bfloat16)
        zeros = torch.full((n, 1), float(offset), dtype=torch.bfloat16, device=w_codes.device)
        layer.pack(w_unsigned, scales, zeros, bias=bias.to(torch.bfloat16))
        return layer, None
    except Exception as error:  # noqa: BLE001  (an optional comparison: any failure is a note in the table)
        return None, f"{type(error).__name__}: {error}"[:200]


def run_case(m: int, size: int, device, rounds: int, backends: list[str]) -> dict:
    import lowbit

    k = n = size
    gen = torch.Generator(device=device).manual_seed(m * 7 + size)
    x = torch.randn((m, k), generator=gen, device=device).to(torch.bfloat16)
    w_bf16 = (torch.randn((n, k), generator=gen, device=device) * 0.02).to(torch.bfloat16)
    bias = torch.randn((n,), generator=gen, device=device)
    x_step = torch.tensor([0.05], device=device)
    fns = {"bf16 F.linear": lambda: torch.nn.functional.linear(x, w_bf16)}
    notes: dict[str, str] = {}

    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    b8 = torch.randint(-128, 128, (k, n), dtype=torch.int8, device=device)
    try:
        torch._int_mm(a8, b8)
        fns["torch._int_mm"] = lambda: torch._int_mm(a8, b8)
    except RuntimeError as error:
        notes["torch._int_mm"] = f"n/a ({str(error).splitlines()[0][:80]})"

    exact: dict[str, bool] = {}
    for bits in WIDTHS:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = torch.randint(lo, hi + 1, (n, k), dtype=torch.int8, device=device, generator=gen)
        packed = lowbit.pack(codes, bits)
        w_scale = torch.rand((n,), generator=gen, device=device) * 0.01 + 1e-3

        def call(packed=packed, w_scale=w_scale, bits=bits):
            return lowbit.packed_linear(x, packed, w_scale, bits, x_step, X_BITS, x_signed=True, bias=bias)

        with lowbit.use_backend("reference"):
            expected = call()
        for backend in backends:
            name = f"lowbit {backend} W{bits}A8"
            with lowbit.use_backend(backend):
                exact[name] = bool(torch.equal(call().view(torch.int16), expected.view(torch.int16)))

            def timed(backend=backend, call=call):
                with lowbit.use_backend(backend):
                    return call()

            fns[name] = timed
        layer, why = gemlite_linear(codes, w_scale, bits, bias)
        if layer is not None:
            fns[f"gemlite W{bits}A16"] = lambda layer=layer: layer(x)
        else:
            notes[f"gemlite W{bits}A16"] = f"unavailable ({why})"
    times = time_round_robin(fns, device, rounds)
    graphs = {name: g for name, g in ((name, graphed(fn)) for name, fn in fns.items()) if g is not None}
    graph_times = time_round_robin(graphs, device, rounds) if graphs else {}
    return {"M": m, "K": k, "N": n, "ms": times, "graph_ms": graph_times, "exact": exact, "notes": notes}


def environment(device, argv: list[str] | None) -> dict:
    def driver() -> str:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(RESULTS)
    ).stdout.strip()
    return {
        "device": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "driver": driver(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "lowbit_commit": commit or "unknown",
        # kernels/packed_linear.py: full, or quick (a subset of the configurations) in tools/gpu_check.sh's run
        "triton_autotune": os.environ.get("LOWBIT_TRITON_AUTOTUNE", "full"),
        "command": command_line("bench_packed_gpu.py", argv),
    }


def markdown(results: list[dict], env: dict) -> str:
    lines = [
        "# Packed GEMMs on the GPU",
        "",
        f"{env['device']} (sm_{env['capability'].replace('.', '')}), driver {env['driver']}, CUDA {env['cuda']}, "
        f"torch {env['torch']}, triton {env['triton']}, lowbit {env['lowbit_commit']}, Triton autotuning "
        f"{env['triton_autotune']}. Median ms per call after an L2 flush, speed-ups against bf16 F.linear (eager and "
        "CUDA-graph); lowbit calls include activation quantization and the epilogue. From "
        f"`{env['command']}`.",
        "",
    ]
    for res in results:
        base = res["ms"]["bf16 F.linear"]
        gbase = res["graph_ms"].get("bf16 F.linear")
        lines += [
            f"## M={res['M']}, K=N={res['K']}",
            "",
            "| implementation | eager ms | vs bf16 | CUDA-graph ms | vs bf16 | exact |",
            "|---|---|---|---|---|---|",
        ]
        for name, ms in res["ms"].items():
            mark = {True: "yes", False: "**NO**"}.get(res["exact"].get(name), "")
            g = res["graph_ms"].get(name)
            graph = f"{g:.4f} | {gbase / g:.2f}x" if g is not None and gbase else "n/a | "
            lines.append(f"| {name} | {ms:.4f} | {base / ms:.2f}x | {graph} | {mark} |")
        for name, note in res["notes"].items():
            lines.append(f"| {name} | {note} | | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = N = 4096 only, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(RESULTS, "packed_gpu"), help="output path without suffix")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_packed_gpu: needs a CUDA GPU (torch.cuda.is_available() is False); "
            "run it on a CUDA machine with a CUDA build of torch (see issue 10)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    backends = lowbit_backends()
    if not backends:
        print("bench_packed_gpu: no lowbit GPU backend is available (triton or cuda)", file=sys.stderr)
        return 2
    rounds = args.rounds or (10 if args.quick else 30)
    results = []
    for size in SIZES[:1] if args.quick else SIZES:
        for m in MS:
            res = run_case(m, size, device, rounds, backends)
            print(f"M={m} K=N={size}: " + ", ".join(f"{k} {v:.4f} ms" for k, v in res["ms"].items()), flush=True)
            results.append(res)
    env = environment(device, argv)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(results, env))
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0 if all(all(r["exact"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
