"""The MetaMix trainer: float warm-up (optional) -> bit selection -> selection with budget repair -> weight
training, for the three modes (metamix, joint, uniform) on one loop (``lowbit.tools.train.run_epoch``) and one cost
model (``lowbit.bops``), with a checkpoint at every epoch boundary and DDP under ``torchrun``.

A run is a sequence of phases, each a fixed structure (float model, quantized search model, single-branch
model) plus its optimizers. A checkpoint stores the phase, the epochs done in it and every state; resuming
rebuilds the phase's structure deterministically from the caller's float model, loads the states and restores
the RNGs last, so the rest of the run is the uninterrupted one.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lowbit.metamix import checkpoint, distributed
from lowbit.metamix.config import MetaMixConfig
from lowbit.metamix.cost import CostModel, alpha_parameters, multi_branch_layers, weight_parameters
from lowbit.metamix.report import MetaMixReport
from lowbit.metamix.select import LayerChoice, Selection, select_from_model
from lowbit.metamix.steps import StepContext, frozen_bn_stats, joint_step, metamix_step, weight_step
from lowbit.nn.layers import QConv2d, QLinear
from lowbit.nn.quantizers import LSQQuantizer
from lowbit.tools.bops import bops
from lowbit.tools.fold import fold_activation_clips, unfold_activation_clips
from lowbit.tools.quantize import float_layer_names, quantize
from lowbit.tools.train import JsonLog, evaluate, make_optimizer, run_epoch, set_seed

PHASES = ("fp", "search", "finetune")


class MetaMix:
    """Runs one configured search-and-train job; ``fit()`` returns ``(single_branch_model, report)``.

    Args:
        model: a float model (plain ``nn.Conv2d`` / ``nn.Linear`` layers), trained or not; it is copied, never
            modified.
        train_loader: the training batches. The bit-search step of ``mode="metamix"`` draws its batches from
            ``search_loader``; by default the held-out ``config.search_split`` share of ``train_loader.dataset``
            (a fixed split by ``seed``; the bit-meta step trains on the rest during the search), or with
            ``search_split=0`` a second shuffled pass over the whole dataset (own generator).
        test_loader: evaluated after every epoch and at the end (optional).
        config: a ``MetaMixConfig``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        test_loader: Iterable | None = None,
        config: MetaMixConfig | None = None,
        *,
        search_loader: Iterable | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, MetaMixConfig):
            raise TypeError(f"config must be a MetaMixConfig, got {type(config).__name__}")
        self.cfg = config
        self.distributed = distributed.init_from_env(config.device)
        self.device = distributed.local_device(config.device)
        self.is_main = distributed.rank() == 0
        self._search_generator: torch.Generator | None = None
        self._meta_generator: torch.Generator | None = None
        self._float = copy.deepcopy(model).to(self.device)
        self.meta_loader = None  # the bit-meta batches of the search phase when a share is held out
        self.train_loader, self.search_loader = self._loaders(train_loader, search_loader)
        self.test_loader = test_loader
        self.calib = _calibration_batch(train_loader)[0].to(self.device)
        self.searched = self._searched_names()
        self.cost = CostModel.of(self._quantized(self._float, calibrate=False), self.calib[:2], self.searched)
        self.target = self._target()
        self.uniform_bits = self._uniform_bits()
        self.log_path = config.log_path or (
            os.path.join(config.checkpoint_dir, "log.jsonl") if config.checkpoint_dir else None
        )
        self._reset_run_state()

    # ------------------------------------------------------------------------------------------- set-up

    def _loaders(self, train_loader, search_loader):
        if self.cfg.mode == "metamix" and search_loader is None:
            if not isinstance(train_loader, DataLoader):
                raise TypeError("train_loader must be a DataLoader (or pass search_loader) for mode='metamix'")
            search_set, meta_set = self._split(train_loader.dataset)
            generator = self._search_generator = torch.Generator().manual_seed(self.cfg.seed + 1)
            search_loader = DataLoader(
                search_set, batch_size=train_loader.batch_size, shuffle=True, generator=generator
            )
            if meta_set is not None:
                self._meta_generator = torch.Generator().manual_seed(self.cfg.seed + 2)
                self.meta_loader = DataLoader(
                    meta_set, batch_size=train_loader.batch_size, shuffle=True, generator=self._meta_generator
                )
        if distributed.active():
            if not isinstance(train_loader, DataLoader):
                raise TypeError("train_loader must be a DataLoader under DDP (it is re-sharded per rank)")
            train_loader = distributed.sharded_loader(train_loader, self.cfg.seed)
            if search_loader is not None:
                search_loader = distributed.sharded_loader(search_loader, self.cfg.seed + 1)
            if self.meta_loader is not None:
                self.meta_loader = distributed.sharded_loader(self.meta_loader, self.cfg.seed + 2)
        return train_loader, search_loader

    def _split(self, dataset):
        """(held-out search share, the rest) of ``dataset`` by a permutation fixed by ``seed``; (all, None) at 0."""
        share = self.cfg.search_split
        if share == 0:
            return dataset, None
        n = len(dataset)
        held = int(round(n * share))
        if held < 1 or held >= n:
            raise ValueError(f"search_split={share} of {n} training samples leaves one side empty")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + 3)).tolist()
        return Subset(dataset, sorted(order[:held])), Subset(dataset, sorted(order[held:]))

    def _searched_names(self) -> list[str]:
        names = float_layer_names(self._float)
        if isinstance(self.cfg.w_bits, dict):
            unknown = sorted(set(self.cfg.w_bits) - set(names))
            if unknown:
                raise ValueError(f"w_bits names layers that are not convs or linears of the model: {unknown}")
        searched = names[1:-1] if self.cfg.first_last_bits is not None else names
        if not searched:
            raise ValueError(
                "model has no layer to search: it needs a conv/linear besides the first and last "
                "(or first_last_bits=None)"
            )
        return searched

    def _target(self) -> float | None:
        cfg = self.cfg
        if cfg.target_bits is None and cfg.target_bops is None:
            return None
        target = self.cost.target(cfg.target_bits, cfg.target_bops)
        self.cost.check_reachable(target, min(cfg.a_bits))
        return target

    def _uniform_bits(self) -> int | None:
        cfg = self.cfg
        if cfg.mode != "uniform":
            return None
        if cfg.uniform_bits is not None:
            return cfg.uniform_bits
        fitting = [b for b in cfg.a_bits if self.cost.bops(b) <= self.target]
        return max(fitting)  # check_reachable guarantees the smallest fits

    def _reset_run_state(self) -> None:
        self.phase: str | None = None
        self.epoch = 0  # epochs done in the current phase
        self.records: list[dict] = []
        self.trajectory: list[dict] = []
        self.phase_seconds = {p: 0.0 for p in (*PHASES[:2], "select", PHASES[2])}
        self.summary: dict = {}
        self.selection: Selection | None = None

    # ------------------------------------------------------------------------------------------- structures

    def _quantized(self, float_model: nn.Module, calibrate: bool = True) -> nn.Module:
        """The search-phase structure: multi-branch layers (uniform: fixed-width LSQ), first/last fixed."""
        cfg = self.cfg
        model = copy.deepcopy(float_model)
        w_bits, plan = (4, cfg.w_bits) if isinstance(cfg.w_bits, dict) else (cfg.w_bits, None)
        uniform = cfg.mode == "uniform" and getattr(self, "uniform_bits", None) is not None
        quantize(
            model,
            w_bits,
            self.uniform_bits if uniform else max(cfg.a_bits),
            multi_branch=None if uniform else cfg.a_bits,
            first_last_bits=cfg.first_last_bits,
            bits=plan,
        )
        if cfg.search_weights == "float" and not uniform:
            _float_weights(model)
        if calibrate:
            _calibrate(model, self.calib)
        return model

    def _single_branch(self, model: nn.Module, bits: dict[str, int]) -> nn.Module:
        """The weight-training structure: every multi-branch layer as one LSQ layer at its chosen bits. After a
        float-weight search the weight quantizers come back here, their steps initialised from the weights."""
        restored = _quantized_weights(model)
        refold = unfold_activation_clips(model) > 0  # the clips folded into the mixtures move to the LSQ layers
        for name, layer in multi_branch_layers(model):
            model.set_submodule(name, layer.to_single_branch(bits[name]))
        if refold:
            fold_activation_clips(model, strict=False)
        if restored:
            _calibrate(model, self.calib)
        return model

    def _set_phase(self, phase: str, inner: nn.Module) -> None:
        cfg = self.cfg
        self.phase, self.epoch, self.inner = phase, 0, inner.to(self.device)
        self.model = distributed.wrap(self.inner, self.device)
        searching = phase == "search" and cfg.mode != "uniform"
        alphas = alpha_parameters(self.inner) if searching else []
        weights = weight_parameters(self.inner) if searching else list(self.inner.parameters())
        lr = {"fp": cfg.fp_lr, "search": cfg.lr, "finetune": cfg.finetune_lr or cfg.lr}[phase]
        w_opt = make_optimizer(weights, lr, cfg.weight_decay, cfg.optimizer)
        a_opt = make_optimizer(alphas, cfg.alpha_lr, 0.0, cfg.alpha_optimizer) if alphas else None
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=max(cfg.epochs[phase], 1))
        self.ctx = StepContext(
            self.model,
            self.inner,
            self.device,
            w_opt,
            a_opt,
            weights,
            alphas,
            self.cost,
            self.target,
            cfg.lam,
            toggle=not distributed.active(),
        )

    def _make_step(self):
        """A fresh step function per epoch, so the bit-search iterator starts with the epoch (as on resume)."""
        if self.phase == "search" and self.cfg.mode == "joint":
            return joint_step(self.ctx)
        if self.phase == "search" and self.cfg.mode == "metamix":
            return metamix_step(self.ctx, lambda: iter(self.search_loader))
        return weight_step(self.ctx)

    def _enter(self, phase: str, selection: Selection | None = None) -> None:
        """Moves to ``phase``: builds its structure from the current one (or, on resume, from the float model)."""
        if phase == "fp":
            self._set_phase("fp", copy.deepcopy(self._float))
        elif phase == "search":
            source = self.inner if self.phase == "fp" else self._float
            self._set_phase("search", self._quantized(source))
            if self.cfg.mode != "uniform":
                self._record_trajectory()
        else:
            start = time.perf_counter()
            self.selection = selection or self._select()
            self._set_phase("finetune", self._single_branch(self.inner, self.selection.bits))
            if selection is None:  # a real transition, not a rebuild on resume
                self.phase_seconds["select"] += time.perf_counter() - start
                self.summary["selected_test_acc"] = self._test_acc()

    def _select(self) -> Selection:
        if self.cfg.mode == "uniform":
            b = self.uniform_bits
            layers = [LayerChoice(x.name, x.macs, x.w_bits, [b], [0.0], [1.0], b, b) for x in self.cost.layers]
            bops = self.cost.bops(b)
            return Selection(layers, self.target or bops, bops, bops, False)
        return select_from_model(self.inner, self.cost, self.target, self.cfg.fill, self.cfg.repair)

    # ------------------------------------------------------------------------------------------- the run

    def fit(self, stop_after: int | None = None) -> tuple[nn.Module, MetaMixReport] | None:
        """Runs (or, with ``config.resume``, continues) the job. ``stop_after=k`` returns ``None`` after ``k``
        epochs of this call, checkpoint written: the same as a job killed at that epoch boundary."""
        self._reset_run_state()
        set_seed(self.cfg.seed)
        if self._search_generator is not None:
            self._search_generator.manual_seed(self.cfg.seed + 1)
        if self._meta_generator is not None:
            self._meta_generator.manual_seed(self.cfg.seed + 2)
        state = self._load() if self.cfg.resume else None
        if state is None and self.is_main and self.log_path and os.path.exists(self.log_path):
            checkpoint.rewrite_log(self.log_path, [])  # a fresh run: the log holds exactly this run's epochs
        start = state["phase"] if state else PHASES[0]
        done = 0
        for phase in PHASES[PHASES.index(start) :]:
            if state is not None and phase == state["phase"]:
                self._restore(state)
            elif phase == "fp" and self.cfg.fp_epochs == 0:
                continue
            else:
                self._enter(phase)
            while self.epoch < self.cfg.epochs[phase]:
                if stop_after is not None and done >= stop_after:
                    return None
                self._epoch()
                done += 1
        return self.inner, self._report()

    def _epoch(self) -> None:
        cfg, phase = self.cfg, self.phase
        start = time.perf_counter()
        offset = sum(cfg.epochs[p] for p in PHASES[: PHASES.index(phase)])
        for loader in (self.train_loader, self.search_loader, self.meta_loader):
            distributed.set_epoch(loader, offset + self.epoch)
        desc = f"{cfg.mode} {phase} {self.epoch + 1}/{cfg.epochs[phase]}"
        batches = self.meta_loader if phase == "search" and self.meta_loader is not None else self.train_loader
        record = run_epoch(batches, self._make_step(), desc, cfg.progress and self.is_main)
        self.sched.step()
        self.epoch += 1
        record = {"phase": phase, "epoch": self.epoch, **record}
        if cfg.eval_each_epoch and self.test_loader is not None:
            record.update({f"test_{k}": v for k, v in evaluate(self.inner, self.test_loader, self.device).items()})
        if phase == "search" and cfg.mode != "uniform":
            self._record_trajectory()
        self.phase_seconds[phase] += time.perf_counter() - start
        record["phase_seconds"] = self.phase_seconds[phase]
        self.records.append(record)
        self._save()
        if self.is_main and self.log_path:
            JsonLog(self.log_path).write(**record)

    def _record_trajectory(self) -> None:
        with torch.no_grad():
            layers = multi_branch_layers(self.inner)
            bits = {n: float(m.expected_bits()) for n, m in layers}
            point = {
                "epoch": self.epoch,
                "alpha": {n: m.act_quant.alpha.detach().cpu().tolist() for n, m in layers},
                "bits": bits,
                "avg_bits": self.cost.avg_bits(bits),
                "ebops_ratio": self.cost.bops(bits) / self.target,
            }
        self.trajectory.append(point)

    def _test_acc(self) -> float | None:
        if self.test_loader is None:
            return None
        return evaluate(self.inner, self.test_loader, self.device)["acc"]

    def _report(self) -> MetaMixReport:
        if self.selection is None:  # no finetune phase ran yet (finetune_epochs == 0 is still a phase)
            raise RuntimeError("the run ended before selection")
        self.inner.eval()
        whole = bops(self.inner, self.calib[:2])
        final = CostModel.from_report(whole, self.searched)
        bits = self.selection.bits
        search_records = [r for r in self.records if r["phase"] == "search"]
        summary = dict(self.summary)
        if search_records and "test_acc" in search_records[-1]:
            summary["search_test_acc"] = search_records[-1]["test_acc"]
        return MetaMixReport(
            mode=self.cfg.mode,
            selection=self.selection,
            target_bops=self.target,
            bops=whole.total_bops,
            avg_bits=final.avg_bits(bits),
            model_avg_a_bits=whole.avg_a_bits,
            accuracy=self._test_acc(),
            phase_seconds=dict(self.phase_seconds),
            history=list(self.records),
            trajectory=list(self.trajectory),
            summary=summary,
            config=self.cfg.to_dict(),
        )

    # ------------------------------------------------------------------------------------------- checkpoints

    def _generators(self) -> list[torch.Generator]:
        found, seen = [], set()
        for loader in (self.train_loader, self.search_loader, self.meta_loader):
            for holder in (loader, getattr(loader, "sampler", None)):
                g = getattr(holder, "generator", None)
                if isinstance(g, torch.Generator) and id(g) not in seen:
                    seen.add(id(g))
                    found.append(g)
        return found

    def _save(self) -> None:
        rng = distributed.all_gather(checkpoint.rng_state(self._generators()))
        if not self.cfg.checkpoint_dir or not self.is_main:
            return
        state = {
            "version": 1,
            "mode": self.cfg.mode,
            "phase": self.phase,
            "epoch": self.epoch,
            "model": self.inner.state_dict(),
            "w_opt": self.ctx.w_opt.state_dict(),
            "a_opt": self.ctx.a_opt.state_dict() if self.ctx.a_opt is not None else None,
            "sched": self.sched.state_dict(),
            "rng": rng,
            "records": self.records,
            "trajectory": self.trajectory,
            "phase_seconds": self.phase_seconds,
            "summary": self.summary,
            "selection": self.selection.to_dict() if self.selection is not None else None,
        }
        checkpoint.save(self.cfg.checkpoint_dir, state)

    def _load(self) -> dict | None:
        state = checkpoint.load(self.cfg.checkpoint_dir)
        if state is not None and state["mode"] != self.cfg.mode:
            raise ValueError(
                f"checkpoint in {self.cfg.checkpoint_dir} is of mode {state['mode']!r}, not {self.cfg.mode!r}"
            )
        return state

    def _restore(self, state: dict) -> None:
        phase = state["phase"]
        if phase == "fp":
            self._enter("fp")
        else:
            self.phase = None
            self._enter("search")
            if phase == "finetune":
                self._enter("finetune", Selection.from_dict(state["selection"]))
        self.inner.load_state_dict(state["model"])
        self.ctx.w_opt.load_state_dict(state["w_opt"])
        if self.ctx.a_opt is not None:
            self.ctx.a_opt.load_state_dict(state["a_opt"])
        self.sched.load_state_dict(state["sched"])
        self.epoch = state["epoch"]
        self.records, self.trajectory = list(state["records"]), list(state["trajectory"])
        self.phase_seconds, self.summary = dict(state["phase_seconds"]), dict(state["summary"])
        if state["selection"] is not None:
            self.selection = Selection.from_dict(state["selection"])
        rng = state["rng"]
        if len(rng) != distributed.world_size():
            raise ValueError(
                f"checkpoint was written by {len(rng)} process(es), resuming with {distributed.world_size()}"
            )
        checkpoint.set_rng_state(rng[distributed.rank()], self._generators())
        if self.is_main and self.log_path:
            checkpoint.rewrite_log(self.log_path, self.records)


