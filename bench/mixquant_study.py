"""MixQuant study: QE-table speed against model size, and accuracy of MixQuant plans against uniform plans on
digits with three quantizers (min-max PTQ, LSQ QAT fine-tuning, BRECQ-style reconstruction), plus the
accuracy-vs-size curve as ``qem`` sweeps.

    python bench/mixquant_study.py            # the full study (a few minutes on 2 CPU cores)
    python bench/mixquant_study.py --quick    # sub-minute smoke run, writes mixquant_quick.*

Writes ``bench/results/mixquant_study.{md,json}``, ``mixquant_speed.png`` and ``mixquant_qem.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit import data, mixquant, train
from lowbit.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (2.5, 3.0, 4.0)
QEMS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class Settings:
    """Everything a run depends on; ``--quick`` shrinks it to a smoke test."""

    seeds: int = 3
    fp_epochs: int = 8
    fp_lr: float = 0.05
    lsq_epochs: int = 3
    lsq_lr: float = 0.01
    brecq_iters: int = 200
    brecq_samples: int = 256
    repeats: int = 5
    speed_models: tuple = (
        ("resnet18", 0.25),
        ("resnet18", 0.5),
        ("resnet18", 0.75),
        ("resnet18", 1.0),
        ("mobilenet_v2", 0.5),
        ("mobilenet_v2", 1.0),
        ("mobilenet_v2", 1.4),
    )

    @classmethod
    def quick(cls) -> Settings:
        return cls(seeds=1, fp_epochs=3, lsq_epochs=1, brecq_iters=20, brecq_samples=64, repeats=1)


# ---------------------------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------------------------


def speed(settings: Settings) -> dict:
    """Median QE-table time (7 widths) of full-size ImageNet models, against their conv/linear weight count."""
    rows = []
    for name, width in settings.speed_models:
        model = create_model(name, num_classes=1000, width_mult=width).eval()
        mixquant.qe_table(model)  # warm-up: first-call dispatch and allocator
        times = []
        for _ in range(settings.repeats):
            start = time.perf_counter()
            table = mixquant.qe_table(model, bits=range(2, 9))
            times.append(time.perf_counter() - start)
        params = sum(table.params.values())
        rows.append(
            {
                "model": name,
                "width": width,
                "params": params,
                "layers": len(table.layers),
                "median_s": statistics.median(times),
                "min_s": min(times),
            }
        )
        print(f"  {name} x{width}: {params:,} weights, {statistics.median(times):.3f} s", flush=True)
    families = {r["model"] for r in rows}
    fits = {name: linear_fit([r for r in rows if r["model"] == name]) for name in sorted(families)}
    return {"rows": rows, "fit": linear_fit(rows), "fits": fits}


def linear_fit(rows: list[dict]) -> dict:
    """Least-squares ``time = intercept + slope * params`` and its R²."""
    x = np.array([r["params"] for r in rows], dtype=float)
    y = np.array([r["median_s"] for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (slope * x + intercept)) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30)
    return {"slope_s_per_mparam": slope * 1e6, "intercept_s": intercept, "r2": r2}


def plot_speed(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r["model"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["model"] == name]
        ax.plot([r["params"] / 1e6 for r in rows], [r["median_s"] for r in rows], "o", label=name)
    xs = np.linspace(0, max(r["params"] for r in result["rows"]) / 1e6, 50)
    for label, fit in [("all", result["fit"]), *result["fits"].items()]:
        ax.plot(
            xs,
            fit["intercept_s"] + fit["slope_s_per_mparam"] * xs,
            "--",
            lw=0.9,
            label=f"fit {label}: {fit['slope_s_per_mparam']:.3f} s/M + {fit['intercept_s']:.3f} s, R²={fit['r2']:.3f}",
        )
    ax.set_xlabel("conv/linear weights (millions)")
    ax.set_ylabel("QE table time, 7 widths (s, median)")
    ax.set_title("MixQuant QE table: time vs parameters")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------------------------


def trained_model(dataset, seed: int, settings: Settings):
    """ResNet-18 (small input, width 0.25) trained in full precision; the loaders of that seed."""
    train.set_seed(seed)
    model = create_model("resnet18", num_classes=10, in_channels=1, small_input=True, width_mult=0.25)
    train_loader, test_loader = dataset.loaders(64, seed)
    train.fit(model, train_loader, None, settings.fp_epochs, lr=settings.fp_lr, progress=False)
    return model.eval(), train_loader, test_loader


def quantizers(dataset, train_loader, seed: int, settings: Settings) -> dict:
    return {
        "min-max PTQ": mixquant.MinMaxPTQ(),
        "LSQ QAT fine-tune": mixquant.LSQFineTune(train_loader, epochs=settings.lsq_epochs, lr=settings.lsq_lr),
        "BRECQ-style": mixquant.BRECQ(
            dataset.train_x, samples=settings.brecq_samples, iters=settings.brecq_iters, seed=seed
        ),
    }


def accuracy_of(model, plan, quantizer, test_loader, cache: dict, seed: int) -> float:
    """Test accuracy of ``quantizer`` applied to a copy of ``model``; a plan already measured is not redone."""
    key = (type(quantizer).__name__, tuple(sorted(dict(plan).items())))
    if key not in cache:
        train.set_seed(seed)
        quantized = mixquant.apply_plan(copy.deepcopy(model), plan, quantizer)
        cache[key] = train.evaluate(quantized, test_loader)["acc"]
    return cache[key]


def one_seed(dataset, seed: int, settings: Settings) -> dict:
    start = time.perf_counter()
    model, train_loader, test_loader = trained_model(dataset, seed, settings)
    record = {"seed": seed, "fp_acc": train.evaluate(model, test_loader)["acc"], "budget": [], "qem": [], "uniform": []}
    table = mixquant.qe_table(model)
    cache: dict = {}
    for avg in BUDGETS:
        plans = {
            "mixquant": mixquant.search(table, budget=mixquant.AvgBits(avg)),
            "uniform": mixquant.uniform_plan(table, int(avg)),
        }
        for qname, quantizer in quantizers(dataset, train_loader, seed, settings).items():
            for kind, plan in plans.items():
                record["budget"].append(
                    {
                        "budget": avg,
                        "quantizer": qname,
                        "plan": kind,
                        "avg_bits": plan.avg_bits,
                        "total_qe": plan.total_qe,
                        "bits": dict(plan),
                        "acc": accuracy_of(model, plan, quantizer, test_loader, cache, seed),
                    }
                )
    minmax = mixquant.MinMaxPTQ()
    for qem in QEMS:
        plan = mixquant.search(table, qem=qem)
        acc = accuracy_of(model, plan, minmax, test_loader, cache, seed)
        record["qem"].append({"qem": qem, "avg_bits": plan.avg_bits, "acc": acc})
    for bits in range(2, 9):
        plan = mixquant.uniform_plan(table, bits)
        record["uniform"].append({"bits": bits, "acc": accuracy_of(model, plan, minmax, test_loader, cache, seed)})
    record["seconds"] = time.perf_counter() - start
    print(f"  seed {seed}: FP {record['fp_acc']:.1f}%, {record['seconds']:.0f} s", flush=True)
    return record


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}"


def plot_qem(seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    qem_x = [statistics.fmean(r["qem"][i]["avg_bits"] for r in seeds) for i in range(len(QEMS))]
    qem_y = [mean_std(r["qem"][i]["acc"] for r in seeds) for i in range(len(QEMS))]
    ax.errorbar(
        qem_x,
        [m for m, _ in qem_y],
        yerr=[s for _, s in qem_y],
        fmt="o-",
        capsize=3,
        label="MixQuant QEM rule + min-max PTQ",
    )
    budget = [
        mean_std(
            next(r for r in s["budget"] if (r["budget"], r["quantizer"], r["plan"]) == (a, "min-max PTQ", "mixquant"))[
                "acc"
            ]
            for s in seeds
        )
        for a in BUDGETS
    ]
    ax.errorbar(
        BUDGETS,
        [m for m, _ in budget],
        yerr=[e for _, e in budget],
        fmt="^",
        ms=8,
        capsize=3,
        label="MixQuant budget plan (AvgBits) + min-max PTQ",
    )
    labelled = set()
    for x, y, q in zip(qem_x, qem_y, QEMS, strict=True):
        if round(x, 1) in labelled:
            continue
        labelled.add(round(x, 1))
        ax.annotate(f"qem={q}", (x, y[0]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    uni = [mean_std(r["uniform"][i]["acc"] for r in seeds) for i in range(7)]
    ax.errorbar(
        range(2, 9),
        [m for m, _ in uni],
        yerr=[s for _, s in uni],
        fmt="s--",
        capsize=3,
        label="uniform bits + min-max PTQ",
    )
    fp = statistics.fmean(r["fp_acc"] for r in seeds)
    ax.axhline(fp, color="grey", lw=0.8, label=f"float ({fp:.1f}%)")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("digits test accuracy (%)")
    ax.set_title("Accuracy vs size as qem sweeps (ResNet-18 x0.25, weight-only)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def speed_section(result: dict, png: str) -> list[str]:
    lines = [
        "## Speed: the QE table",
        "",
        "Full-size ImageNet models (3 input channels, 1000 classes), 7 widths (2..8), default quantizer",
        "(symmetric per-channel, the fused `lowbit.fake_quant`); median of the repeats after one warm-up call.",
        "",
        "| model | width | conv/linear weights | layers | median (s) | min (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['width']} | {r['params']:,} | {r['layers']} | {r['median_s']:.3f} "
            f"| {r['min_s']:.3f} |"
        )
    full = [r for r in result["rows"] if r["model"] == "resnet18" and r["width"] == 1.0]
    lines.append("")
    for label, fit in [("all models", result["fit"]), *result["fits"].items()]:
        lines.append(
            f"- Linear fit ({label}): time = {fit['intercept_s']:.3f} s + {fit['slope_s_per_mparam']:.4f} s "
            f"per million weights, R² = {fit['r2']:.4f}."
        )
    lines.append("")
    if full:
        lines.append(
            f"**Full-size ResNet-18 ({full[0]['params']:,} weights, 7 widths): {full[0]['median_s']:.3f} s** "
            "(target: under 2 s)."
        )
    return [*lines, "", f"![QE table time vs parameters]({png})", ""]


def budget_section(seeds: list[dict]) -> list[str]:
    lines = [
        "## Quality: MixQuant budget plan vs uniform plan",
        "",
        "| budget (avg bits) | quantizer | MixQuant acc (%) | MixQuant avg bits | uniform plan | uniform acc (%) "
        "| Δ (MQ − uniform) | MQ plan same as uniform (seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = seeds[0]["budget"]
    for avg in BUDGETS:
        for qname in dict.fromkeys(r["quantizer"] for r in rows):

            def pick(kind, _avg=avg, _q=qname):
                return [
                    next(r for r in s["budget"] if (r["budget"], r["quantizer"], r["plan"]) == (_avg, _q, kind))
                    for s in seeds
                ]

            mq, uni = pick("mixquant"), pick("uniform")
            delta = [a["acc"] - b["acc"] for a, b in zip(mq, uni, strict=True)]
            same = sum(a["bits"] == b["bits"] for a, b in zip(mq, uni, strict=True))
            lines.append(
                f"| {avg} | {qname} | {fmt(r['acc'] for r in mq)} | "
                f"{statistics.fmean(r['avg_bits'] for r in mq):.3f} | {int(avg)}-bit ({uni[0]['avg_bits']:.1f}) | "
                f"{fmt(r['acc'] for r in uni)} | {fmt(delta)} | {same}/{len(seeds)} |"
            )
    return [*lines, ""]


def plans_section(seeds: list[dict]) -> list[str]:
    lines = [
        "### The plans (seed 0)",
        "",
        "| budget | plan | avg bits | summed size-weighted QE | bits histogram |",
        "|---|---|---|---|---|",
    ]
    for avg in BUDGETS:
        for kind in ("mixquant", "uniform"):
            r = next(r for r in seeds[0]["budget"] if r["budget"] == avg and r["plan"] == kind)
            hist = {b: list(r["bits"].values()).count(b) for b in sorted(set(r["bits"].values()))}
            hist_text = ", ".join(f"{b}-bit: {n}" for b, n in hist.items())
            lines.append(f"| {avg} | {kind} | {r['avg_bits']:.3f} | {r['total_qe']:.4g} | {hist_text} |")
    return [*lines, ""]


def findings_section(seeds: list[dict]) -> list[str]:
    """Numbers read off the tables above, so the text cannot drift from them."""

    def acc(avg, qname, kind):
        return statistics.fmean(
            next(r for r in s["budget"] if (r["budget"], r["quantizer"], r["plan"]) == (avg, qname, kind))["acc"]
            for s in seeds
        )

    names = list(dict.fromkeys(r["quantizer"] for r in seeds[0]["budget"]))
    same = sum(
        r["bits"] == u["bits"]
        for s in seeds
        for r in s["budget"]
        for u in s["budget"]
        if r["plan"] == "mixquant"
        and u["plan"] == "uniform"
        and (r["budget"], r["quantizer"]) == (u["budget"], u["quantizer"])
        and r["budget"] != 2.5
    )
    total = sum(1 for s in seeds for r in s["budget"] if r["plan"] == "mixquant" and r["budget"] != 2.5)
    vs3 = ", ".join(f"{q}: {acc(2.5, q, 'mixquant'):.1f} vs {acc(3.0, q, 'uniform'):.1f}" for q in names)
    close = all(acc(2.5, q, "mixquant") >= acc(3.0, q, "uniform") - 0.5 for q in names)
    verb = "matches or beats" if close else "is compared with"
    vs2 = ", ".join(f"{q}: +{acc(2.5, q, 'mixquant') - acc(2.5, q, 'uniform'):.1f}" for q in names)
    return [
        "## Findings",
        "",
        f"- **At 3 and 4 bits the budget plan is the uniform plan** ({same}/{total} seed x quantizer cases): on this",
        "  model every layer's QE falls by about the same factor per bit, so no trade between layers lowers the",
        "  summed size-weighted QE at an integer budget. MixQuant neither helps nor hurts there.",
        f"- **At 2.5 bits MixQuant beats uniform 2-bit** ({vs2} points) and {verb} uniform **3-bit**",
        f"  with a sixth fewer bits (mean accuracy, MixQuant 2.5 vs uniform 3: {vs3}).",
        "- **The QEM rule gives (nearly) uniform plans** on this model for the same reason: `QE(l, b) / QE(l, 8)`",
        "  is close to `4^(8-b)` for every layer, so each power of 4 in `qem` takes one bit off every layer at once;",
        "  the curve follows the uniform one. The budget mode is the way to get fractional average bits.",
        "",
    ]


def qem_section(seeds: list[dict], png: str) -> list[str]:
    lines = [
        "## Accuracy vs size as `qem` sweeps (min-max PTQ)",
        "",
        "| qem | avg bits | accuracy (%) |",
        "|---|---|---|",
    ]
    for i, qem in enumerate(QEMS):
        bits = statistics.fmean(s["qem"][i]["avg_bits"] for s in seeds)
        lines.append(f"| {qem} | {bits:.3f} | {fmt(s['qem'][i]['acc'] for s in seeds)} |")
    lines += ["", "Uniform plans with the same quantizer, for reference:", "", "| bits | accuracy (%) |", "|---|---|"]
    lines += [f"| {b} | {fmt(s['uniform'][b - 2]['acc'] for s in seeds)} |" for b in range(2, 9)]
    return [*lines, "", f"![accuracy vs average bits]({png})", ""]


DECISIONS = """## Setup and decisions

