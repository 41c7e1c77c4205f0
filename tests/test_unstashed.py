"""Pipelining without weight stashing (delay.stashing: false): the backward pass sees other
weights than the forward pass. Checked against backpropagation written out by hand for two
layers, against a second construction for a whole ResNet (per-layer hooks that recompute each
layer at the backward weights), against weight snapshots for which step each stage's backward
weights come from, and against the stashed pipeline where the two must coincide."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from abexp.cli import main
from abexp.config import ConfigError, DelayCfg, OptimCfg, load_config
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.train.backward_weights import backward_weights
from abexp.train.models import build_model
from abexp.train.start import train_run


def grads_with_backward_weights(model, flat, loss_fn, w_fwd, w_bwd):
    flat.data.copy_(w_fwd)
    flat.grad.zero_()
    with backward_weights(flat.data, w_bwd):
        loss = loss_fn(model)
    loss.backward()
    return flat.grad.clone()


def test_two_layers_match_backpropagation_written_out_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    flat = FlatParams(model)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    w_fwd = flat.data.clone()
    w_bwd = w_fwd + 0.5 * torch.randn_like(w_fwd)
    got = grads_with_backward_weights(model, flat, lambda m: F.cross_entropy(m(x), y), w_fwd, w_bwd)

    def unpack(w):  # W1 [3, 4], b1 [3], W2 [2, 3], b2 [2], in parameter order
        return w[:12].view(3, 4), w[12:15], w[15:21].view(2, 3), w[21:23]
    W1f, b1f, W2f, b2f = unpack(w_fwd)
    _, _, W2b, _ = unpack(w_bwd)
    h = x @ W1f.T + b1f  # forward: every activation at the forward weights
    a = h.clamp_min(0)
    z = a @ W2f.T + b2f
    g2 = (torch.softmax(z, 1) - F.one_hot(y, 2)) / len(y)
    delta_h = (g2 @ W2b) * (h > 0)  # the error travels back through the *backward* weights
    want = torch.cat([(delta_h.T @ x).reshape(-1), delta_h.sum(0), (g2.T @ a).reshape(-1), g2.sum(0)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # and it is not the stashed gradient: W2's inconsistency reaches W1's gradient
    stashed = grads_with_backward_weights(model, flat, lambda m: F.cross_entropy(m(x), y), w_fwd, w_fwd)
    assert not torch.allclose(stashed[:12], got[:12])
    torch.testing.assert_close(stashed[15:], got[15:], rtol=0, atol=0)  # the last layer's own gradient


def recompute_at_backward_weights(model, w_bwd, x, y):
    """Reference: every convolution, batch norm and linear layer outputs its forward value
    (computed at the forward weights) but takes its gradients from a recomputation at leaf
    copies of the backward weights: f(x, W_b) + (f(x, W_f) - f(x, W_b)).detach()."""
    params = [p for p in model.parameters()]
    leaves, offset = {}, 0
    for p in params:  # the same layout as the parameter's view of the flat buffer
        leaves[id(p)] = w_bwd.as_strided(p.shape, p.stride(), offset).clone().requires_grad_()
        offset += p.numel()

    def hook(module, inputs, out):
        (inp,) = inputs
        wb = leaves[id(module.weight)]
        bb = leaves[id(module.bias)] if module.bias is not None else None
        if isinstance(module, nn.Conv2d):
            redo = F.conv2d(inp, wb, bb, module.stride, module.padding, module.dilation, module.groups)
        elif isinstance(module, nn.Linear):
            redo = F.linear(inp, wb, bb)
        else:  # training-mode batch norm: the batch's statistics, no running-stat update
            redo = F.batch_norm(inp, None, None, wb, bb, training=True, eps=module.eps)
        return redo + (out - redo).detach()

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    grads = torch.empty_like(w_bwd)  # back into the flat buffer's layout
    offset = 0
    for p in params:
        grads.as_strided(p.shape, p.stride(), offset).copy_(leaves[id(p)].grad)
        offset += p.numel()
    return grads


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_resnet_matches_per_layer_recomputation_at_the_backward_weights(channels_last):
    torch.manual_seed(1)
    model = build_model("resnet8")
    flat = FlatParams(model, channels_last)  # channels_last: NHWC views of the flat buffer
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_fwd = flat.data.clone()
    w_bwd = w_fwd + 0.05 * torch.randn_like(w_fwd)
    got = grads_with_backward_weights(model, flat, lambda m: F.cross_entropy(m(x), y), w_fwd, w_bwd)
    flat.data.copy_(w_fwd)
    want = recompute_at_backward_weights(model, w_bwd, x, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    stashed = grads_with_backward_weights(model, flat, lambda m: F.cross_entropy(m(x), y), w_fwd, w_fwd)
    assert (stashed - got).abs().max() > 1e-3 * got.abs().max()  # the swap did something


def test_each_stage_takes_its_backward_weights_from_step_t_minus_b():
    torch.manual_seed(0)
    sizes = [3, 2, 4]
    w0 = torch.randn(sum(sizes), dtype=torch.float64)
    delay = DelayCfg(kind="pipeline", stage_delays=[4, 3, 1], stashing=False, stage_backward_delays=[2, 0, 1])
    ranges = [(0, 3), (3, 5), (5, 9)]
    engine = DelayedSGD(w0, sizes, OptimCfg(name="sgdm", lr=0.1, weight_decay=0), delay, 0, stages=ranges)
    snapshots = []
    for t in range(8):
        snapshots.append(engine.w.clone())
        seen = {}

        def grad_fn(w_fwd):
            seen["fwd"], seen["bwd"] = w_fwd.clone(), engine.w_bwd.clone()
            return torch.sin(w_fwd * (t + 1))
        engine.step(grad_fn, 0.1)
        for (a, b), d, back in zip(ranges, [4, 3, 1], [2, 0, 1]):
            assert torch.equal(seen["fwd"][a:b], snapshots[max(t - d, 0)][a:b])
            assert torch.equal(seen["bwd"][a:b], snapshots[max(t - back, 0)][a:b])


def test_unstashed_runs_equal_stashed_where_backward_and_forward_delays_agree(tmp_path, tiny_overrides):
    pipe = tiny_overrides + ["train.epochs=2", "delay.kind=pipeline", "delay.stages=3", "optim.name=ab"]
    stashed = train_run(load_config(None, pipe), tmp_path / "s", "cpu", log=lambda s: None)
    same = train_run(load_config(None, pipe + ["delay.stashing=false", "delay.stage_backward_delays=[4, 2, 0]"]),
                     tmp_path / "u", "cpu", log=lambda s: None)
    assert same["train_loss"] == stashed["train_loss"] and same["test_acc"] == stashed["test_acc"]
    a = torch.load(tmp_path / "s" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "u" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Pipelined Backpropagation proper (b_s = 0) trains differently, and resumes bitwise
    unstashed = load_config(None, pipe + ["delay.stashing=false"])
    whole = train_run(unstashed, tmp_path / "pb", "cpu", log=lambda s: None)
    assert whole["train_loss"] != stashed["train_loss"]
    assert train_run(unstashed, tmp_path / "pb2", "cpu", stop_after_epochs=1, log=lambda s: None) is None
    resumed = train_run(unstashed, tmp_path / "pb2", "cpu", log=lambda s: None)
    assert resumed["train_loss"] == whole["train_loss"] and resumed["test_acc"] == whole["test_acc"]


@pytest.mark.parametrize("overrides, message", [
    (["delay.kind=constant", "delay.stashing=false"], "delay.stashing: only for delay.kind: pipeline"),
    (["delay.kind=pipeline", "delay.stages=3", "delay.stage_backward_delays=[0, 0, 0]"],
     "delay.stage_backward_delays: needs delay.stashing: false"),
    (["delay.kind=pipeline", "delay.stages=3", "delay.stashing=false", "delay.stage_backward_delays=[0, 0]"],
     "delay.stage_backward_delays: needs 3 delays"),
    (["delay.kind=pipeline", "delay.stages=3", "delay.stashing=false", "train.precision=bf16"],
     "train.precision: delay.stashing: false needs"),
    (["delay.kind=pipeline", "delay.stages=3", 'delay.stashing="false"'], "delay.stashing"),
])
def test_bad_unstashed_options_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ---------------------------------------------------------------- PipeMare's discrepancy correction

def test_pipemare_corrects_the_backward_weights_as_recomputed_by_hand():
    """Engine vs a loop written here: rate lr * max(1, tau)^-p_k, p_k = max(0, 1 - k/K); the
    backward weights w_t[s] - gap_s * delta, gap_s = min(D_s, t) - min(b_s, t); delta the EMA
    (decay gamma) of the weight change of every step."""
    torch.manual_seed(0)
    ranges, delays, backs = [(0, 3), (3, 5), (5, 9)], [4, 2, 0], [1, 0, 0]
    w0 = torch.randn(9, dtype=torch.float64)
    optim = OptimCfg(name="pipemare", lr=0.1, momentum=0.9, weight_decay=0.01,
                     pipemare_anneal_steps=5, pipemare_gamma=0.7)
    delay = DelayCfg(kind="pipeline", stage_delays=delays, stashing=False, stage_backward_delays=backs)
    engine = DelayedSGD(w0, [3, 2, 4], optim, delay, 0, stages=ranges)

    def gradient(w_fwd, w_bwd, t):  # depends on both, as a network's gradient would
        return torch.sin(w_fwd * (t + 1)) + 0.5 * torch.cos(w_bwd)

    w, v, delta, snaps = w0.clone(), torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64), []
    for t in range(10):
        lr = 0.1 * (1 + 0.1 * t)
        snaps.append(w.clone())
        w_fwd, w_bwd = torch.empty(9, dtype=torch.float64), torch.empty(9, dtype=torch.float64)
        for (a, b), d, back in zip(ranges, delays, backs):
            w_fwd[a:b] = snaps[max(t - d, 0)][a:b]
            w_bwd[a:b] = snaps[max(t - back, 0)][a:b] - (min(d, t) - min(back, t)) * delta[a:b]
        g = gradient(w_fwd, w_bwd, t) + 0.01 * w
        v = 0.9 * v + g
        p = max(0.0, 1 - t / 5)
        new = w.clone()
        for (a, b), d in zip(ranges, delays):
            new[a:b] = w[a:b] - lr * max(1, min(d, t)) ** -p * v[a:b]
        delta = 0.7 * delta + 0.3 * (new - w)
        w = new
        engine.step(lambda wf: gradient(wf, engine.w_bwd, t), lr)
        torch.testing.assert_close(engine.w_bwd, w_bwd, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(engine.w, w, rtol=1e-12, atol=1e-14)
    assert engine.optimizer.delta.abs().max() > 0


def run_engine(name, delay, steps=12, state=None):
    torch.manual_seed(3)
    w0 = torch.randn(9, dtype=torch.float64)
    engine = DelayedSGD(w0, [3, 2, 4], OptimCfg(name=name, lr=0.05), delay, 0, stages=[(0, 3), (3, 5), (5, 9)])
    for t in range(steps):
        if state is not None and t == steps // 2:  # a resume mid-run: state through a fresh engine
            saved = engine.state_dict()
            engine = DelayedSGD(w0, [3, 2, 4], OptimCfg(name=name, lr=0.05), delay, 0,
                                stages=[(0, 3), (3, 5), (5, 9)])
            engine.load_state_dict({k: (v.clone() if torch.is_tensor(v) else
                                        {a: b.clone() if torch.is_tensor(b) else b for a, b in v.items()}
                                        if isinstance(v, dict) else v) for k, v in saved.items()})
        engine.step(lambda wf: torch.sin(3 * wf) + torch.cos(engine.w_bwd), 0.05)
    return engine.w


def test_pipemare_reduces_to_its_rescheduling_where_forward_and_backward_weights_agree():
    same = DelayCfg(kind="pipeline", stage_delays=[4, 2, 0], stashing=False, stage_backward_delays=[4, 2, 0])
    assert torch.equal(run_engine("pipemare", same), run_engine("pipemare_lr", same))
    apart = DelayCfg(kind="pipeline", stage_delays=[4, 2, 0], stashing=False)
    assert not torch.equal(run_engine("pipemare", apart), run_engine("pipemare_lr", apart))
    assert torch.equal(run_engine("pipemare", apart, state=True), run_engine("pipemare", apart))


def test_pipemare_needs_an_unstashed_pipeline():
    for overrides in (["optim.name=pipemare"], ["optim.name=pipemare", "delay.kind=pipeline", "delay.stages=2"]):
        with pytest.raises(ConfigError, match="optim.name: pipemare's discrepancy correction"):
            load_config(None, overrides)
    load_config(None, ["optim.name=pipemare", "delay.kind=pipeline", "delay.stages=2", "delay.stashing=false"])


def test_a_backward_delay_above_its_forward_delay_is_one_line_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("delay: {kind: pipeline, stages: 3, stashing: false, stage_backward_delays: [0, 3, 0]}\n"
                      "train: {epochs: 1}\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"abexp: error: {config}: delay.stage_backward_delays: each must be at most its stage's forward delay "
                   "[4, 2, 0] (a backward pass runs after its forward pass); got [0, 3, 0]"]
    assert not (tmp_path / "run").exists()
