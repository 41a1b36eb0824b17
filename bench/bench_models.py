"""Converted (packed) models against fp32 PyTorch and ONNX Runtime, end to end on the CPU. Side by side, one run.

ResNet-18 and MobileNet-v2 from ``lowbit.models``, each with the small-input stem at 32x32 (10 classes) and the
standard stem at 224x224 (1000 classes), batch 1 and batch 32. The quantized model is W4A8 with the first and
last layer at 8 bits (``lowbit.quantize(model, 4, 8)``), its steps initialised on one calibration batch, then
``lowbit.convert``. Implementations, timed round-robin (one forward of each per round), median of the rounds:

  fp32 eager        the float model
  fp32 compiled     torch.compile(float model)
  ORT fp32          the float model exported with torch.onnx.export, ONNX Runtime CPUExecutionProvider
  ORT int8 QDQ      that export quantized by onnxruntime.quantization.quantize_static (QDQ, per-channel int8
                    weights, uint8 activations), calibrated on the same calibration batch as lowbit
  lowbit packed     the converted model, eager
  lowbit compiled   torch.compile(converted model, fullgraph=True)

ONNX Runtime runs with the same thread count as torch and its intra-op spinning off
(``session.intra_op.allow_spinning=0``), so its idle threads do not steal the CPU from the next timed call.
onnx / onnxruntime / onnxscript are the optional ``[peers]`` extra; without them the ORT columns read n/a.

Also a batch-1 profile of every packed model (torch.profiler): the time inside operator kernels against the
forward's wall time, i.e. the per-layer Python overhead.

``--clock cpu`` times each forward by the process's CPU time instead of the wall clock: on a shared, overloaded
machine a forward longer than a scheduler slice is stretched by the other jobs, and CPU time (run with
``--threads 1``, where it equals the single-thread latency of a quiet machine) is the honest measure there.

Writes bench/results/models_<device>.{md,json}. ``--quick`` runs 32x32 batch 1 only with 2 repeats and writes
nothing unless --out is given.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import torch
from common import command_line, cpu_clock_median_ms, results_folder, timing_arguments, write_results

import lowbit
from lowbit.app.machine import cpu_name
from lowbit.app.timing import interleaved_median_ms
from lowbit.backends import cpu as cpu_backend
from lowbit.models import create_model
from lowbit.tools.convert import convert

MODELS = ("resnet18", "mobilenet_v2")
SIZES = (32, 224)
BATCHES = (1, 32)
CALIBRATION_BATCH = 8
IMPLS = ("fp32 eager", "fp32 compiled", "ORT fp32", "ORT int8 QDQ", "lowbit packed", "lowbit compiled")


def build(name: str, size: int) -> dict[str, torch.nn.Module]:
    """fp32, fake-quant and packed versions of one model, eval mode, plus the calibration batch."""
    torch.manual_seed(0)
    small = size <= 64
    fp32 = create_model(name, num_classes=10 if small else 1000, in_channels=3, small_input=small).eval()
    _randomize_batch_norm(fp32)
    calibration = torch.randn(CALIBRATION_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    fake = lowbit.quantize(copy.deepcopy(fp32), 4, 8)
    with torch.no_grad():
        fake.eval()(calibration)
    return {"fp32": fp32, "fake": fake, "packed": convert(fake), "calibration": calibration}


def _randomize_batch_norm(model: torch.nn.Module) -> None:
    """Trained-looking BN statistics (init_weights leaves them at identity, which would hide the BN cost)."""
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime peers
# ---------------------------------------------------------------------------------------------------------------


def ort_available() -> str | None:
    """None when onnx + onnxruntime can run here, else why not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime missing ({exc}); pip install -e .[peers]"
    return None


def ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str) -> None:
    """torch.onnx.export with a dynamic batch axis (one file serves batch 1 and 32)."""
    torch.onnx.export(
        model, (example,), path, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        dynamo=False,
    )  # fmt: skip


