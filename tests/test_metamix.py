"""MetaMix (lowbit.metamix): freezing in the two alternating steps, the BOPs penalty, selection under a budget,
checkpoint/resume (in process and after SIGKILL), DDP agreement across ranks, report output and bad input.

Everything runs on a tiny conv net and a few hundred digits, so the file takes seconds on one core.
"""

from __future__ import annotations

import copy
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit
import lowbit.app.data
import lowbit.models
from lowbit.metamix import (
    CostModel,
    MetaMix,
    MetaMixConfig,
    alpha_parameters,
    bit_meta,
    bit_search,
    penalty,
    select,
    select_from_model,
    weight_parameters,
)
from lowbit.metamix.cost import multi_branch_layers
from lowbit.metamix.steps import StepContext
from lowbit.tools.train import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_net(seed: int = 0) -> nn.Module:
    """conv(1->8) -> conv(8->8) -> conv(8->16) -> linear: two searched layers between a fixed first and last."""
    torch.manual_seed(seed)
    return lowbit.models.SmallCNN(num_classes=10, in_channels=1, width=8)


def deeper_net(seed: int = 0) -> nn.Module:
    """Five searched convs of different sizes, for penalty and selection tests."""
    torch.manual_seed(seed)
    layers, c = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()], 8
    for out in (8, 16, 8, 24, 16):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def data():
    digits = lowbit.app.data.digits()
    return digits.train_x[:192], digits.train_y[:192], digits.test_x[:64], digits.test_y[:64]


