"""Tests over the registries (abexp.registry): every registered update rule, model and dataset
is checked here by name, so a new entry (built-in or a loaded plugin's) is tested without
touching this file; and the config keys that enter the run id are frozen. A plugin's entries
are tested by naming it: ``ABEXP_PLUGINS=mymodule pytest tests/test_registry.py``."""

import io
from dataclasses import fields

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import abexp
from abexp.config import ADDED_KEYS, ConfigError, OptimCfg, RunConfig, canonical, flatten, load_config, run_id
from abexp.registry import DATASETS, FIGURES, INPUT_KINDS, MODELS, RULES, TASKS
from abexp.sim.optim import Mitigations, mitigations

# at delay 0 and these values every rule is its reference: AB brakes even without delay
# (rho 0 switches it off) and ADL averages adl_steps gradients (1: each its own update)
NEUTRAL = {"rho": 0.0, "adl_steps": 1}
# rules that act on an unstashed pipeline's backward weights need one (abexp.config)
PIPELINE = {"kind": "pipeline", "stage_delays": [0, 0], "stashing": False}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(steps)]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def options(name: str) -> dict:
    from abexp.train.torch_optim import rule_options
    keys = rule_options(name)
    return {k: v for k, v in NEUTRAL.items() if k in keys}


def delay_for(name: str, steps: int):
    if mitigations(name).discrepancy:
        return {**PIPELINE, "stage_delays": [steps, 0]}
    return steps


def step_all(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        with opt.backward_weights():
            F.cross_entropy(model(x), y).backward()
        opt.step()


class Both:
    """Two torch optimizers over disjoint parameters, stepped as one (Muon's recipe)."""

    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for opt in self.opts:
            opt.zero_grad()

    def step(self):
        for opt in self.opts:
            opt.step()


def reference(name: str, params, lr: float):
    flags = mitigations(name)
    if flags.muon:  # abexp.DelayedOptimizer: Muon on every 2-D parameter, AdamW on the rest
        params = list(params)
        return Both(torch.optim.Muon([p for p in params if p.ndim == 2], lr=lr, weight_decay=1e-4),
                    torch.optim.AdamW([p for p in params if p.ndim != 2], lr=lr, weight_decay=1e-4))
    if flags.adam:
        cls = torch.optim.AdamW if flags.decoupled_wd else torch.optim.Adam
        return cls(params, lr=lr, weight_decay=1e-4)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("name", RULES.names())
def test_every_rule_is_its_reference_at_delay_0(name):
    """At D = 0 (neutral AB and ADL strengths) every rule is momentum SGD or Adam/AdamW,
    bitwise: a delay mitigation must not change undelayed training."""
    ours, theirs = mlp(), mlp()
    data = batches(30)
    opt = abexp.DelayedOptimizer(ours.parameters(), name, lr=0.05, delay=delay_for(name, 0),
                                 weight_decay=1e-4, **options(name))
    step_all(ours, opt, data)
    ref = reference(name, theirs.parameters(), 0.05)
    for x, y in data:
        ref.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        ref.step()
    with opt.current_weights():
        assert torch.equal(flat(ours), flat(theirs)), name


@pytest.mark.parametrize("name", RULES.names())
def test_every_rule_resumes_bitwise_under_delay(name):
    """12 steps straight equal 5, a state dict through torch.save, and 7 more, from a model
    with other weights: everything the rule keeps (its state, a plugin's too) is saved."""
    data = batches(12)

    def make(seed):
        model = mlp(seed)
        return model, abexp.DelayedOptimizer(model.parameters(), name, lr=0.05, delay=delay_for(name, 2))

    whole, opt_whole = make(0)
    step_all(whole, opt_whole, data)
    first, opt = make(0)
    step_all(first, opt, data[:5])
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    resumed, opt2 = make(5)
    opt2.load_state_dict(torch.load(saved, weights_only=True))
    step_all(resumed, opt2, data[5:])
    with opt2.current_weights(), opt_whole.current_weights():
        assert torch.isfinite(flat(whole)).all()
        assert torch.equal(flat(resumed), flat(whole)), name


@pytest.mark.parametrize("name", RULES.names())
def test_every_rule_rejects_bad_input(name):
    extra = ["delay.kind=pipeline", "delay.stage_delays=[2,0]", "delay.stashing=false"] \
        if mitigations(name).discrepancy else []
    cfg = load_config(None, [f"optim.name={name}", *extra])  # the rule itself is accepted
    assert cfg.optim.name == name
    for bad, key in (("optim.lr=-1", "optim.lr"), ("optim.momentum=1.5", "optim.momentum"),
                     ("optim.weight_decay=-0.1", "optim.weight_decay")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"optim.name={name}", *extra, bad])
        assert err.value.key == key
    with pytest.raises(ValueError, match="lr must be"):
        abexp.DelayedOptimizer(mlp().parameters(), name, lr=float("nan"), delay=delay_for(name, 0))


