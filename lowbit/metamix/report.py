"""What a MetaMix run hands back: the chosen bits and their probabilities per layer, BOPs against the target,
average bits, accuracy, wall time per phase, the per-epoch history and the alpha / expected-bits trajectories
of the search; as a dict/JSON, a markdown table and two matplotlib figures (Agg canvas, files only)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from lowbit.metamix.select import Selection


@dataclass
class MetaMixReport:
    mode: str
    selection: Selection
    target_bops: float | None
    bops: float  # the final single-branch model, by lowbit.bops
    avg_bits: float  # searched layers, weighted by MACs * w_bits
    model_avg_a_bits: float  # every layer, MAC-weighted (SPEC section 3), first/last included
    accuracy: float | None  # final test top-1 (%)
    phase_seconds: dict[str, float]
    history: list[dict] = field(default_factory=list)
    trajectory: list[dict] = field(default_factory=list)  # per search epoch: alpha and expected bits per layer
    summary: dict = field(default_factory=dict)  # extra scalars: accuracy after search / after selection...
    config: dict = field(default_factory=dict)

    @property
    def bits(self) -> dict[str, int]:
        return self.selection.bits

    @property
    def bops_ratio(self) -> float | None:
        return None if not self.target_bops else self.bops / self.target_bops

    def to_dict(self) -> dict:
        data = asdict(self)
        data["selection"] = self.selection.to_dict()
        data["bits"] = self.bits
        data["bops_ratio"] = self.bops_ratio
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=float)

    def to_markdown(self) -> str:
        """A summary line block and one row per searched layer (chosen bits, argmax, probabilities)."""
        lines = [f"**{self.mode}**: {self.bops:,.0f} BOPs"]
        if self.target_bops:
            lines[0] += f" vs target {self.target_bops:,.0f} ({100 * (self.bops_ratio - 1):+.2f}%)"
            lines[0] += f"; argmax before repair {self.selection.argmax_bops:,.0f}"
        lines[0] += f"; average activation bits {self.avg_bits:.3f} (whole model {self.model_avg_a_bits:.3f})"
        if self.accuracy is not None:
            lines[0] += f"; top-1 {self.accuracy:.2f}%"
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items())
        lines += ["", f"wall time: {times}", ""]
        lines.append("| layer | MACs | w bits | a bits | argmax | probabilities |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for layer in self.selection.layers:
            probs = ", ".join(f"{b}:{p:.2f}" for b, p in zip(layer.candidates, layer.probs, strict=True))
            lines.append(
                f"| {layer.name} | {layer.macs:,} | {layer.w_bits} | {layer.bits} | {layer.argmax_bits} | {probs} |"
            )
        return "\n".join(lines) + "\n"

    def plot_allocation(self, path: str, title: str | None = None) -> str:
        """Bar chart of the chosen activation bits per searched layer, with the search's expected bits."""
        layers = self.selection.layers
        fig = _figure(max(6, 0.22 * len(layers) + 2), 3.5)
        ax = fig.subplots()
        xs = range(len(layers))
        ax.bar(xs, [layer.bits for layer in layers], color="tab:blue", label="chosen bits")
        expected = [sum(b * p for b, p in zip(layer.candidates, layer.probs, strict=True)) for layer in layers]
        ax.plot(xs, expected, "o", color="tab:orange", markersize=3, label="expected bits at end of search")
        ax.set_xlabel("searched layer (network order)")
        ax.set_ylabel("activation bits")
        ax.set_title(title or f"{self.mode}: per-layer activation bits (avg {self.avg_bits:.2f})")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return path

    def plot_trajectories(self, path: str, title: str | None = None) -> str:
        """Expected bits of every searched layer and ``E[BOPs]/target`` over the search epochs."""
        import matplotlib

        fig = _figure(10, 3.5)
        left, right = fig.subplots(1, 2)
        epochs = [point["epoch"] for point in self.trajectory]
        names = list(self.trajectory[0]["bits"]) if self.trajectory else []
        cmap = matplotlib.colormaps["viridis"]
        for i, name in enumerate(names):
            color = cmap(i / max(len(names) - 1, 1))
            left.plot(epochs, [point["bits"][name] for point in self.trajectory], color=color, linewidth=0.8)
        left.set_xlabel("search epoch")
        left.set_ylabel("expected bits sum_i p_i b_i")
        left.set_title("per layer (colour: depth)")
        right.plot(epochs, [point["ebops_ratio"] for point in self.trajectory], marker="o")
        right.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        right.set_xlabel("search epoch")
        right.set_ylabel("E[BOPs] / target")
        fig.suptitle(title or f"{self.mode}: search trajectories")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return path


def _figure(width: float, height: float):
    """A bare ``Figure`` drawn by the Agg canvas: no pyplot, so no GUI backend and no global state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig
