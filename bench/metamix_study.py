"""MetaMix study on the embedded digits: MetaMix vs joint (EdMIPS-style) search vs uniform LSQ, at W4 with the
packaged small-input MobileNet-v2 and a budget of average activation bits 3.0 and 2.5.

Per seed, one float model is trained once and shared by every method and target. Each method then gets the same
epochs (search + weight training) from it; uniform LSQ runs at the widest candidate width whose BOPs do not exceed
the target (2 bits for both targets with candidates {2, 4, 8}) and, since that width is the same for both targets,
once per seed. Writes ``bench/results/metamix_digits.{md,json}`` and PNG figures next to them.

    python bench/metamix_study.py            # the full study (about 20 minutes on one CPU core)
    python bench/metamix_study.py --quick    # a smoke run (under a minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import torch

import lowbit
import lowbit.data
from lowbit.metamix import MetaMix, MetaMixConfig
from lowbit.models import create_model
from lowbit.train import evaluate, fit, set_seed

METHODS = ("metamix", "joint", "uniform")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 target, 1 epoch per phase")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[3.0, 2.5], help="average activation bits")
    p.add_argument("--width", type=float, default=0.5, help="MobileNet-v2 width multiplier")
    p.add_argument("--fp-epochs", type=int, default=10)
    p.add_argument("--search-epochs", type=int, default=6)
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="weights and steps, search and weight phases")
    p.add_argument("--alpha-lr", type=float, default=0.05)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--out", default=None, help="default bench/results (--quick: a temporary folder)")
    args = p.parse_args(argv)
    if args.out is None:
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        args.out = tempfile.mkdtemp(prefix="metamix-quick-") if args.quick else results
    if args.quick:
        args.seeds, args.targets = args.seeds[:1], args.targets[:1]
        args.fp_epochs, args.search_epochs, args.finetune_epochs = 1, 1, 1
    return args


def pretrained(args, data, seed: int) -> tuple[torch.nn.Module, dict]:
    """The shared float starting point of one seed."""
    set_seed(seed)
    model = create_model("mobilenet_v2", num_classes=10, in_channels=1, small_input=True, width_mult=args.width)
    train, test = data.loaders(args.batch_size, seed)
    start = time.perf_counter()
    fit(model, train, test, args.fp_epochs, lr=0.05, progress=False, desc="fp")
    seconds = time.perf_counter() - start
    return model, {"seed": seed, "fp_acc": evaluate(model, test)["acc"], "fp_seconds": seconds}


def run_method(args, data, fp_model, seed: int, mode: str, target: float):
    train, test = data.loaders(args.batch_size, seed)
    cfg = MetaMixConfig(
        mode=mode,
        target_bits=target,
        fp_epochs=0,
        search_epochs=args.search_epochs,
        finetune_epochs=args.finetune_epochs,
        lr=args.lr,
        alpha_lr=args.alpha_lr,
        lam=args.lam,
        seed=seed,
        progress=False,
    )
    return MetaMix(copy.deepcopy(fp_model), train, test, cfg).fit()[1]


def row(report, seed: int, target: float) -> dict:
    return {
        "seed": seed,
        "target_bits": target,
        "mode": report.mode,
        "top1": report.accuracy,
        "top1_after_search": report.summary.get("search_test_acc"),
        "top1_after_selection": report.summary.get("selected_test_acc"),
        "bops": report.bops,
        "target_bops": report.target_bops,
        "bops_ratio": report.bops_ratio,
        "argmax_ratio": report.selection.argmax_bops / report.target_bops,
        "avg_bits": report.avg_bits,
        "model_avg_a_bits": report.model_avg_a_bits,
        "phase_seconds": report.phase_seconds,
        "bits": report.bits,
    }


def study(args) -> dict:
    data = lowbit.data.digits()
    runs, fps, reports = [], [], {}
    for seed in args.seeds:
        fp_model, fp = pretrained(args, data, seed)
        fps.append(fp)
        print(f"seed {seed}: float top-1 {fp['fp_acc']:.2f}% ({fp['fp_seconds']:.0f} s)", flush=True)
        uniform_by_width = {}
        for target in args.targets:
            for mode in METHODS:
                if mode == "uniform":
                    width = MetaMix(fp_model, *data.loaders(args.batch_size, seed), _uniform_cfg(target)).uniform_bits
                    if width not in uniform_by_width:
                        uniform_by_width[width] = run_method(args, data, fp_model, seed, mode, target)
                    report = _retarget(uniform_by_width[width], target, fp_model, data, args)
                else:
                    report = run_method(args, data, fp_model, seed, mode, target)
                runs.append(row(report, seed, target))
                reports[(seed, target, mode)] = report
                r = runs[-1]
                print(
                    f"  target {target} {mode:8s} top-1 {r['top1']:.2f}%  BOPs/target {r['bops_ratio']:.4f} "
                    f"(argmax {r['argmax_ratio']:.3f})  avg bits {r['avg_bits']:.3f}  "
                    + " ".join(f"{k} {v:.0f}s" for k, v in r["phase_seconds"].items()),
                    flush=True,
                )
    figures = plots(args, reports)
    return {"runs": runs, "fp": fps, "figures": figures}


def _uniform_cfg(target: float) -> MetaMixConfig:
    return MetaMixConfig(mode="uniform", target_bits=target, progress=False)


def _retarget(report, target: float, fp_model, data, args):
    """The uniform run reported against another target (same width, so the same run)."""
    rep = copy.copy(report)
    rep.target_bops = MetaMix(fp_model, *data.loaders(args.batch_size, 0), _uniform_cfg(target)).target
    return rep


def plots(args, reports) -> list[str]:
    seed, names = args.seeds[0], []
    for target in args.targets:
        for mode in ("metamix", "joint"):
            report = reports[(seed, target, mode)]
            stem = f"metamix_digits_{mode}_{str(target).replace('.', 'p')}"
            title = f"{mode}, target {target} avg bits, seed {seed}"
            names.append(os.path.basename(report.plot_allocation(os.path.join(args.out, f"{stem}_bits.png"), title)))
            names.append(
                os.path.basename(report.plot_trajectories(os.path.join(args.out, f"{stem}_search.png"), title))
            )
    return names


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(args, result, command: str, seconds: float) -> str:
    runs = result["runs"]
    fp_mean, fp_std = mean_std(f["fp_acc"] for f in result["fp"])
    lines = [
        "# MetaMix on digits: MobileNet-v2 (small input), W4, mixed-precision activations",
        "",
        f"Produced by `{command}` in {seconds / 60:.1f} min on {platform.machine()} CPU "
        f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s), lowbit {lowbit.__version__}).",
        "",
        f"Setup: MobileNet-v2 width {args.width}, small-input stem, scikit-learn digits (8x8, 1,437 train / 360 "
        f"test). Weights 4-bit LSQ per channel, first and last layer 8-bit weights and activations. Candidate "
        f"activation bits {{2, 4, 8}}. Per seed one float model is trained for {args.fp_epochs} epochs and shared "
        f"(float top-1 {fp_mean:.2f} ± {fp_std:.2f}%). Every method then gets {args.search_epochs} search + "
        f"{args.finetune_epochs} weight-training epochs (SGD lr {args.lr}, cosine; alpha Adam lr {args.alpha_lr}, "
        f"lambda {args.lam}). Uniform LSQ runs at the widest candidate width whose BOPs do not exceed the target: "
        f"2 bits for both targets (3 bits is not a candidate), so one uniform run per seed serves both rows. "
        f"Target BOPs = BOPs with every searched layer at the target bits. Seeds {args.seeds}; mean ± std.",
        "",
        "| target avg bits | method | top-1 (%) | BOPs / target (mean, max) | argmax BOPs / target | avg bits "
        "| search s | select s | weight training s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in args.targets:
        for mode in METHODS:
            rs = [r for r in runs if r["target_bits"] == target and r["mode"] == mode]
            acc, std = mean_std(r["top1"] for r in rs)
            ratio = [r["bops_ratio"] for r in rs]
            secs = {k: statistics.fmean(r["phase_seconds"][k] for r in rs) for k in ("search", "select", "finetune")}
            lines.append(
                f"| {target} | {mode} | {acc:.2f} ± {std:.2f} | {statistics.fmean(ratio):.4f}, {max(ratio):.4f} | "
                f"{statistics.fmean(r['argmax_ratio'] for r in rs):.3f} | "
                f"{statistics.fmean(r['avg_bits'] for r in rs):.3f} | {secs['search']:.1f} | {secs['select']:.2f} | "
                f"{secs['finetune']:.1f} |"
            )
    fp_secs = statistics.fmean(f["fp_seconds"] for f in result["fp"])
    lines += [
        "",
        f"Float pre-training (shared, once per seed): {fp_secs:.1f} s per seed. Times are wall-clock seconds per run "
        "(mean over seeds; the search time includes the per-epoch test evaluation). A MetaMix search epoch runs "
        "two forward/backward passes per batch (bit-meta and bit-search), the joint search one.",
        "",
        "Per seed (top-1 after the search with the soft mixture / after selection, before weight training / final):",
        "",
        "| seed | target | method | after search | after selection | final | BOPs / target |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['seed']} | {r['target_bits']} | {r['mode']} | {_pct(r['top1_after_search'])} | "
            f"{_pct(r['top1_after_selection'])} | {r['top1']:.2f} | {r['bops_ratio']:.4f} |"
        )
    lines += ["", "Figures (seed 0): " + ", ".join(f"[{f}]({f})" for f in result["figures"]), ""]
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    command = "python bench/metamix_study.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start = time.perf_counter()
    result = study(args)
    seconds = time.perf_counter() - start
    stem = "metamix_digits_quick" if args.quick else "metamix_digits"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump({"command": command, "args": vars(args), "seconds": seconds, **result}, f, indent=2)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(markdown(args, result, command.strip(), seconds))
    print(f"wrote {stem}.md/.json in {args.out} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
