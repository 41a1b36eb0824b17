"""MetaMix study against the uniform activation frontier (SPEC section 9), on digits and mnist5k.

Per data set and seed, one float model is trained and shared. Every method then gets the same epochs (search +
weight training) at W4 (first and last layer 8-bit):

* uniform LSQ at every activation width 2..8: the frontier, points (BOPs, top-1);
* MetaMix and joint (EdMIPS-style) search at two targets: the BOPs of uniform A3, and halfway between A2 and A3;
* MetaMix variants, one switch each (``--variants``): float search weights, candidate sets with 3 bits, the
  paper's argmax selection (no repair/fill), no held-out search split.

A mixed run's score is its gap to the uniform frontier interpolated at its own BOPs (``lowbit.app.frontier``); the
tables give mean ± std over seeds and paired differences on the same seeds. The model is a small 6-layer CNN (5
searched layers; MobileNet-v2 does not fit 5 seeds x 2 data sets x ~20 runs on a shared 2-core CPU); mnist5k is
pooled to 14x14. Writes ``bench/results/metamix_<data>.{md,json}`` and ``metamix_<data>_frontier.png``; the JSON is
rewritten after every seed, so a partial run still leaves its numbers.

    python bench/metamix_study.py --data digits          # 5 seeds; the results file records the run time
    python bench/metamix_study.py --data mnist5k
    python bench/metamix_study.py --data digits --report-only   # tables and plot from the saved JSON
    python bench/metamix_study.py --quick                # a smoke run (under a minute), temporary folder
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn

import lowbit
import lowbit.app.data
from lowbit.app.frontier import gap, mean_std, paired
from lowbit.app.machine import cpu_name
from lowbit.metamix import MetaMix, MetaMixConfig
from lowbit.tools.train import evaluate, fit, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TARGETS = {"A3": 3.0, "A2.5": 2.5}  # average activation bits of the searched layers: BOPs of uniform A3 / halfway
VARIANTS = {
    "float-weights": dict(search_weights="float"),
    "bits{2,3,4,8}": dict(a_bits=(2, 3, 4, 8)),
    "bits{2..8}": dict(a_bits=(2, 3, 4, 5, 6, 7, 8)),
    "argmax-only": dict(repair=False, fill="none"),
    "no-split": dict(search_split=0.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("digits", "mnist5k"), default="digits")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch per phase, 3 widths")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--width", type=int, default=16, help="channels of the first convs (then 2x, 4x)")
    p.add_argument("--fp-epochs", type=int, default=None, help="default: digits 8, mnist5k 3")
    p.add_argument("--search-epochs", type=int, default=None, help="default: digits 3, mnist5k 2")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: digits 3, mnist5k 2")
    p.add_argument("--batch-size", type=int, default=None, help="default: digits 64, mnist5k 128")
    p.add_argument("--lr", type=float, default=0.01, help="weights and steps, search and weight phases")
    p.add_argument("--alpha-lr", type=float, default=0.05)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS)[:4], help=f"of {list(VARIANTS)}")
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[2, 3, 4, 8],
        help="uniform widths (every mixed run lies between A2 and A3 BOPs: only those two set its gap)",
    )
    p.add_argument("--base", default="{}", help="JSON MetaMixConfig fields for the MetaMix runs (tuning)")
    p.add_argument("--tag", default="", help="suffix of the results files (tuning runs)")
    p.add_argument("--no-joint", action="store_true", help="MetaMix only (tuning runs)")
    p.add_argument("--out", default=None, help="default bench/results (--quick: a temporary folder)")
    p.add_argument("--report-only", action="store_true", help="rewrite md and plot from the saved JSON")
    p.add_argument("--merge", nargs="*", default=[], help="--report-only: JSON files whose seeds join the report")
    args = p.parse_args(argv)
    small = args.data == "digits"
    for name, d, m in (
        ("fp_epochs", 8, 3),
        ("search_epochs", 3, 2),
        ("finetune_epochs", 3, 2),
        ("batch_size", 64, 128),
    ):
        if getattr(args, name) is None:
            setattr(args, name, d if small else m)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="metamix-quick-") if args.quick else common.RESULTS
    if args.quick:
        args.seeds, args.widths, args.variants = args.seeds[:1], [2, 3, 8], args.variants[:1]
        args.fp_epochs, args.search_epochs, args.finetune_epochs = 1, 1, 1
    args.base = json.loads(args.base)
    return args


def study_cnn(width: int, classes: int = 10) -> nn.Module:
    """conv(1->w) conv(w->w) pool conv(w->2w) conv(2w->2w) pool conv(2w->4w) gap linear: 5 searched layers."""

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    layers = [*block(1, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2)]
    layers += [*block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4 * w, classes)]
    return nn.Sequential(*layers)


def load_data(name: str):
    return lowbit.app.data.digits() if name == "digits" else lowbit.app.data.mnist5k(image_size=14)


def pretrained(args, data, seed: int) -> tuple[nn.Module, dict]:
    set_seed(seed)
    model = study_cnn(args.width, data.num_classes)
    train, test = data.loaders(args.batch_size, seed)
    start = time.perf_counter()
    fit(model, train, None, args.fp_epochs, lr=0.05, progress=False, desc="fp")
    return model, {"seed": seed, "fp_acc": evaluate(model, test)["acc"], "fp_seconds": time.perf_counter() - start}


def run_one(args, data, fp_model, seed: int, **fields) -> dict:
    train, test = data.loaders(args.batch_size, seed)
    base = dict(
        fp_epochs=0,
        search_epochs=args.search_epochs,
        finetune_epochs=args.finetune_epochs,
        lr=args.lr,
        alpha_lr=args.alpha_lr,
        lam=args.lam,
        seed=seed,
        progress=False,
        eval_each_epoch=False,
    )
    cfg = MetaMixConfig(**{**base, **fields})
    start = time.perf_counter()
    report = MetaMix(copy.deepcopy(fp_model), train, test, cfg).fit()[1]
    return {
        "top1": report.accuracy,
        "top1_after_selection": report.summary.get("selected_test_acc"),
        "bops": report.bops,
        "target_bops": report.target_bops,
        "argmax_ratio": report.selection.argmax_bops / report.target_bops if report.target_bops else None,
        "avg_bits": report.avg_bits,
        "bits": report.bits,
        "seconds": time.perf_counter() - start,
    }


def one_seed(args, data, seed: int) -> dict:
    fp_model, record = pretrained(args, data, seed)
    print(f"seed {seed}: float top-1 {record['fp_acc']:.2f}% ({record['fp_seconds']:.0f} s)", flush=True)
    record["uniform"] = {}
    for b in args.widths:
        r = run_one(args, data, fp_model, seed, mode="uniform", a_bits=(b,), uniform_bits=b)
        record["uniform"][str(b)] = r
        print(f"  uniform A{b}: {r['top1']:.2f}% ({r['seconds']:.0f} s)", flush=True)
    record["mixed"] = []
    runs = [("metamix", {})] + ([] if args.no_joint else [("joint", {"mode": "joint"})])
    runs += [(v, VARIANTS[v]) for v in args.variants]
    for label, fields in runs:
        for tname, bits in TARGETS.items():
            fields = {"mode": "metamix", **args.base, **fields} if label != "joint" else fields
            r = run_one(args, data, fp_model, seed, target_bits=bits, **fields)
            r.update(method=label, target=tname, gap=frontier_gap(record, r))
            record["mixed"].append(r)
            print(
                f"  {label:14s} {tname:5s}: {r['top1']:.2f}% BOPs/target {r['bops'] / r['target_bops']:.3f} "
                f"gap {r['gap']:+.2f} ({r['seconds']:.0f} s)",
                flush=True,
            )
    return record


def frontier_points(record: dict) -> list[tuple[float, float]]:
    return [(r["bops"], r["top1"]) for r in record["uniform"].values()]


def frontier_gap(record: dict, run: dict) -> float:
    return gap(frontier_points(record), run["bops"], run["top1"])


# ---------------------------------------------------------------------------------------------------------- report


def pick(seeds, method, target):
    """The run of ``method`` at ``target`` of every seed that has it (variants may cover fewer seeds)."""
    found = [[r for r in s["mixed"] if r["method"] == method and r["target"] == target] for s in seeds]
    return [rs[0] for rs in found if rs]


def pick_pair(seeds, first, second, target):
    """Top-1 of two methods on the seeds that ran both: the paired comparison."""
    both = [s for s in seeds if pick([s], first, target) and pick([s], second, target)]
    return [r["top1"] for r in pick(both, first, target)], [r["top1"] for r in pick(both, second, target)]


def fmt(values, digits=2) -> str:
    m, s = mean_std(list(values))
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if digits else f"{m:.0f} ± {s:.0f}"


def signed(mean_and_std: tuple[float, float]) -> str:
    return f"{mean_and_std[0]:+.2f} ± {mean_and_std[1]:.2f}"


def pm(values) -> str:
    m, s = mean_std(list(values))
    return f"{m:.2f} ± {s:.2f}"


def methods_of(seeds) -> list[str]:
    return list(dict.fromkeys(r["method"] for s in seeds for r in s["mixed"]))


def markdown(result: dict) -> str:
    args, seeds = result["args"], result["seeds"]
    n = len(seeds)
    a2 = mean_std([s["uniform"]["2"]["bops"] for s in seeds])[0]
    lines = [
        f"# MetaMix on {args['data']}: gap to the uniform activation frontier (W4)",
        "",
        f"Produced by `{result['command']}` in {result['seconds'] / 60:.1f} min on {result['machine']} "
        f"(torch {torch.__version__}, 1 thread; shared machine, other jobs running).",
        "",
        f"Setup: {setup_text(args)} Seeds {[s['seed'] for s in seeds]} ({n}); mean ± std over seeds.",
        "",
        "## Uniform frontier (LSQ, W4, activations at one width)",
        "",
        "| activation bits | BOPs (M) | top-1 (%) |",
        "|---:|---:|---:|",
    ]
    for b in args["widths"]:
        rs = [s["uniform"][str(b)] for s in seeds]
        lines.append(f"| {b} | {rs[0]['bops'] / 1e6:.3f} | {pm(r['top1'] for r in rs)} |")
    fp = pm(s["fp_acc"] for s in seeds)
    lines += [
        "",
        f"Float model (shared starting point): {fp}%. Uniform A2 costs {a2 / 1e6:.3f} M BOPs per image.",
        "",
        "## Mixed precision against the frontier",
        "",
        "Gap = top-1 minus the frontier interpolated linearly at the run's own BOPs (points; + above, - under).",
        "",
        "| method | target | top-1 (%) | BOPs / target | avg act. bits | gap to frontier | gap > 0 (seeds) "
        "| paired vs MetaMix |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in methods_of(seeds):
        for target in TARGETS:
            rs = pick(seeds, method, target)
            wins, n = sum(r["gap"] > 0 for r in rs), len(rs)
            vs = "-" if method == "metamix" else signed(paired(*pick_pair(seeds, method, "metamix", target)))
            lines.append(
                f"| {method} | {target} | {pm(r['top1'] for r in rs)} | "
                f"{mean_std([r['bops'] / r['target_bops'] for r in rs])[0]:.3f} | "
                f"{mean_std([r['avg_bits'] for r in rs])[0]:.2f} | {fmt(r['gap'] for r in rs)} | {wins}/{n} | {vs} |"
            )
    fewer = [m for m in methods_of(seeds) if len(pick(seeds, m, "A3")) < len(seeds)]
    if fewer:
        covered = [s["seed"] for s in seeds if pick([s], fewer[0], "A3")]
        lines += ["", f"{', '.join(fewer)}: seeds {covered} only (the shared CPU's budget); paired on those seeds."]
    lines += ["", *findings(seeds), "", f"![frontier]({result['figure']})", "", *per_seed(seeds)]
    return "\n".join(lines) + "\n"


def data_text(data: str) -> str:
    """The images and splits of a study's data set, as its report says them."""
    return "8x8, 1,437 train / 360 test" if data == "digits" else "pooled to 14x14, 4,000 train / 1,000 test"


