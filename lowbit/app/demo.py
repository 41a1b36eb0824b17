"""``lowbit demo``: the whole toolkit end to end on real data, in minutes on a laptop CPU.

1. train a packaged model in full precision;
2. MixQuant: per-layer weight bits under an average-bits budget (SPEC section 7), trained with 4-bit activations;
3. MetaMix: per-layer activation bits at a BOPs target, at W4 and on top of the MixQuant weights, then weight
   training (SPEC section 8);
4. the uniform frontier (SPEC section 9): uniform LSQ W4A2, W4A3, W4A4, W4A8 trained for the same number of epochs;
   every mixed model is scored by its distance above (+) or under (-) that frontier at its own BOPs;
5. convert the MetaMix model to packed integer layers, check its accuracy equals the fake-quant model's, save it;
6. time packed inference against the float model.

Everything lands in one folder: ``report.md``, ``metrics.json``, ``pareto.png``, ``bits.png``, ``model.safetensors``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import lowbit
from lowbit.app import data as data_lib
from lowbit.models import create_model
from lowbit.tools import train
from lowbit.tools.bops import float_parameter_bytes


@dataclass
class DemoConfig:
    model: str = "mobilenet_v2"
    width: float = 0.5
    data: str | None = None  # None: scikit-learn's digits; else an image folder (one sub-folder per class)
    image_size: int = 32  # image folders only; digits are 8x8
    device: str = "cpu"
    epochs: int = 15  # full-precision epochs
    qat_epochs: int = 12  # per quantized method (MetaMix: half search, half weight training)
    target_bits: float = 3.0  # MetaMix: average activation bits at the BOPs target
    weight_bits: float = 4.0  # MixQuant: average weight bits of the plan
    batch_size: int = 64
    lr: float = 0.05
    qat_lr: float = 0.01
    seed: int = 0
    out: str = "demo-results"
    quick: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.quick:  # a sub-minute smoke run: tiny model, one epoch per phase, a slice of the data
            self.model, self.width, self.epochs, self.qat_epochs = "small_cnn", 1.0, 1, 2
        for name in ("epochs", "qat_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.target_bits <= 8:
            raise ValueError(f"target_bits must be in 2..8 (average activation bits), got {self.target_bits}")
        if not 2 <= self.weight_bits <= 8:
            raise ValueError(f"weight_bits must be in 2..8 (average weight bits), got {self.weight_bits}")


@dataclass
class Result:
    """One point of the comparison: a model, its accuracy and its cost."""

    name: str
    acc: float
    bops: float
    avg_w_bits: float
    avg_a_bits: float
    epochs: int
    seconds: float
    extra: dict = field(default_factory=dict)


class Demo:
    """The demo's state and phases; ``run()`` calls them in order and writes the results folder."""

    def __init__(self, config: DemoConfig):
        self.cfg = config
        self.device = torch.device(config.device)
        train.set_seed(config.seed)
        self.dataset = self._load_data()
        self.train_loader, self.test_loader = self.dataset.loaders(config.batch_size, seed=config.seed)
        self.example = self.dataset.test_x[:1].to(self.device)
        self.results: list[Result] = []
        self.metrics: dict = {"config": asdict(config), "phases_seconds": {}}
        os.makedirs(config.out, exist_ok=True)

    # ---- data and the float model ---------------------------------------------------------------------------

    def _load_data(self) -> data_lib.Dataset:
        dataset = data_lib.load(self.cfg.data, image_size=self.cfg.image_size)
        if self.cfg.quick:
            keep = min(len(dataset.train_y), 512)
            dataset.train_x, dataset.train_y = dataset.train_x[:keep], dataset.train_y[:keep]
        return dataset

    def _new_model(self) -> nn.Module:
        kwargs = {"num_classes": self.dataset.num_classes, "in_channels": self.dataset.in_channels}
        if self.cfg.model != "small_cnn":
            kwargs.update(small_input=True, width_mult=self.cfg.width)
        return create_model(self.cfg.model, **kwargs).to(self.device)

    def _fit(self, model: nn.Module, epochs: int, lr: float, desc: str) -> float:
        start = time.perf_counter()
        train.fit(
            model,
            self.train_loader,
            None,
            epochs,
            lr=lr,
            device=self.device,
            progress=self.cfg.progress,
            desc=desc,
        )
        return time.perf_counter() - start

    def _accuracy(self, model: nn.Module) -> float:
        return train.evaluate(model, self.test_loader, self.device)["acc"]

    def _record(self, name: str, model: nn.Module, epochs: int, seconds: float, **extra) -> Result:
        cost = lowbit.bops(model, self.example)
        result = Result(
            name, self._accuracy(model), cost.total_bops, cost.avg_w_bits, cost.avg_a_bits, epochs, seconds, extra
        )
        self.results.append(result)
        return result

    def train_float(self) -> nn.Module:
        model = self._new_model()
        seconds = self._fit(model, self.cfg.epochs, self.cfg.lr, "fp32")
        self._record("fp32", model, self.cfg.epochs, seconds)
        return model

    # ---- quantized methods ----------------------------------------------------------------------------------

    def mixquant_plan(self, fp_model: nn.Module):
        from lowbit import mixquant

        start = time.perf_counter()
        plan = mixquant.search(fp_model, budget=mixquant.AvgBits(self.cfg.weight_bits))
        self.metrics["mixquant"] = {
            "seconds": time.perf_counter() - start,
            "avg_bits": plan.avg_bits,
            "model_bytes": plan.model_bytes,
            "plan": dict(plan),
        }
        return plan

    def uniform(self, fp_model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
        model = lowbit.quantize(copy.deepcopy(fp_model), w_bits=w_bits, a_bits=a_bits)
        seconds = self._fit(model, self.cfg.qat_epochs, self.cfg.qat_lr, f"W{w_bits}A{a_bits}")
        self._record(f"uniform W{w_bits}A{a_bits}", model, self.cfg.qat_epochs, seconds)
        return model

    def mixquant_a4(self, fp_model: nn.Module, plan) -> nn.Module:
        """MixQuant alone: the plan's per-layer weight bits, uniform 4-bit activations, LSQ training."""
        model = lowbit.quantize(copy.deepcopy(fp_model), a_bits=4, bits=dict(plan))
        seconds = self._fit(model, self.cfg.qat_epochs, self.cfg.qat_lr, "MixQuant A4")
        self._record("MixQuant W + A4", model, self.cfg.qat_epochs, seconds)
        return model

    def metamix(self, fp_model: nn.Module, plan=None) -> nn.Module:
        """MetaMix at W4 (``plan=None``) or on the MixQuant plan's weight bits."""
        from lowbit import metamix

        search_epochs = max(self.cfg.qat_epochs // 2, 1)
        name = "MetaMix W4" if plan is None else "MixQuant + MetaMix"
        config = metamix.MetaMixConfig(
            w_bits=4 if plan is None else dict(plan),
            target_bits=self.cfg.target_bits,
            search_epochs=search_epochs,
            finetune_epochs=self.cfg.qat_epochs - search_epochs,
            lr=self.cfg.qat_lr,
            device=str(self.device),
            progress=self.cfg.progress,
            seed=self.cfg.seed,
            log_path=os.path.join(self.cfg.out, "metamix_log.jsonl" if plan is not None else "metamix_w4_log.jsonl"),
        )
        start = time.perf_counter()
        model, report = metamix.run(copy.deepcopy(fp_model), self.train_loader, self.test_loader, config)
        seconds = time.perf_counter() - start
        if plan is None:
            self._record(name, model, self.cfg.qat_epochs, seconds)
            return model
        self.metrics["metamix"] = {
            "target_bops": report.target_bops,
            "bops": report.bops,
            "avg_bits": report.avg_bits,
            "phase_seconds": report.phase_seconds,
            "layers": [
                {"name": c.name, "bits": c.bits, "prob": c.probs[c.candidates.index(c.bits)], "probs": c.probs}
                for c in report.selection.layers
            ],
        }
        report.plot_trajectories(os.path.join(self.cfg.out, "metamix_search.png"))
        self._record(name, model, self.cfg.qat_epochs, seconds)
        return model

    # ---- deployment -----------------------------------------------------------------------------------------

    def deploy(self, qat_model: nn.Module) -> dict:
        qat_model.eval()
        packed = lowbit.convert(qat_model)  # converts a copy; qat_model stays as it is
        path = os.path.join(self.cfg.out, "model.safetensors")
        lowbit.save(packed, path)
        reloaded = lowbit.load(path).to(self.device)
        fake_quant_acc = self._accuracy(qat_model)
        packed_acc = self._accuracy(reloaded)
        latency = self._latency(qat_model, reloaded)
        return {
            "fake_quant_acc": fake_quant_acc,
            "packed_acc": packed_acc,
            "accuracy_equal": fake_quant_acc == packed_acc,
            "file_bytes": os.path.getsize(path),
            "fp32_bytes": float_parameter_bytes(qat_model),
            "latency_ms": latency,
        }

    def _latency(self, qat_model: nn.Module, packed: nn.Module) -> dict:
        from lowbit.app.timing import interleaved_median_ms

        fp = self._float_twin(qat_model)
        out = {}
        for batch in (1, 32):
            x = self.dataset.test_x[:batch].to(self.device)
            with torch.no_grad():
                times = interleaved_median_ms(
                    {"fp32": lambda x=x: fp(x), "packed": lambda x=x: packed(x)},
                    self.device,
                    repeats=5 if self.cfg.quick else 20,
                )
            out[f"batch{batch}"] = {**times, "speedup": times["fp32"] / times["packed"]}
        return out

    def _float_twin(self, qat_model: nn.Module) -> nn.Module:
        """The same architecture in float (for latency): the packaged model, freshly built, in eval mode."""
        return self._new_model().eval()

    # ---- the whole run --------------------------------------------------------------------------------------

    def _phase(self, name: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        self.metrics["phases_seconds"][name] = time.perf_counter() - start
        return value

    def run(self) -> dict:
        start = time.perf_counter()
        fp_model = self._phase("fp32 training", self.train_float)
        plan = self._phase("MixQuant plan", self.mixquant_plan, fp_model)
        self._phase("MixQuant weights + A4 training", self.mixquant_a4, fp_model, plan)
        self._phase("MetaMix (W4) search + weight training", self.metamix, fp_model)
        final = self._phase("MixQuant + MetaMix search + weight training", self.metamix, fp_model, plan)
        for a_bits in UNIFORM_A_BITS:
            self._phase(f"uniform W4A{a_bits}", self.uniform, fp_model, 4, a_bits)
        self.metrics["deploy"] = self._phase("convert, save, reload, time", self.deploy, final)
        self.metrics["results"] = [asdict(r) for r in self.results]
        self.metrics["frontier"] = frontier_scores(self.metrics["results"])
        self.metrics["test_size"] = len(self.dataset.test_y)
        self.metrics["total_seconds"] = time.perf_counter() - start
        self.write()
        return self.metrics

    def write(self) -> None:
        from lowbit.app import demo_report

        out = self.cfg.out
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(self.metrics, f, indent=2, default=float)
        demo_report.pareto_png(self.metrics, os.path.join(out, "pareto.png"))
        demo_report.bits_png(self.metrics, os.path.join(out, "bits.png"))
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(demo_report.markdown(self.metrics))


UNIFORM_A_BITS = (2, 3, 4, 8)  # the uniform W4 frontier: every mixed point of the demo lies within its BOPs range


def frontier_scores(results: list[dict]) -> dict:
    """Each mixed model's top-1 minus the uniform W4 frontier at its BOPs (``None`` outside the frontier's range)."""
    from lowbit.app.frontier import frontier_at

    points = [(r["bops"], r["acc"]) for r in results if r["name"].startswith("uniform W4A")]
    scores = {}
    for r in results:
        if r["name"] == "fp32" or r["name"].startswith("uniform"):
            continue
        try:
            at = frontier_at(points, r["bops"])
        except ValueError:
            scores[r["name"]] = {"frontier_acc": None, "gap": None}
            continue
        scores[r["name"]] = {"frontier_acc": at, "gap": r["acc"] - at}
    return scores


def run(config: DemoConfig) -> dict:
    """Runs the demo; returns the metrics also written to ``config.out/metrics.json``."""
    return Demo(config).run()
