"""Rules muon and ab_muon (abexp/sim/muon.py) against independent references: torch.optim.Muon on
the hidden matrices plus torch.optim.AdamW on the rest (bitwise at D = 0, and under a constant
delay with the stale gradients fed to them by a naive loop), and a hand recomputation of where
Adaptive Braking acts."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim._muon import _zeropower_via_newtonschulz

import abexp
from abexp.config import ADDED_KEYS, ConfigError, DelayCfg, OptimCfg, load_config, run_id
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.sim.muon import muon_matrices
from abexp.train.gpt import GPT, GPTConfig, loss_nats, muon_split

CFG = GPTConfig(vocab=11, context=8, layers=2, heads=2, width=16)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG)


def windows(steps, seed=1, batch=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab, (batch, CFG.context + 1), generator=gen) for _ in range(steps)]


def loss(model, xy):
    return loss_nats(model(xy[:, :-1]), xy[:, 1:])


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def torch_pair(model, lr, wd, split="hidden", **muon):
    """The reference: torch.optim.Muon on ``split``'s matrices, torch.optim.AdamW on the rest."""
    if split == "hidden":
        hidden, other = (p for _, p in muon_split(model)[0]), (p for _, p in muon_split(model)[1])
    else:
        hidden = [p for p in model.parameters() if p.ndim == 2]
        other = [p for p in model.parameters() if p.ndim != 2]
    scale = muon.pop("lr_scale", 1.0)
    betas, eps = muon.pop("betas", (0.9, 0.999)), muon.pop("eps", 1e-8)
    return [torch.optim.Muon(list(hidden), lr=lr * scale, weight_decay=wd, **muon),
            torch.optim.AdamW(list(other), lr=lr, weight_decay=wd, betas=betas, eps=eps)]


def engine_for(model, optim: OptimCfg, delay=0, dtype=None):
    flat_params = FlatParams(model)
    w0 = flat_params.data if dtype is None else flat_params.data.to(dtype)
    engine = DelayedSGD(w0, flat_params.sizes, optim, DelayCfg(steps=delay), seed=0,
                        matrices=muon_matrices(model, optim.muon_params))
    return engine, flat_params


def train_engine(model, optim, batches, lr, delay=0):
    engine, flat_params = engine_for(model, optim, delay)
    return drive(engine, model, flat_params, batches, lr)


def drive(engine, model, flat_params, batches, lr):
    """Step ``engine`` on ``batches``, each gradient taken on ``model`` at the forward weights."""
    for xy in batches:
        def grad_fn(w_fwd):
            flat_params.data.copy_(w_fwd)
            flat_params.grad.zero_()
            loss(model, xy).backward()
            return flat_params.grad
        engine.step(grad_fn, lr)
    return engine


# ---------------------------------------------------------------- the split

def test_hidden_split_is_the_gpts_muon_split_and_all_2d_adds_the_embeddings():
    model = tiny_gpt()
    hidden = {id(p) for _, p in muon_split(model)[0]}
    params = list(model.parameters())
    got = muon_matrices(model, "hidden")
    assert [m is not None for m in got] == [id(p) in hidden for p in params]
    assert sum(m is not None for m in got) == 4 * CFG.layers
    assert all(m == tuple(p.shape) for m, p in zip(got, params) if m is not None)
    every = muon_matrices(model, "all_2d")
    assert [m is not None for m in every] == [p.ndim == 2 for p in params]
    assert sum(m is not None for m in every) == 4 * CFG.layers + 2  # + token and position embeddings
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    assert muon_matrices(mlp, "hidden") == [(5, 6), None, (7, 5), None, None, None]  # not the output layer


# ---------------------------------------------------------------- D = 0: torch.optim.Muon + AdamW