class FloatWeights(nn.Module):
    """Stands in for a layer's weight quantizer during a float-weight search: the weight passes unchanged, while
    ``bits`` still tells the cost model the width the weight will have (BOPs are counted at the final widths)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def get_extra_state(self):
        return {"bits": self.bits}

    def set_extra_state(self, state) -> None:
        self.bits = state["bits"]


def _float_weights(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, (QConv2d, QLinear)) and isinstance(layer.weight_quant, LSQQuantizer):
            layer.weight_quant = FloatWeights(layer.weight_quant.bits)


def _quantized_weights(model: nn.Module) -> bool:
    """Puts fresh (uninitialised) LSQ weight quantizers back where ``FloatWeights`` stand; True if any did."""
    found = False
    for layer in model.modules():
        if isinstance(layer, (QConv2d, QLinear)) and isinstance(layer.weight_quant, FloatWeights):
            quant = LSQQuantizer(layer.weight_quant.bits, signed=True, channels=layer.weight.shape[0], axis=0)
            layer.weight_quant = quant.to(layer.weight.device)
            found = True
    return found


def _calibration_batch(loader: Iterable):
    """The first batch of an unshuffled pass: the same on every rank and in every run, and it uses no RNG."""
    if isinstance(loader, DataLoader):
        return next(iter(DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False)))
    return next(iter(loader))


@torch.no_grad()
def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """One forward in train mode: LSQ steps start from the batch (as in LSQ); BN running statistics are put
    back."""
    with frozen_bn_stats(model):
        model.train()
        model(x)


def run(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None = None,
    config: MetaMixConfig | None = None,
    **overrides,
) -> tuple[nn.Module, MetaMixReport]:
    """One line for the whole job: ``single_branch_model, report = lowbit.metamix.run(model, train, test, cfg)``.

    ``overrides`` replace fields of ``config`` (``run(model, train, test, target_bits=3.0, search_epochs=2)``).
    """
    import dataclasses

    if config is None:
        config = MetaMixConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return MetaMix(model, train_loader, test_loader, config).fit()
