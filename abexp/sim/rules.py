"""The built-in update rules, one record each (abexp.registry.RuleRecord): the Mitigations
flags of abexp.sim.optim it switches on, the optim.* keys it reads besides lr, momentum,
nesterov and weight decay (with their defaults; tests/test_registry.py checks them against
abexp.config.OptimCfg), its label and colour in every figure, and where its equations are.
A new rule that composes existing flags is one record here; one with a new operation also
adds its flag and its lines to abexp.sim.optim (docs/extending.md)."""

from __future__ import annotations

from abexp.registry import RULES, RuleRecord

_AB = {"rho": 1.0, "ab_cosine": "tensor"}
_LWP = {"lwp_horizon": None, "lwp_lookahead": "linear"}
_ADAM = {"betas": [0.9, 0.999], "eps": 1e-8}
_DOC = "abexp/sim/optim.py; docs/science.md §1"


def _rule(name: str, flags: tuple[str, ...], label: str, color: str, keys: dict | None = None) -> None:
    RULES.add(name, RuleRecord(frozenset(flags), dict(keys or {}), label, color, _DOC))


# order: the order of every figure's legend (SGDM first)
_rule("sgdm", (), "SGDM", "#1f77b4")
_rule("ab", ("ab",), "AB", "#d62728", _AB)
_rule("sc", ("sc",), "SC", "#2ca02c")
_rule("lwp", ("lwp",), "LWP", "#9467bd", _LWP)
_rule("dcasgd", ("dc",), "DC-ASGD", "#8c564b", {"dc_lambda": 0.04, "dc_adaptive": False})
_rule("salr", ("salr",), "staleness-aware lr", "#e377c2")
_rule("ab_lwp", ("ab", "lwp"), "AB + LWP", "#ff7f0e", {**_AB, **_LWP})
_rule("sc_lwp", ("sc", "lwp"), "SC + LWP", "#17becf", _LWP)
_rule("adam", ("adam",), "Adam", "#7f7f7f", _ADAM)
_rule("adamw", ("adam", "decoupled_wd"), "AdamW", "#bcbd22", _ADAM)
_rule("ab_adam", ("ab", "adam"), "AB-Adam", "#e7298a", {**_AB, **_ADAM})
_rule("ab_adamw", ("ab", "adam", "decoupled_wd"), "AB-AdamW", "#66a61e", {**_AB, **_ADAM})
_rule("gap_aware", ("gap_aware",), "Gap-Aware", "#a6761d", {"gap_gamma": 0.999, "gap_eps": 1e-8})
_rule("delay_adaptive", ("delay_adaptive",), "delay-adaptive lr", "#666666", {"tau_c": None})
_rule("pipemare_lr", ("pipemare_lr",), "PipeMare lr", "#1b9e77", {"pipemare_anneal_steps": 1000})
_rule("pipemare", ("pipemare_lr", "discrepancy"), "PipeMare", "#0b5e47",
      {"pipemare_anneal_steps": 1000, "pipemare_gamma": 0.9})
_rule("drop_stale", ("drop_stale",), "drop stale", "#b15928", {"drop_above": None})
_rule("adl", ("accumulate",), "ADL", "#7570b3", {"adl_steps": 4})
_rule("ab_adl", ("ab", "accumulate"), "AB + ADL", "#d95f02", {**_AB, "adl_steps": 4})
# Muon on the hidden matrices, AdamW on the rest (abexp/sim/muon.py); weight prediction along
# the last applied update and DC-ASGD for the Adam family and Muon
_MUON = {"muon_params": "hidden", "muon_momentum": 0.95, "muon_nesterov": True, "muon_ns_steps": 5,
         "muon_adjust_lr": "original", "muon_lr_scale": 1.0, **_ADAM}
_DC = {"dc_lambda": 0.04, "dc_adaptive": False}
_rule("muon", ("muon", "decoupled_wd"), "Muon", "#e6ab02", _MUON)
_rule("ab_muon", ("ab", "muon", "decoupled_wd"), "AB-Muon", "#a50f15", {**_AB, **_MUON})
_rule("lwp_adam", ("lwp", "adam"), "LWP-Adam", "#c5b0d5", {**_LWP, **_ADAM})
_rule("lwp_adamw", ("lwp", "adam", "decoupled_wd"), "LWP-AdamW", "#9edae5", {**_LWP, **_ADAM})
_rule("lwp_muon", ("lwp", "muon", "decoupled_wd"), "LWP-Muon", "#dbdb8d", {**_LWP, **_MUON})
_rule("dcasgd_adam", ("dc", "adam"), "DC-Adam", "#c49c94", {**_DC, **_ADAM})
_rule("dcasgd_adamw", ("dc", "adam", "decoupled_wd"), "DC-AdamW", "#f7b6d2", {**_DC, **_ADAM})
_rule("dcasgd_muon", ("dc", "muon", "decoupled_wd"), "DC-Muon", "#ffbb78", {**_DC, **_MUON})