def setup_text(args: dict) -> str:
    size = data_text(args["data"])
    return (
        f"{args['data']} ({size}); a 6-layer CNN (width {args['width']}, 5 searched layers; the first conv and the "
        f"classifier at 8 bits), float-trained {args['fp_epochs']} epochs per seed and shared. Every run: "
        f"{args['search_epochs']} search + {args['finetune_epochs']} weight-training epochs, batch "
        f"{args['batch_size']}, SGD lr {args['lr']} cosine; alpha Adam lr {args['alpha_lr']}, lambda {args['lam']}. "
        "Uniform runs the same two phases at one width. MetaMix defaults: candidates {2, 4, 8}, quantized (W4) "
        "search weights, a 25% held-out search split, argmax + repair + fill; extra MetaMix fields "
        f"{args['base'] or 'none'}. Targets: A3 = the BOPs of uniform A3, A2.5 = halfway between uniform A2 and A3."
    )


def findings(seeds) -> list[str]:
    """Sentences built from the numbers: which targets are met, by how much."""
    out = ["## Targets (mean over seeds)", ""]
    for target in TARGETS:
        g = mean_std([r["gap"] for r in pick(seeds, "metamix", target)])
        ok = "met" if g[0] >= 1.0 else "missed"
        out.append(
            f"- MetaMix at least 1 point above the frontier at {target}: **{ok}** (gap {g[0]:+.2f} ± {g[1]:.2f})."
        )
        if "joint" not in methods_of(seeds):
            continue
        d = paired(*pick_pair(seeds, "metamix", "joint", target))
        ok = "met" if d[0] >= 0 else "missed"
        out.append(f"- MetaMix >= joint at {target}: **{ok}** (paired top-1 difference {d[0]:+.2f} ± {d[1]:.2f}).")
    best = {
        t: max(methods_of(seeds), key=lambda m, t=t: mean_std([r["gap"] for r in pick(seeds, m, t)])[0])
        for t in TARGETS
    }
    out.append("- Best mean gap per target: " + ", ".join(f"{t}: {m}" for t, m in best.items()) + ".")
    return out