def loaders(data, seed: int = 0):
    train_x, train_y, test_x, test_y = data
    train = DataLoader(
        TensorDataset(train_x, train_y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    return train, DataLoader(TensorDataset(test_x, test_y), batch_size=64)


def config(**kw) -> MetaMixConfig:
    base = dict(target_bits=3.0, fp_epochs=1, search_epochs=2, finetune_epochs=1, progress=False, lam=2.0)
    return MetaMixConfig(**{**base, **kw})


def search_model(data, net=tiny_net):
    model = lowbit.quantize(net(), 4, multi_branch=(2, 4, 8))
    model.train()
    model(data[0][:32])  # initialise the LSQ steps
    return model


def context(model, target=None, lam=1.0) -> StepContext:
    weights, alphas = weight_parameters(model), alpha_parameters(model)
    cost = CostModel.of(model, torch.zeros(2, 1, 8, 8), [n for n, _ in multi_branch_layers(model)])
    target = target or cost.bops(3.0)
    w_opt = make_optimizer(weights, 0.05)
    a_opt = make_optimizer(alphas, 0.1, 0.0, "adam")
    return StepContext(model, model, torch.device("cpu"), w_opt, a_opt, weights, alphas, cost, target, lam)


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def all_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------- freezing


def test_bit_meta_step_leaves_alpha_unchanged(data):
    model = search_model(data)
    ctx = context(model)
    with torch.no_grad():  # distinct alphas, so a stray update would show
        for i, alpha in enumerate(ctx.alphas):
            alpha.copy_(torch.tensor([0.3, -0.2, 0.1]) * (i + 1))
    alphas, weights = snapshot(ctx.alphas), snapshot(ctx.weights)
    for _ in range(3):
        bit_meta(ctx, data[0][:32], data[1][:32])
    assert all_equal(alphas, ctx.alphas)
    assert not all_equal(weights, ctx.weights)  # the step did train the weights and steps
    steps = [m.act_quant.steps for _, m in multi_branch_layers(model)]
    assert all(p.requires_grad for p in ctx.alphas + steps)  # requires_grad restored after the step


def test_bit_search_step_leaves_weights_steps_and_bn_unchanged(data):
    model = search_model(data)
    ctx = context(model)
    weights, buffers, alphas = snapshot(ctx.weights), snapshot(model.buffers()), snapshot(ctx.alphas)
    step_params = [m.act_quant.steps for _, m in multi_branch_layers(model)]
    assert any(p is s for s in step_params for p in ctx.weights)  # the LSQ steps are among the frozen ones
    for _ in range(3):
        bit_search(ctx, data[0][32:64], data[1][32:64])
    assert all_equal(weights, ctx.weights)
    assert all_equal(buffers, list(model.buffers()))  # BN running mean/var and num_batches_tracked
    assert not all_equal(alphas, ctx.alphas)
    assert all(p.requires_grad for p in ctx.weights)


# --------------------------------------------------------------------------------------------- penalty


@pytest.mark.parametrize("target_bits", [2.5, 3.0, 6.0])
def test_penalty_gradient_drives_expected_bops_to_target(data, target_bits):
    model = search_model(data, deeper_net)
    ctx = context(model)
    target = ctx.cost.bops(target_bits)
    opt = torch.optim.Adam(ctx.alphas, lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        penalty(model, ctx.cost, target, 1.0).backward()
        opt.step()
    expected = float(ctx.cost.expected_bops(model).detach())
    assert abs(expected / target - 1) < 0.01


def test_cost_model_prices_expected_bops_with_its_own_macs(data):
    model = search_model(data, deeper_net)
    ctx = context(model)
    # alpha = 0: every searched layer at the mean of its branches (2, 4, 8); first and last fixed
    assert float(ctx.cost.expected_bops(model).detach()) == pytest.approx(ctx.cost.bops(14 / 3), rel=1e-6)
    assert set(ctx.cost.macs) == {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert not any(hasattr(m, "macs") for m in model.modules())  # the layers hold no cost state


# --------------------------------------------------------------------------------------------- selection


def hand_cost() -> CostModel:
    from lowbit.metamix.cost import SearchedLayer

    layers = (SearchedLayer("a", 100, 4), SearchedLayer("b", 1000, 4), SearchedLayer("c", 10, 4))
    return CostModel(layers, fixed_bops=500.0)


def test_repair_lowers_the_layer_with_best_saving_per_alpha_margin():
    cost, cands = hand_cost(), {n: [2, 4, 8] for n in "abc"}
    # every argmax is 8 bits; b saves 16x more than a per step for half the margin, so b goes first
    alphas = {"a": [0.0, 0.0, 1.0], "b": [0.0, 0.5, 1.0], "c": [0.0, 0.0, 1.0]}
    full = cost.bops({"a": 8, "b": 8, "c": 8})
    sel = select(cost, alphas, cands, target=full - 1, fill="none")
    assert sel.bits == {"a": 8, "b": 4, "c": 8}
    assert sel.argmax_bops == full and sel.repaired and sel.bops <= full - 1
    # a tighter budget: b is lowered again (2 bits: margin 0.5, saving 8000) before a or c move
    sel = select(cost, alphas, cands, target=cost.bops({"a": 8, "b": 2, "c": 8}), fill="none")
    assert sel.bits == {"a": 8, "b": 2, "c": 8}


def test_repair_stops_at_first_fit_and_fill_spends_what_is_left():
    cost, cands = hand_cost(), {n: [2, 4, 8] for n in "abc"}
    alphas = {"a": [0.0, 0.9, 1.0], "b": [-1.0, 0.5, 1.0], "c": [0.0, 1.0, 0.5]}
    argmax = {"a": 8, "b": 8, "c": 4}
    target = cost.bops(argmax) - 16500
    plain = select(cost, alphas, cands, target, fill="none")
    # b first (saves 16000 for margin 0.5), 500 BOPs still over; then a (1600 for 0.1) beats b again
    # (8000 for 1.5) and c (80 for 1.0); 1100 BOPs under the target at the first fit
    assert plain.bits == {"a": 4, "b": 4, "c": 4}
    filled = select(cost, alphas, cands, target, fill="both")
    assert filled.bits == {"a": 4, "b": 4, "c": 8}  # c's raise (160 BOPs) is the only one that fits
    assert plain.bops < filled.bops <= target
    assert filled.argmax_bops == plain.argmax_bops == cost.bops(argmax)


def test_argmax_under_target_kept_unless_filled():
    cost, cands = hand_cost(), {n: [2, 4, 8] for n in "abc"}
    alphas = {"a": [1.0, 0.0, 0.0], "b": [1.0, 0.9, 0.0], "c": [1.0, 0.0, 0.0]}
    target = cost.bops(4)
    kept = select(cost, alphas, cands, target, fill="repair")
    assert kept.bits == {"a": 2, "b": 2, "c": 2} and not kept.repaired
    filled = select(cost, alphas, cands, target, fill="both")
    assert filled.bits["b"] == 4 and filled.bops <= target  # b: the smallest margin given up


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fill", ["both", "repair", "none"])
def test_selection_respects_budget_on_a_model(data, seed, fill):
    model = search_model(data, deeper_net)
    torch.manual_seed(seed)
    with torch.no_grad():
        for alpha in alpha_parameters(model):
            alpha.copy_(torch.randn(3) * 2)
    cost = CostModel.of(model, data[0][:2], [n for n, _ in multi_branch_layers(model)])
    target = cost.bops(2.0 + 4.0 * torch.rand(()).item())
    sel = select_from_model(model, cost, target, fill)
    assert sel.bops <= target
    assert sel.bops == pytest.approx(cost.bops(sel.bits))
    if fill == "both":  # no single raise still fits
        up = {2: 4, 4: 8}
        raises = [
            x.macs * x.w_bits * (up[sel.bits[x.name]] - sel.bits[x.name]) for x in cost.layers if sel.bits[x.name] < 8
        ]
        assert all(sel.bops + r > target for r in raises)


# --------------------------------------------------------------------------------------------- trainer


@pytest.mark.parametrize("mode", ["metamix", "joint", "uniform"])
def test_modes_run_and_report(data, tmp_path, mode):
    train, test = loaders(data)
    cfg = config(mode=mode, checkpoint_dir=str(tmp_path))
    model, report = MetaMix(tiny_net(), train, test, cfg).fit()
    assert not list(multi_branch_layers(model))
    assert report.bops <= report.target_bops * (1 + 1e-9)
    assert report.bops == pytest.approx(lowbit.bops(model.eval(), data[0][:2]).total_bops)
    json.loads(report.to_json())
    assert "features.1.0" in report.to_markdown()
    assert os.path.getsize(report.plot_allocation(str(tmp_path / "bits.png"))) > 0
    if mode != "uniform":
        assert len(report.trajectory) == cfg.search_epochs + 1
        assert os.path.getsize(report.plot_trajectories(str(tmp_path / "traj.png"))) > 0
    else:
        assert set(report.bits.values()) == {2}  # widest of (2, 4, 8) within 3.0 average bits
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(r["phase"], r["epoch"]) for r in lines] == [("fp", 1), ("search", 1), ("search", 2), ("finetune", 1)]
    assert set(report.phase_seconds) == {"fp", "search", "select", "finetune"}


def test_fresh_run_starts_a_fresh_log(data, tmp_path):
    for _ in range(2):  # the same folder twice, no resume: the log holds the second run's epochs only
        train, test = loaders(data)
        MetaMix(tiny_net(), train, test, config(mode="uniform", checkpoint_dir=str(tmp_path))).fit()
    assert len(open(tmp_path / "log.jsonl").read().splitlines()) == 4


def test_folded_clips_move_to_the_single_branch_layers(data):
    """The ReLUs folded into the multi-branch quantizers during the search end up folded into the chosen LSQ
    layers (not clipped twice, not left to the activations), and the result computes what its unfolded copy does."""
    train, test = loaders(data)
    model, _ = MetaMix(deeper_net(), train, test, config(mode="uniform", fp_epochs=0, search_epochs=1)).fit()
    clips = [m for m in model.modules() if isinstance(m, lowbit.nn.FoldedClip)]
    assert len(clips) == 5 and all(m.clipped_by_reader() for m in clips)
    readers = [m.act_quant for m in model.modules() if isinstance(m, lowbit.nn.QConv2d) and m.act_quant.input_clip]
    assert len(readers) == 5 and all(type(q) is lowbit.nn.LSQQuantizer for q in readers)
    unfolded = copy.deepcopy(model)
    assert lowbit.unfold_activation_clips(unfolded) == 5
    with torch.no_grad():
        assert torch.equal(model.eval()(data[2]), unfolded.eval()(data[2]))


def test_uniform_width_is_the_widest_within_target(data):
    train, test = loaders(data)
    trainer = MetaMix(tiny_net(), train, test, config(mode="uniform", target_bits=5.0))
    assert trainer.uniform_bits == 4


def test_run_one_line(data):
    train, test = loaders(data)
    model, report = lowbit.metamix.run(tiny_net(), train, test, config(), search_epochs=1, fp_epochs=0)
    assert report.mode == "metamix" and len(report.history) == 2


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("stop_after", [2, 3])  # mid-search, and at the search/finetune boundary
def test_resume_equals_uninterrupted(data, tmp_path, stop_after):
    train, test = loaders(data)
    ref_model, ref = MetaMix(tiny_net(), train, test, config(checkpoint_dir=str(tmp_path / "a"))).fit()

    train, test = loaders(data)
    cfg = config(checkpoint_dir=str(tmp_path / "b"))
    assert MetaMix(tiny_net(), train, test, cfg).fit(stop_after=stop_after) is None
    train, test = loaders(data)  # a fresh process would build fresh loaders: their generators are restored
    model, report = MetaMix(tiny_net(), train, test, config(checkpoint_dir=str(tmp_path / "b"), resume=True)).fit()

    assert report.bits == ref.bits
    a, b = state_of(ref_model), state_of(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["test_acc"] for r in report.history] == [r["test_acc"] for r in ref.history]
    assert report.trajectory == ref.trajectory


_CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset
    import lowbit.models
    from lowbit.metamix import MetaMix, MetaMixConfig

    class Slow(Dataset):  # counts reads; at read kill_at it says so and waits to be killed (mid-epoch)
        def __init__(self, x, y, kill_at, marker):
            self.x, self.y, self.reads, self.kill_at, self.marker = x, y, 0, kill_at, marker
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            self.reads += 1
            if self.reads == self.kill_at:
                open(self.marker, "w").close()
                time.sleep(120)
            return self.x[i], self.y[i]

    def main(data_path, out, kill_at):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            x, y, tx, ty = torch.load(data_path)
            train = DataLoader(Slow(x, y, kill_at, os.path.join(out, "in-epoch")), batch_size=32, shuffle=True,
                               generator=torch.Generator().manual_seed(0))
            test = DataLoader(TensorDataset(tx, ty), batch_size=64)
            torch.manual_seed(0)
            model = lowbit.models.SmallCNN(num_classes=10, in_channels=1, width=8)
            cfg = MetaMixConfig(target_bits=3.0, fp_epochs=1, search_epochs=3, finetune_epochs=1, progress=False,
                                lam=2.0, checkpoint_dir=os.path.join(out, "ckpt"), resume=True)
            final, report = MetaMix(model, train, test, cfg).fit()
            torch.save({"state": final.state_dict(), "bits": report.bits}, os.path.join(out, "final.pt"))
        finally:
            torch.set_num_threads(threads)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


def _child_script(tmp_path, data) -> tuple[str, str]:
    script, data_path = tmp_path / "child.py", tmp_path / "data.pt"
    script.write_text(_CHILD)
    torch.save(data, data_path)
    return str(script), str(data_path)


def _log(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "ckpt", "log.jsonl"))]


def test_sigkill_mid_epoch_then_resume(tmp_path, data):
    script, data_path = _child_script(tmp_path, data)
    out, ref_out = str(tmp_path / "killed"), str(tmp_path / "reference")
    os.makedirs(out), os.makedirs(ref_out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    # reads per epoch: fp 192; search 144 bit-meta (the 75% not held out, 5 batches) + 128 bit-search (5 batches
    # cycling over the 48 held-out: 32, 16, 32, 16, 32); read 192 + 272 + 150 falls in search epoch 2, after two
    # completed epochs
    proc = subprocess.Popen([sys.executable, script, data_path, out, str(192 + 272 + 150)], env=env)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "in-epoch")):
        assert proc.poll() is None and time.time() < deadline, "child ended or hung before the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [(r["phase"], r["epoch"]) for r in _log(out)] == [("fp", 1), ("search", 1)]

    resumed = subprocess.Popen([sys.executable, script, data_path, out, "-1"], env=env)
    runpy.run_path(script)["main"](data_path, ref_out, -1)  # the uninterrupted run, meanwhile, in this process
    assert resumed.wait(timeout=60) == 0

    expected = [("fp", 1), ("search", 1), ("search", 2), ("search", 3), ("finetune", 1)]
    assert [(r["phase"], r["epoch"]) for r in _log(out)] == expected  # nothing lost, nothing logged twice
    a, b = torch.load(os.path.join(out, "final.pt")), torch.load(os.path.join(ref_out, "final.pt"))
    assert a["bits"] == b["bits"]
    tensors = [k for k, v in b["state"].items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in tensors)
    assert [r["test_acc"] for r in _log(out)] == [r["test_acc"] for r in _log(ref_out)]