@pytest.mark.parametrize("options", [
    {},  # torch's defaults: momentum 0.95, Nesterov, 5 NS steps, original lr adjustment
    dict(muon_nesterov=False, muon_momentum=0.9, muon_ns_steps=3, muon_adjust_lr="match_rms_adamw",
         muon_lr_scale=20.0, betas=[0.8, 0.99], eps=1e-6),
])
def test_delay_0_engine_equals_torch_muon_and_adamw_bitwise(options):
    batches, lr, wd = windows(12), 0.01, 0.05
    ours, theirs = tiny_gpt(), tiny_gpt()
    engine = train_engine(ours, OptimCfg(name="muon", weight_decay=wd, **options), batches, lr)
    ref = dict(momentum=options.get("muon_momentum", 0.95), nesterov=options.get("muon_nesterov", True),
               ns_steps=options.get("muon_ns_steps", 5), adjust_lr_fn=options.get("muon_adjust_lr"),
               lr_scale=options.get("muon_lr_scale", 1.0), betas=tuple(options.get("betas", (0.9, 0.999))),
               eps=options.get("eps", 1e-8))
    opts = torch_pair(theirs, lr, wd, **ref)
    start = flat(theirs)
    for xy in batches:
        for o in opts:
            o.zero_grad()
        loss(theirs, xy).backward()
        for o in opts:
            o.step()
    assert torch.equal(engine.w, flat(theirs))
    assert not torch.equal(engine.w, start)


def test_ab_muon_with_rho_0_is_muon_bitwise():
    batches = windows(6)
    a = train_engine(tiny_gpt(), OptimCfg(name="muon", weight_decay=0.01), batches, 0.02, delay=2)
    b = train_engine(tiny_gpt(), OptimCfg(name="ab_muon", weight_decay=0.01, rho=0.0), batches, 0.02, delay=2)
    c = train_engine(tiny_gpt(), OptimCfg(name="ab_muon", weight_decay=0.01), batches, 0.02, delay=2)
    assert torch.equal(a.w, b.w)
    assert not torch.equal(a.w, c.w)  # rho = 1 brakes


# ---------------------------------------------------------------- under delay

@pytest.mark.parametrize("name,cosine,steps", [("muon", "tensor", 10), ("ab_muon", "global", 10),
                                                ("ab_muon", "tensor", 5)])
def test_constant_delay_matches_a_naive_loop_over_torch_optimizers(name, cosine, steps):
    """A naive delayed loop: explicit copies of the weights of step t - D, the gradient taken on a
    second model holding them, then (ab_muon) the gradient braked by hand with 1 - rho cos(g, B),
    B read from torch's own Muon momentum buffers and AdamW exp_avg, then torch.optim.Muon +
    AdamW. With the global cosine the hand sums are the engine's (one sum over the flat vector):
    bitwise. Per tensor the engine sums in blocks (abexp.sim.segments), so the cosines differ in
    the last bit from step 2 on, and the bfloat16 NS turns that into whole bfloat16 steps of an
    element now and then (5e-6 after 8 steps, 3e-4 after 10 here): 5 steps, to 1e-6."""
    delay, lr, wd, rho = 3, 0.02, 0.01, 1.0
    batches = windows(steps)
    cfg = OptimCfg(name=name, weight_decay=wd, rho=rho, ab_cosine=cosine)
    engine = train_engine(tiny_gpt(), cfg, batches, lr, delay)
    model, stale_model = tiny_gpt(), tiny_gpt()
    opts = torch_pair(model, lr, wd)
    params = list(model.parameters())
    history = [[p.detach().clone() for p in params]]
    for t, xy in enumerate(batches):
        with torch.no_grad():
            for p, s in zip(stale_model.parameters(), history[max(t - delay, 0)]):
                p.copy_(s)
        stale_model.zero_grad()
        loss(stale_model, xy).backward()
        grads = [s.grad.clone() for s in stale_model.parameters()]
        if name == "ab_muon":
            states = [next(o.state[p] for o in opts if any(p is q for q in o.param_groups[0]["params"]))
                      for p in params]
            moments = [st.get("momentum_buffer", st.get("exp_avg", torch.zeros_like(p)))
                       for st, p in zip(states, params)]
            pairs = ([(torch.cat([g.reshape(-1) for g in grads]), torch.cat([m.reshape(-1) for m in moments]))]
                     if cosine == "global" else list(zip(grads, moments)))
            scales = []
            for g, m in pairs:
                denom = (g * g).sum().sqrt() * (m * m).sum().sqrt()
                scales.append(1.0 - rho * ((g * m).sum() / denom if denom > 0 else torch.tensor(0.0)))
            grads = [g * scales[0 if cosine == "global" else i] for i, g in enumerate(grads)]
        for p, g in zip(params, grads):
            p.grad = g
        for o in opts:
            o.step()
        history.append([p.detach().clone() for p in params])
    if name == "muon" or cosine == "global":
        assert torch.equal(engine.w, flat(model))
    else:
        assert torch.allclose(engine.w, flat(model), rtol=0, atol=1e-6)
    if name == "ab_muon":
        plain = train_engine(tiny_gpt(), OptimCfg(name="muon", weight_decay=wd), batches, lr, delay)
        assert (plain.w - flat(model)).abs().max() > 1e-4  # the brake moved the weights much more


