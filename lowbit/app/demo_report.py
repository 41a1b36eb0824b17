"""The demo's outputs: ``report.md``, ``pareto.png`` and the one-screen terminal summary, all from ``metrics``.

Everything here reads the metrics dictionary that is also written to ``metrics.json``, so the report and the JSON
cannot disagree.
"""

from __future__ import annotations


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _gap_text(score: dict | None) -> str:
    if score is None:
        return ""
    if score["gap"] is None:
        return "outside"
    return f"{score['gap']:+.2f}"


def results_table(metrics: dict) -> str:
    scores = metrics.get("frontier", {})
    rows = [
        "| model | top-1 (%) | BOPs (M) | avg weight bits | avg act. bits | epochs | train time (s) "
        "| vs uniform W4 frontier (points) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in metrics["results"]:
        rows.append(
            f"| {r['name']} | {r['acc']:.2f} | {r['bops'] / 1e6:.1f} | {r['avg_w_bits']:.2f} | "
            f"{r['avg_a_bits']:.2f} | {r['epochs']} | {r['seconds']:.1f} | {_gap_text(scores.get(r['name']))} |"
        )
    return "\n".join(rows)


def frontier_text(metrics: dict) -> str:
    """One sentence per mixed model, built from the numbers: above or under the uniform frontier, by how much."""
    by_name = {r["name"]: r for r in metrics["results"]}
    lines = []
    for name, score in metrics.get("frontier", {}).items():
        r = by_name[name]
        if score["gap"] is None:
            lines.append(
                f"- {name}: {r['acc']:.2f}% at {r['bops'] / 1e6:.1f} M BOPs, outside the frontier's BOPs range."
            )
            continue
        side = "above" if score["gap"] > 0 else "under" if score["gap"] < 0 else "on"
        lines.append(
            f"- {name}: {r['acc']:.2f}% at {r['bops'] / 1e6:.1f} M BOPs; uniform W4 at the same BOPs (interpolated) "
            f"gives {score['frontier_acc']:.2f}%: {side} the frontier by {abs(score['gap']):.2f} points."
        )
    test_size = metrics.get("test_size")
    one = f" (one test image is {100 / test_size:.2f} points)" if test_size else ""
    lines.append(
        f"\nOne seed{one}: differences of a point or two are within seed-to-seed noise. The 5-seed studies are "
        "bench/results/metamix_*.md and mixquant_*.md."
    )
    return "\n".join(lines)


def deploy_table(metrics: dict) -> str:
    d = metrics["deploy"]
    rows = [
        "| | value |",
        "|---|---|",
        f"| fake-quant top-1 (%) | {d['fake_quant_acc']:.2f} |",
        f"| packed top-1 (%) | {d['packed_acc']:.2f} |",
        f"| equal | {'yes' if d['accuracy_equal'] else 'NO'} |",
        f"| saved file | {_mib(d['file_bytes'])} ({d['file_bytes']:,} bytes) |",
        f"| fp32 parameters | {_mib(d['fp32_bytes'])} ({d['fp32_bytes'] / d['file_bytes']:.1f}x the file) |",
    ]
    for batch, t in d["latency_ms"].items():
        rows.append(
            f"| latency {batch}: fp32 / packed (ms) | {t['fp32']:.2f} / {t['packed']:.2f} ({t['speedup']:.2f}x) |"
        )
    return "\n".join(rows)


def layers_table(metrics: dict) -> str:
    plan = metrics["mixquant"]["plan"]
    act = {layer["name"]: layer for layer in metrics.get("metamix", {}).get("layers", [])}
    rows = ["| layer | weight bits (MixQuant) | activation bits (MetaMix) | p(chosen) |", "|---|---:|---:|---:|"]
    for name, w_bits in plan.items():
        a = act.get(name, {})
        prob = a.get("prob")
        rows.append(f"| {name} | {w_bits} | {a.get('bits', '-')} | {'-' if prob is None else f'{prob:.2f}'} |")
    return "\n".join(rows)


def phases_table(metrics: dict) -> str:
    rows = ["| phase | seconds |", "|---|---:|"]
    rows += [f"| {name} | {sec:.1f} |" for name, sec in metrics["phases_seconds"].items()]
    rows.append(f"| total | {metrics['total_seconds']:.1f} |")
    return "\n".join(rows)


def markdown(metrics: dict) -> str:
    cfg = metrics["config"]
    mq = metrics["mixquant"]
    mm = metrics.get("metamix", {})
    return (
        "\n\n".join(
            [
                "# lowbit demo report",
                f"Data: {cfg['data'] or 'digits (scikit-learn, 8x8)'}; model: {cfg['model']} (width {cfg['width']}); "
                f"seed {cfg['seed']}; device {cfg['device']}; fp32 epochs {cfg['epochs']}, "
                f"{cfg['qat_epochs']} epochs per quantized method.",
                "## Accuracy and cost\n\n" + results_table(metrics),
                "## At equal cost: against the uniform frontier\n\n" + frontier_text(metrics),
                "![accuracy against BOPs](pareto.png)",
                f"## Per-layer bits\n\nMixQuant plan: average weight bits {mq['avg_bits']:.2f} (budget "
                f"{cfg['weight_bits']}), found in {mq['seconds']:.2f} s. MetaMix: target {cfg['target_bits']} average "
                f"activation bits, reached {mm.get('avg_bits', float('nan')):.2f}; BOPs "
                f"{mm.get('bops', float('nan')) / 1e6:.2f} M against a target of "
                f"{mm.get('target_bops', float('nan')) / 1e6:.2f} M.\n\n" + layers_table(metrics),
                "![per-layer bits](bits.png)",
                "## Packed deployment (MixQuant + MetaMix model)\n\n" + deploy_table(metrics),
                "## Time per phase\n\n" + phases_table(metrics),
            ]
        )
        + "\n"
    )


def summary(metrics: dict) -> str:
    """What the terminal shows at the end: the results table and the deployment line."""
    d = metrics["deploy"]
    b1 = d["latency_ms"].get("batch1", {})
    lines = [
        results_table(metrics),
        "",
        frontier_text(metrics),
        "",
        f"packed model: top-1 {d['packed_acc']:.2f}% (fake-quant {d['fake_quant_acc']:.2f}%, "
        f"{'equal' if d['accuracy_equal'] else 'DIFFERENT'}), file {_mib(d['file_bytes'])} vs fp32 "
        f"{_mib(d['fp32_bytes'])}, batch-1 latency {b1.get('packed', float('nan')):.2f} ms vs fp32 "
        f"{b1.get('fp32', float('nan')):.2f} ms",
        f"total {metrics['total_seconds']:.0f} s; results in {metrics['config']['out']}/ (report.md, pareto.png, "
        "bits.png, metrics.json, model.safetensors)",
    ]
    return "\n".join(lines)


def pareto_png(metrics: dict, path: str) -> None:
    """Accuracy against BOPs: fp32, the uniform baselines and the MixQuant + MetaMix model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    uniform = sorted((r for r in metrics["results"] if r["name"].startswith("uniform W4A")), key=lambda r: r["bops"])
    ax.plot(
        [r["bops"] / 1e6 for r in uniform],
        [r["acc"] for r in uniform],
        "o-",
        color="grey",
        label="uniform W4 frontier (A" + ", A".join(r["name"].split("A")[-1] for r in uniform) + ")",
    )
    for r in uniform:
        ax.annotate(r["name"].split()[-1], (r["bops"] / 1e6, r["acc"]), textcoords="offset points", xytext=(4, -10))
    for r in metrics["results"]:
        if r in uniform:
            continue
        marker = (
            "*" if "MetaMix" in r["name"] else ("s" if r["name"] == "fp32" else "D" if "MixQuant" in r["name"] else "o")
        )
        ax.scatter(r["bops"] / 1e6, r["acc"], marker=marker, s=120 if marker == "*" else 50, label=r["name"])
    ax.set_xscale("log")
    ax.set_xlabel("BOPs per image (millions, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy against bit operations")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bits_png(metrics: dict, path: str) -> None:
    """Per-layer bit allocation: MixQuant's weight bits and MetaMix's activation bits, in network order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(metrics["mixquant"]["plan"])
    act = {layer["name"]: layer["bits"] for layer in metrics.get("metamix", {}).get("layers", [])}
    a_bits = [act.get(name, 8) for name in layers]  # first and last layer are not searched: 8-bit
    index = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layers)), 3.6), dpi=120)
    ax.bar([i - 0.2 for i in index], list(metrics["mixquant"]["plan"].values()), width=0.4, label="weight (MixQuant)")
    ax.bar([i + 0.2 for i in index], a_bits, width=0.4, label="activation (MetaMix; first/last fixed at 8)")
    ax.set_xlabel("conv / linear layer, network order")
    ax.set_ylabel("bits")
    ax.set_yticks(range(0, 9, 2))
    ax.set_title("per-layer bit allocation")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