def per_seed(seeds) -> list[str]:
    lines = [
        "## Per seed",
        "",
        "| seed | method | target | top-1 | after selection | BOPs / target | gap |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for s in seeds:
        for r in s["mixed"]:
            after = r["top1_after_selection"]
            lines.append(
                f"| {s['seed']} | {r['method']} | {r['target']} | {r['top1']:.2f} | "
                f"{'-' if after is None else f'{after:.2f}'} | {r['bops'] / r['target_bops']:.3f} | {r['gap']:+.2f} |"
            )
    return lines


def plot(result: dict, path: str) -> None:
    seeds, args = result["seeds"], result["args"]
    fig = common.figure((6.5, 4.2))
    ax = fig.subplots()
    xs = [mean_std([s["uniform"][str(b)]["bops"] / 1e6 for s in seeds])[0] for b in args["widths"]]
    ys = [mean_std([s["uniform"][str(b)]["top1"] for s in seeds]) for b in args["widths"]]
    common.plot_uniform(ax, [f"A{b}" for b in args["widths"]], xs, ys, "uniform A2..A8")
    markers = dict(zip(methods_of(seeds), "*oDv^<>p", strict=False))
    for method in methods_of(seeds):
        for i, target in enumerate(TARGETS):
            rs = pick(seeds, method, target)
            common.plot_mean(
                ax,
                [r["bops"] / 1e6 for r in rs],
                [r["top1"] for r in rs],
                fmt=markers[method],
                ms=11 if method == "metamix" else 6,
                color=f"C{methods_of(seeds).index(method)}",
                label=method if i == 0 else None,
            )
    ax.set_ylabel("top-1 (%)")
    title = f"{args['data']}: mixed activations vs the uniform frontier ({len(seeds)} seeds)"
    common.finish_axes(ax, "BOPs per image (millions, log)", title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merged(result: dict, paths: list[str]) -> dict:
    """``result`` with the seeds of the study JSON files at ``paths`` appended (a run split over processes)."""
    for path in paths:
        with open(path) as f:
            extra = json.load(f)
        result["seeds"] += extra["seeds"]
        result["seconds"] += extra["seconds"]
        result["command"] += f" (+ {extra['command']})"
    return result


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} logical CPU(s)"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        stem = f"metamix_{args.data}{args.tag}"
        with open(os.path.join(args.out, f"{stem}.json")) as f:
            result = json.load(f)
        common.write_study(args, "metamix", merged(result, args.merge), plot, markdown)
        return
    command = common.command_line("metamix_study.py", argv)
    data = load_data(args.data)
    result = {"command": command.strip(), "machine": machine(), "args": vars(args), "seeds": []}
    common.run_seeds(
        result,
        args.seeds,
        lambda seed: one_seed(args, data, seed),
        lambda r: common.write_study(args, "metamix", r, plot, markdown),
    )


if __name__ == "__main__":
    main()