# ---------------------------------------------------------------- where the brake acts

def test_ab_muon_brakes_the_gradient_before_the_momentum_hand_computed():
    """Two steps of ab_muon on one 3x4 matrix and one bias, recomputed by hand. Dyadic gradients,
    momentum 0.5 and beta1 0.5 make every cosine's sums exact, so the hand values are bitwise the
    engine's. Step 2: s = 1 - rho cos(G2, B1) scales G2 before B2 = lerp(B1, s G2, 1 - mu) and the
    Nesterov mix lerp(s G2, B2, mu); only then NS. Braking the NS input instead would change
    nothing (NS normalises), which the last assertion checks too."""
    rows, cols, rho, mu, lr, wd = 3, 4, 0.7, 0.5, 0.1, 0.01
    g1 = torch.tensor([[1., -2., 0., 3.], [2., 1., -1., 0.], [0., 1., 2., -2.]], dtype=torch.float64)
    g2 = torch.tensor([[2., -1., 1., 1.], [-1., 3., 0., 2.], [1., 0., -2., 1.]], dtype=torch.float64)
    b1, b2 = torch.tensor([1., -1., 2.], dtype=torch.float64), torch.tensor([2., 1., 1.], dtype=torch.float64)
    w0 = torch.linspace(-1.0, 1.0, rows * cols + 3, dtype=torch.float64)
    cfg = OptimCfg(name="ab_muon", rho=rho, muon_momentum=mu, betas=[0.5, 0.999], weight_decay=wd)
    engine = DelayedSGD(w0, [rows * cols, 3], cfg, DelayCfg(steps=0), seed=0, matrices=[(rows, cols), None])
    grads = iter([torch.cat([g1.reshape(-1), b1]), torch.cat([g2.reshape(-1), b2])])
    engine.step(lambda w: next(grads).clone(), lr)
    engine.step(lambda w: next(grads).clone(), lr)

    def ns(u):
        return _zeropower_via_newtonschulz(u, (3.4445, -4.7750, 2.0315), 5, 1e-7)

    def cos(a, b):
        return float((a * b).sum()) / (float(a.norm()) * float(b.norm()))

    adj = max(1, rows / cols) ** 0.5
    w = w0[:12].reshape(rows, cols).clone()
    buf = torch.zeros_like(g1).lerp_(g1, 1 - mu)  # step 1: B0 = 0, so cos = 0 and no braking
    w.mul_(1 - lr * wd).add_(ns(g1.lerp(buf, mu)), alpha=-lr * adj)
    s = 1 - rho * cos(g2, buf)  # step 2: cos(G2, B1) with B1 = (1 - mu) G1
    assert s != 1.0
    braked = g2 * s
    buf.lerp_(braked, 1 - mu)
    w.mul_(1 - lr * wd).add_(ns(braked.lerp(buf, mu)), alpha=-lr * adj)
    assert torch.equal(engine.w[:12].view(rows, cols), w)
    assert torch.equal(engine.optimizer.v[:12].view(rows, cols), buf)
    # the bias: AdamW, braked by cos(b2, m1), m1 = (1 - beta1) b1
    m = torch.zeros(3, dtype=torch.float64).lerp_(b1, 0.5)
    assert torch.equal(engine.optimizer.v[12:], m.lerp(b2 * (1 - rho * cos(b2, m)), 0.5))
    # braking the NS input instead of the gradient: a no-op (up to bfloat16 rounding of the scale)
    u = g2.lerp(torch.zeros_like(g1).lerp_(g1, 1 - mu).lerp_(g2, 1 - mu), mu)
    assert torch.equal(ns(u * 0.5), ns(u))