- **Model and data.** ResNet-18 (`small_input=True`, width 0.25, 1 input channel: 0.70M parameters) trained in
  full precision on the embedded digits (1,437 train / 360 test images, 8x8) for {fp_epochs} epochs (SGD, lr
  {fp_lr}, cosine) per seed; the seed also sets the data order and every quantizer's randomness.
- **Weight-only.** Activations stay float: MixQuant chooses *weight* widths and the QE it ranks is the weights'
  error, so a weight-only study isolates what the plan does. (`LSQFineTune(a_bits=...)` quantizes activations too.)
- **Plans.** One QE table per seed with the default quantizer (symmetric per-channel, SPEC section 7); the budget
  plan is `search(table, budget=AvgBits(a))`, the same plan for every quantizer (MixQuant as a preprocessing
  step). Budget mode is an exact dynamic programme over the budget split into 20,000 cells (costs rounded up,
  so it always fits), also compared with the hull greedy and the best uniform plan; the returned plan carries a
  certified `gap_bound` against the LP relaxation.
- **The 2.5-bit comparison.** No uniform plan has 2.5 bits. The comparison is with the best uniform plan that
  fits the same budget: uniform 2-bit (2.0 bits; the MixQuant plan uses the extra 0.5 bit). The 3-bit row gives
  uniform 3-bit, the next uniform plan *above* the budget, so the 2.5 row is bracketed. At 3 and 4 bits both
  plans have (up to rounding) the same average bits. Both plans' actual average bits are in the table.