@pytest.mark.parametrize("name", RULES.names())
def test_every_rule_record_is_complete(name):
    """Its flags exist, its keys are optim.* keys with the config's own defaults (else the
    docs and the API would promise another default than a run uses), it has a label and a
    colour of its own."""
    record = RULES.get(name)
    assert record.flags <= {f.name for f in fields(Mitigations)}
    defaults = OptimCfg().model_dump()
    for key, default in record.keys.items():
        assert key in defaults and defaults[key] == default, (name, key)
    assert record.label and record.color.startswith("#") and len(record.color) == 7
    others = {r.color for n, r in RULES.items() if n != name}
    assert record.color not in others, f"{name} shares its colour"


def test_an_unknown_name_lists_the_registered_ones_and_how_to_load_a_plugin():
    for key in ("optim.name", "model.name", "data.name"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}=nonesuch"])
        assert err.value.key == key
        registry = {"optim.name": RULES, "model.name": MODELS, "data.name": DATASETS}[key]
        assert all(n in err.value.message for n in registry.names())
        assert "--plugin" in err.value.message and "ABEXP_PLUGINS" in err.value.message


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_for_its_inputs(name):
    """Built from its record through the run's own path (which checks its batch_norm claim);
    an image model also runs a forward pass on 16x16 images of 7 classes."""
    from abexp.train.catalog import build
    record = MODELS.get(name)
    assert record.inputs and set(record.inputs) <= set(INPUT_KINDS)
    if "image_folder" in record.inputs:
        pytest.skip(f"{name}: ImageNet-sized (tests/test_models.py builds it)")
    data = next((n for n, d in DATASETS.items() if d.input_kind in record.inputs), None)
    assert data is not None, f"no registered dataset yields what {name} takes ({record.inputs})"
    cfg = load_config(None, [f"model.name={name}", f"data.name={data}"])
    model = build(cfg, 7, (3, 16, 16), 3)
    assert isinstance(model, nn.Module)
    if "image" in record.inputs:
        assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_record_is_complete(name):
    record = DATASETS.get(name)
    assert record.input_kind in INPUT_KINDS and record.task in TASKS
    assert record.classes is None or record.classes >= 2
    assert record.chance == (1.0 / record.classes if record.task == "classification" else None)
    n = record.train_examples
    assert n is None or callable(n) or (isinstance(n, int) and n > 0)


def test_the_builtin_lists_are_the_registries():
    """What the code used to spell by hand: figures' colours and labels, the figure scripts."""
    from abexp.figures import common, make
    assert common.label("ab") == "AB" and common.color("ab") == RULES.get("ab").color
    assert common.ordered(["ab", "sgdm"]) == ["sgdm", "ab"]
    assert make.RUN_SCRIPTS == FIGURES.names() and "paired" in FIGURES
    import importlib
    for name, record in FIGURES.items():
        assert callable(importlib.import_module(record.module).main), name


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        abexp.register_rule("ab")


# ---------------------------------------------------------------- the run id

# The dotted keys of the default config that enter its run id. A key added to the schema must
# be registered in abexp.config.ADDED_KEYS with the value that reproduces the behaviour from
# before it existed; otherwise it enters every stored run's id, and every stored run would be
# identified anew and trained again. That is what this test catches.
IDENTITY_KEYS = {
    "data.augment", "data.image_size", "data.name", "data.split_seed", "data.subset", "data.synthetic_size",
    "data.test_subset", "delay.kind", "delay.mean", "delay.seed", "delay.steps", "eval.bn", "eval.recal_batches",
    "model.name", "model.zero_init_residual", "optim.ab_cosine", "optim.dc_lambda", "optim.lr",
    "optim.lwp_horizon", "optim.momentum", "optim.name", "optim.nesterov", "optim.rho", "optim.weight_decay",
    "optim.weight_decay_on", "schedule.gamma", "schedule.milestones", "schedule.name", "schedule.warmup_epochs",
    "seed", "train.batch_size", "train.channels_last", "train.compile", "train.divergence_check_every",
    "train.epochs", "train.label_smoothing", "train.micro_batches", "train.precision"}


def test_the_keys_entering_the_run_id_are_frozen():
    keys = set(flatten(canonical(RunConfig())))
    added = sorted(keys - IDENTITY_KEYS)
    assert not added, (f"{added} would enter every stored run's id: add each to abexp.config.ADDED_KEYS "
                       "with the value that reproduces the behaviour from before it existed")
    assert keys == IDENTITY_KEYS
    # and the default config's id is the one every stored run was issued with
    assert run_id(RunConfig()) == "ff9a12e36a42"


def test_every_added_key_is_a_config_key_at_its_default():
    defaults = flatten(RunConfig().model_dump())
    for key, neutral in ADDED_KEYS.items():
        assert key in defaults, f"ADDED_KEYS names {key}, which is no config key"
        assert defaults[key] == neutral, f"{key}: default {defaults[key]!r} is not its neutral {neutral!r}"