# ---------------------------------------------------------------- state and bad input

@pytest.mark.parametrize("name", ["ab_muon", "lwp_muon"])
def test_resume_from_state_dict_is_bitwise(name):
    """Muon's momentum, AdamW's moments and step count, AB's state and the last applied update
    (weight prediction) are all in the checkpoint: an engine built afresh (other initial
    weights) and loaded after 5 steps continues exactly."""
    batches, cfg = windows(8), OptimCfg(name=name, weight_decay=0.01)
    whole = train_engine(tiny_gpt(), cfg, batches, 0.02, delay=2)
    first = train_engine(tiny_gpt(), cfg, batches[:5], 0.02, delay=2)
    state = copy.deepcopy(first.state_dict())
    model = tiny_gpt(1)
    resumed, flat_params = engine_for(model, cfg, delay=2)
    resumed.load_state_dict(state)
    drive(resumed, model, flat_params, batches[5:], 0.02)
    assert torch.equal(resumed.w, whole.w)


def test_muon_needs_shapes_and_a_matrix():
    with pytest.raises(ValueError, match="needs the parameters' shapes"):
        DelayedSGD(torch.zeros(6), [6], OptimCfg(name="muon"), DelayCfg(), seed=0)
    with pytest.raises(ValueError, match="no parameter gets Muon"):
        DelayedSGD(torch.zeros(6), [6], OptimCfg(name="muon"), DelayCfg(), seed=0, matrices=[None])
    with pytest.raises(ValueError, match="does not fill"):
        DelayedSGD(torch.zeros(6), [6], OptimCfg(name="muon"), DelayCfg(), seed=0, matrices=[(2, 2)])


def test_new_keys_leave_existing_run_ids_unchanged_and_nesterov_is_refused(tmp_path):
    for key in ("muon_params", "muon_momentum", "muon_nesterov", "muon_ns_steps", "muon_adjust_lr",
                "muon_lr_scale"):
        assert ADDED_KEYS[f"optim.{key}"] == OptimCfg.model_fields[key].default
    cfg = load_config(None)
    data = cfg.model_dump()
    for key in list(data["optim"]):
        if key.startswith("muon_"):
            del data["optim"][key]
    assert run_id(cfg) == run_id(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {name: muon, nesterov: true}\n")
    with pytest.raises(ConfigError, match="bad.yaml: optim.nesterov: not read by muon"):
        load_config(str(bad))
    bad.write_text("optim: {name: lwp_muon, lwp_lookahead: momentum}\n")
    with pytest.raises(ConfigError, match="bad.yaml: optim.lwp_lookahead: lwp_muon predicts along"):
        load_config(str(bad))


# ---------------------------------------------------------------- abexp.DelayedOptimizer

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))


def mlp_data(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen))
            for _ in range(steps)]