def quantize_onnx(fp32_path: str, int8_path: str, calibration: torch.Tensor) -> None:
    """Static QDQ int8 (per-channel weights, uint8 activations), calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calibration.numpy()}])

        def get_next(self):
            return next(self.batches, None)

    prepared = int8_path + ".pre.onnx"
    quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
    quantize_static(
        prepared, int8_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def ort_runners(fp32: torch.nn.Module, calibration: torch.Tensor, folder: str) -> dict:
    fp32_path, int8_path = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
    export_onnx(fp32, calibration[:1], fp32_path)
    quantize_onnx(fp32_path, int8_path, calibration)
    return {"ORT fp32": ort_session(fp32_path), "ORT int8 QDQ": ort_session(int8_path)}


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------


def torch_runner(model, x):
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def ort_runner(session, x):
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def compiled(model: torch.nn.Module, fullgraph: bool, x: torch.Tensor):
    """torch.compile of the model, compiled on x (first call), and the compile time in seconds."""
    fn = torch.compile(model, fullgraph=fullgraph)
    start = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return fn, time.perf_counter() - start


CLOCK = {"wall": lambda fns, repeats, warmup: interleaved_median_ms(fns, torch.device("cpu"), repeats, warmup)}
CLOCK["cpu"] = cpu_clock_median_ms


def time_row(built: dict, sessions: dict, batch: int, size: int, repeats: int, clock: str = "wall") -> dict:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    fns = {"fp32 eager": torch_runner(built["fp32"], x)}
    notes = {}
    fp32_c, notes["fp32 compile s"] = compiled(built["fp32"], False, x)
    fns["fp32 compiled"] = torch_runner(fp32_c, x)
    for name, session in sessions.items():
        fns[name] = ort_runner(session, x)
    fns["lowbit packed"] = torch_runner(built["packed"], x)
    packed_c, notes["packed compile s"] = compiled(built["packed"], True, x)
    fns["lowbit compiled"] = torch_runner(packed_c, x)
    with torch.inference_mode():
        fake_top1 = built["fake"](x).argmax(1)
        agree = bool(torch.equal(fake_top1, built["packed"](x).argmax(1)))
        agree_c = bool(torch.equal(fake_top1, packed_c(x).argmax(1)))
    warmup = 1 if batch * size * size > 32 * 32 * 32 else 3
    times = CLOCK[clock](fns, repeats, warmup)
    return {"ms": times, "top1_packed_equals_fake_quant": agree, "top1_compiled_equals_fake_quant": agree_c, **notes}


def profile_batch1(model: torch.nn.Module, size: int, rounds: int = 5) -> dict:
    """Wall time of a batch-1 forward against the time its operators' kernels take (torch.profiler self CPU time
    of every op); the rest is Python between the ops. Profiler overhead is included in the wall time."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(rounds):
                model(x)
            wall_ms = (time.perf_counter() - start) * 1e3 / rounds
    events = prof.key_averages()
    kernel_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / rounds
    lowbit_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("lowbit")) / 1e3 / rounds
    layers = sum(1 for m in model.modules() if not list(m.children()))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    return {
        "wall_ms": wall_ms,
        "op_self_ms": kernel_ms,
        "lowbit_ops_ms": lowbit_ms,
        "leaf_modules": layers,
        "outside_ops_us_per_module": (wall_ms - kernel_ms) * 1e3 / layers,
        "top_ops": [(e.key, e.self_cpu_time_total / 1e3 / rounds, e.count // rounds) for e in top],
    }


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def _ratio(base: float | None, ms: float | None) -> str:
    return f"{base / ms:.2f}x" if base and ms else "n/a"


def markdown(results: dict, profiles: dict, meta: dict) -> str:
    lines = [
        "# Converted models against fp32 PyTorch and ONNX Runtime (cpu)",
        "",
        f"`{meta['command']}` on {meta['device_name']}, lowbit cpu kernels `{meta['cpu_isa']}`, {meta['threads']} "
        f"threads (torch and ONNX Runtime), torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, clock: "
        f"{meta['clock']}. Median of {meta['repeats']} round-robin repeats (224x224 batch 32: {meta['repeats_large']}),"
        " milliseconds per "
        "forward. W4A8, first and last layer 8-bit. Ratios: fp32 eager time / time (above 1 = faster than fp32 "
        f"eager). {meta['note']}",
        "",
        "| model | input | batch | " + " | ".join(IMPLS) + " | packed vs fp32 | packed vs best ORT "
        "| top-1 packed = fake-quant |",
        "|---|---|---:|" + "---:|" * len(IMPLS) + "---:|---:|---|",
    ]
    for key, row in results.items():
        ms = row["ms"]
        fp32 = ms["fp32 eager"]
        cells = [f"{ms[i]:.2f} ({_ratio(fp32, ms[i])})" if ms.get(i) else "n/a" for i in IMPLS]
        best_ort = min([ms[i] for i in ("ORT fp32", "ORT int8 QDQ") if ms.get(i)], default=None)
        best_lowbit = min(ms["lowbit packed"], ms["lowbit compiled"])
        model, size, batch = key.split(" ")
        agree = row["top1_packed_equals_fake_quant"] and row["top1_compiled_equals_fake_quant"]
        lines.append(
            f"| {model} | {size} | {batch[1:]} | " + " | ".join(cells) + f" | {_ratio(fp32, best_lowbit)} | "
            f"{_ratio(best_ort, best_lowbit)} | {'yes' if agree else 'NO'} |"
        )
    lines += [
        "",
        "packed vs fp32 / vs best ORT use the faster of lowbit packed (eager) and lowbit compiled.",
        "",
        "## Batch-1 profile of the packed models (eager, torch.profiler)",
        "",
        "| model | input | forward ms | in op kernels ms | in lowbit ops ms | outside ops, us per leaf module "
        "| top ops (self ms, calls) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for key, p in profiles.items():
        model, size = key.split(" ")
        top = ", ".join(f"{name} {ms:.2f} ({n})" for name, ms, n in p["top_ops"][:4])
        lines.append(
            f"| {model} | {size} | {p['wall_ms']:.2f} | {p['op_self_ms']:.2f} | {p['lowbit_ops_ms']:.2f} | "
            f"{p['outside_ops_us_per_module']:.1f} ({p['leaf_modules']} modules) | {top} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = timing_arguments(__doc__, "32x32 batch 1 only, 2 repeats, no files unless --out", note="", threads=True)
    parser.add_argument("--repeats-large", type=int, default=3, help="repeats for the 224x224 batch-32 rows")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated input sizes")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--stem", default="models_cpu", help="results file name (without .md / .json)")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall", help="wall clock or process CPU time")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 10)
    out = results_folder(args)
    sizes = (32,) if args.quick else tuple(int(s) for s in args.sizes.split(","))
    batches = (1,) if args.quick else tuple(int(b) for b in args.batches.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    ort_missing = ort_available()
    from lowbit.backends import extension

    extension.load()
    meta = {
        "device": "cpu",
        "device_name": cpu_name(),
        "cpu_isa": cpu_backend.isa(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort_missing or __import__("onnxruntime").__version__,
        "lowbit": lowbit.__version__,
        "repeats": repeats,
        "repeats_large": min(repeats, args.repeats_large),
        "note": args.note,
        "clock": "wall clock" if args.clock == "wall" else "process CPU time",
        "command": command_line("bench_models.py", argv),
    }
    results, profiles = {}, {}
    for name in args.models.split(","):
        for size in sizes:
            built = build(name, size)
            with tempfile.TemporaryDirectory() as folder:
                sessions = {} if ort_missing else ort_runners(built["fp32"], built["calibration"], folder)
                for batch in batches:
                    print(f"{name} {size}x{size} batch {batch} ...", file=sys.stderr, flush=True)
                    n = meta["repeats_large"] if batch * size * size > 32 * 64 * 64 else repeats
                    results[f"{name} {size}x{size} b{batch}"] = time_row(built, sessions, batch, size, n, args.clock)
            profiles[f"{name} {size}x{size}"] = profile_batch1(built["packed"], size)
            torch._dynamo.reset()
    text = markdown(results, profiles, meta)
    print(text)
    if out:
        write_results(out, args.stem, text, {"meta": meta, "results": results, "profiles": profiles})
    return 0


if __name__ == "__main__":
    sys.exit(main())