_DDP_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader, TensorDataset
    import lowbit, lowbit.app.data, lowbit.models
    from lowbit.metamix import MetaMix, MetaMixConfig
    from lowbit.metamix.cost import multi_branch_layers

    out = sys.argv[1]
    digits = lowbit.app.data.digits()
    train = DataLoader(TensorDataset(digits.train_x[:128], digits.train_y[:128]), batch_size=16, shuffle=True)
    torch.manual_seed(0)
    model = lowbit.models.SmallCNN(num_classes=10, in_channels=1, width=8)
    cfg = MetaMixConfig(target_bits=3.0, fp_epochs=0, search_epochs=2, finetune_epochs=0, progress=False,
                        checkpoint_dir=os.path.join(out, "ckpt"))
    trainer = MetaMix(model, train, None, cfg)
    torch.manual_seed(100 + torch.distributed.get_rank())  # ranks differ in RNG: only DDP keeps them together
    final, report = trainer.fit()
    searched = [n for n, _ in multi_branch_layers(trainer.inner)]
    torch.save({"params": {k: v for k, v in final.named_parameters()}, "bits": report.bits,
                "alphas": [t["alpha"] for t in report.trajectory], "world": torch.distributed.get_world_size()},
               os.path.join(out, f"rank{torch.distributed.get_rank()}.pt"))
    """
)


def test_ddp_two_ranks_agree(tmp_path, data):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    torch.save(data, tmp_path / "data.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(
        cmd + [str(tmp_path), str(tmp_path / "data.pt")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == 2
    assert r0["bits"] == r1["bits"]
    assert r0["alphas"] == r1["alphas"]  # every search epoch, every layer
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    lines = open(tmp_path / "ckpt" / "log.jsonl").read().splitlines()
    assert len(lines) == 2  # rank 0 alone wrote the log


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(a_bits=(1, 4)), ValueError, "a_bits"),
        (dict(a_bits=(2, 9)), ValueError, "a_bits"),
        (dict(a_bits=()), ValueError, "a_bits"),
        (dict(a_bits=(4, 4)), ValueError, "a_bits"),
        (dict(a_bits=(2.5, 4)), TypeError, "a_bits"),
        (dict(w_bits=9), ValueError, "w_bits"),
        (dict(w_bits={"x": 1}), ValueError, "w_bits"),
        (dict(target_bits=0.0), ValueError, "target_bits"),
        (dict(target_bits=None, target_bops=-5.0), ValueError, "target_bops"),
        (dict(target_bits=1.5), ValueError, "target_bits"),
        (dict(target_bits=None), ValueError, "target"),
        (dict(target_bops=1e6), ValueError, "target"),
        (dict(search_epochs=-1), ValueError, "search_epochs"),
        (dict(fp_epochs=1.5), TypeError, "fp_epochs"),
        (dict(mode="edmips"), ValueError, "mode"),
        (dict(lam=-1.0), ValueError, "lam"),
        (dict(alpha_lr=0.0), ValueError, "alpha_lr"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer"),
        (dict(fill="maybe"), ValueError, "fill"),
        (dict(repair="yes"), TypeError, "repair"),
        (dict(search_weights="fp32"), ValueError, "search_weights"),
        (dict(search_split=1.0), ValueError, "search_split"),
        (dict(search_split=-0.1), ValueError, "search_split"),
        (dict(resume=True), ValueError, "checkpoint_dir"),
    ],
)
def test_bad_config(kwargs, error, word):
    with pytest.raises(error, match=word):
        config(**kwargs)


def test_bad_trainer_input(data):
    train, test = loaders(data)
    with pytest.raises(TypeError, match="model"):
        MetaMix("resnet", train, test, config())
    with pytest.raises(TypeError, match="config"):
        MetaMix(tiny_net(), train, test, {"target_bits": 3.0})
    with pytest.raises(ValueError, match="unreachable"):  # below every searched layer at 2 bits
        MetaMix(tiny_net(), train, test, config(target_bits=None, target_bops=1000.0))
    with pytest.raises(ValueError, match="w_bits"):
        MetaMix(tiny_net(), train, test, config(w_bits={"no.such.layer": 4}))
    two_layers = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(ValueError, match="no layer to search"):
        MetaMix(two_layers, train, test, config())


def test_per_layer_weight_plan(data):
    train, test = loaders(data)
    plan = {"features.1.0": 2, "features.3.0": 8}
    model, report = MetaMix(tiny_net(), train, test, config(w_bits=plan, fp_epochs=0, search_epochs=1)).fit()
    assert model.get_submodule("features.1.0").w_bits == 2 and model.get_submodule("features.3.0").w_bits == 8
    assert {x.name: x.w_bits for x in report.selection.layers} == plan
    assert copy.deepcopy(report.bops) <= report.target_bops


def test_argmax_only_is_the_papers_rule_and_may_exceed_the_target():
    cost, cands = hand_cost(), {n: [2, 4, 8] for n in "abc"}
    alphas = {"a": [0.0, 0.0, 1.0], "b": [0.0, 0.5, 1.0], "c": [0.0, 0.0, 1.0]}
    argmax = {"a": 8, "b": 8, "c": 8}
    target = cost.bops({"a": 4, "b": 4, "c": 4})
    paper = select(cost, alphas, cands, target, fill="none", repair=False)
    assert paper.bits == argmax and paper.bops == paper.argmax_bops > target and not paper.repaired
    assert select(cost, alphas, cands, target, fill="both", repair=False).bits == argmax  # nothing fits a raise
    assert select(cost, alphas, cands, target, fill="none").bops <= target  # the extension repairs


def test_held_out_search_split_is_disjoint_fixed_and_used(data):
    train, test = loaders(data)
    trainer = MetaMix(tiny_net(), train, test, config(search_split=0.25))
    held = set(trainer.search_loader.dataset.indices)
    rest = set(trainer.meta_loader.dataset.indices)
    assert not held & rest and len(held | rest) == 192 and len(held) == 48
    again = MetaMix(tiny_net(), *loaders(data), config(search_split=0.25))
    assert set(again.search_loader.dataset.indices) == held  # fixed by the seed
    whole = MetaMix(tiny_net(), *loaders(data), config(search_split=0.0))
    assert whole.meta_loader is None and len(whole.search_loader.dataset) == 192
    seen, meta = [], trainer.meta_loader

    class Counting:  # the search phase's bit-meta batches come from the 144 samples not held out
        def __iter__(self):
            for x, y in meta:
                seen.append(len(y))
                yield x, y

    trainer.meta_loader = Counting()
    trainer.fit()
    assert sum(seen) == 144 * trainer.cfg.search_epochs


def test_float_search_weights_quantize_from_the_weight_phase_on(data):
    from lowbit.metamix.trainer import FloatWeights
    from lowbit.nn.quantizers import LSQQuantizer

    train, test = loaders(data)
    trainer = MetaMix(tiny_net(), train, test, config(search_weights="float", fp_epochs=0))
    assert trainer.fit(stop_after=1) is None  # inside the search
    quantizers = [m.weight_quant for m in trainer.inner.modules() if hasattr(m, "weight_quant")]
    assert quantizers and all(isinstance(q, FloatWeights) for q in quantizers)
    layer = trainer.inner.get_submodule("features.1.0")
    assert torch.equal(layer.weight_quant(layer.weight), layer.weight)  # the search sees float weights
    assert trainer.cost.layers[0].w_bits == 4  # BOPs still counted at the weights' final width
    model, report = MetaMix(tiny_net(), *loaders(data), config(search_weights="float", fp_epochs=0)).fit()
    quantizers = [m.weight_quant for m in model.modules() if hasattr(m, "weight_quant")]
    assert quantizers and all(isinstance(q, LSQQuantizer) and q.initialized for q in quantizers)
    assert report.bops <= report.target_bops * (1 + 1e-9)
    w = model.get_submodule("features.1.0")
    assert not torch.equal(w.weight_quant(w.weight), w.weight)


def test_float_search_weights_resume_equals_uninterrupted(data, tmp_path):
    cfg = dict(search_weights="float", fp_epochs=0)
    ref_model, ref = MetaMix(tiny_net(), *loaders(data), config(checkpoint_dir=str(tmp_path / "a"), **cfg)).fit()
    assert MetaMix(tiny_net(), *loaders(data), config(checkpoint_dir=str(tmp_path / "b"), **cfg)).fit(2) is None
    resumed = config(checkpoint_dir=str(tmp_path / "b"), resume=True, **cfg)
    model, report = MetaMix(tiny_net(), *loaders(data), resumed).fit()
    a, b = state_of(ref_model), state_of(model)
    assert report.bits == ref.bits and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