@pytest.mark.parametrize("name", ["muon", "ab_muon"])
def test_delayed_optimizer_equals_torch_muon_plus_adamw_for_the_rest_at_delay_0(name):
    """abexp.DelayedOptimizer(name="muon") at D = 0: torch.optim.Muon on every 2-D parameter and
    torch.optim.AdamW on the biases, bitwise after 60 steps, with an lr changed midway in both.
    ab_muon with rho = 0 is the same."""
    batches, lr, wd = mlp_data(60), 0.02, 0.1
    ours, theirs = mlp(), mlp()
    extra = {"rho": 0.0} if name == "ab_muon" else {}
    opt = abexp.DelayedOptimizer(ours.parameters(), name, lr=lr, delay=0, weight_decay=wd, **extra)
    refs = [torch.optim.Muon([p for p in theirs.parameters() if p.ndim == 2], lr=lr, weight_decay=wd),
            torch.optim.AdamW([p for p in theirs.parameters() if p.ndim != 2], lr=lr, weight_decay=wd)]
    for t, (x, y) in enumerate(batches):
        if t == 30:
            for o in [opt] + refs:
                for g in o.param_groups:
                    g["lr"] = lr / 4
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.step()
        for o in refs:
            o.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        for o in refs:
            o.step()
    with opt.current_weights():
        assert torch.equal(flat(ours), flat(theirs))
    assert not torch.equal(flat(theirs), flat(mlp()))


def test_delayed_optimizer_usual_recipe_on_the_gpt_through_a_muon_false_group():
    """The usual recipe in a user's loop: the GPT's hidden matrices in one group, the rest (with
    the 2-D embeddings) in a group with 'muon': False — torch.optim.Muon + AdamW bitwise."""
    batches, lr, wd = windows(10), 0.01, 0.05
    ours, theirs = tiny_gpt(), tiny_gpt()
    hidden, other = ([p for _, p in part] for part in muon_split(ours))
    opt = abexp.DelayedOptimizer([{"params": hidden}, {"params": other, "muon": False}], "muon",
                                 lr=lr, weight_decay=wd)
    refs = torch_pair(theirs, lr, wd)
    for xy in batches:
        opt.zero_grad()
        loss(ours, xy).backward()
        opt.step()
        for o in refs:
            o.zero_grad()
        loss(theirs, xy).backward()
        for o in refs:
            o.step()
    with opt.current_weights():
        assert torch.equal(flat(ours), flat(theirs))
    assert not torch.equal(flat(theirs), flat(tiny_gpt()))


def test_delayed_optimizer_muon_bad_input():
    params = list(mlp().parameters())
    with pytest.raises(ValueError, match="muon_params needs the model"):
        abexp.DelayedOptimizer(params, "muon", lr=0.1, muon_params="all_2d")
    with pytest.raises(ValueError, match="'muon' is read only by rules muon, ab_muon"):
        abexp.DelayedOptimizer([{"params": params, "muon": False}], "adamw", lr=0.1)
    with pytest.raises(ValueError, match="no 2-D parameter"):
        abexp.DelayedOptimizer([{"params": params, "muon": False}], "muon", lr=0.1)
    with pytest.raises(ValueError, match="'momentum' is not read by rule 'muon'"):
        abexp.DelayedOptimizer(params, "muon", lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="optim.muon_momentum"):
        abexp.DelayedOptimizer(params, "muon", lr=0.1, muon_momentum=1.0)


def test_a_model_without_a_muon_matrix_is_one_line_before_the_run(tmp_path):
    """preflight: muon on a ResNet under hidden (convolutions are 4-D, fc the output layer) is a
    ConfigError naming optim.muon_params; all_2d gives Muon the fc and passes."""
    from abexp.lab.preflight import check_muon
    spec = tmp_path / "run.yaml"
    spec.write_text("model: {name: resnet8}\noptim: {name: muon}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: optim.muon_params: hidden: resnet8 has no"):
        check_muon([load_config(str(spec))], str(spec))
    spec.write_text("model: {name: resnet8}\noptim: {name: ab_muon, muon_params: all_2d}\n")
    check_muon([load_config(str(spec))], str(spec))