- **Quantizers.** Min-max PTQ: asymmetric per-channel, nearest rounding. LSQ QAT: `lowbit.quantize(bits=plan)`
  (QConv2d/QLinear, weight steps LSQ per channel), {lsq_epochs} epochs of `lowbit.train.fit` at lr {lsq_lr}.
  BRECQ-style: asymmetric per-channel min-max steps, AdaRound rounding learned block by block (ResNet basic
  blocks; stem conv and fc alone) on {brecq_samples} training images, {brecq_iters} Adam iterations per block,
  output-MSE loss from the quantized-input path. With 0 iterations it equals min-max PTQ exactly.
- **Accuracy** is top-1 on the 360 test images: one image is 0.28 points, so differences under ~1 point are
  within noise at 3 seeds.
"""


def write_report(result: dict, settings: Settings, out: Path, stem: str) -> None:
    seeds = result["seeds"]
    fp = fmt(s["fp_acc"] for s in seeds)
    lines = [
        "# MixQuant study",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; torch {torch.__version__}, {result['threads']} thread(s); "
        f"wall time {result['seconds']:.0f} s.",
        "",
        *speed_section(result["speed"], f"{stem}_speed.png"),
        f"Float accuracy over {len(seeds)} seed(s): {fp} %.",
        "",
        *budget_section(seeds),
        *findings_section(seeds),
        *plans_section(seeds),
        *qem_section(seeds, f"{stem}_qem.png"),
        DECISIONS.format(**vars(settings)),
    ]
    (out / f"{stem}_study.md").write_text("\n".join(lines))


def machine() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} logical CPU(s)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sub-minute smoke run (1 seed, tiny budgets)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the saved JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings.quick() if args.quick else Settings()
    stem = "mixquant_quick" if args.quick else "mixquant"
    if args.report_only:
        result = json.loads((args.out / f"{stem}_study.json").read_text())
        write_report(result, settings, args.out, stem)
        plot_qem(result["seeds"], args.out / f"{stem}_qem.png")
        return result
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print("QE table speed", flush=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "settings": vars(settings),
    }
    result["speed"] = speed(settings)
    plot_speed(result["speed"], args.out / f"{stem}_speed.png")
    print("quality on digits", flush=True)
    dataset = data.digits()
    result["seeds"] = [one_seed(dataset, seed, settings) for seed in range(settings.seeds)]
    plot_qem(result["seeds"], args.out / f"{stem}_qem.png")
    result["seconds"] = time.perf_counter() - start
    (args.out / f"{stem}_study.json").write_text(json.dumps(result, indent=1, default=_json))
    write_report(result, settings, args.out, stem)
    print(f"wrote {args.out / f'{stem}_study.md'} ({result['seconds']:.0f} s)")
    return result


def _json(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
