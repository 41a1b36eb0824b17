"""MixQuant study against the uniform weight frontier (SPEC section 9), on digits and mnist5k, plus QE-table speed.

Per data set and seed, one float model is trained and shared. For each quantizer (min-max PTQ, BRECQ-style
reconstruction, LSQ QAT fine-tuning), weight-only:

* uniform plans at several widths give the frontier, points (model bytes, top-1);
* MixQuant plans from the QE table of *that* quantizer (asymmetric min-max for PTQ and BRECQ, symmetric for LSQ):
  the QEM rule over a ``qem`` sweep (the paper's rule) and the budget mode (the project's extension) at the bytes
  of uniform 3-bit and at 2.5 average bits;
* for PTQ and BRECQ the budget plans from the symmetric table too (the QE of another quantizer: the old default).

Each mixed point's score is its gap to its quantizer's frontier interpolated at its own bytes (``lowbit.app.frontier``).
The model is the 6-layer CNN of ``metamix_study.py`` (five convs and a classifier, 0.04M weights); mnist5k is pooled
to 14x14. Writes ``bench/results/mixquant_<data>.{md,json}`` and ``mixquant_<data>_frontier.png`` (JSON rewritten
after every seed); ``--speed`` writes ``mixquant_speed.{md,json,png}`` (QE-table time of full-size models).

    python bench/mixquant_study.py --data digits
    python bench/mixquant_study.py --data mnist5k
    python bench/mixquant_study.py --speed
    python bench/mixquant_study.py --data mnist5k --seeds 3 --tag _s3 --out parts   # one seed per process, then
    python bench/mixquant_study.py --data mnist5k --report-only --merge parts/mixquant_mnist5k_s3.json
    python bench/mixquant_study.py --quick                # smoke run, temporary folder
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from lowbit import mixquant
from lowbit.app.frontier import gap, mean_std, paired
from lowbit.models import create_model
from lowbit.tools import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from metamix_study import data_text, load_data, machine, merged, study_cnn  # noqa: E402  (the same model and data as MetaMix)

QEMS = (4, 16, 64, 256, 1024, 4096, 16384)
QUANTIZERS = ("min-max PTQ", "BRECQ-style", "LSQ QAT")
WIDTHS = {"min-max PTQ": (2, 3, 4, 5, 6, 7, 8), "BRECQ-style": (2, 3, 4, 8), "LSQ QAT": (2, 3, 4, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("digits", "mnist5k"), default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--fp-epochs", type=int, default=None, help="default: digits 8, mnist5k 3 (as metamix_study)")
    p.add_argument("--batch-size", type=int, default=None, help="default: digits 64, mnist5k 128")
    p.add_argument("--lsq-epochs", type=int, default=2)
    p.add_argument("--lsq-lr", type=float, default=0.01)
    p.add_argument("--brecq-iters", type=int, default=100)
    p.add_argument("--brecq-samples", type=int, default=256)
    p.add_argument("--max-qem-plans", type=int, default=3, help="QEM plans per seed for BRECQ and LSQ (PTQ: all)")
    p.add_argument("--speed", action="store_true", help="only the QE-table speed section")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the results files (a run split over processes)")
    p.add_argument("--merge", nargs="*", default=[], help="--report-only: JSON files whose seeds join the report")
    args = p.parse_args(argv)
    small = args.data == "digits"
    args.fp_epochs = args.fp_epochs or (8 if small else 3)
    args.batch_size = args.batch_size or (64 if small else 128)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="mixquant-quick-") if args.quick else common.RESULTS
    if args.quick:
        args.seeds, args.fp_epochs, args.lsq_epochs, args.brecq_iters, args.brecq_samples = [0], 1, 1, 5, 64
        args.max_qem_plans = 1
    return args


# ---------------------------------------------------------------------------------------------------------- quality


def make_quantizer(name: str, args, dataset, train_loader, seed: int):
    if name == "min-max PTQ":
        return mixquant.MinMaxPTQ()
    if name == "BRECQ-style":
        return mixquant.BRECQ(dataset.train_x, samples=args.brecq_samples, iters=args.brecq_iters, seed=seed)
    return mixquant.LSQFineTune(train_loader, epochs=args.lsq_epochs, lr=args.lsq_lr)


def accuracy(model, plan, quantizer, test_loader, seed: int) -> float:
    train.set_seed(seed)
    quantized = mixquant.apply_plan(copy.deepcopy(model), plan, quantizer)
    return train.evaluate(quantized, test_loader)["acc"]


def qem_plans(table, limit: int | None) -> list[tuple[float, mixquant.Plan]]:
    """Distinct QEM-rule plans over the sweep; with ``limit``, those nearest 2.5-3 average bits first."""
    plans, seen = [], set()
    for qem in QEMS:
        plan = mixquant.search(table, qem=qem)
        key = tuple(sorted(plan.bits.items()))
        if key not in seen:
            seen.add(key)
            plans.append((qem, plan))
    if limit is not None:
        plans = sorted(plans, key=lambda qp: abs(qp[1].avg_bits - 2.75))[:limit]
    return sorted(plans, key=lambda qp: qp[0])


def one_quantizer(name, args, dataset, model, loaders, seed) -> dict:
    train_loader, test_loader = loaders
    quantizer = make_quantizer(name, args, dataset, train_loader, seed)
    table = mixquant.qe_table(model, quantizer=quantizer)  # the error of the quantizer that will be applied
    out = {"uniform": {}, "mixed": []}
    for b in WIDTHS[name]:
        plan = mixquant.uniform_plan(table, b)
        out["uniform"][str(b)] = {
            "bytes": plan.model_bytes,
            "top1": accuracy(model, plan, quantizer, test_loader, seed),
        }
    points = [(u["bytes"], u["top1"]) for u in out["uniform"].values()]

    def add(rule, label, plan, table_kind):
        top1 = accuracy(model, plan, quantizer, test_loader, seed)
        out["mixed"].append(
            {
                "rule": rule,
                "label": label,
                "table": table_kind,
                "bytes": plan.model_bytes,
                "avg_bits": plan.avg_bits,
                "top1": top1,
                "gap": gap(points, plan.model_bytes, top1),
                "bits": dict(plan),
            }
        )

    three = mixquant.uniform_plan(table, 3).model_bytes
    budgets = {"3-bit bytes": mixquant.ModelBytes(three), "2.5 bits": mixquant.AvgBits(2.5)}
    for label, budget in budgets.items():
        add("budget", label, mixquant.search(table, budget=budget), "own")
    if name != "LSQ QAT":  # the symmetric table (another quantizer's error) for comparison
        sym = mixquant.qe_table(model)
        for label, budget in budgets.items():
            add("budget", label, mixquant.search(sym, budget=budget), "symmetric")
    limit = None if name == "min-max PTQ" else args.max_qem_plans
    for qem, plan in qem_plans(table, limit):
        add("qem", f"qem={qem}", plan, "own")
    return out


def one_seed(args, dataset, seed: int) -> dict:
    start = time.perf_counter()
    train.set_seed(seed)
    model = study_cnn(args.width, dataset.num_classes)
    loaders = dataset.loaders(args.batch_size, seed)
    train.fit(model, loaders[0], None, args.fp_epochs, lr=0.05, progress=False)
    model.eval()
    record = {"seed": seed, "fp_acc": train.evaluate(model, loaders[1])["acc"], "quantizers": {}}
    for name in QUANTIZERS:
        record["quantizers"][name] = one_quantizer(name, args, dataset, model, loaders, seed)
        r = record["quantizers"][name]
        budget = [m for m in r["mixed"] if m["rule"] == "budget" and m["table"] == "own"]
        print(
            f"  seed {seed} {name}: uniform "
            + " ".join(f"W{b} {u['top1']:.1f}" for b, u in r["uniform"].items())
            + " | budget gaps "
            + " ".join(f"{m['label']} {m['gap']:+.2f}" for m in budget),
            flush=True,
        )
    record["seconds"] = time.perf_counter() - start
    print(f"seed {seed}: float {record['fp_acc']:.2f}%, {record['seconds']:.0f} s", flush=True)
    return record


# ---------------------------------------------------------------------------------------------------------- report


def rows(seeds, qname, rule=None, label=None, table="own"):
    """The matching mixed row of every seed (one per seed), or [] if a seed lacks it."""
    out = []
    for s in seeds:
        found = [
            m
            for m in s["quantizers"][qname]["mixed"]
            if (rule is None or m["rule"] == rule) and (label is None or m["label"] == label) and m["table"] == table
        ]
        if len(found) != 1:
            return []
        out.append(found[0])
    return out


def pm(values, sign=False) -> str:
    m, s = mean_std(list(values))
    return f"{m:+.2f} ± {s:.2f}" if sign else f"{m:.2f} ± {s:.2f}"


def markdown(result: dict) -> str:
    args, seeds = result["args"], result["seeds"]
    lines = [
        f"# MixQuant on {args['data']}: gap to the uniform weight frontier (weight-only)",
        "",
        f"Produced by `{result['command']}` in {result['seconds'] / 60:.1f} min on {result['machine']} "
        f"(torch {torch.__version__}, 1 thread; shared machine, other jobs running).",
        "",
        f"Setup: {setup_text(args)} Seeds {[s['seed'] for s in seeds]}; mean ± std over seeds. Float top-1 "
        f"{pm(s['fp_acc'] for s in seeds)}%.",
        "",
        "## Uniform frontier (top-1 %, every layer at one width)",
        "",
        "| weight bits | bytes | " + " | ".join(QUANTIZERS) + " |",
        "|---:|---:|" + "---:|" * len(QUANTIZERS),
    ]
    for b in range(2, 9):
        cells = []
        for q in QUANTIZERS:
            us = [s["quantizers"][q]["uniform"].get(str(b)) for s in seeds]
            cells.append("-" if None in us else pm(u["top1"] for u in us))
        some = next(
            seeds[0]["quantizers"][q]["uniform"][str(b)]
            for q in QUANTIZERS
            if str(b) in seeds[0]["quantizers"][q]["uniform"]
        )
        lines.append(f"| {b} | {some['bytes']:,.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## MixQuant plans against the frontier",
        "",
        "Gap = top-1 minus the same quantizer's frontier interpolated linearly at the plan's bytes (+ above, - under).",
        "Table `own`: QE of the quantizer applied (asymmetric min-max for PTQ/BRECQ, symmetric for LSQ); `symmetric`:",
        "the symmetric max|W| table (the previous default), paired against `own` on the same seeds.",
        "",
        "| quantizer | rule | plan | QE table | avg bits | top-1 (%) | gap to frontier | gap > 0 (seeds) "
        "| paired vs own |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for q in QUANTIZERS:
        labels = list(dict.fromkeys((m["rule"], m["label"], m["table"]) for m in seeds[0]["quantizers"][q]["mixed"]))
        for rule, label, table in labels:
            rs = rows(seeds, q, rule, label, table)
            if not rs:
                continue
            vs = "-"
            if table == "symmetric":
                own = rows(seeds, q, rule, label, "own")
                vs = signed(paired([r["top1"] for r in rs], [r["top1"] for r in own])) if own else "-"
            lines.append(
                f"| {q} | {'budget (extension)' if rule == 'budget' else 'QEM (paper)'} | {label} | {table} | "
                f"{mean_std([r['avg_bits'] for r in rs])[0]:.2f} | {pm(r['top1'] for r in rs)} | "
                f"{pm((r['gap'] for r in rs), sign=True)} | {sum(r['gap'] > 0 for r in rs)}/{len(rs)} | {vs} |"
            )
    lines += ["", *findings(seeds), "", f"![frontier]({result['figure']})", ""]
    return "\n".join(lines) + "\n"


def signed(mean_and_std: tuple[float, float]) -> str:
    return f"{mean_and_std[0]:+.2f} ± {mean_and_std[1]:.2f}"


def setup_text(args: dict) -> str:
    size = data_text(args["data"])
    return (
        f"{args['data']} ({size}); the 6-layer CNN of metamix_study.py (width {args['width']}), float-trained "
        f"{args['fp_epochs']} epochs per seed, activations float. Min-max PTQ: asymmetric per channel. BRECQ-style: "
        f"{args['brecq_iters']} AdaRound iterations per block on {args['brecq_samples']} training images. LSQ: "
        f"{args['lsq_epochs']} epochs at lr {args['lsq_lr']}. QEM plans: qem in {list(QEMS)} (distinct plans; BRECQ "
        f"and LSQ: the {args['max_qem_plans']} nearest 2.75 average bits). Uniform widths: PTQ 2..8, BRECQ/LSQ 2, 3, "
        "4, 8 (every budget plan lies between 2 and 3 bits)."
    )


def findings(seeds) -> list[str]:
    out = ["## Targets (mean over seeds)", ""]
    for q in QUANTIZERS:
        for label in ("3-bit bytes", "2.5 bits"):
            rs = rows(seeds, q, "budget", label)
            m, s = mean_std([r["gap"] for r in rs])
            need = "above" if q != "LSQ QAT" else "at least on"
            ok = (m > 0) if need == "above" else (m >= 0)
            out.append(
                f"- {q}, budget {label}: {need} the frontier: **{'met' if ok else 'missed'}** (gap {m:+.2f} ± {s:.2f})."
            )
    for q in QUANTIZERS:
        qem = [
            lbl
            for (rule, lbl, t) in {(m["rule"], m["label"], m["table"]) for m in seeds[0]["quantizers"][q]["mixed"]}
            if rule == "qem"
        ]
        gaps = [
            mean_std([r["gap"] for r in rows(seeds, q, "qem", lbl)])[0] for lbl in qem if rows(seeds, q, "qem", lbl)
        ]
        if gaps:
            out.append(
                f"- {q}, QEM rule: mean gaps from {min(gaps):+.2f} to {max(gaps):+.2f} over {len(gaps)} qem values."
            )
    return out


def plot(result: dict, path: str) -> None:
    seeds, args = result["seeds"], result["args"]
    fig = common.figure((13, 4))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, q in zip(axes, QUANTIZERS, strict=True):
        widths = list(seeds[0]["quantizers"][q]["uniform"])
        xs = [seeds[0]["quantizers"][q]["uniform"][b]["bytes"] / 1024 for b in widths]
        ys = [mean_std([s["quantizers"][q]["uniform"][b]["top1"] for s in seeds]) for b in widths]
        common.plot_uniform(ax, [f"W{b}" for b in widths], xs, ys, "uniform")
        styles = {
            ("budget", "own"): ("*", "C0", "budget plan"),
            ("budget", "symmetric"): ("x", "C1", "budget, sym. QE"),
            ("qem", "own"): ("o", "C2", "QEM rule"),
        }
        labels = list(dict.fromkeys((m["rule"], m["label"], m["table"]) for m in seeds[0]["quantizers"][q]["mixed"]))
        used = set()
        for rule, label, table in labels:
            rs = rows(seeds, q, rule, label, table)
            if not rs:
                continue
            marker, color, name = styles[(rule, table)]
            common.plot_mean(
                ax,
                [r["bytes"] / 1024 for r in rs],
                [r["top1"] for r in rs],
                fmt=marker,
                color=color,
                ms=10 if marker == "*" else 6,
                label=None if name in used else name,
            )
            used.add(name)
        common.finish_axes(ax, "weight bytes (KiB, log)", q)
    axes[0].set_ylabel("top-1 (%)")
    fig.suptitle(f"MixQuant on {args['data']}: plans vs the uniform weight frontier ({len(seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------------- speed

SPEED_MODELS = (("resnet18", 0.25), ("resnet18", 0.5), ("resnet18", 1.0), ("mobilenet_v2", 0.5), ("mobilenet_v2", 1.0))


def speed(repeats: int) -> dict:
    """Median QE-table time (7 widths) of full-size ImageNet models, against their conv/linear weight count."""
    out = []
    for name, width in SPEED_MODELS:
        model = create_model(name, num_classes=1000, width_mult=width).eval()
        mixquant.qe_table(model)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            table = mixquant.qe_table(model, bits=range(2, 9))
            times.append(time.perf_counter() - start)
        out.append(
            {
                "model": name,
                "width": width,
                "params": sum(table.params.values()),
                "layers": len(table.layers),
                "median_s": statistics.median(times),
                "min_s": min(times),
            }
        )
        print(f"  {name} x{width}: {out[-1]['params']:,} weights, {out[-1]['median_s']:.3f} s", flush=True)
    x = np.array([r["params"] for r in out], dtype=float)
    y = np.array([r["median_s"] for r in out])
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (slope * x + intercept)) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30)
    return {"rows": out, "fit": {"slope_s_per_mparam": slope * 1e6, "intercept_s": intercept, "r2": r2}}


def speed_markdown(result: dict) -> str:
    fit = result["speed"]["fit"]
    lines = [
        "# MixQuant QE table: time against model size",
        "",
        f"Produced by `{result['command']}` on {result['machine']} (torch {torch.__version__}, 1 thread; shared "
        "machine, other jobs running). Full-size ImageNet models, 7 widths (2..8), the default symmetric quantizer "
        "(fused `lowbit.fake_quant`); median of the repeats after one warm-up call.",
        "",
        "| model | width | conv/linear weights | layers | median (s) | min (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["speed"]["rows"]:
        lines.append(
            f"| {r['model']} | {r['width']} | {r['params']:,} | {r['layers']} | {r['median_s']:.3f} "
            f"| {r['min_s']:.3f} |"
        )
    lines += [
        "",
        f"Linear fit: time = {fit['intercept_s']:.3f} s + {fit['slope_s_per_mparam']:.4f} s per million weights, "
        f"R² = {fit['r2']:.4f}. Target for a full-size ResNet-18: under 2 s.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    command = common.command_line("mixquant_study.py", argv)
    base = {"command": command.strip(), "machine": machine(), "args": vars(args)}
    if args.speed:
        result = {**base, "speed": speed(1 if args.quick else 5)}
        with open(os.path.join(args.out, "mixquant_speed.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "mixquant_speed.md"), "w") as f:
            f.write(speed_markdown(result))
        return
    if args.report_only:
        with open(os.path.join(args.out, f"mixquant_{args.data}.json")) as f:
            result = json.load(f)
        common.write_study(args, "mixquant", merged(result, args.merge), plot, markdown)
        return
    dataset = load_data(args.data)
    result = {**base, "seeds": []}
    common.run_seeds(
        result,
        args.seeds,
        lambda seed: one_seed(args, dataset, seed),
        lambda r: common.write_study(args, "mixquant", r, plot, markdown),
    )


if __name__ == "__main__":
    main()