# ---------------------------------------------------------------- weight prediction and DC-ASGD

@pytest.mark.parametrize("name", ["lwp_adamw", "lwp_muon"])
def test_weight_prediction_predicts_along_the_last_applied_update(name):
    """lwp_adamw, lwp_muon: the stored forward weights of step t are w_t - H (w_{t-1} - w_t), the
    last applied update extrapolated H = D steps (0 before the first update), and the gradient
    of step t is taken at those of step t - D. Recomputed from the engine's own weight trajectory."""
    delay, lr = 2, 0.02
    batches = windows(7)
    model = tiny_gpt()
    optim = OptimCfg(name=name, weight_decay=0.01)
    engine, flat_params = engine_for(model, optim, delay)
    seen, trajectory = [], [engine.w.clone()]
    for xy in batches:
        def grad_fn(w_fwd, xy=xy):
            seen.append(w_fwd.clone())
            flat_params.data.copy_(w_fwd)
            flat_params.grad.zero_()
            loss(model, xy).backward()
            return flat_params.grad
        engine.step(grad_fn, lr)
        trajectory.append(engine.w.clone())
    predicted = [trajectory[0]] + [torch.add(w, prev - w, alpha=-float(delay))
                                   for prev, w in zip(trajectory, trajectory[1:])]
    for t, w_fwd in enumerate(seen):
        assert torch.equal(w_fwd, predicted[max(t - delay, 0)]), t
    assert not torch.equal(predicted[3], trajectory[3])
    plain = train_engine(tiny_gpt(), OptimCfg(name=name.replace("lwp_", ""), weight_decay=0.01), batches,
                         lr, delay=0)
    assert torch.equal(train_engine(tiny_gpt(), optim, batches, lr, delay=0).w, plain.w)  # D = 0: no prediction


@pytest.mark.parametrize("name", ["dcasgd_muon", "dcasgd_adamw"])
def test_dcasgd_matches_torch_optimizers_fed_the_corrected_gradient(name):
    """dcasgd_muon, dcasgd_adamw: g + lambda g*g*(w - w_fwd) (the weights now minus those the
    gradient was taken at) enters Muon + AdamW / AdamW; a naive loop computing it per tensor and
    feeding torch.optim.Muon + AdamW (or AdamW alone) agrees bitwise under D = 3."""
    delay, lr, wd, lam = 3, 0.02, 0.01, 2.0
    batches = windows(8)
    engine = train_engine(tiny_gpt(), OptimCfg(name=name, weight_decay=wd, dc_lambda=lam), batches, lr, delay)
    model, stale_model = tiny_gpt(), tiny_gpt()
    opts = (torch_pair(model, lr, wd) if name == "dcasgd_muon" else
            [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)])
    history = [[p.detach().clone() for p in model.parameters()]]
    for t, xy in enumerate(batches):
        stale = history[max(t - delay, 0)]
        with torch.no_grad():
            for p, s in zip(stale_model.parameters(), stale):
                p.copy_(s)
        stale_model.zero_grad()
        loss(stale_model, xy).backward()
        for p, s, old in zip(model.parameters(), stale_model.parameters(), stale):
            g = s.grad.clone()
            if t > 0:  # the engine corrects only a stale gradient
                g.add_((g * g).mul_(p.detach() - old).mul_(lam))
            p.grad = g
        for o in opts:
            o.step()
        history.append([p.detach().clone() for p in model.parameters()])
    assert torch.equal(engine.w, flat(model))
    plain = train_engine(tiny_gpt(), OptimCfg(name=name.replace("dcasgd_", ""), weight_decay=wd),
                         batches, lr, delay)
    assert (plain.w - engine.w).abs().max() > 1e-6
